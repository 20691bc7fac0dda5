"""Every config file builds, its argument form works, and bad arguments are named."""

import jax
import pytest

from configs import common, demo, fgvc, vtab


@pytest.mark.parametrize("task", sorted(vtab.TASKS))
def test_vtab_tasks(task):
  c = vtab.get_config(task)
  t = vtab.TASKS[task]
  assert (c.data.name, c.data.train_split, c.data.val_split, c.data.test_split) == (
      t.builder, t.train800, t.val200, t.test)
  assert c.data.num_classes == t.num_classes and c.data.label_key == t.label_key
  assert c.data.label_transform == t.label_transform
  final = vtab.get_config(f"{task},final")
  assert final.data.train_split == f"{t.train800}+{t.val200}" and final.data.val_split == ""


def test_paper_defaults_and_overrides():
  c = vtab.get_config("cifar100,optim.lr=0.25,prompt.length=10,prompt.deep=false,seed=42")
  assert (c.batch_size, c.optim.name, c.optim.momentum) == (128, "sgd", 0.9)
  assert (c.optim.warmup_epochs, c.optim.epochs) == (10, 100)
  assert c.optim.lr == 0.25 and c.prompt.length == 10 and c.prompt.deep is False and c.seed == 42
  assert c.data.normalization == "minus_one_one" and c.model.drop_pre_logits


@pytest.mark.parametrize("module,arg,match", [
    (vtab, "cifar10", "expected a task"),
    (vtab, "cifar100,optim.learning_rate=1", "unknown option 'optim.learning_rate'"),
    (vtab, "cifar100,prompt.deep=maybe", "expected a boolean"),
    (fgvc, "birds", "expected one of cub"),
    (demo, "vpt", "expected one of vpt-deep"),
])
def test_bad_arguments_are_named(module, arg, match):
  with pytest.raises(ValueError, match=match):
    module.get_config(arg)


def test_fgvc_preprocessing_splits_and_official_lr():
  c = fgvc.get_config("cub")
  assert (c.data.crop, c.data.resize_size, c.model.image_size) == ("resize_crop", 256, 224)
  assert (c.optim.lr, c.optim.wd) == OFFICIAL_FGVC["cub"]
  assert (c.data.source, c.data.train_split, c.data.val_split) == ("tfds", "train", "holdout")
  # the official final protocol: the 90% train split, test reported; tfds and json agree
  for arg in ("flowers,final", "cub,final", "cub,final,json", "flowers,json,final"):
    f = fgvc.get_config(arg)
    assert (f.data.train_split, f.data.test_split) == ("train", "test")
    assert f.data.val_split in ("holdout", "validation", "val")
  nab = fgvc.get_config("nabirds,data.root=/data/nabirds")
  assert (nab.data.source, nab.data.root, nab.data.image_dir, nab.data.num_classes) == (
      "fgvc_json", "/data/nabirds", "images", 555)
  assert fgvc.get_config("dogs,json").data.image_dir == "Images"


def test_split_arg():
  assert common.split_arg("a, final ,x.y=1") == (["a", "final"], ["x.y=1"])


def test_vtab_from_pre_extracted_folders():
  c = vtab.get_config("dsprites_location,folder,data.root=/data/vtab-1k/dsprites_loc")
  assert (c.data.source, c.data.root, c.data.label_transform) == (
      "vtab_folder", "/data/vtab-1k/dsprites_loc", "")
  assert (c.data.train_split, c.data.val_split, c.data.test_split) == ("train800", "val200", "test")
  assert c.data.num_classes == 16 and c.task == "dsprites_location"
  final = vtab.get_config("cifar100,folder,final")
  assert (final.data.train_split, final.data.val_split) == ("train800val200", "")


def test_e2vpt_presets_use_the_papers_token_counts():
  v = vtab.get_config("dtd,e2vpt")
  assert (v.prompt.length, v.prompt.kv_length, v.prompt.deep) == (10, 5, True)
  f = fgvc.get_config("cub,e2vpt,prompt.kv_length=3")
  assert (f.prompt.length, f.prompt.kv_length) == (5, 3)
  assert vtab.get_config("dtd").prompt.kv_length == 0


def test_vtab_backbone_flags():
  from vpt_jax.weights import zoo
  for flag, family in (("mae", "mae"), ("moco", "moco")):
    c = vtab.get_config(f"cifar100,{flag}")
    assert zoo.family_of(c.model.checkpoint) == family
    assert c.data.normalization == "imagenet" and not c.model.drop_pre_logits
    assert vtab.lr_grid(f"cifar100,{flag},protocol=linear")[-3:] == (0.025, 0.005, 0.0025)
    assert vtab.lr_grid(f"cifar100,{flag}") == vtab.LR_GRID
    assert c.prompt.pool == ("all" if flag == "mae" else "original")
  assert vtab.get_config("cifar100").model.checkpoint == "vit-b16-i21k"
  with pytest.raises(ValueError, match="one backbone flag"):
    vtab.get_config("cifar100,mae,moco")


# Official values, written out from the official configs (not from configs/*.py):
# - KMnP/vpt configs/prompt/{cub,nabirds,cars,dogs,flowers}.yaml: SOLVER.BASE_LR / WEIGHT_DECAY,
#   used unscaled by train.py at configs/base-prompt.yaml's DATA.BATCH_SIZE 128 (effective lr);
OFFICIAL_FGVC = {"cub": (0.1, 0.01), "nabirds": (0.1, 0.01), "cars": (1e-3, 1e-4),
                 "dogs": (1e-3, 1e-4), "flowers": (1e-3, 1e-4)}
