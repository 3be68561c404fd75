"""kiqa: blind (no-reference) image quality assessment with Keras ConvNeXt.

Models predict KonIQ-10k's 0-100 mean opinion score (MOS, higher is better).
Importing the package is cheap: TensorFlow is loaded by the modules that need it.
"""

__version__ = "0.1.0"
