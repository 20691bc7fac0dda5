"""Every config file builds, its argument form works, and bad arguments are named."""

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
  assert c.optim.lr == pytest.approx(0.1 * 128 / 256) and c.optim.wd == 0.01
  assert (c.data.source, c.data.train_split, c.data.val_split) == ("tfds", "train", "holdout")
  assert fgvc.get_config("flowers,final").data.train_split == "train+validation"
  assert fgvc.get_config("cub,final").data.val_split == ""
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
