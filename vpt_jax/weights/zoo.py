"""Names for the public checkpoints that visual prompt tuning is usually run on.

Facts only: where each file is published and what it holds. `load_pretrained('vit-b16-i21k')`
downloads on first use (into $VPT_JAX_CACHE or ~/.cache/vpt_jax); nothing here is fetched by the
tests. gs:// files are also served at https://storage.googleapis.com/<bucket>/<path>.

Input range: every Google .npz checkpoint below was trained on images scaled to [-1, 1]; the
PyTorch files (family other than 'vit') on ImageNet mean/std-normalised images, as the official VPT
code feeds them.

`family` says which reader and model a file needs ('vit': the .npz reader of `weights.npz`;
'mae', 'moco': `weights.torch_vit`; 'swin': `weights.torch_swin`; 'convnext', 'resnet':
`weights.torch_convnets`). `sha256_prefix` / `md5_prefix` hold what the publishers state about the
file's hash (a prefix only where that is all they state; empty where nothing is published);
`sha256` and `size` (bytes) are recorded only where public sources that name the published URL
agree on them. A download is checked against all of them (`weights.download`).

Where the hashes come from (checked 2026-12-01):
- ResNet-50: torchvision's file name carries the sha256 prefix; its size is the server's
  Content-Length (102502400 bytes) as recorded in public download logs.
- MAE: the md5 prefixes of the facebookresearch/mae README (8cad7c / b8b06e / 9bdbb0); the full
  sha256 and size of ViT-B and ViT-L as pinned by several independent projects that fetch the
  dl.fbaipublicfiles.com URLs (Git LFS pointers and download locks of the same files).
- MoCo v3: the md5 prefix of the moco-v3 README (8f39ce).
- Swin, ConvNeXt, MAE ViT-H: no hash or size is published; pin one with 'name@sha256:<hex>'.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional


@dataclasses.dataclass(frozen=True)
class Entry:
  url: str
  about: str
  family: str = "vit"
  sha256_prefix: str = ""
  md5_prefix: str = ""
  # The full sha256 and size in bytes where public sources agree on them (see the module
  # docstring); otherwise pin one with 'name@sha256:<hex>' (`vpt_jax.weights.download`).
  sha256: Optional[str] = None
  size: Optional[int] = None


_VIT = "gs://vit_models/imagenet21k"
_AUGREG = "gs://vit_models/augreg"
_SIGLIP = "gs://big_vision/siglip"
_MAE = "https://dl.fbaipublicfiles.com/mae/pretrain"
_SWIN = "https://github.com/SwinTransformer/storage/releases/download"

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")

ZOO: Dict[str, Entry] = {
    # Shipped with the package, for offline demos and smoke tests: a 32px ViT (patch 4, width 64,
    # 2 layers, 10 classes) in the vit_jax layout, with random weights. Its predictions mean
    # nothing.
    "tiny-random": Entry(os.path.join(_ASSETS, "tiny_random_vit.npz"),
                         "tiny random-weight ViT shipped with vpt_jax (offline demos and tests)"),
    # Shipped: the offline demo's backbone, vit_jax layout, pretrained by this project
    # (tools/pretrain_demo_backbone.py) on the procedural shapes task of vpt_jax.data.shapes.
    "demo-vit": Entry(os.path.join(_ASSETS, "demo_vit.npz"),
                      "32px ViT (patch 4, width 64, 4 layers) pretrained by "
                      "tools/pretrain_demo_backbone.py on procedural shapes"),
    # google-research/vision_transformer, ImageNet-21k pre-training (Dosovitskiy et al.). vit_jax
    # layout with a 768/1024/1280-wide tanh `pre_logits` layer and a 21843-way head that was zeroed
    # in the release. ViT-B/16 is the backbone of the VPT and E2VPT papers; load it with
    # num_classes=..., drop_pre_logits=True as they do.
    "vit-b16-i21k": Entry(f"{_VIT}/ViT-B_16.npz", "ViT-B/16, ImageNet-21k, 224px, pre_logits 768 "
                          "(the VPT / E2VPT paper backbone)"),
    "vit-l16-i21k": Entry(f"{_VIT}/ViT-L_16.npz", "ViT-L/16, ImageNet-21k, 224px, pre_logits 1024"),
    "vit-h14-i21k": Entry(f"{_VIT}/ViT-H_14.npz", "ViT-H/14, ImageNet-21k, 224px, pre_logits 1280"),
    # The i21k model fine-tuned on ImageNet-1k at 224px. The official VPT base configs default to
    # this file ('sup_vitb16_224'), which users mistook for the paper's backbone; listed so it can
    # be chosen knowingly.
    "vit-b16-i21k-ft-i1k": Entry("gs://vit_models/imagenet21k+imagenet2012/ViT-B_16-224.npz",
                                 "ViT-B/16, ImageNet-21k then fine-tuned on ImageNet-1k, 224px, "
                                 "1000-way head (not the VPT paper's backbone)"),
    # AugReg (Steiner et al., "How to train your ViT"): the i21k checkpoints big_vision recommends
    # ('howto-i21k-*'). vit_jax layout, no pre_logits, 21843-way head kept.
    "augreg-ti16-i21k": Entry(
        f"{_AUGREG}/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
        "AugReg ViT-Ti/16, ImageNet-21k, 224px"),
    "augreg-s32-i21k": Entry(
        f"{_AUGREG}/S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0.npz",
        "AugReg ViT-S/32, ImageNet-21k, 224px"),
    "augreg-s16-i21k": Entry(
        f"{_AUGREG}/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
        "AugReg ViT-S/16, ImageNet-21k, 224px"),
    "augreg-b32-i21k": Entry(
        f"{_AUGREG}/B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz",
        "AugReg ViT-B/32, ImageNet-21k, 224px"),
    "augreg-b16-i21k": Entry(
        f"{_AUGREG}/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
        "AugReg ViT-B/16, ImageNet-21k, 224px"),
    "augreg-b8-i21k": Entry(
        f"{_AUGREG}/B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
        "AugReg ViT-B/8, ImageNet-21k, 224px"),
    "augreg-l16-i21k": Entry(
        f"{_AUGREG}/L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0.npz",
        "AugReg ViT-L/16, ImageNet-21k, 224px"),
    # SigLIP image towers (Zhai et al.), big_vision two-tower files: `params/img/...` next to the
    # text tower, MAP pooling, no class token, `head` = projection into the image-text space.
    "siglip-b16-224": Entry(f"{_SIGLIP}/webli_en_b16_224_63724782.npz:img",
                            "SigLIP B/16 image tower, 224px"),
    "siglip-b16-256": Entry(f"{_SIGLIP}/webli_en_b16_256_60500360.npz:img",
                            "SigLIP B/16 image tower, 256px"),
    "siglip-b16-384": Entry(f"{_SIGLIP}/webli_en_b16_384_68578854.npz:img",
                            "SigLIP B/16 image tower, 384px"),
    "siglip-b16-512": Entry(f"{_SIGLIP}/webli_en_b16_512_68580893.npz:img",
                            "SigLIP B/16 image tower, 512px"),
    "siglip-l16-256": Entry(f"{_SIGLIP}/webli_en_l16_256_60552751.npz:img",
                            "SigLIP L/16 image tower, 256px"),
    "siglip-l16-384": Entry(f"{_SIGLIP}/webli_en_l16_384_63634585.npz:img",
                            "SigLIP L/16 image tower, 384px"),
    "siglip-so400m14-224": Entry(f"{_SIGLIP}/webli_en_so400m_224_57633886.npz:img",
                                 "SigLIP So400m/14 image tower, 224px"),
    "siglip-so400m14-384": Entry(f"{_SIGLIP}/webli_en_so400m_384_58765454.npz:img",
                                 "SigLIP So400m/14 image tower, 384px"),
    # PyTorch backbones of the VPT paper's Tables 2, 4 and 5 (read without torch, `weights.torch`).
    # MAE (He et al.) pre-trained encoders, `{'model': ...}`; VPT pools them with global_pool and a
    # fresh fc_norm (`weights.torch_vit`).
    "mae-vit-b16": Entry(
        f"{_MAE}/mae_pretrain_vit_base.pth",
        "MAE ViT-B/16 encoder, ImageNet-1k self-supervised, 224px", "mae", md5_prefix="8cad7c",
        sha256="aec5f0b68e5f3193a00b07bc65a37440db549c15b36b8bea242606cc40c4bc5d",
        size=343249461),
    "mae-vit-l16": Entry(
        f"{_MAE}/mae_pretrain_vit_large.pth",
        "MAE ViT-L/16 encoder, ImageNet-1k self-supervised, 224px", "mae", md5_prefix="b8b06e",
        sha256="d2ceff4892889d0c0f5418fa8bcb02e6a25a37fc3bdc0619c3cacd7d3d05c39f",
        size=1213314565),
    "mae-vit-h14": Entry(f"{_MAE}/mae_pretrain_vit_huge.pth",
                         "MAE ViT-H/14 encoder, ImageNet-1k self-supervised, 224px", "mae",
                         md5_prefix="9bdbb0"),
    # MoCo v3 (Chen et al.) ViT-B linear-evaluation file: what VPT loads (it renames it to
    # mocov3_linear-vit-b-300ep.pth.tar). The moco-v3 README lists its md5 as starting 8f39ce.
    "mocov3-vit-b16": Entry("https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/"
                            "linear-vit-b-300ep.pth.tar",
                            "MoCo v3 ViT-B/16, 300 epochs, linear-eval checkpoint, 224px", "moco",
                            md5_prefix="8f39ce"),
    # microsoft/Swin-Transformer releases, `{'model': ...}`; Swin-B 22k is VPT's Table 2 backbone.
    "swin-b-22k": Entry(f"{_SWIN}/v1.0.0/swin_base_patch4_window7_224_22k.pth",
                        "Swin-B, window 7, ImageNet-22k, 224px (VPT Table 2)", "swin"),
    "swin-l-22k": Entry(f"{_SWIN}/v1.0.0/swin_large_patch4_window7_224_22k.pth",
                        "Swin-L, window 7, ImageNet-22k, 224px", "swin"),
    "swin-s-22k": Entry(f"{_SWIN}/v1.0.8/swin_small_patch4_window7_224_22k.pth",
                        "Swin-S, window 7, ImageNet-22k, 224px", "swin"),
    "swin-t-1k": Entry(f"{_SWIN}/v1.0.0/swin_tiny_patch4_window7_224.pth",
                       "Swin-T, window 7, ImageNet-1k, 224px", "swin"),
    "swin-s-1k": Entry(f"{_SWIN}/v1.0.0/swin_small_patch4_window7_224.pth",
                       "Swin-S, window 7, ImageNet-1k, 224px", "swin"),
    # ConvNeXt (Liu et al. 2022) and torchvision's ResNet-50 (VPT Table 5, pad prompts).
    "convnext-b-22k": Entry("https://dl.fbaipublicfiles.com/convnext/convnext_base_22k_224.pth",
                            "ConvNeXt-B, ImageNet-22k, 224px (VPT Table 5)", "convnext"),
    # torchvision names its files by the first 8 hex digits of their sha256.
    "resnet50-1k": Entry("https://download.pytorch.org/models/resnet50-19c8e357.pth",
                         "ResNet-50 (torchvision v1.5), ImageNet-1k, 224px (VPT Table 5)",
                         "resnet", sha256_prefix="19c8e357", size=102502400),
}


def names() -> List[str]:
  return sorted(ZOO)


def family_of(spec: str) -> str:
  """A zoo name's backbone family; '' for anything not in the zoo."""
  entry = ZOO.get(spec)
  return entry.family if entry else ""


def sha256_for(spec: str) -> Optional[str]:
  """The recorded sha256 of a zoo name's file, or the prefix of it that its publisher states (a
  download must start with it); None when unknown or not a zoo name."""
  entry = ZOO.get(spec)
  return (entry.sha256 or entry.sha256_prefix or None) if entry else None


def md5_for(spec: str) -> Optional[str]:
  """The md5 prefix a zoo name's publisher states; None when unknown or not a zoo name."""
  entry = ZOO.get(spec)
  return (entry.md5_prefix or None) if entry else None


def size_for(spec: str) -> Optional[int]:
  """The recorded size in bytes of a zoo name's file; None when unknown or not a zoo name."""
  entry = ZOO.get(spec)
  return entry.size if entry else None


def url_for(spec: str) -> str:
  """A zoo name -> its URL (with sub-tree suffix); anything else is returned unchanged."""
  entry = ZOO.get(spec)
  return entry.url if entry else spec