# - KMnP/vpt configs/base-prompt.yaml: batch 128, SGD momentum 0.9, warmup 10, 100 epochs;
#   src/configs/config.py: MODEL.PROMPT.DROPOUT 0.0; src/data/datasets/tf_dataset.py and
#   src/data/transforms.py: ImageNet mean/std; src/models/mlp.py: kaiming-normal head;
OFFICIAL_VPT = dict(batch_size=128, epochs=100, warmup_epochs=10, momentum=0.9, dropout=0.0,
                    normalization="imagenet", head_init="kaiming")
# - KMnP/vpt tune_vtab.py: BASE_LR = lr / 256 * BATCH_SIZE over this grid (effective lr at batch
#   b is x * b / 256); wd grid as is;
OFFICIAL_VTAB_LR_GRID = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)
OFFICIAL_WD_GRID = (0.01, 1e-3, 1e-4, 0.0)
# - ChengHan111/E2VPT configs/base-prompt_changed_P_VK.yaml and command.txt: DROPOUT_P 0.1,
#   batch 64 on VTAB, 128 on FGVC; 10 visual + 5 key-value tokens (most VTAB tasks), 5 + 5 FGVC.
OFFICIAL_E2VPT = dict(dropout=0.1, vtab_batch=64, fgvc_batch=128)


def _check_vpt_paper(c):
  assert (c.batch_size, c.optim.epochs, c.optim.warmup_epochs, c.optim.momentum) == (
      OFFICIAL_VPT["batch_size"], OFFICIAL_VPT["epochs"], OFFICIAL_VPT["warmup_epochs"],
      OFFICIAL_VPT["momentum"])
  assert c.optim.name == "sgd" and c.prompt.dropout == OFFICIAL_VPT["dropout"]
  assert c.data.normalization == OFFICIAL_VPT["normalization"]
  assert c.model.head_init == OFFICIAL_VPT["head_init"]


@pytest.mark.parametrize("ds", sorted(OFFICIAL_FGVC))
def test_fgvc_paper_reproduces_the_official_effective_settings(ds):
  c = fgvc.get_config(f"{ds},paper")
  _check_vpt_paper(c)
  assert (c.optim.lr, c.optim.wd) == pytest.approx(OFFICIAL_FGVC[ds])
  assert (c.data.crop, c.data.resize_size, c.model.image_size) == ("resize_crop", 256, 224)
  assert fgvc.get_config(ds).optim.lr == pytest.approx(OFFICIAL_FGVC[ds][0])  # default too
  assert tuple(fgvc.WD_GRID) == OFFICIAL_WD_GRID


@pytest.mark.parametrize("task", ["cifar100", "dsprites_location", "smallnorb_elevation"])
def test_vtab_paper_reproduces_the_official_effective_settings(task):
  c = vtab.get_config(f"{task},paper")
  _check_vpt_paper(c)
  assert (c.data.crop, c.model.image_size) == ("resize", 224)
  assert tuple(vtab.LR_GRID) == OFFICIAL_VTAB_LR_GRID and tuple(vtab.WD_GRID) == OFFICIAL_WD_GRID
  assert c.optim.lr == pytest.approx(1.0 * OFFICIAL_VPT["batch_size"] / 256)  # grid value 1
  # the default differs from `paper` in the normalisation only
  d = vtab.get_config(task)
  assert d.data.normalization == "minus_one_one"
  d.data.normalization = "imagenet"
  assert d.to_dict() == c.to_dict()


def test_e2vpt_presets_follow_the_official_commands():
  v = vtab.get_config("dtd,e2vpt")
  assert (v.prompt.dropout, v.batch_size) == (OFFICIAL_E2VPT["dropout"],
                                              OFFICIAL_E2VPT["vtab_batch"])
  assert v.optim.lr == pytest.approx(1.0 * OFFICIAL_E2VPT["vtab_batch"] / 256)
  f = fgvc.get_config("cub,e2vpt,paper")
  assert (f.prompt.dropout, f.batch_size) == (OFFICIAL_E2VPT["dropout"],
                                              OFFICIAL_E2VPT["fgvc_batch"])
  assert f.optim.lr == pytest.approx(OFFICIAL_FGVC["cub"][0])


# - KMnP/vpt configs/base-finetune.yaml and src/solver/optimizer.py: AdamW eps 1e-6, wd 0.01 on
#   all but biases / LayerNorm parameters, batch 384, warmup 5 of 100 epochs.
def test_full_preset_follows_the_official_end_to_end_optimizer():
  import vpt_jax
  from vpt_jax.tuning import optim, rules
  for c in (vtab.get_config("dtd,full"), fgvc.get_config("cub,full")):
    assert (c.protocol, c.prompt.length, c.batch_size) == ("full", 0, 384)
    o = c.optim
    assert (o.name, o.eps, o.wd, o.warmup_epochs, o.epochs) == ("adamw", 1e-6, 0.01, 5, 100)
  _, variables = vpt_jax.load_pretrained("tiny-random", num_classes=3)
  decay = optim._decay_mask(vtab.get_config("dtd,full").optim.wd_exclude)(variables)
  flags = dict(zip(rules.leaf_paths(decay), jax.tree.leaves(decay)))
  for path, d in flags.items():
    no_decay = path.endswith("/bias") or "LayerNorm_" in path or "encoder_norm" in path
    assert d == (not no_decay), path
