"""Loading the original checkpoints: golden outputs, exact parameters, layouts, and bad files."""

import functools
import http.server
import json
import os
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage
from flax import traverse_util

import numpy_vit
import vpt_jax
from conftest import ATOL, RTOL, data_path, jit_apply, load_io, load_raw
from vpt_jax.weights import download, npz
from vpt_jax.weights.download import CheckpointError

VITJAX = data_path("vitjax_token.npz")
BIGVISION = data_path("bigvision_gap.npz")
BVCONVERTED = data_path("vitjax_token.bvconverted.npz")

# Golden fixtures: checkpoint -> the .io.npz whose outputs the original code computed from it.
GOLDEN = {
    "vitjax_token.npz": "vitjax_token.io.npz",
    "bigvision_gap.npz": "bigvision_gap.io.npz",
    "vitjax_token.bvconverted.npz": "vitjax_token.io.npz",
}


@functools.lru_cache(maxsize=None)
def _jitted(model):
  return jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))


def run(model, variables, images):
  """(logits, intermediates as numpy arrays) with one compile per distinct model.

  The straightforward path, whose intermediates are full size (the fast path's last block and
  `encoded` hold the class-token row only); tests compare the fast path's logits separately.
  """
  logits, state = _jitted(model.clone(fast_path=False))(variables, images)
  inter = traverse_util.flatten_dict(state["intermediates"], sep="/")
  return np.asarray(logits), {k.split("/")[-1]: np.asarray(v[0]) for k, v in inter.items()}


def close(actual, expected):
  np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)


def flat_params(variables):
  return {"/".join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(variables["params"]).items()}


# --------------------------------------------------------------------------------------------
# Golden outputs of the original code.


@pytest.mark.parametrize("ckpt", sorted(GOLDEN))
def test_golden_outputs_32px(ckpt):
  io = load_io(GOLDEN[ckpt])
  model, variables = vpt_jax.load_pretrained(data_path(ckpt))
  logits, inter = run(model, variables, io["images"])
  close(logits, io["logits"])
  close(np.asarray(jax.jit(model.apply)(variables, io["images"])), io["logits"])  # fast path
  close(inter["head_input"], io["pre_logits"])
  close(inter["stem"], io["stem"])
  close(inter["encoded"], io["encoded"])
  for i in range(2):
    close(inter[f"block_{i}"], io["block_outputs"][i])
  if "pooled" in io:
    close(inter["pooled"], io["pooled"])


@pytest.mark.parametrize("ckpt,io_name", [
    ("vitjax_token.npz", "vitjax_token.resample48.io.npz"),
    ("bigvision_gap.npz", "bigvision_gap.resample48.io.npz"),
])
def test_golden_resample_48px(ckpt, io_name):
  io = load_io(io_name)
  model, variables = vpt_jax.load_pretrained(data_path(ckpt), image_size=48)
  assert model.image_size == (48, 48)
  close(np.asarray(variables["params"]["pos_embedding"]), io["pos_embedding_resampled"])
  logits, inter = run(model, variables, io["images"])
  close(logits, io["logits"])
  close(inter["head_input"], io["pre_logits"])
  close(inter["encoded"], io["encoded"])


# --------------------------------------------------------------------------------------------
# Parameters equal the stored arrays bit for bit.

# The vit_jax -> linen renaming, written out by hand (independent of the loader's code).
_VITJAX_NAMES = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                 "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0",
                 "Transformer/posembed_input/pos_embedding": "pos_embedding"}


def _linen_name(key):
  for old, new in _VITJAX_NAMES.items():
    key = key.replace(old, new)
  return key


@pytest.mark.parametrize("ckpt", sorted(GOLDEN))
def test_parameters_equal_stored_arrays(ckpt):
  raw = load_raw(ckpt)
  _, variables = vpt_jax.load_pretrained(data_path(ckpt))
  params = flat_params(variables)
  assert len(params) == len(raw)
  for key, stored in raw.items():
    loaded = params[_linen_name(key)]
    assert loaded.dtype == np.float32, key
    np.testing.assert_array_equal(loaded, stored, err_msg=key)


