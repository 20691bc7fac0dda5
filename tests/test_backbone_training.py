"""The trainer on the PyTorch backbones: MAE / MoCo v3 ViTs, Swin, ConvNeXt and ResNet end to end.

The backbones are the tiny random-weight fixtures of tests/data/backbones, in their original
PyTorch containers (MAE `{'model': ...}` zip, MoCo `{'state_dict': {'module.…'}}`), trained on the
demo's digits. A random backbone shows the plumbing, not transfer: the check is that validation
accuracy rises above the start of a zero head (every logit equal -> class 0 for every image; the
runs use `model.head_init=zeros` for that reason).
"""

import os

import jax
import numpy as np
import pytest

from configs import demo
from conftest import data_path, jit_apply
from vpt_jax.data import pipeline, sources
from vpt_jax.tuning import build, cache, families, loop, rules, steps
from vpt_jax.tuning import workdir as workdir_lib
from vpt_jax.weights import backbones, download
from vpt_jax.weights.torch import read_state_dict

FILES = {"mae": "backbones/mae_vit.pth", "moco": "backbones/mocov3_vit.pth.tar",
         "convnext": "backbones/convnext.pth", "resnet": "backbones/resnet.pth",
         "swin": "swin/swin_toy_patch2_window3_48.pth"}
# A random backbone learns slowly: 4 epochs of 10 steps of 32 on 300 of the 800 training digits.
FAST = ("model.head_init=zeros,optim.lr=0.05,optim.epochs=4,optim.warmup_epochs=0,"
        "eval_every_epochs=2,log_every_steps=12,data.train_split=train800[:300],batch_size=32,"
        "data.test_split=val200[:64]")  # the test figure is not checked: a small split


def cfg(family, arm="vpt-deep", extra=""):
  base = f"model.checkpoint={data_path(FILES[family])},model.num_heads=4"
  return demo.get_config(",".join(x for x in (arm, base, FAST, extra) if x))


def val_top1(model, variables, config):
  """Top-1 on the validation split, computed here (not by the trainer)."""
  val = sources.load_splits(config.data, [config.data.val_split])[config.data.val_split]
  size = model.image_size[0]
  pipe = pipeline.Pipeline(val, pipeline.make_preprocess(config.data, size, False),
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
  full, inter = jit_apply(built.model, {"params": params}, images, mutable=["intermediates"])
  tokens = inter["intermediates"]["Transformer"]["block_0"][0]
  later = jit_apply(built.model, {"params": params}, tokens, start_layer=1)
  np.testing.assert_allclose(np.asarray(later), np.asarray(full), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full)).max() > 0.1


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
# Swin, ConvNeXt and ResNet through the same trainer (`vpt_jax.tuning.families`): VPT-deep with
# E2VPT key-value prompts on the Swin fixture (48px: every stage's grid divides into its 3x3
# windows), VPT's pad prompt on the ConvNets; Adam, so one epoch suffices.

OTHER = {
    "swin": ("vpt-deep,model.image_size=48,prompt.length=4,prompt.kv_length=2,optim.lr=0.03,"
             "data.train_split=train800[:400]"),
    "convnext": "vpt-shallow,model.image_size=32,prompt.location=pad,prompt.length=4",
    "resnet": "vpt-shallow,model.image_size=32,prompt.location=pad,prompt.length=4",
}
OTHER_FAST = ("model.head_init=zeros,data.normalization=imagenet,data.test_split=val200[:64],"
              "data.train_split=train800[:300],batch_size=32,"
              "optim.name=adamw,optim.lr=0.01,optim.wd=0,optim.epochs=1,optim.warmup_epochs=0,"
              "eval_every_epochs=1,log_every_steps=100")


def other_cfg(family, extra=""):
  arm, _, options = OTHER[family].partition(",")
  base = f"model.checkpoint={data_path(FILES[family])}"
  return demo.get_config(",".join(x for x in (arm, base, OTHER_FAST, options, extra) if x))


