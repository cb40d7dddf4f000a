"""The command line: fast help, and one clear line instead of a traceback for bad requests."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings

import click
import pytest
import torch
from conftest import run_cli, write_image

from vggfeat.cli import main
from vggfeat.cli.main import COMMANDS, cli
from vggfeat.data.folders import folder_for_net
from vggfeat.devices import resolve_device
from vggfeat.errors import ConfigError, InputError

HEAVY = ("torch", "numpy", "torchvision", "timm", "sklearn", "h5py", "matplotlib", "scipy")


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_nothing_heavy(flag):
    code = ("import sys\nfrom vggfeat.cli import main\ntry:\n    main([%r])\nexcept SystemExit:\n"
            "    pass\nprint('loaded:', ','.join(m for m in %r if m in sys.modules))" % (flag, HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("loaded:"), out.stdout
    if flag == "--help":
        assert all(name in out.stdout for name in COMMANDS)


# Every command's help, and mistakes answered from the arguments alone: none may wait for torch.
QUICK_ANSWERS = [
    *([name, "--help"] for name in COMMANDS),
    *(["localize", name, "--help"] for name in ("train", "evaluate", "score")),
    ["extract", "img", "-o", "feats.npy"],
    ["extract", "img", "-o", "f.h5", "--layer", "fc9"],
    ["extract", "img", "-o", "f.h5", "--layer", "conv3_4", "--arch", "D"],
    ["extract", "img", "-o", "f.h5", "--backend", "gpu"],
    ["extract", "img", "-o", "f.h5", "--device", "tpu"],
    ["extract", "img", "-o", "f.h5", "--arch", "vgg17"],
    ["transfer", "f.h5", "--protocol", "folder", "--layer", "FC7"],
    ["transfer", "f.h5", "--protocol", "imagenet"],
    ["evaluate", "--method", "dense+crop"],
    ["scoremap", "nope.jpg", "-o", "map.png"],
    ["train", "--data", ".", "--arch", "Z"],
    ["localize", "train", "--data", ".", "--boxes", ".", "--head", "xyz"],
    ["localize", "evaluate", "--weights", "nope.safetensors"],
    ["info", "--arch", "F"],
]


def test_help_and_argument_errors_answer_without_torch(tmp_path):
    code = f"""
import contextlib, io, sys
from vggfeat.cli import main
for argv in {QUICK_ANSWERS!r}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code
        else:
            code = 0
    loaded = [m for m in {HEAVY!r} if m in sys.modules]
    print(repr((argv, code, loaded, out.getvalue())))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    results = [eval(line) for line in out.stdout.splitlines()]
    assert len(results) == len(QUICK_ANSWERS), out.stderr
    for argv, code, loaded, text in results:
        assert loaded == [], (argv, loaded)
        if "--help" in argv:
            assert code == 0 and "Usage:" in text, (argv, text)
        else:
            assert code == 2 and "Error: " in text and "Traceback" not in text, (argv, text)


@pytest.mark.parametrize("layer, arch, hint", [
    ("FC7", None, "did you mean 'fc7'?"),
    ("fc9", None, "did you mean 'fc8'?"),
    ("conv3_4", "D", "for VGG D; did you mean 'conv3_3'?"),
    ("conv1_1:PRE", "E", "did you mean 'conv1_1:pre'?"),
])
def test_a_mistyped_layer_gets_the_closest_name(layer, arch, hint, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["extract", "img", "-o", "f.h5", "--layer", layer, *(["--arch", arch] if arch else [])])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert hint in err and "valid layers" not in err, err


def test_a_layer_far_from_any_name_lists_them_all(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "img", "-o", "f.h5", "--layer", "bottleneck", "--arch", "D"])
    err = capsys.readouterr().err
    assert "valid layers: conv1_1:pre, conv1_1," in err and "conv3_4" not in err


def test_every_listed_command_exists():
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
    assert cli.get_command(ctx, "nope") is None


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'; use one of cpu, cuda, mps"),
    ("cuda:99", "cuda:99"),
])
def test_bad_devices_are_one_line_errors(device, message, tmp_path, capsys):
    if device == "cuda:99" and not torch.cuda.is_available():
        message = "no CUDA GPU is visible"
    with pytest.raises(ConfigError, match=message):
        resolve_device(device)
    for command in (["extract", str(tmp_path), "-o", str(tmp_path / "f.h5")],
                    ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--device", device])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "Invalid value for '--device'" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible to PyTorch.*use --device cpu"):
        resolve_device("cuda")


def test_scoremap_class_out_of_range(tiny_weights, tmp_path, capsys):
    image = write_image(tmp_path / "a.jpg")
    with pytest.raises(SystemExit) as stop:
        main(["scoremap", str(image), "-o", str(tmp_path / "m.png"), "--weights",
              str(tiny_weights), "--class", "5000"])
    assert stop.value.code == 2
    assert "class 5000 does not exist: the net has 1000 classes, 0 … 999" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_scoremap_takes_a_device_like_every_command(tiny_weights, tmp_path, capsys):
    image = write_image(tmp_path / "a.jpg")
    flags = ["scoremap", str(image), "--weights", str(tiny_weights), "--scale", "224"]
    with pytest.raises(SystemExit) as stop:
        main([*flags, "-o", str(tmp_path / "bad.png"), "--device", "tpu"])
    assert stop.value.code == 2 and "Invalid value for '--device'" in capsys.readouterr().err
    main([*flags, "-o", str(tmp_path / "m.png"), "--device", "cpu"])
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "bad.png").exists()


