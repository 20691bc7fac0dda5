"""Input data: sources, task tables and tf.data pipelines."""
