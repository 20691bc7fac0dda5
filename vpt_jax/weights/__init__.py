"""Published weights in: readers of the original file formats, the model zoo, downloads."""
