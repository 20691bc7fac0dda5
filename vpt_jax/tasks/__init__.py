"""What is specific to a task type (losses, metrics, inference): classification, segmentation."""