# --------------------------------------------------------------------------------------------
# Architecture inference.


@pytest.mark.parametrize("name,ckpt", [
    ("vitjax_token", "vitjax_token.npz"),
    ("bigvision_gap", "bigvision_gap.npz"),
    ("vitjax_token_bvconverted", "vitjax_token.bvconverted.npz"),
])
def test_architecture_inferred_from_every_fixture(name, ckpt):
  with open(data_path("manifest.json")) as f:
    cfg = json.load(f)["fixtures"][name]["model_config"]
  arch = vpt_jax.inspect(data_path(ckpt))
  assert arch.patch_size == tuple(cfg["patch_size"])
  assert arch.image_size == tuple(cfg["image_size"])
  assert arch.in_channels == cfg["in_channels"]
  assert arch.width == cfg["hidden_size"]
  assert arch.depth == cfg["num_layers"]
  assert arch.num_heads == cfg["num_heads"]
  assert arch.mlp_dim == cfg["mlp_dim"]
  assert arch.num_classes == cfg["num_classes"]
  pool = cfg.get("classifier", cfg.get("pool_type"))
  assert arch.pool_type == {"tok": "token"}.get(pool, pool)
  assert arch.representation_size == (cfg.get("representation_size") or cfg.get("rep_size") or None)
  assert arch.posemb_cls_row == (cfg["pos_embedding_rows"] == cfg["num_patches"] + 1)


# --------------------------------------------------------------------------------------------
# The other big_vision layouts, built from the fixture files by re-arranging their keys.


def _bv_logits(path, **kw):
  io = load_io("bigvision_gap.io.npz")
  model, variables = vpt_jax.load_pretrained(path, **kw)
  return run(model, variables, io["images"])[0], io["logits"]


@pytest.mark.parametrize("prefix", ["params/", "opt/target/"])
def test_prefixed_training_state(prefix, write_npz):
  raw = load_raw("bigvision_gap.npz")
  path = write_npz({prefix + k: v for k, v in raw.items()} | {"opt/state/step": np.int32(3)}
                   if prefix == "params/" else {prefix + k: v for k, v in raw.items()})
  close(*_bv_logits(path))


def test_siglip_style_image_tower_subtree(write_npz):
  raw = load_raw("bigvision_gap.npz")
  towers = {f"params/img/{k}": v for k, v in raw.items()}
  towers |= {f"params/txt/{k}": v for k, v in raw.items()}
  towers |= {"params/t": np.float32(10.0), "params/b": np.float32(-10.0)}
  path = write_npz(towers)
  close(*_bv_logits(path + ":img"))
  with pytest.raises(CheckpointError, match=r"several models.*:img"):
    vpt_jax.load_pretrained(path)
  with pytest.raises(CheckpointError, match=r"no sub-tree 'image'.*available: b, img, t, txt"):
    vpt_jax.load_pretrained(path + ":image")


def test_scan_stacked_layers(write_npz):
  raw = load_raw("bigvision_gap.npz")
  scanned = {k: v for k, v in raw.items() if "encoderblock_" not in k}
  for k in raw:
    if k.startswith("Transformer/encoderblock_0/"):
      leaf = k[len("Transformer/encoderblock_0/"):]
      scanned[f"Transformer/encoderblock/{leaf}"] = np.stack(
          [raw[f"Transformer/encoderblock_{i}/{leaf}"] for i in range(2)])
  path = write_npz(scanned)
  assert vpt_jax.inspect(path).depth == 2
  close(*_bv_logits(path))
  bad = dict(scanned)
  bad["Transformer/encoderblock/LayerNorm_1/scale"] = bad[
      "Transformer/encoderblock/LayerNorm_1/scale"][:1]
  with pytest.raises(CheckpointError, match=r"encoderblock/LayerNorm_1/scale.*1 layers"):
    vpt_jax.load_pretrained(write_npz(bad, "bad.npz"))


