"""Image layer: `decode` (the one image function) and `header` (in-graph header facts).

The decode module's public names are re-exported, so `from kiqa.image import decode_image`
is the import to use. Importing this package loads TensorFlow.
"""

from kiqa.image.decode import (
    DECODE_VERSION,
    DEFAULT_MAX_BYTES,
    IMAGE_EXTENSIONS,
    decode_image,
    describe_decode_error,
    load_image,
    read_image_bytes,
)

__all__ = [
    "DECODE_VERSION",
    "DEFAULT_MAX_BYTES",
    "IMAGE_EXTENSIONS",
    "decode_image",
    "describe_decode_error",
    "load_image",
    "read_image_bytes",
]
