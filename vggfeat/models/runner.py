"""Running a VGG on a device: placement, input normalisation, autocast and same-shape batching.

Shared by the descriptor extractor, the ImageNet evaluator and the localiser, which differ only
in what they compute from the network's outputs: each runs a loader through
:meth:`ShapeBatches.run_loader` and an image with its mirror image through
:meth:`DeviceRunner.flip_pass`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import chain

import torch
from torch import Tensor

from ..choices import WINDOW_BATCHES
from ..data.loader import stack_rows
from ..devices import resolve_device
from ..errors import ConfigError
from .backends import resolve_backend, with_backend
from .vgg import VGG

AMP_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# WINDOW_BATCHES: how many images a forward pass may gather from, in batches: with g image
# shapes among consecutive inputs, passes stay full while g·(batch_size − 1) < the window.
# On a CPU, the bytes a forward pass may give the first layer's map (float32, an image and its
# mirror).  One image at Q = 512 already makes large matrix products, so gathering more buys
# little speed on a CPU, while the first layers' maps grow with every image: 8 wallpaper photos
# at Q = 512 held 2 GB in one such map.  Same-shape groups run in passes within this budget (one
# image when it alone is larger), so the peak memory no longer grows with the batch size: for
# the paper's widths (64 channels) that is 2^19 input pixels a pass.
CPU_MAP_BYTES_PER_PASS = 256 << 20


def cpu_pixels_per_pass(model: torch.nn.Module) -> int:
    """Input pixels a CPU forward pass may hold: :data:`CPU_MAP_BYTES_PER_PASS` of the first
    convolution's float32 output, for an image and its mirror image."""
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return max(1, CPU_MAP_BYTES_PER_PASS // (first.out_channels * 4 * 2))


def placed_device(device: str | torch.device) -> torch.device:
    """A checked device, ``cuda`` → ``cuda:N`` of the current GPU, so that it compares equal to
    the device of a tensor placed there."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def memory_format_of(model: torch.nn.Module) -> torch.memory_format:
    """channels_last if the first convolution's weight is laid out so, else contiguous."""
    weight = next(p for p in model.parameters() if p.dim() == 4)
    if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class DeviceRunner:
    """A VGG in eval mode on ``device``, fed uint8 RGB batches.

    The caller's model is never changed: if it is not already in eval mode on ``device`` in the
    asked memory format (channels_last, faster for inference on GPUs and CPUs alike, unless
    ``channels_last=False``), the runner works on a copy placed there (``self.model``).

    Subclasses say what one forward pass computes from same-shape views
    (:meth:`forward_views`) and how an image's per-scale results make its row (:meth:`rows`);
    calling the runner on a list of images, streaming images through :meth:`stream`, or running
    a loader through :meth:`run_loader` batches views of exactly the same shape together
    (:class:`ShapeBatches`).  ``window`` (default ``4 × batch_size``) is how many consecutive
    images a stream gathers passes from.

    ``backend`` (``auto``, ``eager`` or ``winograd``; see :mod:`vggfeat.models.backends`) says
    how the 3×3 convolutions run; ``self.backend`` is the one that runs (``auto`` resolves to
    ``eager`` on GPUs and under autocast).  ``reads``, the layers :meth:`forward_views` reads
    (None: any), lets those backends fuse the ReLUs whose input is never read.
    """

    def __init__(self, model: VGG, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 amp: str | None = None, channels_last: bool = True,
                 window: int | None = None, backend: str = "auto",
                 reads: Iterable[str] | None = None) -> None:
        if amp not in AMP_DTYPES:
            raise ConfigError(f"amp must be one of fp32, bf16, fp16 or None, got {amp!r}")
        self.device = placed_device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        on_device = next(model.parameters()).device == self.device
        if model.training or not on_device or memory_format_of(model) != self.memory_format:
            model = copy.deepcopy(model).eval().to(self.device, memory_format=self.memory_format)
        self.amp_dtype = AMP_DTYPES[amp]
        self.backend = resolve_backend(backend, device=self.device, amp_dtype=self.amp_dtype)
        self.model = with_backend(model, self.backend, reads=reads)
        self.batch_size = batch_size
        self.window = window or WINDOW_BATCHES * batch_size
        self.pixels_per_pass = cpu_pixels_per_pass(model) if self.device.type == "cpu" else None
        self.forward_passes = 0  # same-shape passes run so far, and the images they held
        self.forward_images = 0

    @property
    def images_per_forward(self) -> float:
        """Mean number of images in a forward pass so far (flips not counted); 0 before any."""
        return self.forward_images / self.forward_passes if self.forward_passes else 0.0

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def network_input(self, batch: Tensor) -> Tensor:
        """uint8 N×3×H×W → normalised float input on the device, in the model's memory format."""
        x = batch.to(self.device, non_blocking=True)
        return self.model.preprocessing(x).contiguous(memory_format=self.memory_format)

    def forward_views(self, scale: int, batch: Tensor) -> Tensor:
        """uint8 N×3×H×W views of N images at scale index ``scale`` → N×D results on the device."""
        raise NotImplementedError

    def flip_pass(self, batch: Tensor, forward: Callable[[Tensor], Tensor] | None = None, *,
                  flip: bool = True) -> Tensor:
        """``forward`` (default: the dense score map) of uint8 N×3×H×W images and of their
        mirror images, in one pass: float32 2×N×… on the device, ``[0]`` the images', ``[1]``
        their mirrors' (1×N×… without ``flip``).  Average over dim 0 for flip-averaged results.

        ``forward`` takes the normalised input and runs under the runner's autocast.
        """
        x = self.network_input(batch)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        with self.autocast():
            out = (forward or self.model.score_map)(x)
        return out.float().unflatten(0, (2 if flip else 1, len(batch)))

    def rows(self, results: list[list[Tensor]]) -> Tensor:
        """Per-image lists of per-scale results (D on the device) → float32 N×D rows on the host."""
        raise NotImplementedError

    def stream(self, window: int | None = None, *,
               on_progress: Callable[[float], object] | None = None) -> ShapeBatches:
        """A :class:`ShapeBatches` running this runner's forward passes (window default
        ``self.window`` images; ``on_progress`` as there)."""
        return ShapeBatches(self.forward_batch, batch_size=self.batch_size,
                            window=window or self.window, on_progress=on_progress)

    def run_loader(self, loader: Iterable[list], *,
                   on_progress: Callable[[float], object] | None = None,
                   unpack: Callable[[tuple], tuple[object, list[Tensor]]] | None = None,
                   out_of_order: bool = False) -> Iterator[tuple[list, list]]:
        """Every image of ``loader`` through a new :meth:`stream`: see
        :meth:`ShapeBatches.run_loader` (yields ``(finished, failed)`` after each batch).  To
        keep what is finished when stopping early, make the stream and call its ``run_loader``."""
        yield from self.stream(on_progress=on_progress).run_loader(
            loader, unpack=unpack, out_of_order=out_of_order)

    def __call__(self, items: list[list[Tensor]]) -> Tensor:
        """``items[i][s]`` is image i at scale s (uint8 3×H×W) → float32 N×D rows (host).

        Same-shape views among ``items`` run together, ``batch_size`` at a time.
        """
        stream = self.stream(window=len(items))
        for i, views in enumerate(items):
            stream.add(i, views)
        stream.finish()
        return self.rows([results for _, results in stream.take()])

    def forward_batch(self, scale: int, views: list[Tensor]) -> Tensor:
        """Same-shape views → their results (:meth:`forward_views`), in passes of at most
        ``pixels_per_pass`` pixels, counted in :attr:`images_per_forward`."""
        batch = stack_rows(views)
        step = len(batch)
        if self.pixels_per_pass is not None:
            step = max(1, min(step, self.pixels_per_pass // (batch.shape[-2] * batch.shape[-1])))
        outs = []
        with torch.inference_mode():
            for start in range(0, len(batch), step):
                outs.append(self.forward_views(scale, batch[start:start + step]))
                self.forward_passes += 1
                self.forward_images += len(outs[-1])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class ShapeBatches:
    """Forward passes of same-shape views gathered across consecutive images, in input order.

    Images are added in input order, each as its list of per-scale uint8 3×H×W views.  A view
    waits in the queue of its (scale, shape) until ``batch_size`` views wait there; they then
    run together through ``forward(scale, views)`` (N×D results).  When more than ``window``
    images are held, the queue holding the oldest unfinished one runs short.  Nothing is resized
    or padded, so an image's results do not depend on which images shared its passes (beyond
    float rounding).

    :meth:`take` hands back the finished images, whose every view has run, as
    ``(key, [result at each scale])``, in the order they were added.

    ``on_progress(images)``, if given, is called after every forward pass with the images' worth
    of work it did (a view of an image with S scales counts 1/S), so a progress bar moves per
    pass, not only when whole images finish.
    """

    def __init__(self, forward: Callable[[int, list[Tensor]], Tensor], *, batch_size: int,
                 window: int, on_progress: Callable[[float], object] | None = None) -> None:
        self.forward, self.batch_size, self.window = forward, batch_size, max(1, window)
        self.on_progress = on_progress
        # (scale, shape, dtype) → [(seq, view)], and seq → (key, results at each scale so far)
        self.queues: dict[tuple, list[tuple[int, Tensor]]] = {}
        self.waiting: OrderedDict[int, tuple[object, list]] = OrderedDict()
        self.added = 0

    def add(self, key, views: list[Tensor]) -> None:
        """Queue an image's views; run the queues that are full, and short ones while more than
        ``window`` images are held."""
        seq, self.added = self.added, self.added + 1
        self.waiting[seq] = (key, [None] * len(views))
        for s, view in enumerate(views):
            queue = self.queues.setdefault((s, tuple(view.shape), view.dtype), [])
            queue.append((seq, view))
            if len(queue) == self.batch_size:
                self._run((s, tuple(view.shape), view.dtype))
        while len(self.waiting) > self.window:  # the oldest image has waited long enough
            oldest = next((seq for seq, (_, results) in self.waiting.items()
                           if any(r is None for r in results)), None)
            if oldest is None:  # all finished: the caller has yet to take them
                break
            self._run(next(k for k, queue in self.queues.items() if queue[0][0] == oldest))

    def run_loader(self, loader: Iterable[list], *,
                   unpack: Callable[[tuple], tuple[object, list[Tensor]]] | None = None,
                   out_of_order: bool = False) -> Iterator[tuple[list, list]]:
        """Run every image of ``loader``; after each of its batches, yield ``(finished, failed)``.

        ``loader`` yields batches of items ``(key, views or None, failure reason or None, …)``
        (:func:`vggfeat.data.loader.image_loader`).  ``unpack(item)`` gives a prepared item's
        ``(key, views)`` as :meth:`add` takes them (default: its first two fields).  ``finished``
        is what :meth:`take` hands back (``out_of_order`` as there); ``failed`` lists the items
        the loader could not prepare, each counted as one image of ``on_progress``.  The last
        yield comes after every queue ran: by then every image has been handed back.  A caller
        that stops early finds the images finished since its last turn in :meth:`take`.
        """
        unpack = unpack or (lambda item: (item[0], item[1]))
        for batch in chain(loader, [None]):  # None: the end, where short passes run
            failed = []
            for item in batch or ():
                if item[2] is None:
                    self.add(*unpack(item))
                    continue
                failed.append(item)
                if self.on_progress is not None:
                    self.on_progress(1)
            if batch is None:
                self.finish()
            yield self.take(out_of_order=out_of_order), failed

    def finish(self) -> None:
        """Run every queue, however short: every image is then finished."""
        for k in list(self.queues):
            self._run(k)

    def take(self, *, out_of_order: bool = False) -> list[tuple[object, list[Tensor]]]:
        """Hand back the finished images up to the first unfinished one, in input order; with
        ``out_of_order``, every finished image (what stopping early can still keep)."""
        done = []
        for seq in list(self.waiting):
            if any(r is None for r in self.waiting[seq][1]):
                if not out_of_order:
                    break
            else:
                done.append(self.waiting.pop(seq))
        return done

    def _run(self, k: tuple) -> None:
        queue = self.queues.pop(k)
        out = self.forward(k[0], [view for _, view in queue])
        for row, (seq, _) in enumerate(queue):
            self.waiting[seq][1][k[0]] = out[row]
        if self.on_progress is not None:
            self.on_progress(sum(1 / len(self.waiting[seq][1]) for seq, _ in queue))


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set for a block and restored after it.

    Benchmarking pays off when shapes repeat (training crops) and costs a search per new shape
    (dense evaluation, where every image size differs).
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """TF32 tensor-core matmuls on Ampere and later GPUs for a block, restored after it.

    float32 matmuls then round their inputs to 10 mantissa bits (convolutions already do so by
    default); fc6–fc8 and any float32 run get tensor-core speed.
    """
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
