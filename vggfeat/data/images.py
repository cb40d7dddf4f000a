"""Decoding images as they come, and the paper's isotropic rescaling.

Every format Pillow reads (JPEG, PNG, WebP, BMP, TIFF, GIF, …) is decoded to an RGB uint8 tensor
3×H×W: EXIF orientation is applied; grayscale, palette, CMYK and alpha images are converted as
torchvision's ``pil_loader`` does (alpha dropped); 16-bit images are scaled to 8 bits.  A file that
cannot be decoded raises :class:`BadImage` whose message is the reason recorded in caches.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ..choices import MAX_ASPECT

# Pillow's own default (~89.5 Mpx, e.g. 9459×9459): larger files are refused as decompression
# bombs instead of being decoded into gigabytes.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# An image longer than MAX_ASPECT (vggfeat.choices) times its short side is centre-cropped to
# that ratio before rescaling, so a 1×4000 px strip cannot become a 256×1,024,000 tensor.


def transforms():
    """torchvision's v2 functional transforms, imported on first use: importing torchvision
    costs about a second (it loads its detection ops and torch's compiler), which a rerun that
    finds its output up to date never needs."""
    from torchvision.transforms.v2 import functional

    return functional


class BadImage(Exception):
    """An input file that is not a decodable image; ``str()`` is the human-readable reason."""


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> Tensor:
    """Decode ``path`` to an RGB uint8 tensor 3×H×W, or raise :class:`BadImage` saying why.

    Images over ``max_pixels`` (default :data:`MAX_PIXELS`, overridable with the
    ``VGGFEAT_MAX_PIXELS`` environment variable) are refused as decompression bombs.
    """
    path = Path(path)
    return _decode(path, lambda: path.stat().st_size == 0, max_pixels)


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Tensor:
    """Decode an image held in memory (a tar member, a parquet cell, a download) exactly as
    :func:`read_image` decodes a file: same conversions, same limits, same :class:`BadImage`
    reasons."""
    return _decode(io.BytesIO(data), lambda: len(data) == 0, max_pixels)


def _decode(source: Path | BinaryIO, is_empty: Callable[[], bool], max_pixels: int | None
            ) -> Tensor:
    """The one decoder behind :func:`read_image` and :func:`decode_image`: ``source`` is a path
    or a seekable binary file object; ``is_empty`` is asked inside the error handling, so a
    path that cannot even be stat'ed gets the same reasons as one that cannot be decoded."""
    max_pixels = max_pixels or int(os.environ.get("VGGFEAT_MAX_PIXELS", MAX_PIXELS))
    try:
        if is_empty():
            raise BadImage("empty file")
        with warnings.catch_warnings(), _pillow_limit_at_least(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > max_pixels:
                    raise BadImage(f"decompression bomb: {img.width}×{img.height} px is over the "
                                   f"{max_pixels} px limit")
                img = ImageOps.exif_transpose(img)
                return transforms().pil_to_tensor(_to_rgb(img))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise BadImage("not an image (format not recognised)") from err
    except FileNotFoundError as err:
        raise BadImage("file not found") from err
    except OSError as err:
        reason = str(err)
        if "truncated" in reason or "broken data stream" in reason or "premature end" in reason:
            raise BadImage(f"truncated image ({reason})") from err
        raise BadImage(f"unreadable image ({reason})") from err
    except (ValueError, SyntaxError, struct.error) as err:
        raise BadImage(f"corrupt image ({type(err).__name__}: {err})") from err


_limit_lock = threading.Lock()
_limits_in_use: list[int] = []  # max_pixels of the reads now lifting Pillow's limit
_pillow_own_limit: list[int | None] = []  # Pillow's limit before the first of them


@contextmanager
def _pillow_limit_at_least(max_pixels: int):
    """Lift Pillow's module-wide pixel limit to ``max_pixels`` while an image is read.

    Pillow refuses an image over its own limit (``Image.MAX_IMAGE_PIXELS``) in ``Image.open``,
    before vggfeat sees the size, so ``VGGFEAT_MAX_PIXELS`` could lower the limit but never raise
    it.  Reads in several threads share one lift (the largest limit asked for), and Pillow's own
    value comes back when the last one ends.
    """
    with _limit_lock:
        own = _pillow_own_limit[0] if _limits_in_use else Image.MAX_IMAGE_PIXELS
        lift = own is not None and max_pixels > own
        if lift:
            _pillow_own_limit[:] = [own]
            _limits_in_use.append(max_pixels)
            Image.MAX_IMAGE_PIXELS = max(_limits_in_use)
    try:
        yield
    finally:
        if lift:
            with _limit_lock:
                _limits_in_use.remove(max_pixels)
                Image.MAX_IMAGE_PIXELS = max(_limits_in_use) if _limits_in_use else own


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit integer) grayscale: Pillow's convert("RGB") would clip at 255.
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def aspect_window(height: int, width: int, max_aspect: float = MAX_ASPECT
                  ) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of an H×W image :func:`limit_aspect` keeps."""
    longest = max(1, int(min(height, width) * max_aspect))
    if height > longest:
        return (height - longest) // 2, 0, longest, width
    if width > longest:
        return 0, (width - longest) // 2, height, longest
    return 0, 0, height, width


def limit_aspect(image: Tensor, max_aspect: float = MAX_ASPECT) -> Tensor:
    """Centre-crop the long side of a C×H×W image to at most ``max_aspect`` × the short side."""
    top, left, h, w = aspect_window(*image.shape[-2:], max_aspect)
    return image[..., top:top + h, left:left + w]


def resize_short_side(image: Tensor, size: int) -> Tensor:
    """Isotropic rescale (bilinear, antialiased) so the smallest side is ``size`` px.

    The long side follows torchvision's ``Resize(size)`` rule (truncated), so a torchvision-style
    crop pipeline sees exactly the same pixels.
    """
    if min(image.shape[-2:]) == size:
        return image
    tf = transforms()
    return tf.resize(image, [size], interpolation=tf.InterpolationMode.BILINEAR, antialias=True)


def center_crop(image: Tensor, size: int) -> Tensor:
    return transforms().center_crop(image, [size, size])


def rescale_views(image: Tensor, scales: tuple[int, ...], *, max_aspect: float = MAX_ASPECT,
                  crop: int | None = None) -> list[Tensor]:
    """One uint8 view per scale Q: aspect-capped, rescaled to smallest side Q, optionally
    centre-cropped to ``crop`` px.  This is all the per-image work done in loader workers."""
    image = limit_aspect(image, max_aspect)
    views = [resize_short_side(image, q) for q in scales]
    return [center_crop(v, crop) for v in views] if crop is not None else views


def to_pil(image: Tensor) -> Image.Image:
    return transforms().to_pil_image(image)
