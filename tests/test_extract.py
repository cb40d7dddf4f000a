"""`vggfeat extract`: the Appendix B descriptor, the HDF5 cache, resume after SIGKILL, 2 ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_vgg, write_image

import vggfeat
from vggfeat.cache import CacheError
from vggfeat.data import read_image
from vggfeat.data.images import resize_short_side
from vggfeat.extract import DescriptorSpec, ExtractError, extract


def by_hand(model, path, layer, scales, flip=True, aggregate="mean", l2=True, pool="avg"):
    """The paper's recipe written out step by step, for one image."""
    image = read_image(path)
    per_scale = []
    for q in scales:
        x = model.preprocessing(resize_short_side(image, q)[None])
        views = [x, x.flip(-1)] if flip else [x]
        with torch.no_grad():
            maps = [model.forward_layers(v, [layer])[layer] for v in views]
        pooled = [m.mean((2, 3)) if pool == "avg" else m.amax((2, 3)) for m in maps]
        per_scale.append(torch.stack(pooled).mean(0)[0])
    out = torch.stack(per_scale).mean(0) if aggregate == "mean" else torch.cat(per_scale)
    return F.normalize(out, dim=0) if l2 else out


@pytest.mark.parametrize("layer,aggregate,pool", [("fc7", "mean", "avg"), ("conv5_3:pre", "stack", "max"),
                                                  ("fc6:pre", "stack", "avg")])
