"""Pixel masks of the procedural shapes (the segmentation demo's data); make_shapes unchanged."""

import numpy as np
import pytest

from vpt_jax.data import shapes


def test_single_tile_masks_match_make_shapes():
  x, y = shapes.make_shapes(60, seed=3)
  images, masks = shapes.make_shape_masks(60, seed=3)
  np.testing.assert_array_equal(images, x)
  assert masks.shape == (60, 32, 32) and masks.dtype == np.int32
  for m, label in zip(masks, y):
    assert set(np.unique(m)) == {0, label + 1}  # background and this image's one shape
  # Foreground pixels are the drawn ones: on average they differ from the image's corners.
  fg = masks > 0
  assert 0.02 < fg.mean() < 0.6


def test_mosaic_tiles_are_smaller_shape_images():
  images, masks = shapes.make_shape_masks(3, seed=5, image_size=32, tiles=2)
  small, labels = shapes.make_shapes(12, seed=5, image_size=16)
  assert images.shape == (3, 32, 32, 3) and masks.shape == (3, 32, 32)
  for i in range(3):
    for r in range(2):
      for c in range(2):
        k = i * 4 + r * 2 + c
        np.testing.assert_array_equal(images[i, 16 * r:16 * r + 16, 16 * c:16 * c + 16], small[k])
        tile = masks[i, 16 * r:16 * r + 16, 16 * c:16 * c + 16]
        assert set(np.unique(tile)) <= {0, labels[k] + 1} and (tile > 0).any()


def test_mask_options_are_checked():
  with pytest.raises(ValueError, match="tiles=3"):
    shapes.make_shape_masks(2, seed=0, image_size=32, tiles=3)
  with pytest.raises(ValueError, match="threshold=0"):
    shapes.make_shape_masks(2, seed=0, threshold=0)
