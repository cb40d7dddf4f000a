"""The steps of benchmarks/gpu_check.py, run in its worker process (see that script).

Each step returns ``summary`` (the table's text), ``memory`` (peak GPU memory, as text) and
``figures`` (numbers for the JSON); a step that cannot pass raises.  The training loop and the
MFU peaks are benchmarks/train.py's, the test images benchmarks/extract.py's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import extract as extract_bench  # benchmarks/extract.py
import train as train_bench  # benchmarks/train.py
import vggfeat
from vggfeat.descriptors import DescriptorSpec, extract
from vggfeat.fileio import write_json_atomic
from vggfeat.models.runner import cudnn_benchmark, tf32_matmuls
from vggfeat.models.stats import count_macs

REPO = Path(__file__).resolve().parent.parent
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}


@dataclass(frozen=True)
class Context:
    settings: dict
    work: Path   # generated JPEGs and feature files (removed by the supervisor)
    steps: Path  # the steps' result files

    @property
    def device(self) -> torch.device:
        return torch.device(self.settings["device"])


# -- shared pieces -----------------------------------------------------------------------------

def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.1f} GiB"


def _net_name(s: dict) -> str:
    toy = f" at width ×{s['width_mult']:g}, fc {s['fc_dim']}" if s["fc_dim"] else ""
    return f"VGG-16{toy}" if s["arch"] == "D" else f"VGG {s['arch']}{toy}"


def _vggfeat_net(s: dict) -> vggfeat.VGG:
    return vggfeat.vgg(s["arch"], weights="random", width_mult=s["width_mult"], fc_dim=s["fc_dim"])


@lru_cache(maxsize=None)
def _peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    try:
        return train_bench.peak_tflops(torch.device(device), override)
    except SystemExit as unknown:  # a GPU missing from the table: MFU is left out
        return None, str(unknown)


def _throughput(s: dict, rate: float, flops: float) -> dict:
    peak, source = _peak_tflops(s["device"], s["peak_tflops"])
    mfu = 100 * rate * flops / (peak * 1e12) if peak else None
    return {"images_per_second": rate, "gflop_per_image": flops / 1e9, "mfu_percent": mfu,
            "peak_tflops": peak, "peak_source": source}


def _rate_text(figures: dict) -> str:
    mfu = figures["mfu_percent"]
    return (f"{figures['images_per_second']:.1f} img/s, "
            + (f"MFU {mfu:.1f}%" if mfu is not None else f"MFU n/a ({figures['peak_source']})"))


def _train(ctx: Context, model: nn.Module, *, amp: str | None, channels_last: bool,
           compile_backend: str | None = None) -> tuple[float, float | None]:
    """img/s of benchmarks/train.py's training step on a fixed batch, and the peak memory."""
    _reset_memory(ctx.device)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
    s = ctx.settings
    with cudnn_benchmark(True):  # fixed 224² crops, as `vggfeat train` runs them
        rate = train_bench.synthetic(model, batch=s["batch_size"], device=ctx.device, amp=amp,
                                     channels_last=channels_last, compile_=False,
                                     steps=s["train_steps"], warmup=s["warmup_steps"])
    return rate, _peak_gib(ctx.device)


def torchvision_vgg(s: dict) -> nn.Module:
    """torchvision's VGG of ``s["arch"]``; at reduced width for the dry run (its classifier is
    fixed at 512·7·7 → 4096 → 4096, so that is rebuilt at the reduced fc width)."""
    import torchvision.models.vgg as tv

    if s["width_mult"] == 1 and not s["fc_dim"]:
        return getattr(tv, TORCHVISION_NAMES[s["arch"]])()
    cfg = [v if v == "M" else max(1, round(v * s["width_mult"])) for v in tv.cfgs[s["arch"]]]
    features = tv.make_layers(cfg)
    with torch.device("meta"):  # the fixed classifier is replaced below: never allocated
        model = tv.VGG(features)  # torchvision's initialisation of the (real) conv layers
    fc = s["fc_dim"] or 4096
    model.classifier = nn.Sequential(
        nn.Linear(cfg[-2] * 7 * 7, fc), nn.ReLU(True), nn.Dropout(),
        nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(), nn.Linear(fc, 1000))
    return model


# -- training ----------------------------------------------------------------------------------

def _vggfeat_training(ctx: Context, compile_backend: str | None) -> dict:
    s = ctx.settings
    model = _vggfeat_net(s)
    flops = 3 * 2 * count_macs(model, 224)  # forward + backward ≈ 3 × forward
    rate, memory = _train(ctx, model, amp="bf16", channels_last=True,
                          compile_backend=compile_backend)
    figures = _throughput(s, rate, flops)
    label = f"vggfeat {_net_name(s)}, bf16, channels_last, batch {s['batch_size']}"
    if compile_backend:
        label += f", torch.compile (backend {compile_backend}; compiling is in the step's seconds)"
    return {"summary": f"{label}: {_rate_text(figures)}", "memory": _gib(memory),
            "figures": {**figures, "peak_memory_gib": memory}}


