"""The trainable-leaf rule: which leaves each protocol trains, split/merge, parameter reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vpt_jax
from conftest import data_path
from vpt_jax import prompts
from vpt_jax.tuning import rules


@pytest.fixture(scope="module")
def variables():
  base, v = vpt_jax.load_pretrained(data_path("vitjax_token.npz"), num_classes=5)
  cfg = prompts.default_config()
  cfg.length = 2
  model = prompts.attach(base, cfg)
  return {**v, "prompts": prompts.init_prompts(model, jax.random.PRNGKey(0))}


def trainable_paths(variables, protocol):
  mask = rules.label(variables, rules.protocol_patterns(protocol, depth=2))
  return sorted(p for p, m in zip(rules.leaf_paths(variables), jax.tree.leaves(mask)) if m)


def test_vpt_trains_prompts_and_head(variables):
  assert trainable_paths(variables, "vpt") == [
      "params/head/bias", "params/head/kernel", "prompts/hooks/tokens"]


def test_linear_trains_the_head_only(variables):
  assert trainable_paths(variables, "linear") == ["params/head/bias", "params/head/kernel"]


def test_full_trains_everything(variables):
  assert trainable_paths(variables, "full") == sorted(rules.leaf_paths(variables))


def test_bias_trains_every_bias_and_the_head(variables):
  paths = trainable_paths(variables, "bias")
  expected = sorted(p for p in rules.leaf_paths(variables)
                    if p.startswith("params/") and (p.endswith("/bias") or "/head/" in p))
  assert paths == expected
  assert "params/Transformer/encoderblock_0/LayerNorm_0/bias" in paths
  assert "params/Transformer/encoderblock_0/LayerNorm_0/scale" not in paths


def test_partial_k_trains_the_last_blocks(variables):
  paths = trainable_paths(variables, "partial-1")
  assert all(p.startswith(("params/Transformer/encoderblock_1/", "params/Transformer/encoder_norm/",
                           "params/head/")) for p in paths)
  assert any("encoderblock_1/MlpBlock_0" in p for p in paths)
  assert "params/Transformer/encoder_norm/scale" in paths
  with pytest.raises(ValueError, match="partial-3.*depth \\(2\\)"):
    rules.protocol_patterns("partial-3", depth=2)


def test_bad_rules_are_errors(variables):
  with pytest.raises(ValueError, match=r"unknown protocol 'lora'"):
    rules.protocol_patterns("lora")
  with pytest.raises(ValueError, match=r"\['params/heads/.\*'\] match no variable"):
    rules.label(variables, [r"params/heads/.*"])
  with pytest.raises(ValueError, match=r"not a valid regex"):
    rules.label(variables, [r"params/(head"])


def test_split_and_merge_are_inverse_and_disjoint(variables):
  mask = rules.label(variables, rules.protocol_patterns("vpt"))
  trainable, frozen = rules.split(variables, mask)
  assert set(rules.leaf_paths(trainable)).isdisjoint(rules.leaf_paths(frozen))
  merged = rules.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(variables)):
    assert a is b
  with pytest.raises(ValueError, match="both trainable and frozen"):
    rules.merge(trainable, variables)


def test_param_report_follows_the_papers_convention(variables):
  """Total params over N tasks = (shared backbone + N * per-task trainable) / backbone."""
  backbone = sum(int(np.prod(v.shape)) for k, v in variables["params"].items() if k != "head"
                 for v in jax.tree.leaves(v))
  head = 64 * 5 + 5
  n_prompts = 2 * 2 * 64
  for protocol, t, shared in [("linear", head, backbone), ("vpt", head + n_prompts, backbone),
                              ("full", backbone + head + n_prompts, 0)]:
    mask = rules.label(variables, rules.protocol_patterns(protocol, depth=2))
    r = rules.param_report(variables, mask, n_tasks=24)
    assert r["backbone"] == backbone and r["trainable"] == t, protocol
    assert r["total_multiple"] == pytest.approx((shared + 24 * t) / backbone), protocol
    assert r["per_task_multiple"] == pytest.approx((shared + t) / backbone), protocol


def test_count_works_on_abstract_trees():
  tree = {"a": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": {"c": np.zeros(5)}}
  assert rules.count(tree) == 17