def trainer_val_top1(tuned, config):
  """Validation top-1 of a reloaded run, by the trainer's own jitted eval step (same shardings,
  same split into trainable and frozen: the compiled function is the trainer's, from the
  persistent cache), so the figure must equal the trainer's exactly."""
  replicated, batch = steps.mesh_shardings()
  eval_step = jax.jit(steps.make_eval_step(tuned.model), in_shardings=(replicated, replicated,
                                                                      batch),
                      out_shardings=replicated)
  trainable, frozen = rules.split(tuned.variables, tuned.mask)
  val = sources.load_splits(config.data, [config.data.val_split])[config.data.val_split]
  pipe = pipeline.Pipeline(val, pipeline.make_preprocess(config.data, tuned.model.image_size[0],
                                                         False),
                           batch_size=config.batch_size, seed=config.seed)
  return steps.evaluate(eval_step, jax.device_put(trainable, replicated),
                        jax.device_put(frozen, replicated), pipe, batch)["top1"]


def zero_head_top1(config):
  """Validation top-1 of a zero head: every logit equal -> class 0 for every image."""
  val = sources.load_splits(config.data, [config.data.val_split])[config.data.val_split]
  return float(np.mean(val.labels == 0))


@pytest.fixture(scope="module", params=["swin", "convnext", "resnet"])
def other_run(request, tmp_path_factory):
  family = request.param
  wd = str(tmp_path_factory.mktemp(f"run_{family}"))
  return family, wd, loop.train_and_evaluate(other_cfg(family), wd)


def test_other_family_trainer_run_improves_validation_accuracy(other_run):
  family, wd, results = other_run
  config = workdir_lib.read_config(wd)
  before = zero_head_top1(config)
  assert results["val_top1"] > before + 0.05, (family, before, results["val_top1"])
  assert results["cached_features_layer"] is None   # prompts change the input: nothing cached
  # The workdir reloads onto the original file and reproduces the trainer's figure.
  tuned = workdir_lib.load_tuned(wd, which="last")
  assert families.family_of(tuned.model) == family
  assert trainer_val_top1(tuned, config) == results["val_top1"]
  # The prompts trained (they differ from their seeded initial values), the backbone did not.
  start = build.build(config)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start.variables["prompts"]),
                                                 jax.tree.leaves(tuned.variables["prompts"]))]
  assert all(moved), moved
  params = start.variables["params"]
  for path, a, b in zip(rules.leaf_paths(params), jax.tree.leaves(params),
                        jax.tree.leaves(tuned.variables["params"])):
    if not path.startswith("head/"):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
  fp = start.fingerprint()
  assert fp["model"]["family"] == family and fp["prompt_hooks"]
  assert fp["backbone_sha256"] == download.file_sha256(data_path(FILES[family]))
  # Another family's file under the same options: the fingerprint names what differs.
  other = {"swin": "convnext", "convnext": "resnet", "resnet": "convnext"}[family]
  moved = other_cfg(other, "protocol=linear,prompt.length=0,prompt.kv_length=0,"
                           "model.num_classes=10")
  diff = "; ".join(build.describe_difference(fp, build.build(moved).fingerprint()))
  assert "backbone_sha256" in diff and f"model.family: saved '{family}', now '{other}'" in diff


def test_other_family_report_and_plots(other_run, tmp_path):
  """The report names the backbone and the method; curves for every family, the frozen backbone
  of the t-SNE panel, attention refused (no class token)."""
  from vpt_jax.analysis import plots, report
  family, wd, _ = other_run
  md = report.tables([report.load_record(wd)])["markdown"]
  assert os.path.basename(FILES[family]) in md
  assert ("E2VPT" if family == "swin" else "VPT-pad") in md
  png = plots.curves_figure(wd, str(tmp_path / "curves.png"))
  assert os.path.getsize(png) > 1000
  # t-SNE's frozen panel: the published backbone of the family, no prompts (a t-SNE run itself
  # costs ~30 s here, and its code path is the ViTs' one: tests/test_plots.py).
  frozen, _ = plots.frozen_backbone(workdir_lib.read_config(wd))
  assert families.family_of(frozen) == family and families.prompt_fingerprint(frozen) is None
  with pytest.raises(ValueError, match=f"a {family} backbone has no class token"):
    plots.attention_figure(wd, str(tmp_path / "attention.png"), split="val200")


