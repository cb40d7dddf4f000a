"""Shared fixtures: reduced-width nets built by the same builder as the paper's, real image files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggfeat

# Small enough to run many images per second on 2 cores; same Table 1 builder as the full nets.
TINY = {"width_mult": 1 / 16, "fc_dim": 32}

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory) -> Iterator[Path]:
    """Compiled CPU kernels and measured backend choices go to a fresh folder, not the user's
    cache (the CLI's subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("vggfeat-cache")
    before = os.environ.get("VGGFEAT_CACHE")
    os.environ["VGGFEAT_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("VGGFEAT_CACHE", None)
    else:
        os.environ["VGGFEAT_CACHE"] = before


def tiny_vgg(arch: str = "D", seed: int = 0, **kwargs) -> vggfeat.VGG:
    return vggfeat.vgg(arch, weights="random", seed=seed, **{**TINY, **kwargs}).eval()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A vggfeat .safetensors file of a tiny config D: the CLI builds the net from it alone."""
    path = tmp_path_factory.mktemp("weights") / "tiny-D.safetensors"
    vggfeat.save_weights(tiny_vgg("D", seed=3), path)
    return path


def write_image(path: Path, size=(240, 320), seed: int = 0, mode: str = "RGB", **save) -> Path:
    """A real image file with smooth random content (h, w) = size, in the format of its suffix."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 220, 40), (200, 60, 220)]


def coloured_image(path, colour, seed):
    """A photo-like file dominated by one colour, so even a random tiny net separates classes."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-40, 40, (30, 40, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((320, 240), Image.BILINEAR).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two classes of JPEG/PNG photos, a name with spaces and non-ASCII characters included."""
    root = tmp_path / "images"
    sizes = [(240, 320), (260, 250), (240, 320), (300, 230)]
    for c, cls in enumerate(["cat", "dog"]):
        for i, size in enumerate(sizes):
            suffix = ".png" if i == 3 else ".jpg"
            name = f"photo {i} é{suffix}" if i == 1 else f"{i}{suffix}"
            write_image(root / cls / name, size=size, seed=10 * c + i)
    return root


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "vggfeat", *map(str, args)], capture_output=True,
                          text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"vggfeat {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


# ---- S3 (moto), on 127.0.0.1 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_server():
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def moto_bucket(server: str, monkeypatch, endpoint_variable: str, bucket: str):
    """Yield ``(s3fs, bucket)``: a new bucket of the moto ``server``, whose endpoint the
    environment gives the standard way (``endpoint_variable``: AWS_ENDPOINT_URL, read by
    botocore, or FSSPEC_S3_ENDPOINT_URL, fsspec's config, re-read here)."""
    import fsspec.config
    import s3fs

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), (endpoint_variable, server)):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()
