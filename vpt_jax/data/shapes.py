"""A procedural image-classification task: geometric shapes and strokes, generated offline.

It is the upstream (pretraining) task of the demo backbone that ships with the package
(`tools/pretrain_demo_backbone.py`): it needs no download, is deterministic given a seed, and
teaches a small ViT stroke, corner, curve and blob detectors that transfer to other small
line-drawing tasks (e.g. handwritten digits) without ever showing it one of them.

Every image has one shape at a random position and scale, drawn with a random stroke thickness
and foreground colour over a random, slightly graded background with pixel noise. The shapes are
rendered from distance fields with a one-pixel soft edge (cheap antialiasing), one vectorised
numpy pass per class, so ~50k 32x32 images take a few seconds.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np

SHAPE_CLASSES: Tuple[str, ...] = (
    "disk", "ring", "square", "square_outline", "triangle", "plus", "x", "horizontal_bar",
    "vertical_bar", "diagonal_line", "l_corner", "arc", "dot_grid", "chevron",
)

# The geometry of one class for a batch: each array in `p` has shape (m, 1, 1), the pixel grid
# `y, x` has shape (H, W); returns the coverage (m, H, W) in [0, 1].
_Renderer = Callable[[Dict[str, np.ndarray], np.ndarray, np.ndarray], np.ndarray]


def _fill(signed_dist: np.ndarray) -> np.ndarray:
  """Coverage of a filled region from its signed distance (negative inside), 1px soft edge."""
  return np.clip(0.5 - signed_dist, 0.0, 1.0)


def _stroke(dist: np.ndarray, thickness: np.ndarray) -> np.ndarray:
  """Coverage of a stroke of the given thickness around the zero set of `dist`."""
  return np.clip(0.5 + thickness / 2 - dist, 0.0, 1.0)


def _segment_dist(y: np.ndarray, x: np.ndarray, ay, ax, by, bx) -> np.ndarray:
  """Distance from each pixel to the segment a-b (endpoints broadcast against the grid)."""
  dy, dx = by - ay, bx - ax
  length2 = np.maximum(dy * dy + dx * dx, 1e-9)
  t = np.clip(((y - ay) * dy + (x - ax) * dx) / length2, 0.0, 1.0)
  return np.hypot(y - ay - t * dy, x - ax - t * dx)


def _ray(p: Dict[str, np.ndarray], angle: np.ndarray, length: np.ndarray):
  """End point of a segment from the centre in direction `angle` (radians, y down)."""
  return p["cy"] + length * np.sin(angle), p["cx"] + length * np.cos(angle)


def _through_centre(p, y, x, angle) -> np.ndarray:
  """Distance to the segment of half-length s through the centre at `angle`."""
  ay, ax = _ray(p, angle, p["s"])
  by, bx = _ray(p, angle + np.pi, p["s"])
  return _segment_dist(y, x, ay, ax, by, bx)


def _disk(p, y, x):
  return _fill(np.hypot(y - p["cy"], x - p["cx"]) - p["s"])


def _ring(p, y, x):
  return _stroke(np.abs(np.hypot(y - p["cy"], x - p["cx"]) - p["s"]), p["t"])


def _square(p, y, x):
  return _fill(np.maximum(np.abs(y - p["cy"]), np.abs(x - p["cx"])) - 0.8 * p["s"])


def _square_outline(p, y, x):
  cheb = np.maximum(np.abs(y - p["cy"]), np.abs(x - p["cx"]))
  return _stroke(np.abs(cheb - 0.85 * p["s"]), p["t"])


def _triangle(p, y, x):
  # Equilateral, circumradius s, any rotation: the max over its three edge half-planes.
  sd = None
  for k in range(3):
    a = p["angle"] + 2 * np.pi * k / 3
    d = (y - p["cy"]) * np.sin(a) + (x - p["cx"]) * np.cos(a) - p["s"] / 2
    sd = d if sd is None else np.maximum(sd, d)
  return _fill(sd)


def _plus(p, y, x):
  tilt = 0.15 * p["jitter"]
  d = np.minimum(_through_centre(p, y, x, tilt), _through_centre(p, y, x, tilt + np.pi / 2))
  return _stroke(d, p["t"])


def _x(p, y, x):
  tilt = np.pi / 4 + 0.15 * p["jitter"]
  d = np.minimum(_through_centre(p, y, x, tilt), _through_centre(p, y, x, tilt + np.pi / 2))
  return _stroke(d, p["t"])


def _horizontal_bar(p, y, x):
  return _stroke(_through_centre(p, y, x, 0.12 * p["jitter"]), p["t"])


def _vertical_bar(p, y, x):
  return _stroke(_through_centre(p, y, x, np.pi / 2 + 0.12 * p["jitter"]), p["t"])


def _diagonal_line(p, y, x):
  # 30..60 degrees either way, well away from the bars' angles.
  angle = np.where(p["flip"], -1.0, 1.0) * (np.pi / 4 + (np.pi / 12) * p["jitter"])
  return _stroke(_through_centre(p, y, x, angle), p["t"])


def _l_corner(p, y, x):
  # Corner at one of the four diagonal positions; arms run along the axes towards the others.
  sy = np.where(p["quadrant"] % 2 == 0, 1.0, -1.0)
  sx = np.where(p["quadrant"] // 2 == 0, 1.0, -1.0)
  h = 0.8 * p["s"]
  oy, ox = p["cy"] - sy * h, p["cx"] - sx * h
  d = np.minimum(_segment_dist(y, x, oy, ox, oy + 2 * sy * h, ox),
                 _segment_dist(y, x, oy, ox, oy, ox + 2 * sx * h))
  return _stroke(d, p["t"])


def _arc(p, y, x):
  # Half of a ring; pixels on the open side are cut off along the diameter.
  ring = _stroke(np.abs(np.hypot(y - p["cy"], x - p["cx"]) - p["s"]), p["t"])
  side = (y - p["cy"]) * np.sin(p["angle"]) + (x - p["cx"]) * np.cos(p["angle"])
  return ring * np.clip(0.5 + side, 0.0, 1.0)


def _dot_grid(p, y, x):
  radius = np.maximum(0.6 * p["t"], 1.0)
  d = None
  for i in (-1, 0, 1):
    for j in (-1, 0, 1):
      dk = np.hypot(y - p["cy"] - i * 0.8 * p["s"], x - p["cx"] - j * 0.8 * p["s"])
      d = dk if d is None else np.minimum(d, dk)
  return _fill(d - radius)


def _chevron(p, y, x):
  # Two arms from an apex, opening 40..70 degrees, pointing anywhere.
  half_open = np.deg2rad(27.5) + np.deg2rad(7.5) * p["jitter"]
  apex_y, apex_x = _ray(p, p["angle"] + np.pi, 0.9 * p["s"])
  d = None
  for sign in (-1.0, 1.0):
    a = p["angle"] + sign * half_open
    dk = _segment_dist(y, x, apex_y, apex_x, apex_y + 1.8 * p["s"] * np.sin(a),
                       apex_x + 1.8 * p["s"] * np.cos(a))
    d = dk if d is None else np.minimum(d, dk)
  return _stroke(d, p["t"])


_RENDERERS: Tuple[_Renderer, ...] = (
    _disk, _ring, _square, _square_outline, _triangle, _plus, _x, _horizontal_bar, _vertical_bar,
    _diagonal_line, _l_corner, _arc, _dot_grid, _chevron,
)
assert len(_RENDERERS) == len(SHAPE_CLASSES)

_CHUNK = 4096  # images composited at a time


def _colours(rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
  """(background, foreground) RGB in [0, 1], with at least 0.35 brightness contrast."""
  bg_level = rng.uniform(0.0, 1.0, n)
  dark_fg = bg_level > 0.5
  gap = rng.uniform(0.35, 1.0, n)
  fg_level = np.clip(np.where(dark_fg, bg_level - gap, bg_level + gap), 0.0, 1.0)
  bg = np.clip(bg_level[:, None] + rng.uniform(-0.15, 0.15, (n, 3)), 0.0, 1.0)
  fg = np.clip(fg_level[:, None] + rng.uniform(-0.25, 0.25, (n, 3)), 0.0, 1.0)
  return bg, fg


def make_shapes(n: int, seed: int, image_size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
  """`n` images (n, H, W, 3) uint8 and their labels (n,) int32, indexing `SHAPE_CLASSES`.

  The classes are balanced (up to n mod classes) and shuffled; the same (n, seed, image_size)
  always gives the same arrays. Scale, thickness and noise are relative to `image_size`.
  """
  images, labels, _ = _render(n, seed, image_size)
  return images, labels


def make_shape_masks(n: int, seed: int, image_size: int = 32, *, tiles: int = 1,
                     threshold: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
  """A segmentation task: `n` images (n, H, W, 3) uint8 and pixel masks (n, H, W) int32.

  Mask values: 0 = background, c + 1 = a pixel of shape class c (`SHAPE_CLASSES[c]`), i.e.
  len(SHAPE_CLASSES) + 1 classes; a pixel belongs to the shape where its rendered coverage is at
  least `threshold`. tiles=1: the images of `make_shapes(n, seed, image_size)` exactly (one shape
  each); tiles=k: every image is a k x k mosaic of shapes drawn at image_size // k (several
  classes per image), deterministic in (n, seed, image_size, tiles).
  """
  if tiles < 1 or image_size % tiles:
    raise ValueError(f"tiles={tiles} must be a positive divisor of image_size={image_size}")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold={threshold} must be in (0, 1]")
  t = image_size // tiles
  images, labels, coverage = _render(n * tiles * tiles, seed, t)
  masks = np.where(coverage >= threshold, labels[:, None, None] + 1, 0).astype(np.int32)

  def mosaic(a: np.ndarray) -> np.ndarray:
    a = a.reshape((n, tiles, tiles, t, t) + a.shape[3:])
    a = np.swapaxes(a, 2, 3)  # (n, row, y, col, x, ...)
    return a.reshape((n, image_size, image_size) + a.shape[5:])
  return mosaic(images), mosaic(masks)


def _render(n: int, seed: int, image_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, coverage (n, H, W) float32 in [0, 1]) of `make_shapes`."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if image_size < 8:
    raise ValueError(f"image_size must be >= 8, got {image_size}")
  rng = np.random.default_rng(seed)
  size = float(image_size)
  labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES)).astype(np.int32)

  # Per-image geometry, drawn for all images up front so each class's draw does not shift others.
  s = rng.uniform(0.2, 0.42, n) * size                      # half-extent of the shape
  t = rng.uniform(1.5, 5.0, n) * size / 32                  # stroke thickness in pixels
  room = np.maximum(size / 2 - s - 1.0, 0.0)                # keep the shape inside the frame
  params = {
      "s": s, "t": t,
      "cy": size / 2 + rng.uniform(-1.0, 1.0, n) * room,
      "cx": size / 2 + rng.uniform(-1.0, 1.0, n) * room,
      "angle": rng.uniform(0.0, 2 * np.pi, n),
      "jitter": rng.uniform(-1.0, 1.0, n),
      "flip": rng.integers(0, 2, n).astype(bool),
      "quadrant": rng.integers(0, 4, n),
  }
  bg, fg = _colours(rng, n)
  slope = rng.uniform(-0.2, 0.2, (n, 2))                    # background brightness gradient
  noise_std = rng.uniform(0.0, 0.06, n)
  noise_seed = int(rng.integers(0, 2**31 - 1))

  coords = (np.arange(image_size, dtype=np.float32) + 0.5)
  y, x = coords[:, None], coords[None, :]
  coverage = np.zeros((n, image_size, image_size), np.float32)
  for c, render in enumerate(_RENDERERS):
    idx = np.nonzero(labels == c)[0]
    if idx.size:
      p = {k: v[idx].astype(np.float32)[:, None, None] if v.dtype.kind == "f"
           else v[idx][:, None, None] for k, v in params.items()}
      coverage[idx] = render(p, y, x)

  # Composite in chunks so the float temporaries stay small for large n.
  noise_rng = np.random.default_rng(noise_seed)
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  for lo in range(0, n, _CHUNK):
    sl = slice(lo, min(lo + _CHUNK, n))
    ramp = (slope[sl, 0, None, None] * (y / size - 0.5)
            + slope[sl, 1, None, None] * (x / size - 0.5)).astype(np.float32)
    background = bg[sl, None, None, :].astype(np.float32) + ramp[..., None]
    cov = coverage[sl, :, :, None]
    img = (1.0 - cov) * background + cov * fg[sl, None, None, :].astype(np.float32)
    noise = noise_rng.standard_normal(img.shape, dtype=np.float32)
    img += noise * noise_std[sl, None, None, None].astype(np.float32)
    images[sl] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
  return images, labels, coverage
