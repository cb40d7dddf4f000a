"""Progress bars for commands that run images through a net.

Forward passes gather views of many images (:class:`~vggfeat.models.runner.ShapeBatches`), so
whole images finish in bursts; the bars count the work of every pass as a fraction of an image,
which keeps the count and the ETA moving between bursts.
"""

from __future__ import annotations

from tqdm.auto import tqdm

IMAGE_BAR = "{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def image_bar(total: int, *, desc: str, disable: bool = False, initial: float = 0) -> tqdm:
    """A bar over ``total`` images that accepts fractional updates (``bar.update(0.25)``)."""
    return tqdm(total=total, initial=initial, unit="img", desc=desc, disable=disable,
                bar_format=IMAGE_BAR, dynamic_ncols=True)
