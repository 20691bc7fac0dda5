"""Pictures of a tuned run: t-SNE of its features, training curves, class-token attention.

    python -m vpt_jax.plots tsne --workdir=/tmp/vpt_demo/vpt-deep --out=tsne.png
    python -m vpt_jax.plots curves --workdir=/tmp/vpt_demo/vpt-deep --out=curves.png
    python -m vpt_jax.plots attention --workdir=/tmp/vpt_demo/vpt-deep --out=attention.png

* tsne: the test set's pooled features (intermediate 'head_input', what the head reads) of the
  tuned model next to those of the frozen backbone, coloured by class (the VPT paper's Fig. 9):
  how much prompting reshapes the representation the linear head sees.
* curves: training loss and validation/test top-1 against the step, from workdir/metrics.jsonl.
* attention: for a few test images, what the class token attends to in one layer (default the
  last): a heat map over the patches and a bar per prompt token. The weights are the ones the
  model's attention sows (`class_token_attention`), never recomputed.

Every command writes one PNG (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.data import pipeline, sources
from vpt_jax.models.hooks import hook_parts
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.prompts import vpt
from vpt_jax.tuning import families
from vpt_jax.tuning import workdir as workdir_lib
from vpt_jax.weights import backbones

Array = jax.Array
COMMANDS = ("tsne", "curves", "attention")


def _pyplot():
  # pylint: disable=g-import-not-at-top; matplotlib is heavy and only the figures need it.
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


# -- data and features -------------------------------------------------------------------------

def load_images(config, image_size: int, split: str = "", limit: Optional[int] = None,
                seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """(images, labels) of a split of the run's data, preprocessed for evaluation.

  With `limit`, a seeded random subset of that size (so every class shows up), in split order.
  """
  split = split or config.data.test_split or config.data.val_split
  data = sources.load_splits(config.data, [split])[split]
  if limit is not None and limit < len(data):
    idx = np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False))
    data = sources.Split(data.images[idx], data.labels[idx])
  pre = pipeline.make_preprocess(config.data, image_size, train=False)
  pipe = pipeline.Pipeline(data, pre, batch_size=min(256, len(data)), seed=0)
  images, labels = [], []
  for b in pipe.eval_batches():
    keep = b["mask"] > 0
    images.append(b["image"][keep])
    labels.append(b["label"][keep])
  return np.concatenate(images), np.concatenate(labels)


def features(model: VisionTransformer, variables: Mapping[str, Any], images: np.ndarray, *,
             name: str = "head_input", batch_size: int = 256) -> np.ndarray:
  """The sown intermediate `name` ('pooled' or 'head_input') for every image, (N, D)."""
  @jax.jit
  def run(x):
    _, state = model.apply(variables, x, mutable=["intermediates"])
    return state["intermediates"][name][0]
  return np.concatenate([np.asarray(run(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def frozen_backbone(config) -> Tuple[VisionTransformer, Dict[str, Any]]:
  """The run's pretrained backbone as published: no prompts, no tuning."""
  m = config.model
  _, model, variables = backbones.load_any(m.checkpoint, family=m.get("family", "auto"),
                                           num_heads=m.get("num_heads", 0),
                                           image_size=m.image_size or None,
                                           drop_pre_logits=m.drop_pre_logits)
  return model, variables


# What a Swin / ConvNet sows as its head's input (a ViT: 'head_input').
_OTHER_HEAD_INPUT = {"swin": "pooled", "convnext": "features", "resnet": "features"}


def _feature_name(model: Any, feature: str) -> str:
  family = families.family_of(model)
  if not family or feature not in ("head_input", "pooled"):
    return feature
  return _OTHER_HEAD_INPUT[family]


# Up to this many points t-SNE runs exactly (all pairwise forces): faster than the Barnes-Hut
# approximation at that size (120 points: 0.5 s against 3.3 s of CPU here) and no approximation.
EXACT_TSNE_MAX_POINTS = 500


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top; heavy, only t-SNE
  perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
  method = "exact" if len(x) <= EXACT_TSNE_MAX_POINTS else "barnes_hut"
  return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity,
              method=method).fit_transform(x.astype(np.float64))


