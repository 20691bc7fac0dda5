"""Writes the notebooks in colabs/ from the cell sources below (outputs cleared).

    python tools/make_colabs.py          # rewrites colabs/*.ipynb

The notebooks are generated so that they stay reviewable as Python and reproducible: edit the
cells here, run this script, commit both. tests/test_colabs.py executes them on CPU offline.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Cell = Tuple[str, str]   # ("md" | "code", source)

# Shared cells: parameters are in the next cell; this one finds the repository, installs on Colab.
SETUP = r'''
import os, sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:  # Colab: fetch and install the repository (needs a GPU or TPU runtime for speed).
  if not os.path.exists("/content/vpt_jax"):
    !git clone -q {REPO_URL} /content/vpt_jax
  !pip install -q -e /content/vpt_jax
  os.chdir("/content/vpt_jax")

# The repository root holds configs/ (the run configurations); this notebook lives in colabs/.
ROOT = next(p for p in (os.getcwd(), os.path.dirname(os.getcwd()), "/content/vpt_jax")
            if os.path.exists(os.path.join(p, "configs", "demo.py")))
sys.path.insert(0, ROOT)
WORKDIR = os.environ.get("VPT_COLAB_WORKDIR", WORKDIR)
if OFFLINE:  # the tests run a smaller offline setting: $VPT_COLAB_EPOCHS=2, ...
  for _name in ("EPOCHS", "BACKBONE", "TSNE_POINTS", "TRAIN_SPLIT"):
    if f"VPT_COLAB_{_name}" in os.environ and _name in globals():
      globals()[_name] = type(globals()[_name])(os.environ[f"VPT_COLAB_{_name}"])

import tensorflow as tf
tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerator belongs to JAX
import jax
import numpy as np
from IPython.display import Image, display

import vpt_jax
from vpt_jax.analysis import plots
from vpt_jax.tuning import loop, rules
from vpt_jax.weights import zoo
print("JAX devices:", jax.devices())
print("workdir:", WORKDIR)
'''.strip()

QUICKSTART: List[Cell] = [
    ("md", """# VPT quickstart: tune prompts on a frozen ViT, save them, reload them, predict

Visual Prompt Tuning (Jia et al., ECCV 2022) learns a few tokens per layer and a linear head on a
frozen, pretrained Vision Transformer. This notebook runs the whole path with `vpt_jax`:

1. pick a checkpoint from the model zoo and a VTAB-1k task,
2. train VPT-deep (prompts + head only),
3. evaluate on the test split,
4. save the prompts (the checkpoint holds only what trained) and reload them with
   `vpt_jax.load_tuned`,
5. predict, and look at the run: training curves, t-SNE of the features, class-token attention.

