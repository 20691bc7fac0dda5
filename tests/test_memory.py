"""Memory options of issue 18 are exact: rematerialisation, and (below) bf16 storage and sharding.

The tiny model (width 64, 2 layers, 32x32) with VPT-deep prompts; one compile per option.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt_jax import prompts
from vpt_jax.tuning import rules, steps
from vpt_jax.weights.npz import Architecture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = Architecture(patch_size=(4, 4), in_channels=3, width=64, depth=2, num_heads=4, mlp_dim=128,
                    grid=(8, 8), pool_type="token", class_token=True, posemb_cls_row=True,
                    representation_size=None, num_classes=5)


def deep_vpt(**overrides):
  cfg = prompts.default_config()
  cfg.update(dict(length=3, deep=True))
  return prompts.attach(TINY.model(**overrides), cfg)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
  model = deep_vpt()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  # A non-zero head, so the gradients reach the prompts.
  params = dict(variables["params"])
  params["head"] = {"kernel": jnp.asarray(rng.normal(0, 0.3, (64, 5)), jnp.float32),
                    "bias": jnp.zeros((5,), jnp.float32)}
  variables = {**variables, "params": params}
  mask = rules.label(variables, rules.protocol_patterns("vpt"))
  return images, labels, variables, mask


def logits_and_grads(model, setup):
  images, labels, variables, mask = setup
  trainable, frozen = rules.split(variables, mask)
  loss_fn = steps.make_loss_fn(model)
  (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      trainable, frozen, images, labels, jax.random.PRNGKey(0))
  return np.asarray(logits), grads


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_keeps_logits_and_gradients(setup, remat):
  want_logits, want_grads = logits_and_grads(deep_vpt(), setup)
  got_logits, got_grads = logits_and_grads(deep_vpt(remat=remat), setup)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-6, rtol=0)
  leaves = jax.tree.leaves(want_grads)
  assert leaves and all(np.abs(np.asarray(g)).max() > 1e-4 for g in leaves)  # gradients flow
  for path, got, want in zip(rules.leaf_paths(got_grads), jax.tree.leaves(got_grads), leaves):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0, err_msg=path)


def test_remat_recomputes_in_the_backward_pass(setup):
  """The option is really applied: the traced step holds one checkpoint per block (the memory
  it saves is measured at ViT-B/L size by `benchmarks/step_cost.py --memory=remat`)."""
  images, labels, variables, mask = setup
  trainable, frozen = rules.split(variables, mask)

  def checkpoints(model):
    loss = lambda t: steps.make_loss_fn(model)(t, frozen, images, labels, jax.random.PRNGKey(0))[0]
    return len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jax.make_jaxpr(loss)(trainable))))
  assert checkpoints(deep_vpt()) == 0
  assert checkpoints(deep_vpt(remat="block")) == TINY.depth


def test_unknown_remat_is_refused(setup):
  with pytest.raises(ValueError, match="unknown remat 'all'"):
    deep_vpt(remat="all").apply(setup[2], setup[0])


def test_frozen_weights_sharded_over_eight_devices(tmp_path):
  """model.frozen_sharding='sharded' on 8 CPU devices (one process): each device holds 1/8 of the
  frozen backbone, and 4 trainer steps give the replicated run's prompts and logits (1e-5)."""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_frozen_run.py"),
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  res = json.loads(out.stdout.strip().splitlines()[-1])
  print(res)
  assert res["devices"] == 8
  assert res["sharded_bytes_per_device"] * 8 == pytest.approx(res["replicated_bytes_per_device"],
                                                              rel=0.02)
  assert "PartitionSpec()" not in res["sharded_specs"]  # every leaf of the tiny ViT is split
  assert res["prompts_max_abs"] > 1e-3  # the prompts did train
  assert res["trainable_max_diff"] < 1e-5 and res["logits_max_diff"] < 1e-5
