"""SETR-PUP heads, patch feature maps, the segmentation loss, metrics and whole-image inference.

References are independent numpy formulas: PyTorch's bilinear interpolation with
align_corners=False written out per output pixel, LayerNorm/conv/BatchNorm by hand, and a
confusion matrix counted by hand.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_apply, jit_init
from vpt_jax import prompts as vpt
from vpt_jax.weights.npz import load_pretrained
from vpt_jax.tasks import seg_inference, seg_metrics
from vpt_jax.tasks import segmentation as seg
from vpt_jax.tuning import optim, rules, seg_steps

TINY = "vpt_jax/assets/tiny_random_vit.npz"


# -- numpy references -----------------------------------------------------------------------------

def torch_bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of F.interpolate(mode='bilinear', align_corners=False)."""
  m = np.zeros((n_out, n_in))
  for o in range(n_out):
    src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[o, i0] += 1 - lam
    m[o, i1] += lam
  return m


def np_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
  """(B, H, W, C) -> (B, h, w, C) by the PyTorch formula (separable)."""
  mh, mw = torch_bilinear_1d(x.shape[1], h), torch_bilinear_1d(x.shape[2], w)
  return np.einsum("yh,bhwc,xw->byxc", mh, x, mw)


def np_conv(x: np.ndarray, k: np.ndarray, b=None) -> np.ndarray:
  """'same' zero-padded stride-1 conv, x (B, H, W, I), k (kh, kw, I, O)."""
  kh, kw = k.shape[:2]
  ph, pw = kh // 2, kw // 2
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  out = np.zeros(x.shape[:3] + (k.shape[-1],))
  for dy in range(kh):
    for dx in range(kw):
      out += np.einsum("bhwi,io->bhwo", xp[:, dy:dy + x.shape[1], dx:dx + x.shape[2]], k[dy, dx])
  return out if b is None else out + b


def np_head(p: dict, stats: dict, x: np.ndarray, num_convs: int, up: int, train: bool):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  x = (x - mu) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  batch = []
  for i in range(num_convs):
    x = np_conv(x, p[f"conv_{i}"]["kernel"])
    if train:
      m, v = x.mean((0, 1, 2)), x.var((0, 1, 2))
      batch.append((m, v))
    else:
      m, v = stats[f"bn_{i}"]["mean"], stats[f"bn_{i}"]["var"]
    x = (x - m) / np.sqrt(v + 1e-5) * p[f"bn_{i}"]["scale"] + p[f"bn_{i}"]["bias"]
    x = np.maximum(x, 0)
    x = np_resize(x, x.shape[1] * up, x.shape[2] * up)
  return np_conv(x, p["cls_seg"]["kernel"], p["cls_seg"]["bias"]), batch


def randomize(tree, key, scale=0.5):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def np_ce(logits, labels, average):
  logits = np_resize(logits, *labels.shape[1:])
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  valid = labels != 255
  nll = np.zeros(labels.shape)
  for idx in zip(*np.nonzero(valid)):
    nll[idx] = -logp[idx + (labels[idx],)]
  return nll.mean() if average == "all" else nll.sum() / max(valid.sum(), 1)


# -- heads ----------------------------------------------------------------------------------------

def test_torch_bilinear_reference_matches_known_values():
  # 2 -> 4 upsampling, align_corners=False: [a, .75a+.25b, .25a+.75b, b].
  np.testing.assert_allclose(torch_bilinear_1d(2, 4),
                             [[1, 0], [.75, .25], [.25, .75], [0, 1]])


@pytest.mark.parametrize("n_in,n_out", [(3, 6), (4, 16), (6, 4), (5, 7)])
def test_resize_bilinear_is_pytorch_align_corners_false(n_in, n_out):
  x = np.random.default_rng(0).normal(size=(2, n_in, n_in + 1, 3)).astype(np.float32)
  got = seg.resize_bilinear(jnp.asarray(x), (n_out, n_out + 2))
  np.testing.assert_allclose(got, np_resize(x, n_out, n_out + 2), atol=1e-5)


@pytest.fixture(scope="module")
def head_case():
  head = seg.SETRUPHead(num_classes=5, channels=6, num_convs=2, up_scale=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 8))
  v = jit_init(head, jax.random.PRNGKey(0), x)
  v = {"params": randomize(v["params"], jax.random.PRNGKey(2)),
       "batch_stats": jax.tree_util.tree_map(
           lambda s: s + jax.random.uniform(jax.random.PRNGKey(3), s.shape), v["batch_stats"])}
  return head, x, v


