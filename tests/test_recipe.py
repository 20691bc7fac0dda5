"""The paper's recipe, detail by detail (issue 13): head init, the checkpoint that is the model,
the presets' official settings."""

import math

import jax
import numpy as np
import pytest

from configs import demo
from vpt_jax.tuning import build, steps


def _built(head_init):
  c = demo.get_config(f"vpt-deep,model.head_init={head_init}")
  c.model.num_classes = 10
  return build.build(c)


@pytest.fixture(scope="module")
def heads():
  return {k: _built(k) for k in ("kaiming", "zeros")}


def test_official_head_init_is_kaiming_normal_fan_out_with_bias_minus_log_99(heads):
  head = heads["kaiming"].variables["params"]["head"]
  kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
  assert kernel.shape == (64, 10)
  assert abs(kernel.mean()) < 0.1 * math.sqrt(2 / 10)
  assert kernel.std() == pytest.approx(math.sqrt(2 / 10), rel=0.12)   # fan_out = classes
  np.testing.assert_allclose(bias, -math.log(99), rtol=1e-6)
  zero = heads["zeros"].variables["params"]["head"]
  assert not np.any(np.asarray(zero["kernel"])) and not np.any(np.asarray(zero["bias"]))
  # the prompts keep their initial values whatever the head
  np.testing.assert_array_equal(heads["kaiming"].variables["prompts"]["hooks"]["tokens"],
                                heads["zeros"].variables["prompts"]["hooks"]["tokens"])


def test_prompts_get_a_gradient_at_step_0_only_with_the_official_head(heads):
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 3], np.int32)
  norms = {}
  for kind, b in heads.items():
    trainable, frozen = build.rules.split(b.variables, b.mask)
    grad = jax.jit(jax.grad(lambda t: steps.make_loss_fn(b.model)(
        t, frozen, images, labels, jax.random.PRNGKey(0))[0]))(trainable)
    norms[kind] = float(np.abs(np.asarray(grad["prompts"]["hooks"]["tokens"])).max())
  assert norms["zeros"] == 0.0 and norms["kaiming"] > 1e-6


def test_presets_use_the_official_head_and_bad_values_are_named():
  assert demo.get_config("vpt-deep").model.head_init == "kaiming"
  with pytest.raises(ValueError, match="model.head_init='normal'"):
    build.check_config(demo.get_config("vpt-deep,model.head_init=normal"))
