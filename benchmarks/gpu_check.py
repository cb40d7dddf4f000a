"""All the GPU checks in one command: CUDA tests, training and extraction speed, bf16, memory.

    python benchmarks/gpu_check.py --out gpu-check            # one H100/H200: under 8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpuc  # every step at toy size on the CPU

Steps, in this order (the longest, compilation, last):

* ``cuda_tests``: the tests that need a CUDA GPU (``pytest -m cuda``), as a subprocess: passed /
  failed / skipped;
* ``train_eager``: VGG-16 training step (forward, backward, SGD), bf16 autocast, channels_last,
  batch 256, on a fixed batch on the device (``synthetic`` of benchmarks/train.py): img/s, MFU;
* ``train_reference``: torchvision's ``vgg16`` in the same plain SGD loop, fp32 as torchvision's
  reference script runs it and bf16 + channels_last as vggfeat runs: img/s, MFU;
* ``extract``: ``vggfeat.extract`` at Q = 256, 384, 512 with flips on JPEGs of three aspect
  ratios (benchmarks/extract.py's images), bf16: img/s and images per forward;
* ``descriptor_cosine``: the same images extracted in bf16 and in fp32 (TF32 off): min and mean
  cosine of the descriptors;
* ``train_compiled``: ``train_eager`` under ``torch.compile`` (compilation included in the step's
  time, not in img/s).

Each step reports its peak ``torch.cuda.max_memory_allocated``.  The steps run in a worker
process under their own time budget; a step that fails, crashes the worker or runs out of time is
recorded as such and the remaining steps run in a fresh worker.  The table goes to stdout and
OUT/gpu_check.md, every figure to OUT/gpu_check.json; the exit status is 1 when a step did not pass.
With ``--only``, the steps of an earlier report in OUT that were not run again are kept in it,
each with the date and command of the run that measured it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("cuda_tests", "train_eager", "train_reference", "extract", "descriptor_cosine",
         "train_compiled")
# Seconds each step may take at most (compilation of VGG-16 forward + backward is the longest);
# the whole run also stops at --budget.
STEP_SECONDS = {"cuda_tests": 90, "train_eager": 60, "train_reference": 75, "extract": 90,
                "descriptor_cosine": 60, "train_compiled": 240}
TITLES = {"cuda_tests": "CUDA-only tests", "train_eager": "training, vggfeat eager",
          "train_reference": "training, torchvision reference", "extract": "extraction",
          "descriptor_cosine": "bf16 vs fp32 descriptors", "train_compiled": "training, compiled"}


def settings(args: argparse.Namespace) -> dict:
    """The sizes every step uses: the paper's full VGG-16 on a GPU, or a toy net on the CPU."""
    dry = args.dry_run
    cores = os.cpu_count() or 2
    return {
        "device": args.device or ("cpu" if dry else "cuda"),
        "arch": "D",
        # The same Table-1 builder at 1/16 of the width and 32-wide fc layers (as the tests).
        "width_mult": 1 / 16 if dry else 1.0,
        "fc_dim": 32 if dry else None,
        "batch_size": args.batch_size or (2 if dry else 256),
        "train_steps": 1 if dry else 20,
        "warmup_steps": 1 if dry else 5,
        # On a CPU, inductor would compile C++ for minutes: the dry run traces with dynamo only.
        "compile_backend": "eager" if dry else "inductor",
        "peak_tflops": args.peak_tflops,
        "scales": [256, 384, 512],
        "sizes": ([[64, 48], [48, 64], [64, 64]] if dry
                  else [[1024, 768], [768, 1024], [1024, 1024]]),
        "extract_images": args.extract_images or (4 if dry else 1024),
        "extract_batch_size": 2 if dry else 32,
        "warmup_images": 2 if dry else 96,  # untimed: each image shape meets cuDNN once
        # What `auto` runs on a GPU; on the CPU it spares the dry run the CPU backend's kernel
        # compilation and measurements.
        "backend": "eager",
        "workers": args.workers if args.workers is not None else (0 if dry else min(16, cores)),
        "cosine_images": 2 if dry else 64,
        "weights": args.weights,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"),
                        help="folder for gpu_check.md, gpu_check.json and the logs")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step at toy size on the CPU (a reduced-width net, tiny images)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run [450; 270 with --dry-run]")
    parser.add_argument("--step-seconds", action="append", default=[], metavar="STEP=SECONDS",
                        help="another time budget for one step (repeatable)")
    parser.add_argument("--only", default=None, help="comma-separated steps to run")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch [256]")
    parser.add_argument("--extract-images", type=int, default=None, help="JPEGs to extract [1024]")
    parser.add_argument("--workers", type=int, default=None,
                        help="extraction decoding workers [the cores, at most 16]")
    parser.add_argument("--weights", default="random",
                        help="weights of the extraction net: random, or a local weights file")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU [from the device name]")
    parser.add_argument("--worker-steps", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chosen = STEPS if args.only is None else tuple(args.only.split(","))
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        parser.error(f"--only: unknown step {unknown[0]!r}; the steps are {', '.join(STEPS)}")
    args.steps = [s for s in STEPS if s in chosen]
    args.budgets = dict(STEP_SECONDS)
    for item in args.step_seconds:
        name, _, seconds = item.partition("=")
        if name not in STEPS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--step-seconds {item!r}: use STEP=SECONDS with a step of "
                         f"{', '.join(STEPS)}")
        args.budgets[name] = float(seconds)
    if args.budget is None:
        args.budget = 270.0 if args.dry_run else 450.0
    return args


