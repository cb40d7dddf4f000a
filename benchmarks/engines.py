"""One process against ``--engine ray`` with one actor, two ``--shard-index`` processes, and a
tar read from S3 (moto) against the same tar on disk: what each way of running costs.

Writes ``--images`` JPEGs, then extracts them into a fresh feature store, in turns, with
``vggfeat.extract`` (one process) and ``vggfeat.extract_with_ray`` on a local Ray instance
started once beforehand (one actor reserving every CPU, so torch gets the same threads as the
process), and prints a table: wall seconds (best of ``--repeats`` turns), images/s, and the
overhead of the Ray run over the single process, which is mostly fixed per run (starting the
actor: a Python process that imports torch and receives the net) and per unit (each unit reads
the store's index and publishes an entry).  The time to start Ray itself is printed apart.

The two shares run as two ``vggfeat extract`` processes at once, each with half the CPUs'
threads, against one ``vggfeat extract`` process with all of them (both pay the start of a
Python process).  The S3 turn serves the tar from moto's server on 127.0.0.1 (needs
``pip install -e ".[remote,dev]"``), so it measures the reading path, not a network.

    python benchmarks/engines.py                          # 24 images, VGG-16 at 1/4 width
    python benchmarks/engines.py --images 96 --unit-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vggfeat
from vggfeat.descriptors import DescriptorSpec, extract


def write_jpegs(folder: Path, n: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(n):
        small = rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(
            folder / f"{i:05d}.jpg", quality=90)


def timed(run, images: Path, store: Path, **kwargs) -> float:
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    result = run([images], store, **kwargs)
    seconds = time.perf_counter() - start
    assert result.computed == result.num_images, result
    return seconds


def cli_runs(images: Path, store: Path, weights: Path, args, shares: int) -> float:
    """``shares`` ``vggfeat extract`` processes at once into one store; wall seconds."""
    shutil.rmtree(store, ignore_errors=True)
    threads = str(max(1, (os.cpu_count() or 1) // shares))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    common = [sys.executable, "-m", "vggfeat", "extract", str(images), "-o", str(store),
              "--weights", str(weights), "--scales", args.scales, "--backend", args.backend,
              "--unit-size", str(args.unit_size), "--quiet", "--workers", "1"]
    start = time.perf_counter()
    procs = [subprocess.Popen(common + (["--num-shards", str(shares), "--shard-index", str(i)]
                                        if shares > 1 else []), env=env)
             for i in range(shares)]
    assert all(p.wait() == 0 for p in procs)
    return time.perf_counter() - start


def tar_of(images: Path, path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for jpeg in sorted(images.iterdir()):
            data = jpeg.read_bytes()
            info = tarfile.TarInfo(jpeg.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def s3_tar(local: Path):
    """The tar in a bucket of moto's server on 127.0.0.1: (its URL, the server)."""
    from moto.server import ThreadedMotoServer
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs each request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put_file(str(local), "bench/images.tar")
    return "s3://bench/images.tar", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--scales", default="256,384,512")
    parser.add_argument("--unit-size", type=int, default=8, help="images per unit of work")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    size = tuple(int(v) for v in args.size.split("x"))
    model = vggfeat.vgg("D", weights="random", width_mult=args.width_mult).eval()
    spec = DescriptorSpec(scales=tuple(int(s) for s in args.scales.split(",")))
    common = dict(spec=spec, model=model, progress=False, backend=args.backend,
                  unit_images=args.unit_size)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="engines", dir="/tmp") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        write_jpegs(tmp / "images", args.images, size)
        extract([tmp / "images"], tmp / "warm-up", **common)  # the backend's choice, cached
        began = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                 _temp_dir=str(tmp / "ray"))
        ray_start = time.perf_counter() - began
        times = {"one process": [], "ray, 1 actor": []}
        for _ in range(args.repeats):
            times["one process"].append(timed(extract, tmp / "images", tmp / "local", **common))
            times["ray, 1 actor"].append(timed(
                vggfeat.extract_with_ray, tmp / "images", tmp / "ray-store", actors=(1, 1),
                cpus_per_actor=cpus, **common))
        ray.shutdown()
        weights = tmp / "net.safetensors"
        vggfeat.save_weights(model, weights)
        local_tar = tar_of(tmp / "images", tmp / "images.tar")
        url, server = s3_tar(local_tar)
        times.update({"CLI, 1 process": [], "CLI, 2 shares": [], "tar on disk": [],
                      "tar on S3": []})
        for _ in range(args.repeats):
            times["CLI, 1 process"].append(cli_runs(tmp / "images", tmp / "c1", weights, args, 1))
            times["CLI, 2 shares"].append(cli_runs(tmp / "images", tmp / "c2", weights, args, 2))
            for name, source in (("tar on disk", str(local_tar)), ("tar on S3", url)):
                shutil.rmtree(tmp / "t", ignore_errors=True)
                began = time.perf_counter()
                extract([source], tmp / "t", **common)
                times[name].append(time.perf_counter() - began)
        server.stop()
    report(args, cpus, times, ray_start)


def report(args, cpus: int, times: dict[str, list[float]], ray_start: float) -> None:
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, ray "
          f"{__import__('ray').__version__}; {args.images} JPEGs {args.size}, VGG-16 × "
          f"{args.width_mult}, Q = {args.scales}, units of {args.unit_size}, backend "
          f"{args.backend}; best of {args.repeats}")
    bases = {"ray, 1 actor": "one process", "CLI, 2 shares": "CLI, 1 process",
             "tar on S3": "tar on disk"}
    print(f"{'run':<16} {'seconds':>8} {'img/s':>7} {'vs':>16} {'overhead':>9}")
    for name, values in times.items():
        best, base = min(values), bases.get(name, name)
        print(f"{name:<16} {best:8.2f} {args.images / best:7.2f} {base:>16} "
              f"{100 * (best / min(times[base]) - 1):8.1f}%   (turns: "
              + ", ".join(f"{v:.2f}" for v in values) + ")")
    print(f"starting the local Ray instance (once, not counted above): {ray_start:.2f} s")


if __name__ == "__main__":
    main()