def test_setr_up_head_train_mode_matches_numpy(head_case):
  head, x, v = head_case
  out, state = jit_apply(head, v, x, train=True, mutable=["batch_stats"])
  assert out.shape == (2, 12, 16, 5)
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  ref, batch = np_head(p, None, np.asarray(x, np.float64), 2, 2, train=True)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  for i, (m, var) in enumerate(batch):  # running averages: momentum 0.9 (PyTorch's 0.1)
    old = v["batch_stats"][f"bn_{i}"]
    np.testing.assert_allclose(state["batch_stats"][f"bn_{i}"]["mean"],
                               0.9 * old["mean"] + 0.1 * m, atol=1e-5)
    np.testing.assert_allclose(state["batch_stats"][f"bn_{i}"]["var"],
                               0.9 * old["var"] + 0.1 * var, atol=1e-5)


def test_setr_up_head_eval_mode_uses_running_statistics(head_case):
  head, x, v = head_case
  out = jit_apply(head, v, x, train=False)
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  stats = jax.tree_util.tree_map(np.asarray, v["batch_stats"])
  ref, _ = np_head(p, stats, np.asarray(x, np.float64), 2, 2, train=False)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  # No conv bias before a norm (mmcv ConvModule), a bias on the classifier.
  assert "bias" not in v["params"]["conv_0"] and "bias" in v["params"]["cls_seg"]


def test_setr_pup_specs_are_mmseg_ade20k():
  decode, aux = seg.setr_pup_specs(24)
  assert (decode.layer, decode.channels, decode.num_convs, decode.up_scale, decode.weight) == (
      23, 256, 4, 2, 1.0)
  assert [(a.layer, a.num_convs, a.up_scale, a.weight) for a in aux] == [
      (9, 2, 4, 0.4), (14, 2, 4, 0.4), (19, 2, 4, 0.4)]
  assert decode.up_scale ** decode.num_convs == 16 == aux[0].up_scale ** aux[0].num_convs
  decode, aux = seg.setr_pup_specs(12)
  assert decode.layer == 11 and [a.layer for a in aux] == [4, 7, 9]  # 5, 7.5, 10 rounded, 0-based


# -- backbone feature maps ------------------------------------------------------------------------

def tiny_specs():
  dec = seg.HeadSpec(layer=1, channels=8, num_convs=2, up_scale=2)
  return dec, (seg.HeadSpec(layer=0, channels=8, num_convs=1, up_scale=4, weight=0.4),)


@pytest.fixture(scope="module")
def tiny():
  model, variables = load_pretrained(TINY)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  return model, variables, images


def prompt_cfg(**kw):
  cfg = vpt.default_config()
  cfg.update({"length": 3, "deep": True, **kw})
  return cfg


def test_patch_maps_plain_are_the_patch_rows(tiny):
  model, variables, images = tiny
  maps = seg.patch_maps(model, variables, images, (0, 1))
  _, state = model.clone(fast_path=False).apply(variables, images, mutable=["intermediates"])
  for i in (0, 1):
    rows = state["intermediates"]["Transformer"][f"block_{i}"][0]
    assert rows.shape == (2, 65, 64) and maps[i].shape == (2, 8, 8, 64)
    np.testing.assert_array_equal(maps[i].reshape(2, 64, 64), rows[:, 1:])


@pytest.mark.parametrize("kw", [dict(), dict(deep=False), dict(length=0, kv_length=2)])
def test_patch_maps_with_prompts_exclude_prompt_rows(tiny, kw):
  """Prompted backbones (deep with its keys/values-only fast path, shallow, E2VPT key-value
  prompts): maps are the patch rows of the straightforward all-rows model, and the prompts do
  change them (they are attended to)."""
  model, variables, images = tiny
  fast = vpt.attach(model, prompt_cfg(**kw))
  slow = vpt.attach(model.clone(fast_path=False), prompt_cfg(**kw))
  v = {**variables, "prompts": vpt.init_prompts(fast, jax.random.PRNGKey(5))}
  maps = seg.patch_maps(fast, v, images, (0, 1))
  _, state = jit_apply(slow, v, images, mutable=["intermediates"])
  plain = seg.patch_maps(model, variables, images, (1,))
  for i in (0, 1):
    rows = state["intermediates"]["Transformer"][f"block_{i}"][0]
    n_prompts = kw.get("length", 3)
    assert rows.shape[1] == 1 + n_prompts + 64
    np.testing.assert_allclose(maps[i].reshape(2, 64, 64), rows[:, 1 + n_prompts:], atol=1e-5)
  assert np.abs(np.asarray(maps[1] - plain[1])).max() > 1e-3


