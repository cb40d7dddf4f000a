"""Library-wide behaviour: atomic writes, the error hierarchy, the CLI's error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vggfeat import errors
from vggfeat.fileio import atomic_path, atomic_write, write_json_atomic, write_text_atomic


def test_atomic_write_publishes_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "wb") as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            assert tmp.parent == tmp_path and tmp.name.startswith(".")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_a_failed_flush_fails_the_write_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import stat

    target = tmp_path / "cache.json"
    write_json_atomic(target, {"old": 1})

    def fsync(fd):  # what a full disk or an I/O error reports at flush time
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_json_atomic(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["cache.json"]


def test_leftovers_of_killed_writes_are_found_by_name(tmp_path):
    from vggfeat.fileio import leftovers

    for name in (".a[1].h5.0123abcd.tmp", ".b.h5.89abcdef.tmp", "a[1].h5", ".a[1].h5x.1.tmp"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "c.h5") as tmp:
        tmp.write_bytes(b"half")
        assert leftovers(tmp_path, "c.h5") == [tmp]  # what a kill at this moment leaves
        raise KeyboardInterrupt
    assert [p.name for p in leftovers(tmp_path, "a[1].h5")] == [".a[1].h5.0123abcd.tmp"]
    assert len(leftovers(tmp_path)) == 3


def test_all_user_errors_share_one_base_and_keep_their_old_types():
    from vggfeat.cache.store import CacheError
    from vggfeat.data.sources import InputError
    from vggfeat.descriptors.run import ExtractError
    from vggfeat.models.weights import WeightsError
    from vggfeat.train.loop import TrainingError
    from vggfeat.train.recipe import RecipeError

    for cls in (CacheError, InputError, ExtractError, WeightsError, TrainingError, RecipeError):
        assert issubclass(cls, errors.VGGFeatError), cls
    # Code written against the earlier types still catches them.
    assert issubclass(InputError, ValueError) and issubclass(RecipeError, ValueError)
    assert issubclass(CacheError, RuntimeError) and issubclass(WeightsError, RuntimeError)


def _failing_info(monkeypatch, error):
    import vggfeat.models  # where ``vggfeat info`` finds it when it runs

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(vggfeat.models, "count_params", fail)


def test_cli_shows_user_errors_as_one_line(monkeypatch, capsys):
    from vggfeat.cli import main

    _failing_info(monkeypatch, errors.InputError("photo.jpg is not an image: remove it"))
    with pytest.raises(SystemExit) as stop:
        main(["info"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("Error: photo.jpg is not an image: remove it")
    _failing_info(monkeypatch, errors.TrainingError("the loss is nan"))
    with pytest.raises(SystemExit) as stop:
        main(["info"])
    assert stop.value.code == 1  # a run that started and stopped


def test_cli_does_not_hide_a_bugs_value_error(monkeypatch):
    from vggfeat.cli import main

    _failing_info(monkeypatch, ValueError("operands could not be broadcast together"))
    with pytest.raises(ValueError, match="broadcast"):  # its traceback reaches the user
        main(["info"])


def test_crop_mode_defaults_live_in_the_descriptor_spec():
    """``DescriptorSpec(crop=224)`` is torchvision's single centre crop: resize 256, no flip, as
    ``vggfeat extract --crop 224`` gives; dense descriptors keep the paper's scales and flip."""
    from vggfeat.descriptors import DescriptorSpec

    crop = DescriptorSpec(crop=224)
    assert (crop.scales, crop.flip) == ((256,), False)
    assert crop == DescriptorSpec(crop=224, scales=(256,), flip=False)
    assert DescriptorSpec(crop=224, flip=True).flip is True
    dense = DescriptorSpec()
    assert (dense.scales, dense.flip) == ((256, 384, 512), True)
    with pytest.raises(errors.ConfigError, match="every scale must be ≥ 224"):
        DescriptorSpec(crop=224, scales=(192,))