# -- attention ---------------------------------------------------------------------------------

def class_token_attention(model: VisionTransformer, variables: Mapping[str, Any], images: Array,
                          layer: int = -1) -> np.ndarray:
  """Softmax attention weights of the class token (query row 0) in encoder layer `layer`.

  Read from the weights the attention sows (never recomputed). Returns (B, heads, keys) with
  keys ordered [class token, prompts..., patches..., E2VPT key-value prompts...], whether the
  prompts sit in the sequence or enter the layer as memory (keys/values only); masked (pruned)
  keys have weight 0.
  """
  if not model.class_token:
    raise ValueError("class-token attention needs a backbone with a class token")
  layer = layer % model.depth

  @jax.jit
  def run(x_images):
    _, state = model.apply(variables, x_images, mutable=["intermediates"])
    w = state["intermediates"]["Transformer"][f"encoderblock_{layer}"][
        "MultiHeadDotProductAttention_0"]["attention"][0]
    tokens = w["tokens"][:, :, 0]                                   # (B, heads, keys)
    parts = [tokens[..., :1], *([w["memory"][:, :, 0]] if "memory" in w else []),
             tokens[..., 1:], *([w["extra"][:, :, 0]] if "extra" in w else [])]
    return jnp.concatenate(parts, axis=-1)

  return np.asarray(run(jnp.asarray(images)))


def token_layout(model: VisionTransformer, num_keys: int) -> Tuple[int, int, int]:
  """(class tokens, prompt tokens, key-value prompts) in a layer's keys of length `num_keys`,
  from the attached prompts' own counts."""
  prompts = next((p for p in hook_parts(model.hooks) if isinstance(p, vpt.VPT)), None)
  prefix = int(model.class_token)
  n_prompts = prompts.length if prompts is not None and prompts.location in (
      "prepend", "prepend-pixel") else 0
  kv = prompts.kv_length if prompts is not None else 0
  gh, gw = model.grid
  if prefix + n_prompts + gh * gw + kv != num_keys:
    raise ValueError(f"{num_keys} keys do not match {prefix} class, {n_prompts} prompt, "
                     f"{gh * gw} patch and {kv} key-value tokens")
  return prefix, n_prompts, kv


# -- figures -----------------------------------------------------------------------------------

def _show_image(ax, image: np.ndarray) -> None:
  img = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
  ax.imshow(img if img.shape[-1] == 3 else img[..., 0], cmap=None if img.shape[-1] == 3 else "gray")
  ax.set_xticks([])
  ax.set_yticks([])


def tsne_figure(workdir: str, out: str, *, which: str = "last", split: str = "",
                num_examples: int = 500, feature: str = "head_input") -> str:
  """Side-by-side t-SNE of the frozen backbone's and the tuned model's features."""
  run = workdir_lib.load_tuned(workdir, which=which)
  config, tuned, tuned_vars = run.config, run.model, run.variables
  images, labels = load_images(config, tuned.image_size[0], split, limit=num_examples)
  frozen, frozen_vars = frozen_backbone(config)
  panels = [("frozen backbone", features(frozen, frozen_vars, images,
                                         name=_feature_name(frozen, feature))),
            (f"tuned ({config.protocol}, {os.path.basename(os.path.normpath(workdir))})",
             features(tuned, tuned_vars, images, name=_feature_name(tuned, feature)))]
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
  for ax, (title, f) in zip(axes, panels):
    xy = tsne_2d(f)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "tab20",
                    s=8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(sc, ax=axes, label="class", fraction=0.03)
  fig.suptitle(f"t-SNE of '{feature}' features, {len(labels)} {config.data.test_split or split} "
               "images")
  return _save(fig, out)


