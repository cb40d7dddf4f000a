"""Reading images as they come and turning inputs into ordered, labelled image lists."""

from .images import BadImage, decode_image, read_image, resize_short_side
from .sources import ImageList, InputError, gather_images

__all__ = ["BadImage", "decode_image", "read_image", "resize_short_side", "ImageList", "InputError",
           "gather_images"]
