"""Progress bars for commands that run images through a net.

Forward passes gather views of many images (:class:`~vggfeat.models.runner.ShapeBatches`), so
whole images finish in bursts.  The bars are told the work of every pass as a fraction of an
image; they count whole images (``3/12``) and show the work already done on the images still in
progress beside the count (``3/12 (+0.7)``), so the bar keeps moving between bursts without
counting more than there is.
"""

from __future__ import annotations

import math

from tqdm.auto import tqdm

IMAGE_BAR = ("{l_bar}{bar}| {n_fmt}/{total_fmt}{in_progress} "
             "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
# Fractions of an image summed over many passes may land a hair below the whole image.
ROUNDING = 1e-6


class ImageBar(tqdm):
    """A bar over images that takes fractional updates (``bar.update(0.25)``): the count is the
    whole images' worth done, never above the total; the rest shows as ``(+0.7)``."""

    def __init__(self, *args, initial: float = 0, **kwargs) -> None:
        self.work = float(initial)
        super().__init__(*args, initial=int(initial), **kwargs)

    def update(self, n: float = 1) -> bool | None:
        self.work += n
        whole = int(self.work + ROUNDING)
        if self.total is not None:
            whole = min(whole, int(self.total))
        return super().update(max(0, whole - self.n))

    @property
    def format_dict(self) -> dict:
        values = super().format_dict
        extra = getattr(self, "work", 0.0) - values["n"]
        tenths = math.floor(extra * 10 + ROUNDING) / 10  # (+1.0) would read as a finished image
        values["in_progress"] = f" (+{tenths:.1f})" if tenths > 0 else ""
        return values


def image_bar(total: int, *, desc: str, disable: bool = False, initial: float = 0) -> ImageBar:
    """A bar over ``total`` images that accepts fractional updates (``bar.update(0.25)``)."""
    return ImageBar(total=total, initial=initial, unit="img", desc=desc, disable=disable,
                    bar_format=IMAGE_BAR, dynamic_ncols=True)