def read_metrics(workdir: str) -> List[Dict[str, float]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a vpt_jax workdir with metrics")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def curves_figure(workdir: str, out: str) -> str:
  """Training loss (and validation loss) and validation / test top-1 against the step."""
  records = read_metrics(workdir)

  def series(key: str) -> Tuple[List[int], List[float]]:
    pts = {r["step"]: r[key] for r in records if key in r}  # a resumed run rewrites steps
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]

  plt = _pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
  for key, style in (("train/loss", ".-"), ("val/loss", "o--")):
    s, v = series(key)
    if s:
      ax_loss.plot(s, v, style, label=key)
  for key, style in (("train/accuracy", ".-"), ("val/top1", "o-"), ("test/top1", "s")):
    s, v = series(key)
    if s:
      ax_acc.plot(s, v, style, label=key)
  if not series("train/loss")[0]:
    raise ValueError(f"{workdir}/metrics.jsonl has no train/loss records yet")
  ax_loss.set(xlabel="step", ylabel="loss", title="loss")
  ax_acc.set(xlabel="step", ylabel="top-1", title="accuracy", ylim=(0, 1.02))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(os.path.normpath(workdir))
  return _save(fig, out)


def attention_figure(workdir: str, out: str, *, which: str = "last", split: str = "",
                     num_images: int = 4, layer: int = -1) -> str:
  """Per image: the image, the class token's attention over patches, and over the prompts."""
  run = workdir_lib.load_tuned(workdir, which=which)
  config, model, variables = run.config, run.model, run.variables
  if families.family_of(model):
    raise ValueError(f"{workdir}: a {families.family_of(model)} backbone has no class token to "
                     "show the attention of (attention plots are for ViTs)")
  images, labels = load_images(config, model.image_size[0], split, limit=num_images)
  w = class_token_attention(model, variables, images, layer).mean(axis=1)  # (B, keys), head mean
  prefix, n_prompts, n_kv = token_layout(model, w.shape[-1])
  gh, gw = model.grid
  patches = w[:, prefix + n_prompts:prefix + n_prompts + gh * gw].reshape(-1, gh, gw)
  extra = w[:, prefix:prefix + n_prompts]
  if n_kv:
    extra = np.concatenate([extra, w[:, -n_kv:]], axis=1)
  plt = _pyplot()
  fig, axes = plt.subplots(len(images), 3, figsize=(11, 2.8 * len(images)), squeeze=False,
                           gridspec_kw={"width_ratios": [1, 1.25, 1.75]}, layout="constrained")
  for i, row in enumerate(axes):
    _show_image(row[0], images[i])
    row[0].set_title(f"class {labels[i]}")
    im = row[1].imshow(patches[i], cmap="viridis")
    row[1].set_title(f"to patches: {patches[i].sum():.0%}")
    row[1].set_xticks([])
    row[1].set_yticks([])
    fig.colorbar(im, ax=row[1], fraction=0.046)
    if extra.shape[1]:
      colours = ["tab:orange"] * n_prompts + ["tab:purple"] * n_kv
      row[2].bar(np.arange(extra.shape[1]), extra[i], color=colours)
      parts = [f"{n_prompts} prompts: {extra[i, :n_prompts].sum():.0%}"] if n_prompts else []
      parts += [f"{n_kv} kv prompts: {extra[i, n_prompts:].sum():.0%}"] if n_kv else []
      row[2].set_title("to " + ", ".join(parts) + f"\nto the class token: {w[i, 0]:.0%}",
                       fontsize=9)
      row[2].set_xlabel("prompt token" + (" (orange: visual, purple: key-value)" if n_kv else ""))
      row[2].xaxis.get_major_locator().set_params(integer=True)
    else:
      row[2].text(0.5, 0.5, f"no prompts; to the class token {w[i, 0]:.0%}", ha="center")
      row[2].set_axis_off()
  fig.suptitle(f"class-token attention, layer {layer % model.depth} (mean over heads)")
  return _save(fig, out)


def _save(fig, out: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=90)
  _pyplot().close(fig)
  return out