def test_importing_and_plotting_leave_matplotlib_alone(tmp_path):
    """No backend switch at import time or when plotting: the user's choice (here svg) stays."""
    from conftest import write_image

    image = write_image(tmp_path / "cat.jpg", size=(224, 240))
    code = f"""
import sys
import vggfeat.evaluate, vggfeat.train
assert "matplotlib" not in sys.modules, "importing vggfeat loaded matplotlib"
import matplotlib
matplotlib.use("svg")
from conftest import tiny_vgg
from vggfeat.evaluate import plot_score_map
from vggfeat.train.logs import plot_curves
model = tiny_vgg("A").train()
plot_score_map(model, {str(image)!r}, {str(tmp_path / "map.png")!r}, scale=224)
assert model.training, "plot_score_map changed the caller's model to eval mode"
plot_curves([dict(epoch=1, train_loss=2.0, val_top1_error=90.0, val_top5_error=70.0)],
            __import__("pathlib").Path({str(tmp_path / "curves.png")!r}))
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("map.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_and_posteriors_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A writer failing half-way keeps the previous file and leaves no temporary behind."""
    import numpy as np
    import safetensors.torch
    from conftest import tiny_vgg

    from vggfeat.evaluate import EvalResult, load_posteriors, save_posteriors
    from vggfeat.models.weights import save_weights

    weights = save_weights(tiny_vgg("A"), tmp_path / "a.safetensors")
    before = weights.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_weights(tiny_vgg("A", seed=1), weights)
    assert weights.read_bytes() == before

    good = EvalResult(np.full((2, 3), 1 / 3, np.float32), np.array([0, 2]), ["a.jpg", "b.jpg"],
                      "dense", (256,), {"arch": "A"})
    posteriors = save_posteriors(good, tmp_path / "p.h5")
    bad = EvalResult(good.posteriors, good.labels, good.paths, "dense", (256,),
                     {"arch": object()})  # not storable: fails after the datasets are written
    with pytest.raises(TypeError):
        save_posteriors(bad, posteriors)
    assert load_posteriors(posteriors).attrs["arch"] == "A"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "p.h5"]


def test_docs_link_only_files_of_the_repository():
    """Every relative link or path in the docs resolves inside the repository, to a file there."""
    import re

    root = Path(__file__).resolve().parent.parent
    pages = sorted((root / "docs").glob("*.md")) + [root / "README.md"]
    problems = []
    for page in pages:
        text = page.read_text()
        targets = re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r"`(\.\./[^`\s]+)`", text)
        for target in targets:
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = (page.parent / target).resolve()
            if not resolved.is_relative_to(root) or not resolved.exists():
                problems.append(f"{page.name}: {target}")
        problems += [f"{page.name}: {m}" for m in re.findall(r"/work/\S+", text)]
    assert not problems, problems


def test_the_command_lines_choices_are_the_librarys():
    """``--help`` and argument checks read vggfeat.choices (no torch); the code that acts on the
    values must accept exactly those."""
    from vggfeat import choices
    from vggfeat.transfer.protocols import PROTOCOLS

    assert choices.PROTOCOLS == tuple(PROTOCOLS)


def test_dir_shows_the_library_not_its_plumbing():
    import vggfeat
    import vggfeat.models

    for package in (vggfeat, vggfeat.models):
        names = dir(package)
        assert not {"importlib", "sys", "types", "_LAZY"} & set(names), names
    assert {"vgg", "extract", "VGG", "load_features", "__version__"} <= set(dir(vggfeat))
    assert {"vgg", "VGG", "parse_arch", "save_weights"} <= set(dir(vggfeat.models))
    assert callable(vggfeat.extract) and callable(vggfeat.models.vgg)  # the functions


# Functions still over the limit, in rooms being reworked; each goes once it is split.
LONG_FUNCTIONS_EXEMPT: set[str] = set()


def test_no_function_is_longer_than_60_lines():
    """Small functions: none of vggfeat's exceeds 60 lines from ``def`` to its end, not counting
    its docstring."""
    import ast

    root = Path(__file__).parent.parent
    too_long = []
    for path in sorted((root / "vggfeat").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) \
                    and isinstance(doc.value.value, str):
                length -= doc.end_lineno - doc.lineno + 1
            name = f"{path.relative_to(root).as_posix()}:{node.name}"
            if length > 60 and name not in LONG_FUNCTIONS_EXEMPT:
                too_long.append(f"{name} ({length} lines)")
    assert not too_long, too_long