@pytest.mark.parametrize("family", ["swin", "convnext", "resnet"])
def test_other_family_linear_probe_runs_on_cached_pooled_features(tmp_path, family):
  """Only the head trains: the pooled features are computed once per image and the steps apply
  the head alone; the full model reloaded from the workdir gets the same validation figure."""
  wd = str(tmp_path / "run")
  results = loop.train_and_evaluate(other_cfg(family, "protocol=linear,prompt.length=0,"
                                                      "prompt.kv_length=0"), wd)
  config = workdir_lib.read_config(wd)
  assert results["cached_features_layer"] == {"swin": 8, "convnext": 4, "resnet": 4}[family]
  assert results["val_top1"] > zero_head_top1(config) + 0.05
  tuned = workdir_lib.load_tuned(wd)
  after = val_top1(tuned.model, tuned.variables, config)
  assert abs(after - results["val_top1"]) <= 1 / 200 + 1e-9, (after, results["val_top1"])


# Parameter modules each protocol must train (prefixes of params/...), and must not.
PROTOCOL_CASES = {
    ("swin", "partial-1"): (["layers_3/blocks_1/", "norm/"], ["layers_3/blocks_0/",
                                                              "layers_2/downsample/"]),
    ("convnext", "partial-1"): (["stage4_0/", "norm/"], ["downsample3_conv/", "stage3_0/"]),
    ("swin", "partial-3"): (["layers_2/blocks_1/", "layers_2/downsample/", "layers_3/blocks_0/",
                             "norm/"], ["layers_2/blocks_0/"]),
    ("convnext", "partial-2"): (["stage3_0/", "downsample3_norm/", "downsample3_conv/",
                                 "stage4_0/", "norm/"], ["stage2_0/"]),
    ("resnet", "partial-1"): (["layer4_0/"], ["layer3_0/"]),
}


@pytest.mark.parametrize("family", ["swin", "convnext", "resnet"])
def test_protocols_train_what_they_name_on_other_families(family):
  partial = {"swin": "partial-3", "convnext": "partial-2", "resnet": "partial-1"}[family]
  for protocol in ("linear", "bias", "full", "partial-1", partial):
    config = other_cfg(family, f"protocol={protocol},prompt.length=0,prompt.kv_length=0")
    config.model.num_classes = 10
    built = build.build(config)
    flat = list(zip(rules.leaf_paths(built.mask), jax.tree.leaves(built.mask)))
    paths = [p for p, m in flat if m]
    frozen = [p for p, m in flat if not m]
    assert "params/head/kernel" in paths
    assert not any(p.startswith("batch_stats/") for p in paths)   # frozen BatchNorm statistics
    if protocol == "linear":
      assert paths == ["params/head/bias", "params/head/kernel"]
    elif protocol == "bias":
      assert all(p.endswith("/bias") or p.startswith("params/head/") for p in paths)
      assert not any(p.endswith("/bias") for p in frozen)
    elif protocol == "full":
      assert all(p.startswith("batch_stats/") for p in frozen)
    else:
      train, keep = PROTOCOL_CASES[(family, protocol)]
      for prefix in train:
        assert any(p.startswith("params/" + prefix) for p in paths), (protocol, prefix)
      for prefix in keep:
        assert not any(p.startswith("params/" + prefix) for p in paths), (protocol, prefix)
    expected = built.model.depth if protocol == "linear" else 0
    assert cache.entry_layer(built.model, built.mask)[0] == expected
  too_many = other_cfg(family, f"protocol=partial-{built.model.depth + 1},prompt.length=0,"
                               "prompt.kv_length=0,model.num_classes=10")
  with pytest.raises(ValueError, match=rf"1 <= k <= {built.model.depth} \(the blocks of this"):
    build.build(too_many)


