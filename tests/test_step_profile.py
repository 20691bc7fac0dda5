"""benchmarks/step_profile.py: its per-op-kind breakdown accounts for the step it profiles.

The classification is checked against independent facts of the compiled step: the dot FLOPs it
sums per kind add up to most of XLA's own FLOP count of the step (the rest is elementwise work,
a large share at width 64), every kind
the issue names shows up in a VPT-deep train step, and the key/value-only prompt path is found.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import step_cost  # noqa: E402
import step_profile  # noqa: E402
from conftest import jit_init  # noqa: E402
from vpt_jax import prompts  # noqa: E402
from vpt_jax.tuning import optim, rules, steps  # noqa: E402


@pytest.fixture(scope="module")
def deep_step():
  """The trainer's VPT-deep step of a 2-layer width-64 ViT (compiled once for the module)."""
  arch = step_cost.MODELS["tiny"]
  model = prompts.attach(arch.model(), dict_config(length=4))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, *arch.image_size, 3)),
                       jnp.float32)
  variables = jit_init(model, jax.random.PRNGKey(0), images[:1])
  trainable, frozen = rules.split(variables, rules.label(variables,
                                                         rules.protocol_patterns("vpt")))
  tx, schedule = optim.make_optimizer(optim.default_optim_config(), steps_per_epoch=10)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(1))
  batch = {"image": images, "label": jnp.arange(4) % arch.num_classes}
  step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=(0,))
  return {"step": step.lower(state, frozen, batch).compile(), "step_args": (state, frozen, batch)}


def dict_config(**kw):
  cfg = prompts.default_config()
  cfg.update(kw)
  return cfg


def test_breakdown_accounts_for_the_step(deep_step):
  step = deep_step["step"]
  r = step_profile.profile(step, deep_step["step_args"], 2, True)
  kinds = r["kinds"]
  dot_gflops = sum(v["gflops"] for v in kinds.values())
  total = step.cost_analysis()["flops"] / 1e9
  assert 0.6 * total <= dot_gflops <= total, (dot_gflops, total)
  for kind in ("matmul/fwd", "matmul/bwd", "attention/fwd", "attention/bwd", "layernorm/fwd",
               "gelu/fwd", "kv_only_prompts/fwd", "tail/fwd"):
    assert kind in kinds and kinds[kind]["ms"] > 0, (kind, sorted(kinds))
  assert set(k.split("/")[0] for k in kinds) <= set(step_profile.KINDS)
  # Per-thunk minima summed can't exceed the fastest whole step by much (thunks run one after
  # another on this runtime, up to what overlaps).
  assert r["thunk_sum_ms"] <= 2 * r["wall_min_ms"] + 1.0


def test_dot_flops_formula():
  line = ("%dot.1 = f32[8,6,197,197]{3,2,1,0} dot(%p0, %p1), lhs_batch_dims={0,1}, "
          "lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}")
  want = 2 * 8 * 6 * 197 * 197 * 64
  assert step_profile.dot_flops(line, {"p0": [8, 6, 197, 64]}) == want
  assert np.isclose(step_profile.dot_flops(line.replace("{3}", "{2}"), {"p0": [8, 6, 5, 64]}),
                    2 * 8 * 6 * 197 * 197 * 5)
