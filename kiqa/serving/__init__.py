"""Serving kiqa's model outside the Keras training process: exports and their preprocessing."""