@pytest.mark.parametrize("family,option,match", [
    ("resnet", "prompt.length=8,prompt.location=prepend", r"prompt.location='prepend' does not "
     r"apply to a resnet backbone.*prompt.location='pad'"),
    ("convnext", "prompt.kv_length=2", r"prompt.kv_length=2 does not apply to a convnext"),
    ("resnet", "prompt.deep=True", r"prompt.deep=True does not apply to a resnet"),
    ("convnext", "model.dtype=bfloat16", r"model.dtype='bfloat16' does not apply to a convnext"),
    ("resnet", "protocol=adapter", r"protocol='adapter' does not apply to a resnet.*ViT"),
    ("swin", "protocol=mlp-3", r"protocol='mlp-3' does not apply to a swin"),
    ("swin", "prompt.location=add", r"prompt.location='add' does not apply to a swin"),
    ("swin", "prompt.pool=cls", r"prompt.pool='cls' does not apply to a swin"),
    ("swin", "prompt.masks=True", r"prompt.masks=True does not apply to a swin"),
    ("swin", "prompt.shared=True", r"prompt.shared=True does not apply to a swin"),
    ("swin", "model.image_size=0", r"model.image_size=0 does not apply to a swin"),
    ("convnext", "prompt.length=0", r"protocol='vpt' does not apply.*prompt.length=0"),
])
def test_options_that_do_not_apply_to_a_family_are_refused(family, option, match):
  config = other_cfg(family, option)
  config.model.family = family              # refused by check_config, before any file is read
  with pytest.raises(ValueError, match=match):
    build.check_config(config)
  config.model.family = "auto"              # the family read from the file: refused by build
  config.model.num_classes = 10
  with pytest.raises(ValueError, match=match):
    build.build(config)


def test_vtab_backbone_flags_select_the_other_families():
  from configs import vtab
  for flag, zoo_name in (("swin", "swin-b-22k"), ("convnext", "convnext-b-22k"),
                         ("resnet", "resnet50-1k")):
    c = vtab.get_config(f"cifar100,{flag}")
    build.check_config(c)   # the zoo name says the family: every option applies
    assert c.model.checkpoint == zoo_name and c.data.normalization == "imagenet"
    assert c.model.image_size == 224
    if flag == "swin":
      assert (c.prompt.location, c.prompt.pool, c.prompt.deep) == ("prepend", "all", True)
      assert vtab.lr_grid(f"cifar100,{flag}") == vtab.LR_GRID
    else:
      assert (c.prompt.location, c.prompt.length, c.prompt.deep) == ("pad", 5, False)
      assert vtab.lr_grid(f"cifar100,{flag}") == vtab.PROMPT_RESNET_LR_GRID
      assert vtab.lr_grid(f"cifar100,{flag},protocol=linear") == vtab.LR_GRID
    full = vtab.get_config(f"cifar100,{flag},full")
    build.check_config(full)
    assert full.protocol == "full" and full.prompt.length == 0
  with pytest.raises(ValueError, match="kv_length=5 does not apply to a convnext"):
    build.check_config(vtab.get_config("cifar100,convnext,e2vpt"))


def test_serving_refuses_the_other_families_with_the_reason():
  from vpt_jax import serving
  for family in ("swin", "resnet"):
    config = other_cfg(family, "protocol=linear,prompt.length=0,prompt.kv_length=0")
    config.model.num_classes = 10
    built = build.build(config)
    with pytest.raises(serving.ServingError, match=f"a {family} backbone is not served"):
      serving.task_from_model(family, built.model, built.variables)


def test_the_package_door_loads_a_pth_and_an_npz():
  import vpt_jax
  model, variables = vpt_jax.load_pretrained(data_path(FILES["moco"]), num_heads=4,
                                             num_classes=3)
  assert model.pool_type == "token" and variables["params"]["head"]["kernel"].shape == (64, 3)
  model, _ = vpt_jax.load_pretrained("tiny-random")
  assert model.approximate_gelu and not model.fc_norm