def test_prompt_rows_come_from_the_plan_and_a_planless_insertion_is_named(tiny):
  """Rows are counted from the prompt plan (deep, straightforward: p in every block; on the fast
  path the prompts are keys/values only: no rows); tokens that a hook inserts without a plan make
  the count disagree: an error."""
  from vpt_jax.models.hooks import Hooks
  model, variables, images = tiny
  slow = model.clone(fast_path=False)
  assert [seg.prompt_rows(vpt.attach(slow, prompt_cfg()), i) for i in (0, 1)] == [3, 3]
  assert [seg.prompt_rows(vpt.attach(model, prompt_cfg()), i) for i in (0, 1)] == [0, 0]
  assert seg.prompt_rows(vpt.attach(model, prompt_cfg(length=0, kv_length=2)), 1) == 0
  assert seg.prompt_rows(model, 0) == 0

  class Inserts(Hooks):
    def embed(self, images, embedding, *, train):
      return embedding(images), jnp.zeros((1, 2, 64))
  with pytest.raises(ValueError, match="block 0 output has 67 rows; expected 1"):
    seg.patch_maps(model.clone(hooks=Inserts()), variables, images, (0,))


def test_patch_maps_at_another_resolution_resample_posemb():
  model, variables = load_pretrained(TINY, image_size=48)
  images = jnp.zeros((1, 48, 48, 3))
  maps = seg.patch_maps(model, variables, images, (1,))
  assert maps[1].shape == (1, 12, 12, 64)
  with pytest.raises(ValueError, match="outside the backbone"):
    seg.patch_maps(model, variables, images, (2,))


def test_segmenter_shapes_and_batch_stats(tiny):
  model, variables, images = tiny
  dec, aux = tiny_specs()
  sm = seg.Segmenter(model, seg.SETRPUP(num_classes=4, decode=dec, aux=aux))
  hv = sm.init_head(jax.random.PRNGKey(0))
  assert set(hv) == {"params", "batch_stats"}
  assert set(hv["params"]) == {"decode_head", "auxiliary_head_0"}
  (d, a), new = jax.jit(lambda b, h, x: sm.apply(b, h, x, train=True))(variables, hv, images)
  assert d.shape == (2, 32, 32, 4) and [x.shape for x in a] == [(2, 32, 32, 4)]
  assert not np.allclose(new["batch_stats"]["decode_head"]["bn_0"]["mean"],
                         hv["batch_stats"]["decode_head"]["bn_0"]["mean"])
  d_eval, a_eval = jax.jit(sm.apply)(variables, hv, images)
  assert d_eval.shape == (2, 32, 32, 4) and a_eval == ()