def test_evaluate_refuses_folders_that_are_not_the_nets_classes(tiny_weights, image_folder,
                                                                 tmp_path):
    import vggfeat

    imagenet_net = vggfeat.vgg(weights=tiny_weights)
    with pytest.raises(InputError, match="cat, dog are not classes of the net; its 1000 classes "
                                         "need folders named by WordNet id"):
        folder_for_net(image_folder, imagenet_net)
    # A net trained on the folders' classes (recorded in its weights) labels them by name.
    with pytest.warns(UserWarning):
        pets = vggfeat.vgg(weights=tiny_weights, num_classes=2)
    pets.weights_meta["class_names"] = ["dog", "cat"]
    images = folder_for_net(image_folder, pets)
    assert images.class_names == ["dog", "cat"]
    assert [images.labels[i] for i, p in enumerate(images.paths) if "/cat/" in p] == [1] * 4
    pets.weights_meta["class_names"] = ["dog", "horse"]
    with pytest.raises(InputError, match="cat are not classes of the net; its 2 classes need "
                                         "folders named as its classes: dog, horse"):
        folder_for_net(image_folder, pets)
    del pets.weights_meta["class_names"]  # unknown classes: only an unambiguous count is accepted
    assert folder_for_net(image_folder, pets).class_names == ["cat", "dog"]
    pets.reset_classifier(3)
    with pytest.raises(InputError, match="2 class folders, but the net has 3 classes"):
        folder_for_net(image_folder, pets)


def test_evaluate_command_refusal_is_one_line(tiny_weights, image_folder, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--weights", str(tiny_weights), "--data", str(image_folder),
              "--device", "cpu", "--workers", "0", "--quiet"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "are not classes of the net" in err and "Traceback" not in err


def test_missing_optional_package_names_the_extra(monkeypatch):
    from vggfeat.errors import MissingDependencyError
    from vggfeat.optional import require

    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(MissingDependencyError, match=r'needs scipy.*pip install "vggfeat\[devkit\]"'):
        require("scipy.io", "devkit", "reading the ILSVRC devkit's meta.mat")


def test_packaging_extras_and_license():
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "timm" in core  # part of the stack, not an extra
    assert not any(name in core for name in ("tensorboard", "matplotlib", "scipy"))
    extras = project["optional-dependencies"]
    assert "vggfeat[all]" in extras["dev"] and "tensorboard>=2.12" in extras["train"]
    assert any(d.startswith("scikit-learn>=1.6") for d in project["dependencies"])  # validate_data
    assert any(d.startswith("torch>=2.3") for d in project["dependencies"])  # torch.amp.GradScaler
    assert project["license"]["text"] == "BSD-3-Clause"
    assert (root / "LICENSE").read_text().startswith("BSD 3-Clause License")


def test_a_bar_fed_fractions_counts_whole_images_and_never_overshoots():
    from vggfeat.progress import IMAGE_BAR, ImageBar

    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm's "clamping frac to range [0, 1]"
        bar = ImageBar(total=4, unit="img", bar_format=IMAGE_BAR, file=out, mininterval=0,
                       miniters=0, ncols=100)
        for _ in range(4 * 7):
            bar.update(1 / 7)  # seven passes' worth per image, as multi-scale runs report
            assert bar.n <= 4 and bar.n == int(bar.n)
        bar.close()
    lines = out.getvalue().replace("\r", "\n")
    assert "(+0.5)" in lines  # work on unfinished images shows beside the count
    assert re.findall(r"\| (\S+)/4", lines)[-1] == "4" and "(+1.0)" not in lines
    assert not re.search(r"\d\.\d+/4", lines) and "-00:00" not in lines


def test_extract_at_reduced_width_shows_whole_images_and_refuses_another_width(image_folder,
                                                                                tmp_path):
    out = tmp_path / "f.h5"
    tiny = ["--weights", "random", "--scales", "224,256", "--workers", "0", "--fc-dim", "32"]
    proc = run_cli("extract", image_folder, "-o", out, *tiny, "--width-mult", "0.0625",
                   "--batch-size", "3", env={**os.environ, "TQDM_MININTERVAL": "0"})
    bars = proc.stderr.replace("\r", "\n")
    counts = re.findall(r"\| *(\S+)/8 ", bars)
    assert counts and counts[-1] == "8" and all(c.isdigit() for c in counts), bars
    assert "clamping" not in bars and "-00:00" not in bars
    from vggfeat.cache import read_attrs

    assert '"width_mult": 0.0625' in read_attrs(out)["model_config"]
    again = run_cli("extract", image_folder, "-o", out, *tiny, "--width-mult", "0.125", "--quiet",
                    check=False)
    assert again.returncode != 0 and "width_mult\": 0.125" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr


def test_a_warning_during_a_progress_bar_gets_its_own_line(capsys):
    from tqdm import tqdm

    from vggfeat.cli.main import _show_warning

    with tqdm(total=3, desc="extract") as bar:
        bar.update(1)
        _show_warning("something to know", UserWarning, "x.py", 1)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "Warning: something to know" in lines