def test_bfloat16_file_widens_exactly(write_npz):
  raw = load_raw("bigvision_gap.npz")
  as_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in raw.items()}
  path = write_npz(as_bf16)
  _, variables = vpt_jax.load_pretrained(path)
  params = flat_params(variables)
  for k, v in as_bf16.items():
    np.testing.assert_array_equal(params[k], v.astype(np.float32), err_msg=k)


def test_old_pos_embedding_location(write_npz):
  raw = load_raw("vitjax_token.npz")
  raw["Transformer/pos_embedding"] = raw.pop("Transformer/posembed_input/pos_embedding")
  io = load_io("vitjax_token.io.npz")
  model, variables = vpt_jax.load_pretrained(write_npz(raw))
  close(run(model, variables, io["images"])[0], io["logits"])


def _rng_like(rng, shape, std):
  return (rng.standard_normal(shape) * std).astype(np.float32)


def _map_head(rng, d=64, heads=2, mlp=96):
  hd = d // heads
  p = {"MAPHead_0/probe": _rng_like(rng, (1, 1, d), 0.5)}
  for n in ("query", "key", "value"):
    p[f"MAPHead_0/MultiHeadDotProductAttention_0/{n}/kernel"] = _rng_like(rng, (d, heads, hd), .1)
    p[f"MAPHead_0/MultiHeadDotProductAttention_0/{n}/bias"] = _rng_like(rng, (heads, hd), .1)
  p["MAPHead_0/MultiHeadDotProductAttention_0/out/kernel"] = _rng_like(rng, (heads, hd, d), .1)
  p["MAPHead_0/MultiHeadDotProductAttention_0/out/bias"] = _rng_like(rng, (d,), .1)
  p["MAPHead_0/LayerNorm_0/scale"] = 1 + _rng_like(rng, (d,), .1)
  p["MAPHead_0/LayerNorm_0/bias"] = _rng_like(rng, (d,), .1)
  p["MAPHead_0/MlpBlock_0/Dense_0/kernel"] = _rng_like(rng, (d, mlp), .1)
  p["MAPHead_0/MlpBlock_0/Dense_0/bias"] = _rng_like(rng, (mlp,), .1)
  p["MAPHead_0/MlpBlock_0/Dense_1/kernel"] = _rng_like(rng, (mlp, d), .1)
  p["MAPHead_0/MlpBlock_0/Dense_1/bias"] = _rng_like(rng, (d,), .1)
  return p


def test_map_head_and_pre_logits_match_numpy_reference(write_npz):
  """SigLIP-like: MAP pooling (here with its own head count and MLP width) + tanh pre_logits."""
  rng = np.random.default_rng(0)
  raw = load_raw("bigvision_gap.npz") | _map_head(rng)
  raw["pre_logits/kernel"] = _rng_like(rng, (64, 48), 0.2)
  raw["pre_logits/bias"] = _rng_like(rng, (48,), 0.1)
  raw["head/kernel"] = _rng_like(rng, (48, 10), 0.2)
  path = write_npz({f"params/img/{k}": v for k, v in raw.items()})
  arch = vpt_jax.inspect(path + ":img")
  assert (arch.pool_type, arch.map_num_heads, arch.map_mlp_dim) == ("map", 2, 96)
  assert arch.representation_size == 48 and arch.num_classes == 10
  io = load_io("bigvision_gap.io.npz")
  model, variables = vpt_jax.load_pretrained(path + ":img")
  expected = numpy_vit.forward(raw, io["images"], patch=4, depth=2, pool="map", cls_row=False)
  close(run(model, variables, io["images"])[0], expected)