def test_descriptor_follows_the_paper(tmp_path, image_folder, layer, aggregate, pool):
    model = tiny_vgg("D")
    spec = DescriptorSpec(layer=layer, scales=(224, 288), aggregate=aggregate, pool=pool)
    result = extract([image_folder], tmp_path / "f.h5", spec=spec, model=model, workers=0,
                     progress=False)
    data = vggfeat.load_features(result.output)
    assert data.data.shape == (8, 32 * (2 if aggregate == "stack" else 1))
    for row, path in [(0, data.paths[0]), (5, data.paths[5])]:
        expected = by_hand(model, path, layer, (224, 288), aggregate=aggregate, pool=pool)
        np.testing.assert_allclose(data.data[row], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.allclose(np.linalg.norm(data.data, axis=1), 1, atol=1e-5)


def test_batching_does_not_change_descriptors(tmp_path, image_folder):
    model = tiny_vgg("A")
    spec = DescriptorSpec(scales=(224, 256))
    one = extract([image_folder], tmp_path / "one.h5", spec=spec, model=model, batch_size=1,
                  workers=0, progress=False)
    many = extract([image_folder], tmp_path / "many.h5", spec=spec, model=model, batch_size=8,
                   workers=2, progress=False)
    np.testing.assert_allclose(vggfeat.load_features(one.output).data,
                               vggfeat.load_features(many.output).data, rtol=1e-4, atol=1e-5)


def test_crop_mode_is_torchvision_single_crop(tmp_path, image_folder):
    model = tiny_vgg("D")
    spec = DescriptorSpec(layer="fc7", scales=(256,), crop=224, flip=False, l2=False)
    out = extract([image_folder], tmp_path / "c.h5", spec=spec, model=model, workers=0,
                  progress=False)
    data = vggfeat.load_features(out.output)
    from torchvision.transforms.v2 import functional as TF

    x = TF.center_crop(TF.resize(read_image(data.paths[2]), [256], antialias=True), [224, 224])
    with torch.no_grad():
        ref = model.forward_layers(model.preprocessing(x[None]), ["fc7"])["fc7"].flatten(1)[0]
    np.testing.assert_allclose(data.data[2], ref.numpy(), rtol=1e-4, atol=1e-5)
    assert data.input_sizes[2].tolist() == [[224, 224]]


def test_cache_layout_and_loading(tmp_path, image_folder):
    (image_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    strip = write_image(image_folder / "dog" / "strip.png", size=(2000, 8))
    model = tiny_vgg("B")
    out = extract([image_folder], tmp_path / "f.h5", spec=DescriptorSpec(scales=(256,)),
                  model=model, workers=0, progress=False, dtype="float16")
    assert (out.num_images, out.num_failed) == (9, 1)
    with h5py.File(out.output) as f:
        assert f["features"].dtype == np.float16
        assert f["features"].chunks == (9, 32)  # whole rows, at most ~1 MiB
        assert set(f) == {"features", "paths", "labels", "class_names", "input_sizes", "failed"}
        for key in ("arch", "layer", "weights", "weights_sha256", "scales", "pool", "flip",
                    "aggregate", "l2", "preprocessing", "vggfeat_version", "torch_version"):
            assert key in f.attrs, key
    data = vggfeat.load_features(out.output)
    assert data.failed == [(str(image_folder / "cat" / "broken.jpg"),
                            data.failed[0][1])] and "image" in data.failed[0][1]
    row = data.paths.index(str(strip))
    assert data.input_sizes[row].tolist() == [[1024, 256]]  # 4:1 cap, at the asked scale
    assert data.target_names == ["cat", "dog"] and data.target[row] == 1
    X, y = vggfeat.load_features(out.output, return_X_y=True)
    assert X.shape == (9, 32) and y.shape == (9,)
    lazy = vggfeat.load_features(out.output, lazy=True)
    np.testing.assert_array_equal(lazy.data[2:4], X[2:4])
    lazy.file.close()


def test_rerun_rules(tmp_path, image_folder):
    model = tiny_vgg("A")
    spec = DescriptorSpec(scales=(224,))
    first = extract([image_folder], tmp_path / "f.h5", spec=spec, model=model, workers=0,
                    progress=False)
    again = extract([image_folder], tmp_path / "f.h5", spec=spec, model=model, workers=0,
                    progress=False)
    assert again.up_to_date and again.computed == 0
    other = DescriptorSpec(scales=(256,))
    with pytest.raises(CacheError, match=r"scales: \[224\] → \[256\].*--overwrite"):
        extract([image_folder], first.output, spec=other, model=model, workers=0, progress=False)
    write_image(image_folder / "cat" / "new.jpg")
    with pytest.raises(CacheError, match="never appended to"):
        extract([image_folder], first.output, spec=spec, model=model, workers=0, progress=False)
    replaced = extract([image_folder], first.output, spec=other, model=model, workers=0,
                       progress=False, overwrite=True)
    assert replaced.num_images == 9 and vggfeat.load_features(first.output).attrs["scales"] == [256]


def test_strict_stops_and_keeps_work(tmp_path, image_folder):
    (image_folder / "dog" / "zz-empty.jpg").write_bytes(b"")
    out = tmp_path / "f.h5"
    with pytest.raises(ExtractError, match="zz-empty.jpg: empty file"):
        extract([image_folder], out, spec=DescriptorSpec(scales=(224,)), model=tiny_vgg("A"),
                workers=0, progress=False, strict=True, batch_size=2, shard_images=2)
    shards = list((tmp_path / "f.h5.parts").glob("shard-*.h5"))
    assert shards and not out.exists()


def test_cli_end_to_end(tmp_path, image_folder, tiny_weights):
    (image_folder / "cat" / "bad.jpg").write_text("nope")
    out = tmp_path / "feats.h5"
    proc = run_cli("extract", image_folder, "-o", out, "--weights", tiny_weights, "--scales",
                   "224,256", "--aggregate", "stack", "--workers", "1")
    assert "8 images" in proc.stderr and "1 failed" in proc.stderr and "bad.jpg" in proc.stderr
    data = vggfeat.load_features(out)
    assert data.data.shape == (8, 64) and data.attrs["arch"] == "D"
    assert data.attrs["weights_sha256"] == vggfeat.vgg(weights=tiny_weights).weights_meta["sha256"]
    strict = run_cli("extract", image_folder, "-o", tmp_path / "s.h5", "--weights", tiny_weights,
                     "--scales", "224", "--strict", "--quiet", check=False)
    assert strict.returncode == 1 and "bad.jpg" in strict.stderr and "Traceback" not in strict.stderr
    bad_layer = run_cli("extract", image_folder, "-o", tmp_path / "x.h5", "--weights",
                        tiny_weights, "--layer", "fc9", check=False)
    assert bad_layer.returncode == 2 and "valid layers" in bad_layer.stderr
    small = run_cli("extract", image_folder, "-o", tmp_path / "y.h5", "--weights", tiny_weights,
                    "--scales", "128", check=False)
    assert small.returncode == 2 and "at least 224 px" in small.stderr


def test_sigkill_and_rerun_gives_the_uninterrupted_result(tmp_path, tiny_weights):
    folder = tmp_path / "many"
    for i in range(40):
        write_image(folder / f"{i:03d}.jpg", size=(300, 400), seed=i)
    args = [folder, "--weights", tiny_weights, "--scales", "256,320", "--workers", "0",
            "--batch-size", "2", "--shard-size", "2", "--quiet"]
    killed_out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "vggfeat", "extract", "-o", str(killed_out),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("shard-*.h5"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed_out.exists(), "the run finished before it was killed: give it more work"
    done_before = len(list(parts.glob("shard-*.h5")))
    run_cli("extract", "-o", killed_out, *args)
    run_cli("extract", "-o", tmp_path / "whole.h5", *args)
    killed, whole = vggfeat.load_features(killed_out), vggfeat.load_features(tmp_path / "whole.h5")
    assert done_before < 20 and not parts.exists()
    assert killed.paths == whole.paths and len(set(killed.paths)) == 40
    np.testing.assert_allclose(killed.data, whole.data, rtol=1e-5, atol=1e-6)


def test_two_ranks_match_one_process(tmp_path, image_folder, tiny_weights):
    for i in range(5):  # an odd count: ranks get unequal shares, and nothing is padded
        write_image(image_folder / "dog" / f"extra{i}.jpg", seed=50 + i)
    common = [image_folder, "--weights", tiny_weights, "--scales", "224", "--workers", "0",
              "--quiet", "--device", "cpu"]
    run_cli("extract", "-o", tmp_path / "one.h5", *common)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "vggfeat", "extract", "-o",
                           str(tmp_path / "two.h5"), *map(str, common)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    one, two = vggfeat.load_features(tmp_path / "one.h5"), vggfeat.load_features(tmp_path / "two.h5")
    assert two.paths == one.paths and len(two.paths) == 13
    np.testing.assert_allclose(two.data, one.data, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(two.target, one.target)