def step_train_eager(ctx: Context) -> dict:
    return _vggfeat_training(ctx, compile_backend=None)


def step_train_compiled(ctx: Context) -> dict:
    return _vggfeat_training(ctx, compile_backend=ctx.settings["compile_backend"])


def step_train_reference(ctx: Context) -> dict:
    s = ctx.settings
    flops = 3 * 2 * count_macs(_vggfeat_net(s), 224)  # the same layers as torchvision's
    runs, texts, memory = {}, [], []
    for label, amp, channels_last in (("fp32", None, False), ("bf16_channels_last", "bf16", True)):
        rate, peak = _train(ctx, torchvision_vgg(s), amp=amp, channels_last=channels_last)
        runs[label] = {**_throughput(s, rate, flops), "peak_memory_gib": peak}
        shown = "bf16 + channels_last" if amp else "fp32 (torch's default TF32 convolutions)"
        texts.append(f"{shown} {_rate_text(runs[label])}")
        memory.append(f"{shown.split()[0]} {_gib(peak)}")
    summary = (f"torchvision {TORCHVISION_NAMES.get(s['arch'], s['arch'])}"
               f"{' (toy width)' if s['fc_dim'] else ''}, plain SGD loop, batch "
               f"{s['batch_size']}: " + "; ".join(texts))
    eager = ctx.steps / "train_eager.json"
    if eager.exists():
        ours = json.loads(eager.read_text()).get("figures", {}).get("images_per_second")
        if ours:
            runs["vggfeat_eager_over_bf16"] = ours / runs["bf16_channels_last"]["images_per_second"]
            ratio = runs["vggfeat_eager_over_bf16"]
            summary += f"; vggfeat eager / torchvision bf16: {ratio:.2f}×"
    return {"summary": summary, "memory": ", ".join(memory), "figures": runs}


# -- extraction --------------------------------------------------------------------------------

def _images(ctx: Context) -> list[Path]:
    """benchmarks/extract.py's JPEGs, each size in turn in a shuffled order; written once."""
    s = ctx.settings
    folder, done = ctx.work / "images", ctx.work / "images.done"
    shapes = [tuple(size) for size in s["sizes"]]
    order = np.random.default_rng(0).permutation(s["extract_images"]) % len(shapes)
    sizes = [shapes[k] for k in order]
    if not done.exists():
        chunks = [sizes[i:i + 64] for i in range(0, len(sizes), 64)]
        parts = [folder / f"part{k:03d}" for k in range(len(chunks))]
        for part in parts:
            part.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow encodes without the GIL
            list(pool.map(extract_bench.write_jpegs, parts, chunks))
        done.touch()
    return sorted(folder.glob("part*/*.jpg"))


def _extraction_net(s: dict) -> vggfeat.VGG:
    if s["weights"] == "random":
        return _vggfeat_net(s)
    return vggfeat.vgg(weights=s["weights"], download=False, progress=False)


def _extract(ctx: Context, files: list[Path], output: str, amp: str | None, model):
    s = ctx.settings
    result = extract(files, ctx.work / output, spec=DescriptorSpec(scales=tuple(s["scales"])),
                     model=model, batch_size=s["extract_batch_size"], workers=s["workers"],
                     device=s["device"], amp=amp, backend=s["backend"], progress=False,
                     overwrite=True)
    if result.num_failed:
        path, reason = result.failed[0]
        raise RuntimeError(f"{result.num_failed} images failed, e.g. {path}: {reason}")
    return result


def step_extract(ctx: Context) -> dict:
    s = ctx.settings
    files, model = _images(ctx), _extraction_net(s)
    # Untimed: each image shape and scale meets cuDNN and the allocator once.
    _extract(ctx, files[:s["warmup_images"]], "warm-up.h5", "bf16", model)
    _reset_memory(ctx.device)
    start = time.perf_counter()
    result = _extract(ctx, files, "extract-bf16.h5", "bf16", model)
    rate = result.computed / (time.perf_counter() - start)
    memory = _peak_gib(ctx.device)
    sizes = ", ".join(f"{w}×{h}" for w, h in s["sizes"])
    summary = (f"vggfeat.extract, {_net_name(s)} fc7, Q = {', '.join(map(str, s['scales']))}, "
               f"flip, bf16, {len(files)} JPEGs of {sizes} shuffled, batch "
               f"{s['extract_batch_size']}, {s['workers']} workers: {rate:.1f} img/s, "
               f"{result.images_per_forward:.1f} images per forward (backend {result.backend})")
    return {"summary": summary, "memory": _gib(memory),
            "figures": {"images_per_second": rate, "images_per_forward": result.images_per_forward,
                        "images": len(files), "backend": result.backend,
                        "peak_memory_gib": memory}}


