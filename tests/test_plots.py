"""Pictures of a tuned run: each command writes a real PNG; attention weights are right."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vpt_jax
from configs import demo
from conftest import ROOT, jit_apply
import forked_cli
from vpt_jax import prompts
from vpt_jax.analysis import plots
from vpt_jax.tuning import loop

FAST = "model.checkpoint=tiny-random,optim.epochs=1,optim.warmup_epochs=0,eval_every_epochs=1," \
       "batch_size=50,log_every_steps=1,prompt.length=4,data.train_split=train800[:200]"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("run") / "vpt-deep")
  loop.train_and_evaluate(demo.get_config(f"vpt-deep,{FAST}"), wd)
  return wd


def check_png(path, min_size=(300, 200)):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
    assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_tsne_and_attention_write_pngs(workdir, tmp_path):
  check_png(plots.tsne_figure(workdir, str(tmp_path / "tsne.png"), num_examples=120))
  check_png(plots.attention_figure(workdir, str(tmp_path / "att.png"), num_images=2))


def test_curves_command_writes_a_png(workdir, tmp_path):
  out = str(tmp_path / "curves.png")
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = forked_cli.run([sys.executable, "-m", "vpt_jax.plots", "curves", f"--workdir={workdir}",
                      f"--out={out}"], cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip().endswith("curves.png")
  check_png(out)
  # An unknown picture is refused with the usage line before any flag is read (in-process: a
  # second interpreter would only repeat the imports).
  from absl import app  # pylint: disable=g-import-not-at-top
  from vpt_jax import plots as command  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match=r"tsne\|curves\|attention"):
    command.main(["vpt_jax.plots", "pie"])


def numpy_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


FAST_PATH = [False, True] if "fast_path" in vpt_jax.VisionTransformer.__dataclass_fields__ else [None]


@pytest.mark.parametrize("fast_path", FAST_PATH)
@pytest.mark.parametrize("layer", [0, -1])
@pytest.mark.parametrize("kv_length", [0, 2])
def test_class_token_attention_matches_numpy(layer, kv_length, fast_path):
  base, variables = vpt_jax.load_pretrained("tiny-random")
  if fast_path is not None:
    base = base.clone(fast_path=fast_path)
  cfg = prompts.default_config()
  cfg.length, cfg.deep, cfg.kv_length = 3, True, kv_length
  model = prompts.attach(base, cfg)
  variables = {**variables, "prompts": prompts.init_prompts(model, jax.random.PRNGKey(0))}
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  got = plots.class_token_attention(model, variables, images, layer)

  # Independent: the layer's LayerNorm_0 outputs, captured by flax, projected in numpy by the
  # checkpoint's query/key kernels; numpy softmax.
  _, state = jit_apply(model, variables, images, capture_intermediates=True,
                       mutable=["intermediates"])
  block = f"encoderblock_{layer % model.depth}"
  normed = [np.asarray(c, np.float64)
            for c in state["intermediates"]["Transformer"][block]["LayerNorm_0"]["__call__"]]
  att = variables["params"]["Transformer"][block]["MultiHeadDotProductAttention_0"]
  proj = lambda x, name: (np.einsum("btd,dhk->bthk", x, np.asarray(att[name]["kernel"],
                                                                     np.float64))
                          + np.asarray(att[name]["bias"], np.float64))
  q = proj(normed[0], "query")[:, 0]                                      # (B, heads, hd)
  calls = [proj(x, "key") for x in normed]
  seq = calls[0]                                                          # (B, T, heads, hd)
  # Prompts that enter as keys/values only (a fast path) come second; show them after the class.
  kv_only = [np.broadcast_to(c, (2,) + c.shape[1:]) for c in calls[1:]]
  k = np.concatenate([seq[:, :1], *kv_only, seq[:, 1:]], axis=1)
  if kv_length:
    kv = np.asarray(variables["prompts"]["hooks"]["kv"][layer % model.depth], np.float64)
    kv = kv.transpose(1, 0, 2)                                           # (n, heads, hd)
    k = np.concatenate([k, np.broadcast_to(kv, (2,) + kv.shape)], axis=1)
  want = numpy_softmax(np.einsum("bhd,bthd->bht", q, k) / np.sqrt(q.shape[-1]))
  assert got.shape == (2, model.num_heads, 1 + 3 + 64 + kv_length)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert plots.token_layout(model, got.shape[-1]) == (1, 3, kv_length)
