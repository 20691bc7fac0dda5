"""The trainer on the PyTorch backbones: MAE / MoCo v3 ViTs end to end, the others refused.

The backbones are the tiny random-weight fixtures of tests/data/backbones, in their original
PyTorch containers (MAE `{'model': ...}` zip, MoCo `{'state_dict': {'module.…'}}`), trained on the
demo's digits. A random backbone shows the plumbing, not transfer: the check is that validation
accuracy rises above the start of a zero head (every logit equal -> class 0 for every image; the
runs use `model.head_init=zeros` for that reason).
"""

import jax
import numpy as np
import pytest

from configs import demo
from conftest import data_path
from vpt_jax.data import pipeline, sources
from vpt_jax.tuning import build, cache, loop, rules
from vpt_jax.tuning import workdir as workdir_lib
from vpt_jax.weights import backbones, download
from vpt_jax.weights.torch import read_state_dict

FILES = {"mae": "backbones/mae_vit.pth", "moco": "backbones/mocov3_vit.pth.tar",
         "convnext": "backbones/convnext.pth", "resnet": "backbones/resnet.pth",
         "swin": "swin/swin_toy_patch2_window3_48.pth"}
FAST = "model.head_init=zeros,optim.lr=0.05,optim.epochs=4,optim.warmup_epochs=0,eval_every_epochs=1,log_every_steps=12"


def cfg(family, arm="vpt-deep", extra=""):
  base = f"model.checkpoint={data_path(FILES[family])},model.num_heads=4"
  return demo.get_config(",".join(x for x in (arm, base, FAST, extra) if x))


def val_top1(model, variables, config):
  """Top-1 on the validation split, computed here (not by the trainer)."""
  val = sources.load_splits(config.data, [config.data.val_split])[config.data.val_split]
  pipe = pipeline.Pipeline(val, pipeline.make_preprocess(config.data, 32, False),
                           batch_size=64, seed=0)
  apply = jax.jit(model.apply)
  correct = n = 0.0
  for b in pipe.eval_batches():
    pred = np.argmax(apply(variables, b["image"]), -1)
    correct += float(((pred == b["label"]) * b["mask"]).sum())
    n += float(b["mask"].sum())
  return correct / n


@pytest.mark.parametrize("family", ["mae", "moco"])
def test_family_detected_from_the_file(family):
  path = data_path(FILES[family])
  assert backbones.detect_family(read_state_dict(path), path) == family


def test_every_fixture_family_is_recognised():
  for family in ("convnext", "resnet", "swin"):
    path = data_path(FILES[family])
    assert backbones.detect_family(read_state_dict(path), path) == family


# MAE runs E2VPT (VPT-deep + key-value prompts + the pruning masks' variables), MoCo VPT-shallow.
E2VPT = "prompt.kv_length=2,prompt.masks=True,prompt.segments=4"


@pytest.mark.parametrize("family,arm,extra", [("mae", "vpt-deep", E2VPT),
                                              ("moco", "vpt-shallow", "")])
def test_tiny_training_run_improves_validation_accuracy(tmp_path, family, arm, extra):
  config = cfg(family, arm, extra)
  config.model.num_classes = 10
  start = build.build(config)
  before = val_top1(start.model, start.variables, config)
  wd = str(tmp_path / "run")
  results = loop.train_and_evaluate(cfg(family, arm, extra), wd)
  if extra:   # visual 2 layers x p x 64, key-value 2 layers x 4 heads x 2 x 16, head 64 x 10 + 10
    assert start.model.hooks.kv_length == 2 and start.model.hooks.masks
    assert "prompt_masks" in start.variables
    assert results["trainable_params"] == 2 * config.prompt.length * 64 + 2 * 4 * 2 * 16 + 650
  # The tuned workdir reloads onto the .pth backbone and reproduces the trainer's figure.
  model, variables = workdir_lib.load_tuned(wd, which="last")
  after = val_top1(model, variables, workdir_lib.read_config(wd))
  assert model.approximate_gelu is False and model.fc_norm == (family == "mae")
  assert after > before + 0.05, (before, after, results["val_top1"])
  fp = build.Built.fingerprint(start)
  assert fp["model"]["approximate_gelu"] is False
  assert fp["backbone_sha256"] == download.file_sha256(data_path(FILES[family]))


D, BOTTLENECK = 64, 8   # the fixtures' width; the adapter's default reduction 8
# Trainable leaves of the protocols whose modules the backbone gets (as tests/test_baselines.py
# counts them on the demo ViT): module prefix, parameter count without the head.
MODULES = {"mlp-2": ("modules/hooks/mlp/", D * D + D + 2 * D),
           "adapter": ("modules/hooks/adapter_", 2 * (D * BOTTLENECK + BOTTLENECK
                                                      + BOTTLENECK * D + D)),
           "side": ("modules/hooks/side/", (9 * 3 * 16 + 16) + (9 * 16 * 32 + 32)
                    + (9 * 32 * 64 + 64) + (64 * D + D) + 1)}