# -- the supervisor: runs the steps in worker processes, enforces the time budgets -------------

def _kill(proc: subprocess.Popen) -> None:
    """The worker and whatever it started (pytest, DataLoader workers, compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _running(steps_dir: Path) -> tuple[str | None, float]:
    try:
        state = json.loads((steps_dir / "running.json").read_text())
        return state["step"], state["started"]
    except (OSError, ValueError, KeyError):
        return None, 0.0


def worker_command(argv: list[str], todo: list[str], work: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv,
            "--worker-steps", ",".join(todo), "--work-dir", str(work)]


def _collect(steps_dir: Path, todo: list[str], results: dict) -> None:
    """Add the results the worker has written since the last look, and say so on stderr."""
    for name in todo:
        path = steps_dir / f"{name}.json"
        if name not in results and path.exists():
            results[name] = json.loads(path.read_text())
            _announce(name, results[name])


def _announce(name: str, result: dict) -> None:
    print(f"gpu_check: {name}: {result['status']} ({result.get('seconds', 0):.1f} s)",
          file=sys.stderr, flush=True)


def _run_worker(argv: list[str], todo: list[str], args, work: Path, deadline: float) -> dict:
    """Start one worker on ``todo``; return the results of the steps it ran or was stopped in."""
    steps_dir = args.out / "steps"
    (steps_dir / "running.json").unlink(missing_ok=True)
    results: dict[str, dict] = {}
    stopped = None
    with open(args.out / "worker.log", "a") as log:
        proc = subprocess.Popen(worker_command(argv, todo, work), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            time.sleep(0.2)
            _collect(steps_dir, todo, results)
            step, started = _running(steps_dir)
            step = None if step in results else step  # finished; the next has not started
            now = time.time()
            if now >= deadline or (step and now - started > args.budgets[step]):
                limit = "the whole run's --budget" if now >= deadline else \
                    f"its {args.budgets[step]:g} s budget"
                stopped = (step, f"stopped after {limit}", now - started if step else 0.0)
                _kill(proc)
    _collect(steps_dir, todo, results)
    step, started = _running(steps_dir)
    if stopped and stopped[0]:
        results[stopped[0]] = {"status": "timeout", "error": stopped[1], "seconds": stopped[2]}
        _announce(stopped[0], results[stopped[0]])
    elif step and step not in results:
        results[step] = {"status": "failed", "seconds": time.time() - started,
                         "error": f"the worker exited with status {proc.returncode} "
                                  f"(see {args.out / 'worker.log'})"}
        _announce(step, results[step])
    return results


def supervise(argv: list[str], args) -> dict:
    """Every step's result; a worker is started again for the steps left after a stopped one."""
    deadline = time.time() + args.budget
    (args.out / "steps").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="vggfeat-gpu-check-"))  # JPEGs and feature files
    try:
        while len(results) < len(args.steps):
            todo = [s for s in args.steps if s not in results]
            if time.time() >= deadline:
                results.update({s: {"status": "skipped", "seconds": 0.0,
                                     "error": "no time left in --budget"} for s in todo})
                break
            ran = _run_worker(argv, todo, args, work, deadline)
            if not ran:  # the worker died before its first step: the next one would too
                results.update({s: {"status": "failed", "seconds": 0.0, "error":
                                     f"the worker did not start (see {args.out / 'worker.log'})"}
                                for s in todo})
            results.update(ran)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {name: results[name] for name in args.steps}


