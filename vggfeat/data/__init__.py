"""Reading images as they come and turning inputs into ordered, labelled image lists.

Names are imported on first use: the command line checks a URL or a path with
:mod:`vggfeat.data.remote` before torch (which decoding needs) is loaded."""

from .._lazy import lazy_names as _lazy_names

_LAZY = {"BadImage": "images", "decode_image": "images", "read_image": "images",
         "resize_short_side": "images", "ImageList": "sources", "InputError": "sources",
         "gather_images": "sources"}
__all__ = list(_LAZY)
__getattr__, __dir__ = _lazy_names(__name__, _LAZY)