**On Colab** (Runtime > Change runtime type > GPU or TPU) set `OFFLINE = False`: it uses the paper's
ViT-B/16 (ImageNet-21k) and the task from tensorflow-datasets. **Offline** (`OFFLINE = True`, the
default, what the tests run) it uses the project's small demo backbone and scikit-learn's digits,
and runs top to bottom on a CPU in about a minute."""),
    ("code", '''# Parameters
OFFLINE = True                  # True: demo backbone + digits on CPU; False: ViT-B/16 + tfds task
CHECKPOINT = "vit-b16-i21k"     # a model-zoo name (see below), a .npz path or a gs:// URL
TASK = "cifar100"               # a VTAB-1k task (vpt_jax.data.vtab.TASKS)
EPOCHS = 10 if OFFLINE else 100   # offline: $VPT_COLAB_EPOCHS overrides it (the tests)
BACKBONE = "demo-vit"           # offline backbone ($VPT_COLAB_BACKBONE; the tests: tiny-random)
TRAIN_SPLIT = "train800"        # offline training digits ($VPT_COLAB_TRAIN_SPLIT; tests: a slice)
TSNE_POINTS = 300               # test images in the t-SNE picture ($VPT_COLAB_TSNE_POINTS offline)
WORKDIR = "/tmp/vpt_quickstart"  # $VPT_COLAB_WORKDIR overrides it
REPO_URL = "https://github.com/your-account/vpt_jax.git"  # where to clone from on Colab'''),
    ("code", SETUP),
    ("md", "## 1. A checkpoint from the model zoo and a task\n\n"
           "`vpt_jax.inspect` reads the architecture off the file (downloaded once and cached)."),
    ("code", '''from vpt_jax.data.vtab import TASKS
print("zoo:", ", ".join(zoo.names()))
print("VTAB-1k tasks:", ", ".join(TASKS))
checkpoint = BACKBONE if OFFLINE else CHECKPOINT
print(checkpoint, "->", zoo.url_for(checkpoint))
print(vpt_jax.inspect(checkpoint))'''),
    ("code", '''from configs import demo, vtab

if OFFLINE:   # VPT-deep with 8 prompts per layer on the demo backbone, digits 800/200/797
  config = demo.get_config(f"vpt-deep,model.checkpoint={BACKBONE},optim.epochs={EPOCHS},"
                           f"data.train_split={TRAIN_SPLIT},optim.warmup_epochs=1,"
                           "eval_every_epochs=1,log_every_steps=4")
else:         # the paper's setting: VPT-deep p=50 on ViT-B/16 at 224px, VTAB-1k train800/val200
  config = vtab.get_config(f"{TASK},model.checkpoint={CHECKPOINT},optim.epochs={EPOCHS}")
  import tensorflow_datasets as tfds
  tfds.builder(config.data.name).download_and_prepare()   # once; the trainer reads it offline
print(config.task, "| protocol", config.protocol, "| prompt length", config.prompt.length,
      "| deep", config.prompt.deep, "| epochs", config.optim.epochs, "| lr", config.optim.lr)'''),
    ("md", "## 2. Train VPT-deep\n\nOnly the prompts and the head train; the backbone stays frozen "
           "(and is never written to the checkpoints). Re-running this cell resumes or skips a "
           "finished run."),
    ("code", '''results = loop.train_and_evaluate(config, WORKDIR)'''),
    ("md", "## 3. Evaluate"),
    ("code", '''print(f"validation top-1 {results.get('val_top1', float('nan')):.3f}   "
      f"test top-1 {results['test_top1']:.3f}")
print(f"trainable parameters {results['trainable_params']:,} "
      f"({results['trainable_percent_of_backbone']:.2f}% of the backbone)")'''),
    ("md", "## 4. Save the prompts, reload them\n\n"
           "The run's checkpoints already hold only the trainable leaves (prompts + head) plus a "
           "fingerprint of the backbone. Here they are also written as a plain `.npz`, and the "
           "tuned model is rebuilt from the public backbone and the saved leaves with "
           "`vpt_jax.load_tuned`."),
    ("code", '''tuned = vpt_jax.load_tuned(WORKDIR)  # model, variables, config, trainable mask
model, variables = tuned
trainable, _ = tuned.split()
flat = dict(zip(rules.leaf_paths(trainable), jax.tree.leaves(trainable)))
np.savez(os.path.join(WORKDIR, "prompts_and_head.npz"), **{k: np.asarray(v) for k, v in flat.items()})
for k, v in flat.items():
  print(f"{k:40s} {tuple(v.shape)}")
print("saved", os.path.join(WORKDIR, "prompts_and_head.npz"),
      f"({os.path.getsize(os.path.join(WORKDIR, 'prompts_and_head.npz')) / 1024:.1f} KiB)")'''),
    ("md", "## 5. Predict with the reloaded model"),
    ("code", '''images, labels = plots.load_images(config, model.image_size[0], limit=256)
logits = jax.jit(model.apply)(variables, images)
pred = np.asarray(logits.argmax(-1))
print("reloaded model, 256 test images: top-1", (pred == labels).mean())
print("first 12 predictions:", pred[:12].tolist())
print("their labels:        ", labels[:12].tolist())'''),
    ("md", "## 6. Pictures\n\nThe same figures come from the command line: "
           "`python -m vpt_jax.plots curves|tsne|attention --workdir=...`."),
    ("code", '''display(Image(filename=plots.curves_figure(WORKDIR, os.path.join(WORKDIR, "curves.png"))))'''),
    ("code", '''# t-SNE of what the head reads: frozen backbone vs tuned (the VPT paper's Fig. 9)
display(Image(filename=plots.tsne_figure(WORKDIR, os.path.join(WORKDIR, "tsne.png"),
                                         num_examples=TSNE_POINTS)))'''),
    ("code", '''# What the class token attends to in the last layer: patches and prompt tokens
display(Image(filename=plots.attention_figure(WORKDIR, os.path.join(WORKDIR, "attention.png"),
                                              num_images=3)))'''),
]

BASELINES: List[Cell] = [
    ("md", """# E²VPT and the baselines on one task

Compares, on one task and the same frozen backbone:

| arm | what trains |
| --- | --- |
| VPT-deep | prompt tokens before every layer + head |
| E²VPT | the same visual prompts + key-value prompts inside every attention (Han et al., ICCV 2023) |
| linear probe | the head only |
| full fine-tuning | every weight |