# -- loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("average", ["all", "valid"])
def test_cross_entropy_with_ignored_pixels_matches_numpy(average):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 8, 8))
  labels[rng.random(labels.shape) < 0.3] = 255
  got = seg.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), average=average)
  np.testing.assert_allclose(got, np_ce(logits.astype(np.float64), labels, average), rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_and_bad_average_is_named():
  labels = jnp.full((1, 4, 4), 255)
  assert float(seg.cross_entropy(jnp.ones((1, 4, 4, 3)), labels, average="valid")) == 0.0
  with pytest.raises(ValueError, match="average='mean'"):
    seg.cross_entropy(jnp.ones((1, 4, 4, 3)), labels, average="mean")


def test_segmentation_loss_weights_decode_and_aux():
  rng = np.random.default_rng(1)
  dec, aux = seg.setr_pup_specs(24)
  head = seg.SETRPUP(num_classes=3, decode=dec, aux=aux)
  labels = rng.integers(0, 3, size=(2, 6, 6))
  labels[0, 0] = 255
  outs = [rng.normal(size=(2, 6, 6, 3)).astype(np.float32) for _ in range(4)]
  total, parts = seg.segmentation_loss(jnp.asarray(outs[0]), [jnp.asarray(o) for o in outs[1:]],
                                       jnp.asarray(labels), head)
  ces = [np_ce(o.astype(np.float64), labels, "all") for o in outs]
  np.testing.assert_allclose(total, ces[0] + 0.4 * sum(ces[1:]), rtol=1e-5)
  np.testing.assert_allclose(parts["aux_2"], ces[3], rtol=1e-5)
  with pytest.raises(ValueError, match="2 auxiliary outputs for 3"):
    seg.segmentation_loss(jnp.asarray(outs[0]), [jnp.asarray(o) for o in outs[1:3]],
                          jnp.asarray(labels), head)


def test_train_step_gradients_reach_prompts_and_heads(tiny):
  """A VPT-deep segmenter trains prompts and heads; the frozen backbone gets no update."""
  model, variables, images = tiny
  fast = vpt.attach(model, prompt_cfg())
  dec, aux = tiny_specs()
  sm = seg.Segmenter(fast, seg.SETRPUP(num_classes=3, decode=dec, aux=aux))
  hv = sm.init_head(jax.random.PRNGKey(0))
  pr = vpt.init_prompts(fast, jax.random.PRNGKey(1))
  labels = jax.random.randint(jax.random.PRNGKey(2), (2, 32, 32), 0, 3)

  def loss(trainable):
    (d, a), _ = sm.apply({**variables, "prompts": trainable["prompts"]},
                         {**hv, "params": trainable["head"]}, images, train=True)
    return seg.segmentation_loss(d, a, labels, sm.head)[0]
  grads = jax.jit(jax.grad(loss))({"prompts": pr, "head": hv["params"]})
  norms = jax.tree_util.tree_map(lambda g: float(jnp.abs(g).sum()), grads)
  assert norms["prompts"]["hooks"]["tokens"] > 0
  assert norms["head"]["decode_head"]["cls_seg"]["kernel"] > 0
  assert norms["head"]["auxiliary_head_0"]["conv_0"]["kernel"] > 0


# -- metrics -------------------------------------------------------------------------------------

def test_confusion_matrix_and_miou_by_hand():
  # 4 classes. Class 2 is predicted but never labelled (IoU 0, counts); class 3 appears in
  # neither (IoU NaN, left out of the mean). 255 pixels are ignored whatever is predicted.
  labels = np.array([[0, 0, 1, 1, 255],
                     [0, 1, 1, 255, 0]])
  pred = np.array([[0, 1, 1, 1, 3],
                   [2, 1, 0, 2, 0]])
  # Counted by hand (rows gt, columns prediction), ignored pixels (0,4) and (1,3) skipped:
  # gt 0: (0,0)->0, (0,1)->1, (1,0)->2, (1,4)->0   => [2, 1, 1, 0]
  # gt 1: (0,2)->1, (0,3)->1, (1,1)->1, (1,2)->0   => [1, 3, 0, 0]
  want = np.array([[2, 1, 1, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  m = seg_metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels), 4)
  np.testing.assert_array_equal(m, want)
  r = seg_metrics.summarize(m)
  # IoU_0 = 2 / (4 + 3 - 2) = 2/5; IoU_1 = 3 / (4 + 4 - 3) = 3/5; IoU_2 = 0 / (0 + 1 - 0) = 0.
  np.testing.assert_allclose(r["IoU"][:3], [2 / 5, 3 / 5, 0.0])
  assert np.isnan(r["IoU"][3])
  np.testing.assert_allclose(r["mIoU"], (2 / 5 + 3 / 5 + 0) / 3)
  np.testing.assert_allclose(r["aAcc"], 5 / 8)
  np.testing.assert_allclose(r["mAcc"], (2 / 4 + 3 / 4) / 2)  # classes 2, 3 have no labels


def test_confusion_matrix_accumulates_over_images():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 6, size=(3, 7, 9))
  labels[rng.random(labels.shape) < 0.2] = 255
  pred = rng.integers(0, 6, size=(3, 7, 9))
  whole = seg_metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels), 6)
  parts = sum(seg_metrics.confusion_matrix(jnp.asarray(p), jnp.asarray(l), 6)
              for p, l in zip(pred, labels))
  np.testing.assert_array_equal(whole, parts)
  assert int(whole.sum()) == int((labels != 255).sum())


# -- inference -----------------------------------------------------------------------------------

W_TOY = np.random.default_rng(7).normal(size=(3, 4)).astype(np.float32)


def pointwise(x):
  """A 1x1 conv: translation-equivariant with a 1-pixel receptive field."""
  return np.einsum("bhwc,ck->bhwk", x, W_TOY)


