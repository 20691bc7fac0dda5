"""Tasks beyond image classification that reuse the (prompted) backbones: semantic segmentation."""
