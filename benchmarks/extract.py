"""Extraction throughput per backend: forward-only on tensors vs end-to-end `vggfeat extract`.

Writes real-size JPEGs (1024×768 by default; ``--sizes`` mixes aspect ratios in a shuffled
order), then prints, for each backend in ``--backends`` (measured side by side, in turns):

* forward-only images/s: the dense descriptor net alone (flips and all scales) on full batches
  of tensors of the sizes those JPEGs become (best of ``--repeats`` turns),
* end-to-end images/s: ``vggfeat.extract`` on the files (decode, rescale, network, HDF5 cache),
* the speed-up over the first backend (``eager``: torch's own layers) for both,
* the largest difference of its descriptors from the first backend's (L2-normalised),
* end-to-end / forward-only (target on CPU: ≥ 0.95; both best of ``--repeats`` turns, taken
  in turns) and images per forward (the mean number of images in an end-to-end forward pass,
  flips not counted; ``--batch-size`` at most),
* the network's share of the end-to-end run: the time its forward passes took within the run
  over the run's wall time (what the run spends outside the network: set-up, decoding,
  hashing, writing), which, unlike the ratio above, does not move with the machine's load,
* the peak memory of the end-to-end run: the main process's resident memory (RSS), and the
  largest decoding worker's private memory (what it adds: its RSS also counts the pages it
  shares with the main process), sampled every 20 ms and every 5 s; target on CPU: ≤ 3 GB for
  the main process.

    python benchmarks/extract.py                      # VGG-16, Q = 256,384,512, CPU: eager vs auto
    python benchmarks/extract.py --backends eager,winograd,auto --repeats 3
    python benchmarks/extract.py --device cuda --amp bf16 --images 512 --batch-size 32 \
        --sizes 1024x768,768x1024,1024x1024           # shuffled photos in 3 aspect ratios
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vggfeat
from vggfeat.data.images import resize_short_side
from vggfeat.descriptors import descriptor
from vggfeat.descriptors import DescriptorNet, DescriptorSpec, extract
from vggfeat.devices import default_workers


def write_jpegs(folder: Path, sizes: list[tuple[int, int]]) -> None:
    """One JPEG per (width, height), named in list order."""
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(sizes):
        small = rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(
            folder / f"{i:05d}.jpg", quality=90)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process now (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def private_bytes(pid: int | str) -> int:
    """Memory a process holds for itself (private pages, ``/proc/PID/smaps_rollup``; 0 if it
    is gone): a forked decoding worker's RSS also counts the pages it shares with the main
    process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) << 10 for line in f
                       if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except (OSError, ValueError):
        return 0


def child_pids() -> list[str]:
    pids = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += (task / "children").read_text().split()
        except OSError:
            pass
    return pids