@contextmanager
def _true_fp32():
    """float32 without TF32 in convolutions (torch's default) and matmuls: the reference."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with tf32_matmuls(False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def step_descriptor_cosine(ctx: Context) -> dict:
    s = ctx.settings
    files, model = _images(ctx)[:s["cosine_images"]], _extraction_net(s)
    _reset_memory(ctx.device)
    rows = {}
    for amp in ("bf16", None):
        with _true_fp32() if amp is None else nullcontext():
            result = _extract(ctx, files, f"cosine-{amp or 'fp32'}.h5", amp, model)
        features = vggfeat.load_features(result.output)
        rows[amp] = dict(zip(features.paths, np.asarray(features.data, dtype=np.float64)))
    paths = sorted(rows[None])
    low, ref = (np.stack([rows[amp][p] for p in paths]) for amp in ("bf16", None))
    cosine = (low * ref).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(ref, axis=1))
    memory = _peak_gib(ctx.device)
    summary = (f"{len(paths)} images, {_net_name(s)} fc7 ({s['weights']} weights), Q = "
               f"{', '.join(map(str, s['scales']))}, flip: cosine min {cosine.min():.6f}, "
               f"mean {cosine.mean():.6f}")
    return {"summary": summary, "memory": _gib(memory),
            "figures": {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
                        "images": len(paths), "peak_memory_gib": memory}}


# -- CUDA tests --------------------------------------------------------------------------------

def step_cuda_tests(ctx: Context) -> dict:
    report = ctx.work / "cuda-tests.xml"
    selection = ["-m", "cuda"]  # the tests marked as needing a CUDA GPU (pyproject.toml)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *selection], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(proc.stdout, flush=True)  # into the worker's log
    if not report.exists():
        raise RuntimeError(f"pytest exited with {proc.returncode} without a report: "
                           f"{proc.stdout.strip().splitlines()[-1:]}")
    root = ElementTree.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = counts["failures"] + counts["errors"]
    summary = (f"pytest -m cuda: {counts['passed']} passed, {failed} failed, "
               f"{counts['skipped']} skipped")
    result = {"summary": summary, "memory": "",
              "figures": {**counts, "exit_status": proc.returncode}}
    if proc.returncode != 0 or counts["tests"] == 0:
        result.update(status="failed", error=f"pytest exited with {proc.returncode}")
    elif ctx.device.type == "cuda" and counts["skipped"]:
        result.update(status="failed", error="tests were skipped on a CUDA machine")
    return result


STEP_FUNCTIONS = {"cuda_tests": step_cuda_tests, "train_eager": step_train_eager,
                  "train_reference": step_train_reference, "extract": step_extract,
                  "descriptor_cosine": step_descriptor_cosine,
                  "train_compiled": step_train_compiled}


# -- the worker --------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    import torchvision

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware = (f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB), "
                    f"{os.cpu_count()} CPU cores")
    else:
        cpu = platform.processor() or platform.machine()
        hardware = f"no GPU: {cpu}, {os.cpu_count()} CPU cores"
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
                f"{torch.backends.cudnn.version()}, torchvision {torchvision.__version__}, "
                f"Python {platform.python_version()}")
    return {"hardware": hardware, "versions": versions}


def run_one(name: str, ctx: Context) -> dict:
    start = time.perf_counter()
    try:
        result = {"status": "ok", **STEP_FUNCTIONS[name](ctx)}
    except Exception as error:  # recorded in the table; the supervisor goes on with the rest
        traceback.print_exc()
        first = (str(error).strip().splitlines() or [""])[0][:300]
        result = {"status": "failed", "error": f"{type(error).__name__}: {first}"}
    result["seconds"] = time.perf_counter() - start
    return result


def run(args, settings: dict, names: list[str]) -> int:
    """Run ``names`` in order, each announced in running.json and recorded in STEP.json.

    Stops after a failed step: the supervisor runs the rest in a fresh process, since a CUDA
    error can leave this one's context unusable.
    """
    ctx = Context(settings, args.work_dir, args.out / "steps")
    try:
        env = environment(ctx.device)
    except Exception as error:  # e.g. no CUDA here: each step then says so in the table
        env = {"hardware": f"unknown ({type(error).__name__}: {error})", "versions": ""}
    write_json_atomic(ctx.steps / "environment.json", env)
    for name in names:
        write_json_atomic(ctx.steps / "running.json", {"step": name, "started": time.time()})
        print(f"== {name}", flush=True)
        result = run_one(name, ctx)
        write_json_atomic(ctx.steps / f"{name}.json", result)
        if result["status"] == "failed":
            return 1
    return 0