@pytest.mark.parametrize("family", ["mae", "moco"])
@pytest.mark.parametrize("protocol", ["mlp-2", "adapter", "side"])
def test_module_protocols_train_exactly_their_modules(family, protocol):
  """MLP-k, adapter and side-tuning on the PyTorch ViTs: the modules and the head, nothing else
  (MAE's fc_norm and MoCo's encoder_norm stay frozen), and the model traces."""
  config = cfg(family, "linear", f"protocol={protocol}")
  config.model.num_classes = 10
  built = build.build(config)
  prefix, n = MODULES[protocol]
  paths = [p for p, m in zip(rules.leaf_paths(built.mask), jax.tree.leaves(built.mask)) if m]
  assert {"params/head/bias", "params/head/kernel"} <= set(paths)
  assert all(p.startswith((prefix, "params/head/")) for p in paths), paths
  assert rules.param_report(built.variables, built.mask)["trainable"] == n + D * 10 + 10
  norm = "fc_norm" if family == "mae" else "Transformer/encoder_norm"
  assert f"params/{norm}/scale" in rules.leaf_paths(built.variables)
  assert built.model.approximate_gelu is False and built.model.fc_norm == (family == "mae")
  expected = {"mlp-2": 2, "adapter": 0, "side": -1}[protocol]
  assert cache.entry_layer(built.model, built.mask)[0] == expected
  out = jax.eval_shape(built.model.apply, built.variables,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32))   # traced, not compiled
  assert out.shape == (2, 10)


@pytest.mark.parametrize("family", ["mae", "moco"])
@pytest.mark.parametrize("protocol", ["linear", "partial-1", "bias", "full"])
def test_protocols_train_what_they_name(family, protocol):
  config = cfg(family, "linear", f"protocol={protocol}")
  config.model.num_classes = 10
  built = build.build(config)
  paths = [p for p, m in zip(rules.leaf_paths(built.mask), jax.tree.leaves(built.mask)) if m]
  assert "params/head/kernel" in paths
  if protocol == "linear":
    assert paths == ["params/head/bias", "params/head/kernel"]
  elif protocol == "partial-1":   # the last block and the final norm (MAE: fc_norm)
    norm = "params/fc_norm/" if family == "mae" else "params/Transformer/encoder_norm/"
    assert any(p.startswith(norm) for p in paths)
    assert all(p.startswith(("params/Transformer/encoderblock_1/", norm, "params/head/"))
               for p in paths)
  elif protocol == "bias":
    assert all(p.endswith("bias") or p.startswith("params/head/") for p in paths)
  else:
    assert len(paths) == len(jax.tree.leaves(built.variables["params"]))
  # Cached features: the frozen prefix ends where the first trainable leaf is.
  expected = {"linear": 2, "partial-1": 1, "bias": 0, "full": 0}[protocol]
  assert cache.entry_layer(built.model, built.mask)[0] == expected


@pytest.mark.parametrize("family", ["mae", "moco"])
def test_entering_at_a_later_layer_computes_the_same_logits(family):
  """What the cached-features path relies on, with MAE's fc_norm after the pooling."""
  config = cfg(family, "linear")
  config.model.num_classes = 10
  built = build.build(config)
  rng = np.random.default_rng(0)
  params = dict(built.variables["params"])
  params["head"] = {"kernel": rng.normal(size=(64, 10)).astype(np.float32),
                    "bias": rng.normal(size=(10,)).astype(np.float32)}
  images = rng.uniform(-1, 1, size=(4, 32, 32, 3)).astype(np.float32)
  full, inter = built.model.apply({"params": params}, images, mutable=["intermediates"])
  tokens = inter["intermediates"]["Transformer"]["block_0"][0]
  later = built.model.apply({"params": params}, tokens, start_layer=1)
  np.testing.assert_allclose(np.asarray(later), np.asarray(full), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full)).max() > 0.1


@pytest.mark.parametrize("family", ["convnext", "resnet", "swin"])
def test_non_vit_backbones_are_refused_with_the_loader_to_use(tmp_path, family):
  config = cfg(family, "linear")
  with pytest.raises(ValueError, match=rf"a {family} checkpoint.*weights\.torch_"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))



