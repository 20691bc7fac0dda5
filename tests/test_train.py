"""Train step: only trainable leaves move, gradients are right, no frozen-weight gradient work."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vpt_jax
from conftest import data_path, jit_apply, load_io
from vpt_jax import prompts
from vpt_jax.tuning import rules, steps
from vpt_jax.tuning import optim as optim_lib

IMAGES = load_io("vitjax_token.io.npz")["images"]
BATCH = {"image": IMAGES, "label": np.array([0, 3, 7, 9], np.int32)}
STEPS_PER_EPOCH = 4


def optim(**kw):
  cfg = optim_lib.default_optim_config()
  cfg.update(dict(warmup_epochs=0, epochs=2, lr=0.5, wd=1e-2) | kw)
  return cfg


@pytest.fixture(scope="module")
def setup():
  """VPT-deep on the fixture backbone, keeping its trained 10-way head (non-zero gradients)."""
  base, v = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))
  cfg = prompts.default_config()
  cfg.length = 3
  model = prompts.attach(base, cfg)
  variables = {**v, "prompts": prompts.init_prompts(model, jax.random.PRNGKey(0))}
  mask = rules.label(variables, rules.protocol_patterns("vpt"))
  trainable, frozen = rules.split(variables, mask)
  tx, schedule = optim_lib.make_optimizer(optim(), STEPS_PER_EPOCH)
  step = jax.jit(steps.make_train_step(model, tx, schedule))
  return dict(model=model, variables=variables, trainable=trainable, frozen=frozen, tx=tx,
              schedule=schedule, step=step)


def independent_loss(model):
  """The plain loss over the whole variable dict, written without the partition machinery."""
  def loss(variables):
    logits = model.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), BATCH["label"][:, None], 1))
  return loss


def test_frozen_backbone_is_bit_identical_after_training(setup):
  state = steps.create_train_state(setup["trainable"], setup["tx"], jax.random.PRNGKey(1))
  losses = []
  for _ in range(5):
    state, metrics = setup["step"](state, setup["frozen"], BATCH)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  after = rules.merge(state.trainable, setup["frozen"])
  changed = {p: not np.array_equal(a, b) for p, a, b in zip(
      rules.leaf_paths(after), jax.tree.leaves(after), jax.tree.leaves(setup["variables"]))}
  assert sorted(p for p, c in changed.items() if c) == [
      "params/head/bias", "params/head/kernel", "prompts/hooks/tokens"]


def test_prompt_gradients_match_an_independent_grad_and_finite_differences(setup):
  model = setup["model"]
  loss_fn = steps.make_loss_fn(model)
  (_, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      setup["trainable"], setup["frozen"], IMAGES, BATCH["label"], jax.random.PRNGKey(0))
  full = jax.jit(jax.grad(independent_loss(model)))(setup["variables"])
  for path in (("prompts", "hooks", "tokens"), ("params", "head", "kernel")):
    ours, ref = grads, full
    for k in path:
      ours, ref = ours[k], ref[k]
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5)
  g = np.asarray(grads["prompts"]["hooks"]["tokens"])
  assert np.abs(g[0]).max() > 0 and np.abs(g[1]).max() > 0  # both layers' prompts learn

  loss = jax.jit(independent_loss(model))
  tokens = setup["variables"]["prompts"]["hooks"]["tokens"]
  for idx in [(0, 1, 7), (1, 2, 30)]:
    bump = lambda e: {**setup["variables"],
                      "prompts": {"hooks": {"tokens": tokens.at[idx].add(e)}}}
    fd = (loss(bump(1e-2)) - loss(bump(-1e-2))) / 2e-2
    np.testing.assert_allclose(g[idx], fd, rtol=3e-2, atol=2e-5)


def test_padded_rows_of_a_partial_batch_contribute_nothing(setup):
  """Loss and gradients of 3 real rows + 1 masked padding row equal those of the 3 rows alone."""
  grad = jax.jit(jax.value_and_grad(steps.make_loss_fn(setup["model"]), has_aux=True))
  rng = jax.random.PRNGKey(0)
  (loss3, _), g3 = grad(setup["trainable"], setup["frozen"], IMAGES[:3], BATCH["label"][:3], rng)
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  (loss4, _), g4 = grad(setup["trainable"], setup["frozen"], IMAGES, BATCH["label"], rng, mask)
  np.testing.assert_allclose(loss4, loss3, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g3)):
    np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)
  (loss_all, _), _ = grad(setup["trainable"], setup["frozen"], IMAGES, BATCH["label"], rng)
  assert abs(float(loss_all) - float(loss3)) > 1e-4  # the padding row would have counted
  state = steps.create_train_state(setup["trainable"], setup["tx"], jax.random.PRNGKey(1))
  _, m = setup["step"](state, setup["frozen"], {**BATCH, "mask": np.asarray(mask)})
  np.testing.assert_allclose(m["loss"], loss3, rtol=1e-6)


def test_sgd_is_torch_sgd_with_coupled_l2(setup):
  """p1 = p0 - lr (g0 + wd p0); p2 = p1 - lr1 (0.9 buf1 + g1 + wd p1); head bias without decay."""
  cfg = optim()
  state = steps.create_train_state(setup["trainable"], setup["tx"], jax.random.PRNGKey(1))
  s1, _ = setup["step"](state, setup["frozen"], BATCH)
  s2, _ = setup["step"](s1, setup["frozen"], BATCH)

  model = setup["model"]
  mask = rules.label(setup["variables"], rules.protocol_patterns("vpt"))
  full_grad = jax.jit(jax.grad(independent_loss(model)))
  # The independent gradient over all variables, restricted to the trainable leaves.
  grad = lambda trainable: jax.tree.leaves(rules.split(
      full_grad(rules.merge(trainable, setup["frozen"])), mask)[0])
  lr0, lr1 = (float(setup["schedule"](i)) for i in (0, 1))
  assert lr0 == pytest.approx(cfg.lr)
  decay = lambda path: 0.0 if path == "params/head/bias" else cfg.wd
  paths = rules.leaf_paths(setup["trainable"])
  p0 = jax.tree.leaves(setup["trainable"])
  g0 = grad(setup["trainable"])
  buf0 = [g + decay(n) * p for n, g, p in zip(paths, g0, p0)]
  p1 = [p - lr0 * b for p, b in zip(p0, buf0)]
  for n, ours, ref in zip(paths, jax.tree.leaves(s1.trainable), p1):
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5, err_msg=n)
  g1 = grad(s1.trainable)
  buf1 = [cfg.momentum * b + g + decay(n) * p for n, b, g, p in zip(paths, buf0, g1, p1)]
  p2 = [p - lr1 * b for p, b in zip(p1, buf1)]
  for n, ours, ref in zip(paths, jax.tree.leaves(s2.trainable), p2):
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5, err_msg=n)


def test_adamw_and_gradient_clipping(setup):
  model, frozen, trainable = setup["model"], setup["frozen"], setup["trainable"]
  tx, _ = optim_lib.make_optimizer(optim(name="adamw", lr=1e-3, wd=0.05), STEPS_PER_EPOCH)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(1))
  new, metrics = jax.jit(steps.make_train_step(model, tx))(state, frozen, BATCH)
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.trainable),
                                                       jax.tree.leaves(trainable)))
  # Clipping to c with plain SGD (no decay, no momentum) moves the tree by exactly lr * c.
  c, lr = 1e-3, 0.5
  tx, _ = optim_lib.make_optimizer(optim(wd=0.0, momentum=0.0, grad_clip=c, lr=lr), STEPS_PER_EPOCH)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(1))
  new, metrics = jax.jit(steps.make_train_step(model, tx))(state, frozen, BATCH)
  delta = jax.tree.map(lambda a, b: a - b, new.trainable, trainable)
  assert float(metrics["grad_norm"]) > c  # the logged norm is the raw gradient's
  assert float(optax.tree.norm(delta)) == pytest.approx(lr * c, rel=1e-4)


def test_learning_rate_schedule():
  sched = optim_lib.lr_schedule(optim(lr=0.2, warmup_epochs=1, epochs=3), steps_per_epoch=10)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.1)
  assert float(sched(10)) == pytest.approx(0.2)
  assert float(sched(20)) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
  assert float(sched(30)) == pytest.approx(0.0, abs=1e-7)
  with pytest.raises(ValueError, match=r"optim.lr=0"):
    optim_lib.lr_schedule(optim(lr=0), 10)
  with pytest.raises(ValueError, match=r"optim.warmup_epochs=5"):
    optim_lib.lr_schedule(optim(warmup_epochs=5, epochs=5), 10)
  with pytest.raises(ValueError, match=r"optim.name='lamb'"):
    optim_lib.make_optimizer(optim(name="lamb"), 10)


def _step_flops(model, variables, protocol):
  mask = rules.label(variables, rules.protocol_patterns(protocol, depth=2))
  trainable, frozen = rules.split(variables, mask)
  tx, schedule = optim_lib.make_optimizer(optim(), STEPS_PER_EPOCH)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(0))
  step = jax.jit(steps.make_train_step(model, tx, schedule)).lower(state, frozen, BATCH).compile()
  fwd = jax.jit(model.apply).lower(variables, IMAGES).compile()
  return step.cost_analysis()["flops"] / fwd.cost_analysis()["flops"]


def test_no_gradient_work_for_frozen_weights(setup):
  """XLA's FLOP count of the step (with grad-norm logging) relative to the forward pass.

  Full fine-tuning needs activation and weight gradients (~3x the forward). VPT needs activation
  gradients down to the first prompts only (~2x); a linear probe needs almost nothing (~1x).
  """
  model, variables = setup["model"], setup["variables"]
  full = _step_flops(model, variables, "full")
  vpt = _step_flops(model, variables, "vpt")
  linear = _step_flops(model, variables, "linear")
  assert full > 2.7
  assert vpt < 2.3
  assert linear < 1.15


def test_eval_step_counts_only_real_examples(setup):
  eval_step = jax.jit(steps.make_eval_step(setup["model"]))
  batch = dict(BATCH, mask=np.array([1, 1, 0, 0], np.float32))
  out = eval_step(setup["trainable"], setup["frozen"], batch)
  logits = jit_apply(setup["model"], setup["variables"], IMAGES)
  correct = (np.argmax(logits, -1) == BATCH["label"])[:2].sum()
  assert float(out["count"]) == 2 and float(out["correct"]) == correct
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, BATCH["label"])
  assert float(out["loss_sum"]) == pytest.approx(float(ce[:2].sum()), rel=1e-5)


def test_progress_line_counts_a_partial_last_epoch(capsys):
  """An iteration schedule that is not a whole number of epochs (segmentation: 300 steps of 63 per
  epoch) ends in epoch 5 of 5, not 5 of 4."""
  from vpt_jax.tuning.metrics import Progress
  p = Progress(300, 63, 32, 0)
  assert "epoch 5/5" in p.line(300, {"loss": 1.0})
  assert "epoch 1/5" in p.line(63, {"loss": 1.0}) and "epoch 2/5" in p.line(64, {})
  assert "epoch 2/2" in Progress(26, 13, 64, 0).line(26, {})


@pytest.mark.parametrize("microbatch", [2, 5])
def test_microbatched_steps_equal_whole_batch_steps(setup, microbatch):
  """Chunks of the batch, one after the other (microbatch_size): the summed chunk gradients are
  the whole batch's, with a partial batch's padding rows masked out, to float32 rounding."""
  model, trainable, frozen = setup["model"], setup["trainable"], setup["frozen"]
  images = np.concatenate([IMAGES, IMAGES[:, ::-1], IMAGES[:, :, ::-1]])
  batch = {"image": images, "label": (np.arange(12) * 7 % 10).astype(np.int32),
           "mask": (np.arange(12) < 9).astype(np.float32)}
  assert steps.num_chunks(12, microbatch) == {2: 6, 5: 3}[microbatch]
  state = steps.create_train_state(trainable, setup["tx"], jax.random.PRNGKey(1))
  whole = jax.jit(steps.make_train_step(model, setup["tx"], setup["schedule"]))
  parts = jax.jit(steps.make_train_step(model, setup["tx"], setup["schedule"],
                                        microbatch=microbatch))
  (s1, m1), (s2, m2) = whole(state, frozen, batch), parts(state, frozen, batch)
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  moved = 0.0
  for a, b, p in zip(jax.tree.leaves(s2.trainable), jax.tree.leaves(s1.trainable),
                     jax.tree.leaves(trainable)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    moved = max(moved, float(np.abs(b - p).max()))
  assert moved > 1e-3  # the step did move the parameters
  # A masked-out row changes nothing, chunked or not.
  poisoned = dict(batch, label=np.where(batch["mask"] > 0, batch["label"], 0).astype(np.int32))
  s3, _ = parts(state, frozen, poisoned)
  for a, b in zip(jax.tree.leaves(s3.trainable), jax.tree.leaves(s2.trainable)):
    np.testing.assert_array_equal(a, b)
  e1 = jax.jit(steps.make_eval_step(model))(trainable, frozen, batch)
  e2 = jax.jit(steps.make_eval_step(model, microbatch=microbatch))(trainable, frozen, batch)
  for k in e1:
    np.testing.assert_allclose(e2[k], e1[k], rtol=1e-5, err_msg=k)


def test_automatic_microbatches_only_on_cpu_and_for_large_activations():
  from configs import common
  from vpt_jax.tuning import build
  cfg = common.get_config()
  vit_b = vpt_jax.models.vit.VisionTransformer(
      image_size=(224, 224), patch_size=(16, 16), width=768, depth=12, num_heads=12, mlp_dim=3072)
  per_row = build.activation_bytes_per_row(cfg, vit_b)  # VPT-deep p=50: 247 tokens
  assert per_row == 4 * max(247 * 3072, 3 * 247 * 768, 12 * 247 * 247)
  assert steps.auto_microbatch(0, per_row, "cpu") == steps.CPU_CHUNK_BYTES // per_row == 5
  assert steps.num_chunks(64, 5) == 16  # chunks of 4 rows (the fewest chunks of <= 5 rows)
  assert steps.auto_microbatch(0, per_row, "gpu") == steps.auto_microbatch(0, per_row, "tpu") == 0
  assert steps.auto_microbatch(3, per_row, "gpu") == 3  # an explicit setting applies anywhere
  assert steps.auto_microbatch(0, None, "cpu") == 0     # families without an estimate
  tiny = vit_b.clone(image_size=(32, 32), patch_size=(4, 4), width=64, mlp_dim=128, num_heads=4)
  assert steps.auto_microbatch(0, build.activation_bytes_per_row(cfg, tiny), "cpu") > 64