@pytest.mark.parametrize("size", [(40, 57), (20, 25), (32, 32)])
def test_slide_inference_equals_direct_forward_for_a_pointwise_model(size):
  image = np.random.default_rng(0).normal(size=size + (3,)).astype(np.float32)
  calls = []
  def fn(x):
    calls.append(x.shape)
    return pointwise(x)
  got = seg_inference.slide_inference(fn, image, crop=(32, 32), stride=(21, 21), batch_size=2)
  np.testing.assert_allclose(got, pointwise(image[None])[0], atol=1e-5)
  assert all(s == (2, 32, 32, 3) for s in calls)  # fixed batch: one compilation


def test_window_starts_follow_mmseg_grid():
  # 1000 px, crop 512, stride 341: grids = (1000 - 512 + 340) // 341 + 1 = 3; last moved back.
  assert seg_inference.window_starts(1000, 512, 341) == [0, 341, 488]
  assert seg_inference.window_starts(512, 512, 341) == [0]
  assert seg_inference.window_starts(300, 512, 341) == [0]
  with pytest.raises(ValueError, match="uncovered"):
    seg_inference.window_starts(100, 10, 20)


def test_slide_inference_averages_overlaps_with_the_count_map():
  """A model that outputs its window's top-left corner value everywhere: the overlap average is
  the mean over the windows covering a pixel, computed here from the window grid."""
  image = np.arange(20 * 20, dtype=np.float32).reshape(20, 20, 1)
  fn = lambda x: np.broadcast_to(x[:, :1, :1, :], x.shape)
  got = seg_inference.slide_inference(fn, image, crop=(8, 8), stride=(6, 6))[..., 0]
  ys = seg_inference.window_starts(20, 8, 6)
  want = np.zeros((20, 20))
  cnt = np.zeros((20, 20))
  for y in ys:
    for x in ys:
      want[y:y + 8, x:x + 8] += image[y, x, 0]
      cnt[y:y + 8, x:x + 8] += 1
  np.testing.assert_allclose(got, want / cnt, rtol=1e-6)