def test_serving_refuses_the_official_mae_pooling_and_serves_moco():
  """MAE as VPT pools it (prompts and patches, prompt.pool='all') is not a mixed-batch plan."""
  from vpt_jax import prompts, serving
  for family, pool in (("mae", "all"), ("moco", "original")):
    config = cfg(family, "vpt-deep", f"prompt.pool={pool}")
    config.model.num_classes = 10
    built = build.build(config)
    if family == "mae":
      with pytest.raises(serving.ServingError, match="prompt.pool='all'"):
        serving.task_from_model("mae", built.model, built.variables)
    else:
      task = serving.task_from_model("moco", built.model, built.variables)
      assert task.length == config.prompt.length and isinstance(built.model.hooks, prompts.VPT)


# ------------------------------------------------------------------------------------------------
# Swin, ConvNeXt and ResNet are not trained by `vpt_jax.main` (refused above); their prompts and
# head are trained here by a plain optax loop on the same digits data, which shows the models,
# prompts and data fit together, not the trainer.


def _digits(size):
  config = demo.get_config("linear")
  config.data.normalization = "imagenet"   # what these PyTorch backbones were trained on
  splits = sources.load_splits(config.data, ["train800", "val200"])
  out = {}
  for name, split in splits.items():
    pipe = pipeline.Pipeline(split, pipeline.make_preprocess(config.data, size, False),
                             batch_size=100, seed=0)
    batches = list(pipe.eval_batches())
    out[name] = (np.concatenate([b["image"] for b in batches]),
                 np.concatenate([b["label"] for b in batches]),
                 np.concatenate([b["mask"] for b in batches]).astype(bool))
  return out


def _family_model(family):
  from vpt_jax.prompts import swin as swin_prompts
  from vpt_jax.weights import torch_convnets, torch_swin
  path = data_path(FILES[family])
  if family == "swin":
    model, params = torch_swin.load_pretrained(path, image_size=(48, 48), num_classes=10)
    model = swin_prompts.attach(model, length=4, deep=True)
    return model, {"params": params}, swin_prompts.init_prompts(model, jax.random.PRNGKey(0)), 48
  convert = {"convnext": torch_convnets.convnext_from_torch,
             "resnet": torch_convnets.resnet_from_torch}[family]
  model, variables = convert(read_state_dict(path), path=path, pad_tokens=4)
  model = model.clone(num_classes=10)   # a new head, as VPT builds it
  init = model.init(jax.random.PRNGKey(0), np.zeros((1, 56, 56, 3), np.float32))
  variables = dict(variables, params=dict(variables["params"], head=init["params"]["head"]))
  return model, variables, init["prompts"], 56   # 56 + 2 * 4 = the fixtures' 64


@pytest.mark.parametrize("family", ["swin", "convnext", "resnet"])
def test_prompts_and_head_learn_digits_on_the_other_families(family):
  import optax
  model, frozen, prompts_, size = _family_model(family)
  data = _digits(size)
  head = frozen["params"]["head"]
  frozen = dict(frozen, params={k: v for k, v in frozen["params"].items() if k != "head"})

  def logits_fn(tr, images):
    v = dict(frozen, prompts=tr["prompts"], params=dict(frozen["params"], head=tr["head"]))
    return model.apply(v, images)

  def loss_fn(tr, images, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(tr, images), labels).mean()

  opt = optax.adam(1e-2)
  tr = {"prompts": prompts_, "head": head}
  st = opt.init(tr)

  @jax.jit
  def step(tr, st, images, labels):
    g = jax.grad(loss_fn)(tr, images, labels)
    upd, st = opt.update(g, st, tr)
    return optax.apply_updates(tr, upd), st

  predict = jax.jit(lambda tr, images: np.argmax(logits_fn(tr, images), -1))

  def val_top1(tr):
    x, y, m = data["val200"]
    return float(np.mean(np.asarray(predict(tr, x))[m] == y[m]))

  before = val_top1(tr)
  x, y, m = data["train800"]
  x, y = x[m], y[m]
  for epoch in range(3):
    order = np.random.default_rng(epoch).permutation(len(x))
    for i in range(0, len(x) - 63, 64):
      idx = order[i:i + 64]
      tr, st = step(tr, st, x[idx], y[idx])
  after = val_top1(tr)
  assert after > before + 0.05, (before, after)


def test_the_package_door_loads_a_pth_and_an_npz():
  import vpt_jax
  model, variables = vpt_jax.load_pretrained(data_path(FILES["moco"]), num_heads=4,
                                             num_classes=3)
  assert model.pool_type == "token" and variables["params"]["head"]["kernel"].shape == (64, 3)
  model, _ = vpt_jax.load_pretrained("tiny-random")
  assert model.approximate_gelu and not model.fc_norm
