"""Writing checkpoints in the published layouts: exact round trips, and the shipped demo backbone."""

import os

import numpy as np
import pytest
from flax import traverse_util

import vpt_jax
import vpt_jax.weights.zoo
from conftest import data_path, jit_apply, load_io, load_raw
from vpt_jax.weights import npz


def flat(variables):
  return {"/".join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(variables["params"]).items()}


@pytest.mark.parametrize("ckpt,layout", [("vitjax_token.npz", "vit_jax"),
                                         ("vitjax_token.npz", "big_vision"),
                                         ("bigvision_gap.npz", "big_vision")])
def test_round_trip_is_exact(tmp_path, ckpt, layout):
  model, variables = vpt_jax.load_pretrained(data_path(ckpt))
  path = str(tmp_path / "out.npz")
  npz.save_npz(variables["params"], path, layout=layout)
  model2, variables2 = vpt_jax.load_pretrained(path)
  a, b = flat(variables), flat(variables2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  images = load_io("vitjax_token.io.npz")["images"]
  np.testing.assert_array_equal(jit_apply(model, variables, images),
                                jit_apply(model2, variables2, images))
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_vit_jax_layout_reproduces_the_published_file(tmp_path):
  _, variables = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))
  path = str(tmp_path / "out.npz")
  npz.save_npz(variables["params"], path, layout="vit_jax")
  ours, original = load_raw_path(path), load_raw("vitjax_token.npz")
  assert ours.keys() == original.keys()
  for k in ours:
    np.testing.assert_array_equal(ours[k], original[k], err_msg=k)


def load_raw_path(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_vit_jax_layout_needs_a_class_token_row(tmp_path):
  _, variables = vpt_jax.load_pretrained(data_path("bigvision_gap.npz"))
  with pytest.raises(ValueError, match="class-token row"):
    npz.save_npz(variables["params"], str(tmp_path / "x.npz"), layout="vit_jax")
  with pytest.raises(ValueError, match="layout='vitjax'"):
    npz.save_npz(variables["params"], str(tmp_path / "x.npz"), layout="vitjax")


def test_shipped_demo_backbone():
  """The demo backbone is a vit_jax-layout file of the architecture its script trains."""
  from vpt_jax.data import shapes
  arch = vpt_jax.inspect("demo-vit")
  assert (arch.patch_size, arch.width, arch.depth, arch.num_heads, arch.mlp_dim) == (
      (4, 4), 64, 4, 4, 192)
  assert arch.image_size == (32, 32) and arch.num_classes == len(shapes.SHAPE_CLASSES)
  assert arch.pool_type == "token" and arch.posemb_cls_row
  with np.load(vpt_jax.zoo.url_for("demo-vit")) as f:
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in f.files


def test_pretraining_script_is_reproducible(tmp_path):
  """Two runs of tools/pretrain_demo_backbone.py (tiny settings) write byte-identical files.

  Two epochs of one step each: every source of randomness the script has (init, the per-epoch
  generated images and their order, the held-out set) is drawn, and the second epoch's differ
  from the first's; more steps would only repeat the same code.
  """
  import subprocess
  import sys
  from conftest import ROOT
  outs = []
  for i in range(2):
    out = str(tmp_path / f"run{i}.npz")
    r = subprocess.run([sys.executable, "tools/pretrain_demo_backbone.py", f"--out={out}",
                        "--epochs=2", "--per_epoch=128", "--held_out=50"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "held-out accuracy" in r.stdout
    with open(out, "rb") as f:
      outs.append(f.read())
  assert outs[0] == outs[1]
  arch = vpt_jax.inspect(str(tmp_path / "run0.npz"))
  assert arch.width == 64 and arch.depth == 4