and plots test accuracy against the number of trainable parameters. `OFFLINE = True` (default)
runs the demo backbone on scikit-learn's digits on a CPU (about two minutes); `OFFLINE = False`
runs ViT-B/16 on a VTAB-1k task (on a GPU/TPU Colab)."""),
    ("code", '''# Parameters
OFFLINE = True
CHECKPOINT = "vit-b16-i21k"
TASK = "dtd"
EPOCHS = 8 if OFFLINE else 100   # offline: $VPT_COLAB_EPOCHS overrides it (the tests)
BACKBONE = "demo-vit"            # offline backbone ($VPT_COLAB_BACKBONE; the tests: tiny-random)
TRAIN_SPLIT = "train800"         # offline training digits ($VPT_COLAB_TRAIN_SPLIT; tests: a slice)
WORKDIR = "/tmp/vpt_baselines"   # $VPT_COLAB_WORKDIR overrides it
REPO_URL = "https://github.com/your-account/vpt_jax.git"'''),
    ("code", SETUP),
    ("code", '''from configs import demo, vtab

def arm_config(arm: str, overrides: str):
  if OFFLINE:
    base = {"full": "linear"}.get(arm, arm)
    return demo.get_config(f"{base},model.checkpoint={BACKBONE},optim.epochs={EPOCHS},"
                           f"data.train_split={TRAIN_SPLIT},optim.warmup_epochs=1,"
                           "eval_every_epochs=1,log_every_steps=4" + overrides)
  return vtab.get_config(f"{TASK},model.checkpoint={CHECKPOINT},optim.epochs={EPOCHS}{overrides}")

# (arm, config overrides). Offline: p = 8 visual prompts, E2VPT adds 4 key-value prompts per layer.
if OFFLINE:
  ARMS = {"VPT-deep": ("vpt-deep", ""),
          "E²VPT": ("vpt-deep", ",prompt.kv_length=4"),
          "linear probe": ("linear", ""),
          "full fine-tuning": ("full", ",protocol=full,optim.lr=0.01")}
else:
  ARMS = {"VPT-deep": ("vpt", ""),
          "E²VPT": ("vpt", ",prompt.length=10,prompt.kv_length=10"),
          "linear probe": ("linear", ",protocol=linear,prompt.length=0"),
          "full fine-tuning": ("full", ",protocol=full,prompt.length=0,optim.lr=0.005")}'''),
    ("md", "## Train every arm\n\nEach arm gets its own workdir; re-running skips finished runs."),
    ("code", '''rows = {}
for name, (arm, overrides) in ARMS.items():
  print(f"=== {name}")
  wd = os.path.join(WORKDIR, name.replace(" ", "-").replace("²", "2"))
  rows[name] = dict(loop.train_and_evaluate(arm_config(arm, overrides), wd), workdir=wd)'''),
    ("code", '''print(f"{'arm':18s} {'trainable':>12s} {'% backbone':>11s} {'val top-1':>10s} {'test top-1':>11s}")
for name, r in rows.items():
  print(f"{name:18s} {r['trainable_params']:12,d} {r['trainable_percent_of_backbone']:11.2f} "
        f"{r.get('val_top1', float('nan')):10.3f} {r['test_top1']:11.3f}")'''),
    ("md", "## Accuracy and trainable parameters"),
    ("code", '''import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

names = list(rows)
colours = ["tab:blue", "tab:purple", "tab:gray", "tab:red"]
fig, (ax_acc, ax_par) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
ax_acc.bar(names, [100 * rows[n]["test_top1"] for n in names], color=colours)
ax_acc.set(ylabel="test top-1 (%)", title=("digits" if OFFLINE else TASK) + ": test accuracy")
for i, n in enumerate(names):
  ax_acc.text(i, 100 * rows[n]["test_top1"] + 1, f"{100 * rows[n]['test_top1']:.1f}", ha="center")
ax_par.bar(names, [rows[n]["trainable_params"] for n in names], color=colours)
ax_par.set(yscale="log", ylabel="trainable parameters (log)", title="trainable parameters")
for ax in (ax_acc, ax_par):
  ax.tick_params(axis="x", rotation=15)
path = os.path.join(WORKDIR, "baselines.png")
fig.savefig(path, dpi=90)
plt.close(fig)
display(Image(filename=path))'''),
    ("md", "## Where E²VPT's class token looks\n\nLast layer, mean over heads: patches (left), "
           "visual prompts (orange) and key-value prompts (purple)."),
    ("code", '''wd = rows["E²VPT"]["workdir"]
display(Image(filename=plots.attention_figure(wd, os.path.join(wd, "attention.png"), num_images=2)))'''),
    ("code", '''display(Image(filename=plots.curves_figure(wd, os.path.join(wd, "curves.png"))))'''),
]

NOTEBOOKS = {"vpt_quickstart.ipynb": QUICKSTART, "e2vpt_and_baselines.ipynb": BASELINES}


def build(cells: List[Cell]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata.update({
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "accelerator": "GPU",
      "colab": {"provenance": []},
  })
  for i, (kind, source) in enumerate(cells):
    cell = (nbformat.v4.new_markdown_cell(source) if kind == "md"
            else nbformat.v4.new_code_cell(source))
    cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    nb.cells.append(cell)
  return nb


def main() -> None:
  out_dir = os.path.join(ROOT, "colabs")
  for name, cells in NOTEBOOKS.items():
    nb = build(cells)
    nbformat.validate(nb)
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
      nbformat.write(nb, f)
    print(path)


if __name__ == "__main__":
  main()
