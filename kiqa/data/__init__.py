"""Data layer: KonIQ label files and splits, the demo dataset, image checks, tf.data pipelines."""
