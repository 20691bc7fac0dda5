"""The prompt plan (`vpt_jax.prompts.plan`): per-layer actions and explicit prompt counts."""

import jax.numpy as jnp
import numpy as np
import pytest

from vpt_jax.prompts import plan

P = 3


def table(*rows):
  return np.array(rows, bool)


@pytest.mark.parametrize("fresh, kw, actions, outputs", [
    # VPT-deep: every layer replaces the previous prompt outputs; fast: all memory.
    (table([1, 1, 1, 1]), {}, ("memory",) * 4, (0, 0, 0, 0)),
    (table([1, 1, 1, 1]), {"fast_path": False}, ("insert", "replace", "replace", "replace"),
     (P, P, P, P)),
    # The pooling reads prompt outputs: the last layer must compute them.
    (table([1, 1, 1, 1]), {"reads_prompts": True}, ("memory", "memory", "memory", "insert"),
     (0, 0, 0, P)),
    # VPT-shallow: the prompts flow through every later layer.
    (table([1, 0, 0, 0]), {}, ("insert", "keep", "keep", "keep"), (P, P, P, P)),
    # First 2 of 4, no expand: dropped after layer 1 (fast: layer 1's prompts are memory).
    (table([1, 1, 0, 0]), {"expand": False}, ("memory", "memory", "keep", "keep"), (0,) * 4),
    (table([1, 1, 0, 0]), {"expand": False, "fast_path": False},
     ("insert", "replace", "drop", "keep"), (P, P, 0, 0)),
    # Last 2 of 4 (reverse): nothing before layer 2.
    (table([0, 0, 1, 1]), {}, ("keep", "keep", "memory", "memory"), (0,) * 4),
    # Two tasks, one deep and one every other layer: per-example choice where they differ.
    (table([1, 1, 1, 1], [1, 0, 1, 0]), {}, ("insert", "select", "replace", "select"),
     (P, P, P, P)),
])
def test_actions_and_counts(fresh, kw, actions, outputs):
  p = plan.make(fresh, P, **kw)
  assert p.actions == actions
  assert tuple(p.output(i) for i in range(4)) == outputs
  assert tuple(p.carried(i) for i in range(4)) == (0,) + outputs[:3]


def test_pixel_prompts_enter_with_the_input():
  p = plan.make(plan.fresh_table((0,), 3), P, expand=False, fast_path=False, entry=P)
  assert p.actions == ("keep", "drop", "keep") and p.carried(0) == P and p.output(1) == 0


def test_mixed_first_layers_are_refused():
  with pytest.raises(ValueError, match="same first layer"):
    plan.make(table([1, 1], [0, 1]), P)


def test_edit_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 1 + P + 4, 5)).astype(np.float32)   # class, 3 prompts, 4 patches
  new = rng.normal(size=(2, P, 5)).astype(np.float32)
  fresh = lambda memory: jnp.asarray(new[0] if memory else new)
  cls, old, patches = x[:, :1], x[:, 1:1 + P], x[:, 1 + P:]
  want = {
      "keep": (x, P, None),
      "drop": (np.concatenate([cls, patches], 1), 0, None),
      "memory": (np.concatenate([cls, patches], 1), 0, new[0]),
      "replace": (np.concatenate([cls, new, patches], 1), P, None),
      "select": (np.concatenate([cls, np.stack([new[0], old[1]]), patches], 1), P, None),
  }
  for action, (tokens, n, memory) in want.items():
    got = plan.edit(action, jnp.asarray(x), prefix=1, carried=P, fresh=fresh,
                    choose=jnp.array([True, False]))
    np.testing.assert_array_equal(got[0], tokens, err_msg=action)
    assert got[1] == n, action
    assert (got[2] is None) == (memory is None), action
    if memory is not None:
      np.testing.assert_array_equal(got[2], memory)
  inserted = plan.edit("insert", jnp.asarray(np.concatenate([cls, patches], 1)), prefix=1,
                       carried=0, fresh=fresh)
  np.testing.assert_array_equal(inserted[0], want["replace"][0])
