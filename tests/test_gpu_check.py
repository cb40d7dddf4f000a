"""benchmarks/gpu_check.py: the one-shot GPU check runs every step (toy sizes on the CPU), and a
step that hangs or crashes is recorded while the others still run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_step_and_writes_the_table_and_figures(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=290)
    log = (out / "worker.log").read_text() if (out / "worker.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == list(load_gpu_check().STEPS)
    assert {name: r["status"] for name, r in steps.items()} == dict.fromkeys(steps, "ok")
    assert report["dry_run"] and report["settings"]["device"] == "cpu"

    tests = steps["cuda_tests"]["figures"]  # without a GPU they are collected and skipped
    assert tests["tests"] >= 3 and tests["failures"] == tests["errors"] == 0
    assert tests["passed"] + tests["skipped"] == tests["tests"]
    for name in ("train_eager", "train_compiled"):
        figures = steps[name]["figures"]
        assert figures["images_per_second"] > 0 and figures["mfu_percent"] > 0
    reference = steps["train_reference"]["figures"]
    assert reference["fp32"]["images_per_second"] > 0
    assert reference["bf16_channels_last"]["images_per_second"] > 0
    extracted = steps["extract"]["figures"]
    assert extracted["images"] == report["settings"]["extract_images"]
    assert 1 <= extracted["images_per_forward"] <= report["settings"]["extract_batch_size"]
    cosine = steps["descriptor_cosine"]["figures"]
    assert 0.999 < cosine["cosine_min"] <= cosine["cosine_mean"] <= 1 + 1e-9

    table = (out / "gpu_check.md").read_text()
    assert table in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # under the header
    assert len(rows) == len(steps) and all("| ok |" in row for row in rows)


FAKE_WORKER = r"""
import json, os, subprocess, sys, time
args = sys.argv[1:]
out, todo = args[args.index("--out") + 1], args[args.index("--worker-steps") + 1].split(",")
steps = os.path.join(out, "steps")
def write(name, data):
    with open(os.path.join(steps, name + ".tmp"), "w") as f:
        json.dump(data, f)
    os.replace(os.path.join(steps, name + ".tmp"), os.path.join(steps, name))
for name in todo:
    write("running.json", {"step": name, "started": time.time()})
    if name == "cuda_tests":  # hangs, with a child process of its own
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(os.path.join(out, "child.pid"), "w") as f:
            f.write(str(child.pid))
        time.sleep(120)
    if name == "train_eager":  # the process dies (as on a CUDA error)
        os._exit(3)
    write(name + ".json", {"status": "ok", "summary": name + " done", "seconds": 0.1})
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" in status.read_text()  # killed, not yet reaped


def with_worker(script: str, tmp_path, monkeypatch):
    """gpu_check as on a 1-GPU machine whose step worker is ``script``."""
    gpu_check = load_gpu_check()
    worker = tmp_path / "worker.py"
    worker.write_text(script)
    monkeypatch.setattr(gpu_check, "worker_command",
                        lambda argv, todo, work: [sys.executable, str(worker), *argv,
                                                  "--worker-steps", ",".join(todo)])
    monkeypatch.setattr(gpu_check, "cuda_device_count", lambda: 1)
    return gpu_check


def test_a_hung_or_crashed_step_is_recorded_and_the_others_still_run(tmp_path, monkeypatch,
                                                                       capsys):
    gpu_check = with_worker(FAKE_WORKER, tmp_path, monkeypatch)
    out = tmp_path / "check"
    status = gpu_check.main(["--only", "cuda_tests,train_eager,extract", "--step-seconds",
                             "cuda_tests=1.5", "--out", str(out)])
    assert status == 1
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert [(name, r["status"]) for name, r in steps.items()] == \
        [("cuda_tests", "timeout"), ("train_eager", "failed"), ("extract", "ok")]
    assert steps["cuda_tests"]["error"] == "stopped after its 1.5 s budget"
    assert "exited with status 3" in steps["train_eager"]["error"]
    child = int((out / "child.pid").read_text())
    deadline = time.time() + 5
    while not _gone(child) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(child), "the hung step's own child process was left running"
    table = (out / "gpu_check.md").read_text()
    assert "| CUDA-only tests | timeout | stopped after its 1.5 s budget |" in table
    assert table in capsys.readouterr().out


def test_unknown_step_names_are_refused(capsys):
    gpu_check = load_gpu_check()
    for argv in (["--only", "train"], ["--step-seconds", "compile=60"]):
        with pytest.raises(SystemExit) as stop:
            gpu_check.parse_args(argv)
        assert stop.value.code == 2
    errors = capsys.readouterr().err
    assert "--only: unknown step 'train'" in errors and "--step-seconds 'compile=60'" in errors


def test_without_a_cuda_device_it_stops_at_once_and_names_dry_run(tmp_path, monkeypatch, capsys):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(gpu_check, "supervise", lambda *a: pytest.fail("a step was started"))
    assert gpu_check.main(["--out", str(tmp_path / "check")]) == 2
    assert capsys.readouterr().err == "gpu_check: no CUDA device: use --dry-run (or --device)\n"
    assert not (tmp_path / "check").exists()


OK_WORKER = r"""
import json, os, sys
args = sys.argv[1:]
out, todo = args[args.index("--out") + 1], args[args.index("--worker-steps") + 1].split(",")
for name in todo:
    with open(os.path.join(out, "steps", name + ".json"), "w") as f:
        json.dump({"status": "ok", "summary": name + " done", "seconds": 0.1}, f)
"""


def test_only_some_steps_merges_them_into_the_earlier_report(tmp_path, monkeypatch, capsys):
    gpu_check = with_worker(OK_WORKER, tmp_path, monkeypatch)
    out = tmp_path / "check"
    assert gpu_check.main(["--only", "extract,train_compiled", "--out", str(out)]) == 0
    first = json.loads((out / "gpu_check.json").read_text())
    assert gpu_check.main(["--only", "train_eager,extract", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["train_eager", "extract", "train_compiled"]
    assert "run" not in report["steps"]["extract"]  # measured again: this run's
    assert report["steps"]["train_compiled"]["run"] == {"date": first["date"],
                                                        "command": first["command"]}
    table = (out / "gpu_check.md").read_text()
    assert "| training, vggfeat eager | ok |" in table and "| extraction | ok |" in table
    assert "| training, compiled | ok |" in table
    assert "Kept from earlier runs: training, compiled (" in table