@contextmanager
def network_time():
    """Seconds spent in the descriptor net's forward passes during a block: yields a dict whose
    ``seconds`` holds them once the block ends."""
    spent, forward = {"seconds": 0.0}, descriptor.DescriptorNet.forward_views

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(self, *args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - start

    descriptor.DescriptorNet.forward_views = timed
    try:
        yield spent
    finally:
        descriptor.DescriptorNet.forward_views = forward


@contextmanager
def peak_rss(interval: float = 0.02, worker_interval: float = 5.0):
    """Sample the main process's RSS (every ``interval`` s) and its children's private memory
    (every ``worker_interval`` s: reading it walks a forked worker's page tables, ~60 ms of CPU
    for a worker forked from a 3 GB process, which would take a core from the network) during a
    block: yields a dict that holds ``main`` and ``worker`` (the largest child) peaks, in bytes,
    once the block ends (Linux)."""
    peaks, stop = {"main": 0, "worker": 0}, threading.Event()

    def sample() -> None:
        next_worker = time.monotonic() + 1.0  # once the worker has started and decoded
        while not stop.wait(interval):
            peaks["main"] = max(peaks["main"], rss_bytes())
            if time.monotonic() >= next_worker:
                peaks["worker"] = max([peaks["worker"], *map(private_bytes, child_pids())])
                next_worker = time.monotonic() + worker_interval

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="D")
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--scales", default="256,384,512")
    parser.add_argument("--layer", default="fc7")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sizes", default="1024x768",
                        help="JPEG width×height, or several (comma-separated) in a shuffled order")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--backends", default=None,
                        help="comma-separated, the first is the reference [default: eager,auto on "
                             "CPU, eager on GPUs]")
    parser.add_argument("--repeats", type=int, default=2, help="forward-only turns per backend")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    backends = (args.backends or ("eager" if on_gpu or args.amp else "eager,auto")).split(",")
    scales = tuple(int(q) for q in args.scales.split(","))
    shapes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    order = np.random.default_rng(0).permutation(args.images) % len(shapes)
    sizes = [shapes[k] for k in order]  # each shape in turn, shuffled
    spec = DescriptorSpec(layer=args.layer, scales=scales)
    model = vggfeat.vgg(args.arch, weights="random", width_mult=args.width_mult)
    nets = {b: DescriptorNet(model, spec, device=args.device, batch_size=args.batch_size,
                             amp=args.amp, backend=b) for b in backends}
    workers = default_workers() if args.workers is None else args.workers
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}, amp {args.amp}")
    print(f"# VGG {args.arch} ×{args.width_mult}, layer {args.layer}, Q={scales}, flip, "
          f"{args.images} JPEGs {args.sizes}, batch {args.batch_size}, workers {workers}")

    batches = []  # a full batch of each JPEG size
    for width, height in shapes:
        frame = torch.zeros(3, height, width, dtype=torch.uint8)
        batches.append([[resize_short_side(frame, q) for q in scales]] * args.batch_size)
        for net in nets.values():
            net(batches[-1])  # warm-up: allocator, kernels, auto's measurements
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    forward, end_to_end = dict.fromkeys(backends, 0.0), dict.fromkeys(backends, 0.0)
    per_forward, rows, peaks = {}, {}, {b: {"main": 0, "worker": 0} for b in backends}
    share = dict.fromkeys(backends, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        write_jpegs(folder, sizes)
        # In turns (each backend forward-only, then end to end, then the next backend), so that
        # every figure compared sees the same machine load; the best turn of each is kept.
        for turn in range(args.repeats):
            for backend, net in nets.items():
                sync()
                start, done = time.perf_counter(), 0
                while done < args.images:
                    net(batches[done // args.batch_size % len(batches)])
                    done += args.batch_size
                sync()
                fwd = done / (time.perf_counter() - start)
                forward[backend] = max(forward[backend], fwd)
                out = Path(tmp) / f"{backend}-{turn}.h5"
                with peak_rss() as peak, network_time() as spent:
                    start = time.perf_counter()
                    result = extract([folder], out, spec=spec, model=model,
                                     batch_size=args.batch_size, workers=workers,
                                     device=args.device, amp=args.amp, backend=backend,
                                     progress=False)
                    wall = time.perf_counter() - start
                rate = result.num_images / wall
                end_to_end[backend] = max(end_to_end[backend], rate)
                share[backend] = max(share[backend], spent["seconds"] / wall)
                peaks[backend] = {k: max(v, peak[k]) for k, v in peaks[backend].items()}
                per_forward[backend] = result.images_per_forward
                rows[backend] = vggfeat.load_features(out).data
                print(f"# turn {turn}, {backend}: forward-only {fwd:.3f} img/s, end-to-end "
                      f"{rate:.3f} img/s, e2e/fwd {rate / fwd:.3f}, network share "
                      f"{spent['seconds'] / wall:.3f}", flush=True)
    ref = backends[0]
    print(f"{'backend':10} {'forward-only':>14} {'end-to-end':>14} {'speed-up':>15} "
          f"{'max |Δ| vs ' + ref:>16} {'e2e/fwd':>8} {'net share':>9} {'images/forward':>15} "
          f"{'peak RSS main / worker private':>30}")
    for backend in backends:
        diff = float(np.abs(rows[backend] - rows[ref]).max())
        ran = nets[backend].backend
        print(f"{backend if ran == backend else backend + '→' + ran:10} "
              f"{forward[backend]:9.3f} img/s {end_to_end[backend]:9.3f} img/s "
              f"{forward[backend] / forward[ref]:6.2f}× /{end_to_end[backend] / end_to_end[ref]:5.2f}× "
              f"{diff:16.1e} {end_to_end[backend] / forward[backend]:8.3f} {share[backend]:9.3f} "
              f"{per_forward[backend]:15.1f} {peaks[backend]['main'] / 2**30:10.2f} GiB / "
              f"{peaks[backend]['worker'] / 2**30:4.2f} GiB")


if __name__ == "__main__":
    main()
