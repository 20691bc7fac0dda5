"""E2VPT pruning: masks, importance scores, pruning counts, compact storage, prune + rewind."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import numpy_vit
import vpt_jax
from conftest import ATOL, RTOL, data_path, jit_apply, load_io
from vpt_jax import prompts
from vpt_jax.tasks.classification import cross_entropy
from vpt_jax.tuning import pruning, rules

IMAGES = load_io("vitjax_token.io.npz")["images"]
BASE, BASE_VARS = vpt_jax.load_pretrained(data_path("vitjax_token.npz"), num_classes=5)
PARAMS = jax.tree.map(lambda p: np.asarray(p) + 0.05 * np.random.default_rng(0).normal(
    size=p.shape).astype(np.float32), BASE_VARS["params"])  # a head that is not zero
REF = dict(patch=4, depth=2, pool="token", cls_row=True)
LABELS = np.array([0, 3, 1, 4])
MASKS = {  # p = 6 tokens, R = 16 segments: tokens 1 and 4 pruned, 5 segments off in each kept token
    "tokens": np.array([1, 0, 1, 1, 0, 1], np.float32),
    "segments": np.zeros((6, 16), np.float32)}
for _t, _off in zip((0, 2, 3, 5), ((0, 1, 2, 3, 4), (3, 5, 7, 9, 15), (1, 2, 4, 8, 12), (10, 11, 12, 13, 14))):
  MASKS["segments"][_t] = 1.0
  MASKS["segments"][_t, list(_off)] = 0.0


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def model_for(**kw):
  cfg = prompts.default_config()
  cfg.update(dict(length=6, masks=True) | kw)
  model = prompts.attach(BASE, cfg)
  pr = prompts.init_prompts(model, jax.random.PRNGKey(1))
  return model, pr


def variables(pr, masks=None):
  v = {"params": PARAMS, "prompts": pr}
  if masks is not None:
    v["prompt_masks"] = {"hooks": {"token_mask": jnp.asarray(masks["tokens"]),
                                   "segment_mask": jnp.asarray(masks["segments"])}}
  return v


def test_all_ones_masks_change_nothing():
  masked, pr = model_for(kv_length=2)
  cfg = prompts.default_config()
  cfg.update(length=6, kv_length=2)
  plain = prompts.attach(BASE, cfg)
  ones = {"tokens": np.ones(6, np.float32), "segments": np.ones((6, 16), np.float32)}
  np.testing.assert_array_equal(jit_apply(masked, variables(pr, ones), IMAGES),
                                jit_apply(plain, variables(pr), IMAGES))


@pytest.mark.parametrize("kw", [dict(), dict(deep=False), dict(kv_length=2, kv_shared=False),
                                dict(pool="image"), dict(shared=True)])
def test_pruned_compact_model_equals_masked_model(kw):
  """Masked full-size model == the compact model that holds only the kept tokens / dims."""
  model, pr = model_for(**kw)
  masked = np.asarray(jit_apply(model, variables(pr, MASKS), IMAGES))

  packed = pruning.compact(np.asarray(pr["hooks"]["tokens"]), MASKS)
  assert packed["values"].shape == (pr["hooks"]["tokens"].shape[0], 4, 11 * 4)
  tokens, small_masks = pruning.expand(packed, width=64, segments=16)
  small, small_pr = model_for(length=4, **kw)
  small_pr = {"hooks": {**small_pr["hooks"], "tokens": jnp.asarray(tokens)}}
  for k in ("kv", "kv_values"):
    if k in pr["hooks"]:
      small_pr["hooks"][k] = pr["hooks"][k]
  compact_out = np.asarray(jit_apply(small, variables(small_pr, small_masks), IMAGES))
  np.testing.assert_allclose(compact_out, masked, atol=1e-5, rtol=1e-5)
  # Pruning really changed the output.
  dense = np.asarray(jit_apply(model, variables(pr, {k: np.ones_like(v)
                                                      for k, v in MASKS.items()}), IMAGES))
  assert np.abs(dense - masked).max() > 1e-3


def test_masked_model_matches_numpy_with_tokens_removed():
  """Independent check: numpy ViT with only the kept, segment-zeroed tokens inserted (deep)."""
  model, pr = model_for()
  tok = np.asarray(pr["hooks"]["tokens"], np.float64)
  per_dim = MASKS["segments"][:, np.arange(64) % 16]  # strided segments
  kept = [(t * per_dim)[MASKS["tokens"] == 1] for t in tok]
  put = lambda t, replace: (lambda x: np.concatenate(
      [x[:, :1], np.broadcast_to(t, (x.shape[0],) + t.shape), x[:, 1 + replace:]], 1))
  expected = numpy_vit.forward(flat(PARAMS), IMAGES, **REF,
                               insert={0: put(kept[0], 0), 1: put(kept[1], 4)})
  got = np.asarray(jit_apply(model, variables(pr, MASKS), IMAGES))
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
  # The official code's semantics (zero vectors left in the sequence) gives a different model.
  zeros = [(t * per_dim) * MASKS["tokens"][:, None] for t in tok]
  official = numpy_vit.forward(flat(PARAMS), IMAGES, **REF,
                               insert={0: put(zeros[0], 0), 1: put(zeros[1], 6)})
  assert np.abs(official - expected).max() > 1e-4


def _direct_scores(model, pr, images, labels):
  """|dL(x)/d mask| per example by jax.grad of the plain single-example loss, then the mean."""
  ones = {"tokens": np.ones(6, np.float32), "segments": np.ones((6, 16), np.float32)}
  out = {"tokens": 0.0, "segments": 0.0}
  def loss(m, x, y):
    v = {"params": PARAMS, "prompts": pr, "prompt_masks": m}
    return cross_entropy(model.apply(v, x[None]), y[None])[0]
  grad = jax.jit(jax.grad(loss))  # one program for every example
  for x, y in zip(images, labels):
    g = grad(variables(pr, ones)["prompt_masks"], x, jnp.int32(y))["hooks"]
    out["tokens"] = out["tokens"] + np.abs(np.asarray(g["token_mask"]))
    out["segments"] = out["segments"] + np.abs(np.asarray(g["segment_mask"]))
  return {k: v / len(labels) for k, v in out.items()}


def test_importance_equals_direct_mask_gradients():
  model, pr = model_for(kv_length=2)
  ones = {"tokens": np.ones(6, np.float32), "segments": np.ones((6, 16), np.float32)}
  v = variables(pr, ones)
  trainable, frozen = rules.split(v, rules.label(v, [r"prompts/.*", r"params/head/.*"]))
  step = jax.jit(pruning.make_importance_step(model))
  batches = [{"image": IMAGES[:2], "label": LABELS[:2]}, {"image": IMAGES[2:], "label": LABELS[2:]}]
  got = pruning.importance(step, trainable, frozen, batches, jax.random.PRNGKey(0))
  want = _direct_scores(model, pr, IMAGES, LABELS)
  for k in ("tokens", "segments"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-7)
  assert got["tokens"].min() > 0

  # Chain rule, independently of the masks: dL/dm_t = sum over sets and dims of dL/dP * P.
  x, y = IMAGES[:1], jnp.array([LABELS[0]])
  def loss_p(tokens):
    pv = {"hooks": {**pr["hooks"], "tokens": tokens}}
    return cross_entropy(model.apply(variables(pv, ones), x), y)[0]
  gp = np.asarray(jax.jit(jax.grad(loss_p))(pr["hooks"]["tokens"]))
  by_token = np.abs((gp * np.asarray(pr["hooks"]["tokens"])).sum(axis=(0, 2)))
  one = pruning.importance(step, trainable, frozen, [{"image": x, "label": y}],
                           jax.random.PRNGKey(0))
  np.testing.assert_allclose(one["tokens"], by_token, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("p,r,tf,sf", [(10, 16, 0.5, 0.25), (10, 16, 0.9, 0.9), (7, 8, 0.3, 0.0),
                                       (5, 16, 0.0, 0.5), (4, 3, 0.5, 0.9)])
def test_prune_masks_keep_exactly_the_requested_counts(p, r, tf, sf):
  rng = np.random.default_rng(p)
  scores = {"tokens": rng.random(p), "segments": rng.random((p, r))}
  masks = pruning.prune_masks(scores, tf, sf)
  # at least one token; at least 4 of 16 segments (a quarter, >= 1) as the official code
  n_tok, n_seg = min(int(p * tf), p - 1), min(int(r * sf), r - max(1, r // 4))
  assert pruning.counts(p, r, tf, sf) == (n_tok, n_seg)
  assert masks["tokens"].sum() == p - n_tok
  kept = masks["tokens"] == 1
  # The pruned tokens are exactly the lowest-scoring ones.
  assert scores["tokens"][~kept].max(initial=-1) <= scores["tokens"][kept].min()
  assert (masks["segments"][~kept] == 0).all()
  for t in np.flatnonzero(kept):
    row = masks["segments"][t] == 1
    assert row.sum() == r - n_seg
    assert scores["segments"][t][~row].max(initial=-1) <= scores["segments"][t][row].min()


def test_at_least_4_of_16_segments_are_kept():
  assert pruning.counts(10, 16, 0.9, 0.9) == (9, 12)  # official: 16 - MIN_NUMBER_CLS_TOKEN_PIECE


def test_compact_roundtrip_and_real_parameter_count():
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(3, 6, 64)).astype(np.float32)
  packed = pruning.compact(tokens, MASKS)
  restored, small_masks = pruning.expand(packed, width=64, segments=16)
  per_dim = MASKS["segments"][:, np.arange(64) % 16]
  np.testing.assert_array_equal(restored, (tokens * per_dim)[:, MASKS["tokens"] == 1])
  np.testing.assert_array_equal(small_masks["segments"], MASKS["segments"][[0, 2, 3, 5]])
  trainable = {"prompts": {"hooks": {"tokens": tokens, "kv": np.zeros((2, 4, 2, 16))}},
               "params": {"head": {"kernel": np.zeros((64, 5)), "bias": np.zeros(5)}}}
  # 3 sets x 4 tokens x 11 segments x 4 dims + kv + head, by hand.
  assert pruning.pruned_count(trainable, MASKS) == 3 * 4 * 11 * 4 + 2 * 4 * 2 * 16 + 64 * 5 + 5
  assert packed["values"].size == 3 * 4 * 11 * 4


def test_mask_file_errors_name_the_option(tmp_path):
  cfg = prompts.default_config()
  cfg.update(length=6, masks=True, mask_file=str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="prompt.mask_file=.*missing.npz"):
    prompts.attach(BASE, cfg)
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, tokens=np.ones(5), segments=np.ones((5, 16)))
  cfg.mask_file = bad
  with pytest.raises(ValueError, match=r"'tokens' has shape \(5,\); prompt.length=6"):
    prompts.attach(BASE, cfg)
  cfg.update(mask_file="", masks=True, pool="all")
  with pytest.raises(ValueError, match="prompt.pool='all' reads prompt outputs"):
    prompts.attach(BASE, cfg)
  cfg.update(pool="original", segments=24)
  with pytest.raises(ValueError, match="prompt.segments=24 must divide the width 64"):
    prompts.attach(BASE, cfg)
  cfg.update(segments=16, location="add")
  with pytest.raises(ValueError, match="need prompt.masks=True, prompt.location='prepend'"):
    prompts.attach(BASE, cfg)
  with pytest.raises(ValueError, match="prune.token_fraction=1.0"):
    pruning.check_config(_with(token_fraction=1.0))
  with pytest.raises(ValueError, match="prune.rewind_init='again'"):
    pruning.check_config(_with(rewind_init="again"))


def _with(**kw):
  c = pruning.default_config()
  c.update(kw)
  return c


def test_prune_and_rewind_end_to_end_on_the_demo(tmp_path):
  from configs import demo
  from conftest import SMALL_DIGITS
  from vpt_jax.tuning import prune_pipeline
  from vpt_jax.data import pipeline, sources
  from vpt_jax.tuning.steps import evaluate, make_eval_step, mesh_shardings
  # The demo config on the 2-layer random backbone and a quarter of the digits (SMALL_DIGITS),
  # one epoch per stage: every stage (dense run, scores, masks, rewind run, compact model) still
  # runs and is checked; the counts below are written from the model's depth and width.
  c = demo.get_config("vpt-deep,model.checkpoint=tiny-random,prompt.kv_length=2,optim.epochs=1,"
                      "optim.warmup_epochs=0,eval_every_epochs=1,prune.token_fraction=0.5,"
                      "prune.segment_fraction=0.25,prune.grid=0.5:0.25;0.25:0.5,"
                      + SMALL_DIGITS)
  workdir = str(tmp_path / "prune")
  summary = prune_pipeline.run(c, workdir)
  # every level of the grid has its own masks and rewind directory, keyed by its fractions
  for name in ("dense/results.json", "scores.npz", "masks/t0.5_s0.25.npz",
               "masks/t0.25_s0.5.npz", "rewind/t0.5_s0.25/results.json",
               "rewind/t0.25_s0.5/results.json", "pruned.npz", "prune_results.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  levels = {x["level"]: x for x in summary["levels"]}
  assert set(levels) == {"t0.5_s0.25", "t0.25_s0.5"}
  best = max(summary["levels"], key=lambda x: (x["val_top1"], x["token_fraction"]))
  assert summary["chosen"] == best["level"]
  masks = dict(np.load(os.path.join(workdir, "masks", "t0.5_s0.25.npz")))
  assert masks["tokens"].sum() == 4 and (masks["segments"].sum(1)[masks["tokens"] == 1] == 12).all()
  scores = dict(np.load(os.path.join(workdir, "scores.npz")))
  assert scores["tokens"].shape == (8,) and scores["segments"].shape == (8, 16)
  rewind_dir = os.path.join(workdir, "rewind", "t0.5_s0.25")
  with open(os.path.join(rewind_dir, "results.json")) as f:
    rewound = json.load(f)
  from vpt_jax.tuning import workdir as workdir_lib
  model, _ = workdir_lib.load_tuned(rewind_dir, which="last")
  depth, width = model.depth, model.width
  # Real parameter count by hand: a set per layer x 4 kept tokens x 12 segments x d/16 dims,
  # plus the key-value prompts and the head (10 digit classes).
  head = width * 10 + 10
  kv = depth * 2 * width
  pruned = prune_pipeline.save_pruned(rewind_dir, str(tmp_path / "p.npz"))
  assert pruned["pruned_trainable_params"] == depth * 4 * 12 * (width // 16) + kv + head
  assert summary["dense_trainable_params"] == depth * 8 * width + kv + head
  assert levels["t0.5_s0.25"]["test_top1"] == rewound["test_top1"]
  assert summary["rewind_test_top1"] == levels[summary["chosen"]]["test_top1"]
  # The rewound run's own report counts the pruned prompts, not the full tensor.
  assert rewound["trainable_params"] == pruned["pruned_trainable_params"]
  # The compact model (4 tokens in the sequence) scores exactly what the masked run scored.
  small, small_v = prune_pipeline.load_pruned(rewind_dir, str(tmp_path / "p.npz"))
  assert small.hooks.length == 4
  d = c.data
  split = sources.load_splits(d, [d.test_split])[d.test_split]
  pipe = pipeline.Pipeline(split, pipeline.make_preprocess(d, small.image_size[0], train=False),
                           batch_size=c.batch_size, seed=0)
  rep, bs = mesh_shardings()
  r = evaluate(jax.jit(make_eval_step(small)), small_v, {}, pipe, bs)
  assert abs(r["top1"] - rewound["test_top1"]) < 1e-9
  # Rerunning skips every stage.
  again = prune_pipeline.run(c, workdir)
  assert again["rewind_test_top1"] == summary["rewind_test_top1"]


def test_unknown_prune_option_is_named():
  c = pruning.default_config()
  c.unlock()
  c.token_frac = 0.5
  with pytest.raises(ValueError, match="unknown config option.*prune.token_frac"):
    pruning.check_config(c)