def test_inline_map_head_of_older_files(write_npz):
  rng = np.random.default_rng(1)
  head = _map_head(rng)
  raw = load_raw("bigvision_gap.npz")
  inline = raw | {k[len("MAPHead_0/"):]: v for k, v in head.items()}
  nested = raw | head
  io = load_io("bigvision_gap.io.npz")
  outs = []
  for p in (write_npz(inline, "inline.npz"), write_npz(nested, "nested.npz")):
    model, variables = vpt_jax.load_pretrained(p)
    outs.append(run(model, variables, io["images"])[0])
  np.testing.assert_array_equal(outs[0], outs[1])


def test_resampling_matches_scipy_zoom_on_other_grids():
  rng = np.random.default_rng(0)
  for old, new in [((8, 8), (12, 12)), ((8, 8), (5, 5)), ((14, 14), (24, 24)), ((8, 8), (8, 12))]:
    posemb = rng.standard_normal((1, 1 + old[0] * old[1], 16)).astype(np.float32)
    ours = npz.resample_posemb(posemb, old, new, cls_row=True)
    grid = posemb[0, 1:].reshape(*old, 16)
    ref = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    np.testing.assert_array_equal(ours[:, 0], posemb[:, 0])
    np.testing.assert_allclose(ours[0, 1:].reshape(ref.shape), ref, atol=1e-6)


def test_non_square_image_size():
  model, variables = vpt_jax.load_pretrained(BIGVISION, image_size=(32, 48))
  assert variables["params"]["pos_embedding"].shape == (1, 8 * 12, 64)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  expected = numpy_vit.forward(flat_params(variables), images, patch=4, depth=2, pool="gap",
                               cls_row=False)
  close(run(model, variables, images)[0], expected)


# --------------------------------------------------------------------------------------------
# The transfer case: a fresh head, pre_logits dropped on request.


def test_num_classes_replaces_the_head_only():
  _, original = vpt_jax.load_pretrained(VITJAX)
  model, variables = vpt_jax.load_pretrained(VITJAX, num_classes=7)
  assert model.num_classes == 7
  new, old = flat_params(variables), flat_params(original)
  assert new["head/kernel"].shape == (64, 7) and not new["head/kernel"].any()
  assert new["head/bias"].shape == (7,) and not new["head/bias"].any()
  for k in old:
    if not k.startswith("head/"):
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)
  logits = jit_apply(model, variables, load_io("vitjax_token.io.npz")["images"])
  assert logits.shape == (4, 7)


def test_pre_logits_kept_or_dropped(write_npz):
  rng = np.random.default_rng(2)
  raw = load_raw("vitjax_token.npz")
  raw["pre_logits/kernel"] = _rng_like(rng, (64, 32), 0.2)
  raw["pre_logits/bias"] = _rng_like(rng, (32,), 0.1)
  raw["head/kernel"] = _rng_like(rng, (32, 10), 0.2)
  path = write_npz(raw)
  io = load_io("vitjax_token.io.npz")

  model, variables = vpt_jax.load_pretrained(path)
  assert model.representation_size == 32
  canon = {_linen_name(k): v for k, v in raw.items()}
  expected = numpy_vit.forward(canon, io["images"], patch=4, depth=2, pool="token", cls_row=True)
  close(run(model, variables, io["images"])[0], expected)

  kept, kept_vars = vpt_jax.load_pretrained(path, num_classes=5)
  assert kept.representation_size == 32 and kept_vars["params"]["head"]["kernel"].shape == (32, 5)

  dropped, dropped_vars = vpt_jax.load_pretrained(path, num_classes=5, drop_pre_logits=True)
  assert dropped.representation_size is None and "pre_logits" not in dropped_vars["params"]
  assert dropped_vars["params"]["head"]["kernel"].shape == (64, 5)
  with pytest.raises(ValueError, match="drop_pre_logits.*num_classes"):
    vpt_jax.load_pretrained(path, drop_pre_logits=True)


