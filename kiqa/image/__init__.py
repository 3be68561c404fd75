"""Image layer: `decode` (the one image function) and `header` (in-graph header facts).

The decode module's public names are re-exported (with the byte cap and the image
extensions from `kiqa.contract`, where they are defined), so `from kiqa.image import
decode_image` is the import to use. Importing this package loads TensorFlow.
"""

from kiqa.contract import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS
from kiqa.image.decode import (
    DECODE_VERSION,
    UNDECODABLE_MESSAGE,
    decode_image,
    decode_plan,
    decode_planned,
    describe_decode_error,
    file_decoder,
    load_image,
    read_image_bytes,
    traced_decoder,
)

__all__ = [
    "DECODE_VERSION",
    "DEFAULT_MAX_BYTES",
    "IMAGE_EXTENSIONS",
    "UNDECODABLE_MESSAGE",
    "decode_image",
    "decode_plan",
    "decode_planned",
    "describe_decode_error",
    "file_decoder",
    "load_image",
    "read_image_bytes",
    "traced_decoder",
]
