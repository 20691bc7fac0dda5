"""Serving many tasks from one backbone: a mixed batch equals each task's own model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vpt_jax
from configs import demo
from conftest import SMALL_DIGITS
from vpt_jax import prompts, serving
from vpt_jax.tuning import loop

TOL = dict(rtol=1e-5, atol=1e-5)
FAST = "model.checkpoint=tiny-random,optim.epochs=1,optim.warmup_epochs=0,eval_every_epochs=1," \
       f"batch_size=64,log_every_steps=2,{SMALL_DIGITS}"


def prompted(base, variables, seed, num_classes, **cfg_kw):
  """A VPT model on `base` with random prompts and a random (non-zero) head."""
  cfg = prompts.default_config()
  cfg.update(cfg_kw)
  model = prompts.attach(base.clone(num_classes=num_classes), cfg) if (
      cfg.length or cfg.kv_length) else base.clone(num_classes=num_classes)
  rng = np.random.default_rng(seed)
  params = dict(variables["params"])
  params["head"] = {"kernel": jnp.asarray(rng.normal(size=(base.width, num_classes)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(num_classes,)), jnp.float32)}
  out = {"params": params}
  if model.hooks is not None:
    out["prompts"] = prompts.init_prompts(model, jax.random.PRNGKey(seed))
  return model, out


def check_mixed_equals_separate(server, models, images, ids):
  got = np.asarray(server(images, ids))
  assert got.shape == (len(ids), max(m.num_classes for m, _ in models))
  for t, (model, variables) in enumerate(models):
    rows = np.flatnonzero(ids == t)
    want = np.asarray(jax.jit(model.apply)(variables, images))[rows]  # one program per model
    np.testing.assert_allclose(got[rows, :model.num_classes], want, **TOL)
    assert np.all(np.isneginf(got[rows, model.num_classes:]))


@pytest.fixture(scope="module")
def tiny():
  base, variables = vpt_jax.load_pretrained("tiny-random")
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (9, 32, 32, 3)), jnp.float32)
  return base, variables, images


def test_deep_shallow_shared_and_projected_prompts_in_one_batch(tiny):
  base, variables, images = tiny
  models = [prompted(base, variables, 1, 10, length=4, deep=True),
            prompted(base, variables, 2, 7, length=4, deep=False),
            prompted(base, variables, 3, 12, length=4, deep=True, shared=True, project=8)]
  tasks = [serving.task_from_model(f"t{i}", m, v) for i, (m, v) in enumerate(models)]
  server = serving.MultiTaskServer.from_tasks(base, variables["params"], tasks)
  ids = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1], np.int32)
  check_mixed_equals_separate(server, models, images, ids)
  probs = server.predict(images[:3], ["t2", "t0", "t1"])
  assert [len(p) for p in probs] == [12, 10, 7]
  np.testing.assert_allclose([p.sum() for p in probs], 1.0, rtol=1e-5)


def test_e2vpt_key_value_prompts_per_example(tiny):
  base, variables, images = tiny
  models = [prompted(base, variables, 4, 10, length=3, kv_length=2),
            prompted(base, variables, 5, 5, length=3, kv_length=2, kv_shared=False)]
  tasks = [serving.task_from_model(f"t{i}", m, v) for i, (m, v) in enumerate(models)]
  server = serving.MultiTaskServer.from_tasks(base, variables["params"], tasks)
  ids = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1], np.int32)
  check_mixed_equals_separate(server, models, images, ids)


def test_linear_probes_share_the_backbone(tiny):
  base, variables, images = tiny
  models = [prompted(base, variables, 6, 3, length=0), prompted(base, variables, 7, 6, length=0)]
  tasks = [serving.task_from_model(f"t{i}", m, v) for i, (m, v) in enumerate(models)]
  server = serving.MultiTaskServer.from_tasks(base, variables["params"], tasks)
  check_mixed_equals_separate(server, models, images, np.arange(9, dtype=np.int32) % 2)


@pytest.mark.parametrize("kw,match", [
    (dict(length=4, location="add"), "prompt.location='add'"),
    (dict(length=4, pool="all"), "prompt.pool='all'"),
    (dict(length=4, deep=True, depth=1, expand=False), "prompt.expand=False"),
])
def test_unsupported_options_are_refused(tiny, kw, match):
  base, variables, _ = tiny
  model, v = prompted(base, variables, 1, 10, **kw)
  with pytest.raises(serving.ServingError, match=match):
    serving.task_from_model("bad", model, v)


def test_incompatible_tasks_are_refused(tiny):
  base, variables, _ = tiny
  mk = lambda seed, **kw: serving.task_from_model(f"t{seed}", *prompted(base, variables, seed, 4, **kw))
  with pytest.raises(serving.ServingError, match="prompt lengths differ: t1 has 4, t2 has 8"):
    serving.MultiTaskServer.from_tasks(base, variables["params"], [mk(1, length=4), mk(2, length=8)])
  with pytest.raises(serving.ServingError, match="key-value prompts differ"):
    serving.MultiTaskServer.from_tasks(base, variables["params"],
                                       [mk(1, length=4), mk(2, length=4, kv_length=2)])
  with pytest.raises(serving.ServingError, match="different layers"):
    serving.MultiTaskServer.from_tasks(base, variables["params"], [
        mk(1, length=4), mk(2, length=4, deep=True, depth=1, reverse=True)])


# -- tuned workdirs --------------------------------------------------------------------------------

def tune(workdir, arm, extra=""):
  loop.train_and_evaluate(demo.get_config(",".join(x for x in (arm, FAST, extra) if x)), workdir)
  return workdir


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  return {
      "deep": tune(str(root / "deep"), "vpt-deep", "prompt.length=4"),
      "shallow": tune(str(root / "shallow"), "vpt-shallow", "prompt.length=4,model.num_classes=13"),
      "deep16": tune(str(root / "deep16"), "vpt-deep", "prompt.length=4,model.num_classes=16"),
  }


def test_tuned_workdirs_served_together_equal_load_tuned(workdirs, tiny):
  images = tiny[2]
  server = serving.MultiTaskServer.from_workdirs(workdirs)
  assert server.names == ["deep", "shallow", "deep16"]
  assert list(server.num_classes) == [10, 13, 16]
  models = [vpt_jax.load_tuned(wd) for wd in workdirs.values()]
  ids = np.array([2, 0, 1, 1, 2, 0, 0, 1, 2], np.int32)
  check_mixed_equals_separate(server, models, images, ids)


def test_workdirs_on_another_backbone_or_tuned_backbone_are_refused(workdirs, tmp_path):
  # Same architecture, other weights: another backbone file.
  with np.load(vpt_jax.zoo.url_for("tiny-random")) as f:
    arrays = {k: f[k] * (1.5 if k.endswith("bias") else 1.0) for k in f.files}
  other = str(tmp_path / "other.npz")
  np.savez(other, **arrays)
  wd_other = tune(str(tmp_path / "other"), "vpt-deep", f"prompt.length=4,model.checkpoint={other}")
  with pytest.raises(serving.ServingError, match=f"workdir {wd_other} was tuned on another backbone"):
    serving.MultiTaskServer.from_workdirs([workdirs["deep"], wd_other])
  # Full fine-tuning changed the backbone's weights: it cannot share it.
  wd_full = tune(str(tmp_path / "full"), "linear", "protocol=full")
  with pytest.raises(serving.ServingError, match=f"workdir {wd_full} \\(protocol 'full'\\) changed"):
    serving.MultiTaskServer.from_workdirs([workdirs["deep"], wd_full])
  with open(os.path.join(wd_full, "config.json")) as f:
    assert json.load(f)["protocol"] == "full"
  # Another normalisation: the same image would need two inputs.
  wd_norm = tune(str(tmp_path / "norm"), "vpt-deep", "prompt.length=4,data.normalization=imagenet")
  with pytest.raises(serving.ServingError,
                     match=f"workdir {wd_norm} preprocesses its images otherwise than"):
    serving.MultiTaskServer.from_workdirs([workdirs["deep"], wd_norm])
  # predict's reader of that run applies its ImageNet mean/std (not [-1, 1])
  from PIL import Image
  path = str(tmp_path / "grey.png")
  Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(path)
  x = vpt_jax.load_tuned(wd_norm).read_image(path)
  np.testing.assert_allclose(x[0, 0], (1 - np.array([0.485, 0.456, 0.406])) /
                             np.array([0.229, 0.224, 0.225]), rtol=1e-5)


@pytest.mark.skipif("masks" not in prompts.default_config(), reason="no E2VPT pruning masks")
def test_pruned_prompts_are_served_compacted(tiny):
  base, variables, images = tiny
  # Task 0 prunes 2 of its 6 tokens (and some segments); task 1 keeps 4 of 4: equal lengths.
  m0, v0 = prompted(base, variables, 8, 10, length=6, masks=True, segments=4)
  rng = np.random.default_rng(0)
  v0["prompt_masks"] = {"hooks": {
      "token_mask": jnp.asarray([1, 0, 1, 1, 0, 1], jnp.float32),
      "segment_mask": jnp.asarray(rng.integers(0, 2, (6, 4)), jnp.float32)}}
  m1, v1 = prompted(base, variables, 9, 3, length=4)
  tasks = [serving.task_from_model("pruned", m0, v0), serving.task_from_model("plain", m1, v1)]
  assert tasks[0].length == 4
  server = serving.MultiTaskServer.from_tasks(base, variables["params"], tasks)
  check_mixed_equals_separate(server, [(m0, v0), (m1, v1)], images,
                              np.array([0, 1, 0, 0, 1, 1, 0, 1, 0], np.int32))