def test_bf16_compute_stays_close_to_float32():
  io = load_io("vitjax_token.io.npz")
  model, variables = vpt_jax.load_pretrained(VITJAX, dtype=jnp.bfloat16)
  logits, _ = run(model, variables, io["images"])
  assert logits.dtype == np.float32
  assert variables["params"]["embedding"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(logits, io["logits"], atol=0.05 * np.abs(io["logits"]).max())
  assert np.abs(logits - io["logits"]).max() > 0  # really computed in bf16


# --------------------------------------------------------------------------------------------
# Where the file comes from.


def test_split_subtree():
  assert download.split_subtree("a/b.npz:img") == ("a/b.npz", "img")
  assert download.split_subtree("gs://b/x.npz:params/img") == ("gs://b/x.npz", "params/img")
  assert download.split_subtree("gs://b/x.npz") == ("gs://b/x.npz", None)
  assert download.split_subtree("https://h/x.npz") == ("https://h/x.npz", None)
  assert download.split_subtree("x.npz") == ("x.npz", None)


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def test_https_style_download_into_cache(tmp_path):
  """A URL is fetched once into the cache (served here from loopback), then read from there."""
  handler = functools.partial(_Quiet, directory=os.path.dirname(VITJAX))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{server.server_port}/vitjax_token.npz"
  try:
    model, variables = vpt_jax.load_pretrained(url, cache_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"missing\.npz: download failed.*404"):
      vpt_jax.load_pretrained(url.replace("vitjax_token", "missing"), cache_dir=str(tmp_path))
  finally:
    server.shutdown()
  cached = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
  assert len(cached) == 1 and not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
  with open(VITJAX, "rb") as a, open(tmp_path / cached[0], "rb") as b:
    assert a.read() == b.read()
  io = load_io("vitjax_token.io.npz")
  close(run(model, variables, io["images"])[0], io["logits"])
  # The server is gone: the second load must come from the cache.
  _, again = vpt_jax.load_pretrained(url, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(flat_params(again)["cls"], flat_params(variables)["cls"])


def test_zoo_names_resolve_to_published_files():
  from vpt_jax.weights import zoo
  assert zoo.url_for("vit-b16-i21k") == "gs://vit_models/imagenet21k/ViT-B_16.npz"
  for name in zoo.names():
    path, sub = download.split_subtree(zoo.url_for(name))
    if name in ("tiny-random", "demo-vit"):
      assert os.path.exists(path) and vpt_jax.inspect(name).width == 64
      continue
    entry = zoo.ZOO[name]
    if entry.family != "vit":   # the PyTorch backbones: https, .pth files, no sub-tree
      assert path.startswith("https://") and ".pth" in path and sub is None, name
      hashes = entry.sha256_prefix + entry.md5_prefix + (entry.sha256 or "")
      assert all(c in "0123456789abcdef" for c in hashes), name
      assert entry.sha256 is None or len(entry.sha256) == 64, name
      # A full sha256 and its publisher's prefix never disagree.
      assert (entry.sha256 or entry.sha256_prefix).startswith(entry.sha256_prefix), name
      assert entry.size is None or entry.size > 10 << 20, name   # a real backbone, not a stub
      continue
    assert path.startswith("gs://") and path.endswith(".npz"), name
    assert (sub == "img") == name.startswith("siglip"), name
  families = {e.family for e in zoo.ZOO.values()}
  assert families == {"vit", "mae", "moco", "swin", "convnext", "resnet"}, families
  assert zoo.ZOO["resnet50-1k"].url.endswith(zoo.ZOO["resnet50-1k"].sha256_prefix + ".pth")
  assert zoo.url_for("some/local.npz") == "some/local.npz"


# --------------------------------------------------------------------------------------------
# Bad inputs: each error names the file and the key (as spelled in the file).


def test_missing_key_is_named(write_npz):
  raw = load_raw("vitjax_token.npz")
  del raw["Transformer/encoderblock_1/LayerNorm_2/scale"]
  path = write_npz(raw)
  with pytest.raises(CheckpointError) as e:
    vpt_jax.load_pretrained(path)
  assert path in str(e.value)
  assert "'Transformer/encoderblock_1/LayerNorm_2/scale' (64,)" in str(e.value)


def test_missing_key_needed_for_inference_is_named(write_npz):
  raw = load_raw("bigvision_gap.npz")
  del raw["pos_embedding"]
  path = write_npz({f"params/{k}": v for k, v in raw.items()})
  with pytest.raises(CheckpointError, match=rf"{path}: missing key 'params/pos_embedding'"):
    vpt_jax.load_pretrained(path)
  raw = load_raw("vitjax_token.npz")
  del raw["Transformer/posembed_input/pos_embedding"]
  with pytest.raises(CheckpointError, match="missing key 'Transformer/posembed_input/pos_emb"):
    vpt_jax.load_pretrained(write_npz(raw, "vitjax.npz"))


def test_missing_block_is_named(write_npz):
  raw = {k: v for k, v in load_raw("bigvision_gap.npz").items() if "encoderblock_0/" not in k}
  with pytest.raises(CheckpointError, match=r"block\(s\) \[0\] missing.*encoderblock_0"):
    vpt_jax.load_pretrained(write_npz(raw))


def test_unexpected_key_is_named(write_npz):
  raw = load_raw("bigvision_gap.npz")
  raw["Transformer/encoderblock_0/Adapter_0/kernel"] = np.zeros((64, 8), np.float32)
  path = write_npz(raw)
  with pytest.raises(CheckpointError, match=rf"{path}: unexpected key.*'Transformer/encoderblock_0/Adapter_0/kernel'"):
    vpt_jax.load_pretrained(path)


def test_wrong_shape_is_named(write_npz):
  raw = load_raw("vitjax_token.npz")
  raw["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.zeros((64, 96), np.float32)
  path = write_npz(raw)
  with pytest.raises(CheckpointError) as e:
    vpt_jax.load_pretrained(path)
  msg = str(e.value)
  assert path in msg and "'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'" in msg
  assert "(64, 96)" in msg and "(64, 128)" in msg


def test_non_grid_pos_embedding_is_named(write_npz):
  raw = load_raw("bigvision_gap.npz")
  raw["pos_embedding"] = raw["pos_embedding"][:, :60]
  with pytest.raises(CheckpointError, match=r"key 'pos_embedding' has 60 rows"):
    vpt_jax.load_pretrained(write_npz(raw))


def test_truncated_file(tmp_path):
  path = tmp_path / "truncated.npz"
  with open(VITJAX, "rb") as f:
    path.write_bytes(f.read()[: os.path.getsize(VITJAX) // 2])
  with pytest.raises(CheckpointError, match=rf"{path}: not a readable .npz.*truncated"):
    vpt_jax.load_pretrained(str(path))


def test_not_an_npz_file(tmp_path):
  path = tmp_path / "weights.npz"
  path.write_text("this is not a checkpoint\n")
  with pytest.raises(CheckpointError, match=rf"{path}: not a readable .npz"):
    vpt_jax.load_pretrained(str(path))


def test_not_a_vit(write_npz):
  path = write_npz({"w": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match=rf"{path}: missing key 'embedding/kernel'.*top-level names: w"):
    vpt_jax.load_pretrained(path)


def test_missing_file_and_unknown_name():
  with pytest.raises(FileNotFoundError, match=r"'/no/such/file.npz' not found.*vit-b16-i21k"):
    vpt_jax.load_pretrained("/no/such/file.npz")
  with pytest.raises(FileNotFoundError, match=r"'vit-b16-i12k' not found"):
    vpt_jax.load_pretrained("vit-b16-i12k")


def test_bad_image_size():
  with pytest.raises(ValueError, match=r"image_size \(30, 30\) is not a multiple of the patch"):
    vpt_jax.load_pretrained(VITJAX, image_size=30)
  model, variables = vpt_jax.load_pretrained(VITJAX)
  with pytest.raises(ValueError, match=r"\(2, 48, 48, 3\) do not fit.*image_size"):
    model.apply(variables, np.zeros((2, 48, 48, 3), np.float32))