def test_multi_scale_flip_matches_numpy():
  """Toy model: logits = image channels + a column ramp (not flip-invariant). The multi-scale +
  flip probabilities equal the numpy computation with the PyTorch resize formula."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(10, 14, 3)).astype(np.float32)
  ramp = lambda w: np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
  fn = lambda x: x + ramp(x.shape[2])[None]  # crop == whole (padded) image, see crop below
  scales = (0.5, 1.0, 1.5)
  got = seg_inference.multi_scale_inference(fn, image, crop=(21, 21), stride=(21, 21),
                                            scales=scales, flip=True)
  want = np.zeros((10, 14, 3))
  for r in scales:
    h, w = int(10 * r + 0.5), int(14 * r + 0.5)
    x = np_resize(image[None].astype(np.float64), h, w)[0]
    for flip in (False, True):
      xf = x[:, ::-1] if flip else x
      padded = np.zeros((21, 21, 3))
      padded[:h, :w] = xf
      logits = (padded + ramp(21))[:h, :w]
      if flip:
        logits = logits[:, ::-1]
      logits = np_resize(logits[None], 10, 14)[0]
      e = np.exp(logits - logits.max(-1, keepdims=True))
      want += e / e.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, want / 6, atol=1e-5)
  single = seg_inference.multi_scale_inference(fn, image, crop=(21, 21), stride=(21, 21))
  assert np.abs(single - got).max() > 1e-3  # scales and flips do change the result


def test_protocol_patterns_and_dense_backbone(tiny):
  model, variables, images = tiny
  dense, v = seg.dense_backbone(model, variables)
  assert "head" not in v["params"] and dense.num_classes is None
  maps = seg.patch_maps(dense, v, images, (1,))
  np.testing.assert_array_equal(maps[1], seg.patch_maps(model, variables, images, (1,))[1])
  fast = vpt.attach(dense, prompt_cfg())
  v = {**v, "prompts": vpt.init_prompts(fast, jax.random.PRNGKey(0))}
  counts = {}
  for proto in ("full", "head", "bias", "vpt", "vpt+bias"):
    mask = rules.label(v, seg_steps.backbone_patterns(proto))
    counts[proto] = rules.count(rules.split(v, mask)[0])
  n_prompts = 2 * 3 * 64  # 2 layers x 3 tokens x width
  n_params = rules.count(v["params"])
  assert counts["head"] == 0 and counts["vpt"] == n_prompts
  assert counts["full"] == n_params
  assert counts["vpt+bias"] == counts["bias"] + n_prompts and 0 < counts["bias"] < n_params
  with pytest.raises(ValueError, match="protocol 'nope'"):
    seg_steps.backbone_patterns("nope")


def test_train_step_sgd_poly_head_lr_mult(tiny):
  """First SGD step (momentum buffer empty): delta = -lr * grad, heads at 10x lr; the poly
  schedule then decays to end_lr."""
  model, variables, images = tiny
  dense, v = seg.dense_backbone(model, variables)
  dec, aux = tiny_specs()
  sm = seg.Segmenter(dense, seg.SETRPUP(num_classes=3, decode=dec, aux=aux))
  hv = sm.init_head(jax.random.PRNGKey(0))
  t_b, frozen = rules.split(v, rules.label(v, seg_steps.backbone_patterns("bias")))
  tx = optim.sgd_poly(lr=0.1, steps=10)
  state = seg_steps.create_train_state({"backbone": t_b, "head": hv["params"]},
                                       hv["batch_stats"], tx, jax.random.PRNGKey(1))
  batch = {"image": images, "label": jax.random.randint(jax.random.PRNGKey(2), (2, 32, 32), 0, 3)}
  step = jax.jit(seg_steps.make_train_step(sm, tx))
  new, metrics = step(state, frozen, batch)

  def loss(tr):
    (d, a), _ = sm.apply(rules.merge(tr["backbone"], frozen),
                         {"params": tr["head"], "batch_stats": hv["batch_stats"]}, images,
                         train=True)
    return seg.segmentation_loss(d, a, batch["label"], sm.head)[0]
  value, grads = jax.jit(jax.value_and_grad(loss))(state.trainable)
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
  for group, lr in (("backbone", 0.1), ("head", 1.0)):
    jax.tree_util.tree_map(
        lambda a, b, g: np.testing.assert_allclose(b - a, -lr * g, atol=1e-6),
        state.trainable[group], new.trainable[group], grads[group])
  assert int(new.step) == 1
  import optax
  sched = optax.polynomial_schedule(0.1, 1e-4, 0.9, 10)
  np.testing.assert_allclose(sched(5), (0.1 - 1e-4) * 0.5 ** 0.9 + 1e-4, rtol=1e-6)


def test_evaluate_confusion_over_images_of_different_sizes():
  """Pointwise toy model, images smaller and larger than the crop: the accumulated matrix equals
  numpy's count of argmax(x W) against the labels (ignored pixels skipped)."""
  rng = np.random.default_rng(2)
  examples = []
  want = np.zeros((4, 4), np.int64)
  for h, w in [(20, 25), (40, 33)]:
    image = rng.normal(size=(h, w, 3)).astype(np.float32)
    label = rng.integers(0, 4, size=(h, w))
    label[rng.random(label.shape) < 0.2] = 255
    examples.append({"image": image, "label": label})
    pred = pointwise(image[None])[0].argmax(-1)
    ok = label != 255
    np.add.at(want, (label[ok], pred[ok]), 1)
  got, n = seg_inference.evaluate(pointwise, examples, 4, crop=(32, 32), stride=(21, 21),
                                  batch_size=2)
  assert n == 2
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="predicts 4 classes; num_classes=5"):
    seg_inference.evaluate(pointwise, examples, 5, crop=(32, 32), stride=(21, 21))


def test_predict_fn_slide_equals_whole_image_at_crop_size(tiny):
  model, variables, images = tiny
  dense, v = seg.dense_backbone(model, variables)
  dec, aux = tiny_specs()
  sm = seg.Segmenter(dense, seg.SETRPUP(num_classes=3, decode=dec, aux=aux))
  hv = seg.Segmenter.init_head(sm, jax.random.PRNGKey(0))
  fn = seg_inference.make_predict_fn(sm, v, hv)
  image = np.asarray(images[0])
  got = seg_inference.slide_inference(fn, image, crop=(32, 32), stride=(21, 21))
  np.testing.assert_allclose(got, fn(image[None])[0], atol=1e-6)
  # A smaller image is padded with 0 at the bottom/right: the same as padding it by hand.
  small = seg_inference.slide_inference(fn, image[:20, :24], crop=(32, 32), stride=(21, 21))
  padded = np.zeros_like(image)
  padded[:20, :24] = image[:20, :24]
  np.testing.assert_allclose(small, fn(padded[None])[0][:20, :24], atol=1e-6)