# -- the report --------------------------------------------------------------------------------

def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def merge_earlier(report: dict, earlier: dict | None) -> dict:
    """``report`` with the steps of ``earlier`` (a report in the same folder) that it did not
    run, in the order of STEPS, each marked with the run that measured it.  A dry run and a
    GPU run are never mixed."""
    if not earlier or earlier.get("dry_run") != report["dry_run"]:
        return report
    run = {"date": earlier.get("date", "?"), "command": earlier.get("command", "?")}
    kept = {name: {**result, "run": result.get("run", run)}
            for name, result in earlier.get("steps", {}).items()
            if name in STEPS and name not in report["steps"]}
    steps = {name: report["steps"].get(name) or kept[name] for name in STEPS
             if name in report["steps"] or name in kept}
    return {**report, "steps": steps}


def _read_earlier(out: Path) -> dict | None:
    """The report already in ``out``, None when there is none or it cannot be read."""
    try:
        earlier = json.loads((out / "gpu_check.json").read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) and isinstance(earlier.get("steps"), dict) \
        else None


def cuda_device_count() -> int:
    """The CUDA devices torch sees (the supervisor's only use of torch)."""
    import torch

    return torch.cuda.device_count()


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    dry = " (dry run: toy sizes on the CPU)" if report["dry_run"] else ""
    lines = [f"GPU check, {report['date']}{dry}",
             "",
             f"Hardware: {env.get('hardware', 'unknown (the worker did not start)')}; "
             f"{env.get('versions', '')}",
             f"Command: `{report['command']}` ({report['seconds']:.0f} s in all)",
             "",
             "| step | status | result | peak GPU memory | seconds |",
             "|---|---|---|---|---|"]
    for name, result in report["steps"].items():
        text = result.get("summary") or result.get("error", "")
        if result.get("summary") and result.get("error"):
            text += f"; {result['error']}"
        lines.append(f"| {TITLES[name]} | {result['status']} | {_cell(text)} | "
                     f"{_cell(result.get('memory', ''))} | {result.get('seconds', 0):.1f} |")
    earlier = [(TITLES[name], r["run"]) for name, r in report["steps"].items() if "run" in r]
    if earlier:
        lines += ["", "Kept from earlier runs: " + "; ".join(
            f"{title} ({run['date']}, `{run['command']}`)" for title, run in earlier)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker_steps is not None:
        import gpu_check_steps  # torch, vggfeat and the other benchmarks: in the worker only

        return gpu_check_steps.run(args, settings(args), args.worker_steps.split(","))
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and cuda_device_count() == 0:
        print("gpu_check: no CUDA device: use --dry-run (or --device)", file=sys.stderr)
        return 2
    earlier = _read_earlier(args.out) if args.only is not None else None
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("steps", "worker.log"):
        path = args.out / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    start = time.time()
    steps = supervise(argv, args)
    env_file = args.out / "steps" / "environment.json"
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": shlex.join(["python", "benchmarks/gpu_check.py", *argv]),
              "dry_run": args.dry_run, "seconds": time.time() - start,
              "environment": json.loads(env_file.read_text()) if env_file.exists() else {},
              "settings": settings(args), "steps": steps}
    report = merge_earlier(report, earlier)
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table, end="")
    return 0 if all(r["status"] == "ok" for r in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
