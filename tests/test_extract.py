"""`vggfeat extract`: the Appendix B descriptor, the HDF5 cache, resume after SIGKILL, 2 ranks."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
from vggfeat.data.sources import gather_images
from vggfeat.descriptors import DescriptorSpec, ExtractError, extract


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
        assert set(f) == {"features", "paths", "labels", "class_names", "input_sizes", "failed",
                          "file_size", "file_mtime_ns", "file_sha256"}
        row = [p.decode() for p in f["paths"][:]].index(str(strip))
        assert f["file_size"][row] == strip.stat().st_size
        assert bytes(f["file_sha256"][row]) == hashlib.sha256(strip.read_bytes()).digest()
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


def run(images, out, model, spec=DescriptorSpec(scales=(224,)), **kwargs):
    return extract(images, out, spec=spec, model=model, **{"workers": 0, "progress": False,
                                                           **kwargs})


def fresh_row(model, path, tmp_path, spec=DescriptorSpec(scales=(224,))):
    out = run([path], tmp_path / f"fresh-{time.monotonic_ns()}.h5", model, spec)
    return vggfeat.load_features(out.output).data[0]


def row_of(out, path):
    data = vggfeat.load_features(out)
    return data.data[data.paths.index(str(path))]


def test_rerun_updates_added_changed_and_removed_files(tmp_path, image_folder):
    model, out = tiny_vgg("A"), tmp_path / "f.h5"
    first = run([image_folder], out, model)
    assert (first.computed, first.reused) == (8, 0)
    again = run([image_folder], out, model)
    assert again.up_to_date and again.computed == 0 and again.reused == 8
    with pytest.raises(CacheError, match=r"scales: \[224\] → \[256\].*--overwrite"):
        run([image_folder], out, model, DescriptorSpec(scales=(256,)))
    new = write_image(image_folder / "cat" / "new.jpg", seed=70)
    changed = write_image(image_folder / "dog" / "0.jpg", size=(250, 330), seed=71)
    (image_folder / "cat" / "2.jpg").unlink()
    updated = run([image_folder], out, model)
    assert (updated.computed, updated.reused, updated.removed) == (2, 6, 1)
    data = vggfeat.load_features(out)
    assert data.paths == gather_images([image_folder]).paths and data.data.shape[0] == 8
    for path in (new, changed):
        np.testing.assert_allclose(row_of(out, path), fresh_row(model, path, tmp_path),
                                   rtol=1e-5, atol=1e-6)
    new.unlink()
    dropped = run([image_folder], out, model)
    assert (dropped.computed, dropped.removed, dropped.num_images) == (0, 1, 7)
    assert str(new) not in vggfeat.load_features(out).paths


def same_size_replacement(path, seed):
    """New content of the same size and mtime (BMP files of one size have one length)."""
    before = path.stat()
    write_image(path, size=(240, 320), seed=seed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def test_verify_compares_content_hashes(tmp_path):
    folder = tmp_path / "bmp"
    paths = [write_image(folder / f"{i}.bmp", seed=i) for i in range(3)]
    model, out = tiny_vgg("A"), tmp_path / "f.h5"
    run([folder], out, model)
    same_size_replacement(paths[1], seed=40)
    assert run([folder], out, model).up_to_date  # size and mtime alone cannot see it
    verified = run([folder], out, model, verify=True)
    assert (verified.computed, verified.reused) == (1, 2)
    np.testing.assert_allclose(row_of(out, paths[1]), fresh_row(model, paths[1], tmp_path),
                               rtol=1e-5, atol=1e-6)
    os.utime(paths[0])  # touched, same content: --verify reuses it
    touched = run([folder], out, model, verify=True)
    assert touched.computed == 0 and not touched.up_to_date  # identities refreshed in the file
    assert run([folder], out, model).up_to_date


def stop_partway(folder, out, model):
    """A run that stops (as a kill would) after publishing some shards."""
    bad = folder / "dog" / "zz-empty.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ExtractError):
        run([folder], out, model, strict=True, batch_size=2, shard_images=2)
    bad.unlink()
    return [p.decode() for s in out.parent.glob(out.name + ".parts/shard-*.h5")
            for p in h5py.File(s)["paths"][:]]


def test_an_image_replaced_after_a_crash_is_recomputed(tmp_path, image_folder):
    model, out = tiny_vgg("A"), tmp_path / "f.h5"
    done = stop_partway(image_folder, out, model)
    replaced = Path(done[0])
    write_image(replaced, size=(270, 280), seed=80)
    shard = next((tmp_path / "f.h5.parts").glob("shard-*.h5"))  # as two writers would leave
    shutil.copy(shard, shard.with_name("shard-r001-" + shard.name[11:]))
    result = run([image_folder], out, model)
    assert result.computed == 8 - len(done) + 1
    assert sorted(vggfeat.load_features(out).paths) == sorted(gather_images([image_folder]).paths)
    np.testing.assert_allclose(row_of(out, replaced), fresh_row(model, replaced, tmp_path),
                               rtol=1e-5, atol=1e-6)


def test_overwrite_recomputes_everything(tmp_path, image_folder):
    model, out = tiny_vgg("A"), tmp_path / "f.h5"
    done = stop_partway(image_folder, out, model)
    assert done
    replaced = Path(done[0])
    same_size_replacement(replaced, seed=81) if replaced.suffix == ".bmp" else write_image(
        replaced, size=(240, 320), seed=81)
    result = run([image_folder], out, model, overwrite=True)
    assert result.computed == 8 and result.reused == 0
    np.testing.assert_allclose(row_of(out, replaced), fresh_row(model, replaced, tmp_path),
                               rtol=1e-5, atol=1e-6)
    assert run([image_folder], out, model, overwrite=True).computed == 8


def test_failures_are_retried_when_fixed_or_asked(tmp_path, image_folder, monkeypatch):
    model, out = tiny_vgg("A"), tmp_path / "f.h5"
    listed = tmp_path / "list.txt"
    missing = image_folder / "cat" / "later.jpg"
    listed.write_text("\n".join(gather_images([image_folder]).paths + [str(missing)]))
    monkeypatch.setenv("VGGFEAT_MAX_PIXELS", "70000")  # 4 of the 8 images are larger
    first = run([listed], out, model)
    assert first.num_failed == 5 and {r.split(":")[0] for _, r in first.failed} == {
        "decompression bomb", "file not found"}
    monkeypatch.delenv("VGGFEAT_MAX_PIXELS")
    write_image(missing, seed=5)  # restored: retried because the file changed
    rerun = run([listed], out, model)
    assert (rerun.computed, rerun.num_failed) == (1, 4)
    retried = run([listed], out, model, retry_failed=True)
    assert (retried.computed, retried.num_failed, retried.num_images) == (4, 0, 9)


def test_summary_counts_and_output_suffix(tmp_path, image_folder, tiny_weights):
    out = tmp_path / "f.h5"
    model = vggfeat.vgg(weights=str(tiny_weights))  # what the command line builds
    run([image_folder], out, model)
    write_image(image_folder / "dog" / "new.png", seed=60)
    (image_folder / "dog" / "broken.jpg").write_bytes(b"not an image")
    proc = run_cli("extract", image_folder, "-o", out, "--weights", tiny_weights, "--scales",
                   "224", "--workers", "0")
    assert "8 reused, 1 computed, 0 removed, 1 failed" in proc.stderr
    assert "--retry-failed" in proc.stderr
    with pytest.raises(CacheError, match="feat.npy must be named .h5 or .hdf5"):
        run([image_folder], tmp_path / "feat.npy", model)
    assert not (tmp_path / "feat.npy").exists()


def test_failures_are_counted_only_as_failed_and_quiet_keeps_the_summary(tmp_path, image_folder,
                                                                         tiny_weights):
    (image_folder / "dog" / "broken.jpg").write_bytes(b"not an image")
    (image_folder / "dog" / "empty.png").write_bytes(b"")
    args = ["extract", image_folder, "-o", tmp_path / "f.h5", "--weights", tiny_weights,
            "--scales", "224", "--workers", "0", "--quiet"]
    first = run_cli(*args).stderr
    assert "8 images → " in first and "0 reused, 8 computed, 0 removed, 2 failed (" in first
    assert "img/s" in first and first.count("  skipped ") == 2 and "broken.jpg" in first
    again = run_cli(*args).stderr
    assert "is up to date (8 reused, 0 computed, 0 removed, 2 failed)" in again
    (image_folder / "dog" / "empty.png").unlink()
    dropped = run_cli(*args).stderr
    assert "8 images → " in dropped and "8 reused, 0 computed, 1 removed, 1 failed" in dropped
    assert "img/s" not in dropped and "images per forward" not in dropped
    assert "skipped " in dropped and "broken.jpg" in dropped


def test_a_file_that_is_not_hdf5_is_a_clear_error(tmp_path):
    fake = tmp_path / "fake.h5"
    fake.write_text("not HDF5")
    with pytest.raises(CacheError, match=f"{fake} is not an HDF5 feature file"):
        vggfeat.load_features(fake)


def test_a_symlink_loop_under_a_relative_folder_leaves_the_output_up_to_date(tmp_path,
                                                                              image_folder,
                                                                              tiny_weights):
    os.symlink("..", image_folder / "cat" / "up")
    args = ["extract", "images/", "-o", "f.h5", "--weights", tiny_weights, "--scales", "224",
            "--workers", "0", "--quiet"]
    assert "0 reused, 8 computed, 0 removed, 1 failed" in run_cli(*args, cwd=tmp_path).stderr
    failed = vggfeat.load_features(tmp_path / "f.h5").failed
    assert [p for p, _ in failed] == [str(image_folder / "cat" / "up")]
    again = run_cli(*args, cwd=tmp_path).stderr
    assert "f.h5 is up to date (8 reused, 0 computed, 0 removed, 1 failed)" in again


def start_extract(out, args):
    return subprocess.Popen([sys.executable, "-m", "vggfeat", "extract", "-o", str(out),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_shards(parts, count, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while len(list(parts.glob("shard-*.h5"))) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def slow_run(tmp_path, tiny_weights, count):
    """A folder of ``count`` images, and CLI arguments publishing a shard every 2 images."""
    folder = tmp_path / "many"
    for i in range(count):
        write_image(folder / f"{i:03d}.jpg", size=(300, 400), seed=i)
    return folder, [folder, "--weights", tiny_weights, "--scales", "256,320", "--workers", "0",
                    "--batch-size", "2", "--shard-size", "2", "--quiet"]


def test_one_writer_per_output_and_stale_locks_are_taken_over(tmp_path, tiny_weights):
    folder, args = slow_run(tmp_path, tiny_weights, 12)
    out = tmp_path / "f.h5"
    first = start_extract(out, args)
    wait_for_shards(tmp_path / "f.h5.parts", 1, first)
    first.send_signal(signal.SIGSTOP)  # still running, however slow the second one starts
    model, spec = vggfeat.vgg(weights=str(tiny_weights)), DescriptorSpec(scales=(256, 320))
    for overwrite in (False, True):
        with pytest.raises(CacheError, match=f"being written by process {first.pid} on "
                                             f"{socket.gethostname()}"):
            run([folder], out, model, spec, overwrite=overwrite)
    first.send_signal(signal.SIGKILL)  # leaves its lock file behind, naming a dead process
    first.wait()
    assert (tmp_path / "f.h5.lock").exists() and not out.exists()
    resumed = run([folder], out, model, spec)
    assert 0 < resumed.reused and resumed.reused + resumed.computed == 12
    assert len(vggfeat.load_features(out).paths) == 12 and not (tmp_path / "f.h5.lock").exists()


SIGTERM_RUN = """
import os, signal, sys
import vggfeat
from vggfeat.descriptors import DescriptorNet, DescriptorSpec, extract
passes = 0
forward = DescriptorNet.forward_views
def counting(self, scale, batch):
    global passes
    passes += 1
    if passes == 4:  # a scheduler's SIGTERM, with rows computed and none published yet
        os.kill(os.getpid(), signal.SIGTERM)
    return forward(self, scale, batch)
DescriptorNet.forward_views = counting
extract([sys.argv[1]], sys.argv[2], spec=DescriptorSpec(scales=(224,)), weights=sys.argv[3],
        workers=0, progress=False, batch_size=2, shard_images=1000, shard_seconds=1e9)
"""


def test_sigterm_publishes_what_was_computed(tmp_path, image_folder, tiny_weights):
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_RUN)
    out = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, str(script), str(image_folder), str(out),
                           str(tiny_weights)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    # Shapes in input order: A A C B A A C B; passes of 2: A(0,1) A(4,5) C(2,6), then B(3,7) is
    # stopped. 0 and 1 were handed over; 2, 4, 5 and 6 are finished behind 3 and kept too.
    shards = list((tmp_path / "f.h5.parts").glob("shard-*.h5"))
    assert sum(len(h5py.File(s)["paths"]) for s in shards) == 6
    resumed = run([image_folder], out, vggfeat.vgg(weights=str(tiny_weights)))
    assert (resumed.reused, resumed.computed) == (6, 2)


def test_symlink_loops_and_undecodable_names(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "a" / "1.jpg")
    write_image(root / "b" / "2.jpg", seed=1)
    os.symlink("..", root / "a" / "up")
    os.symlink("../a", root / "b" / "again")
    images = gather_images([root])
    assert images.paths == [str(root / "a" / "1.jpg"), str(root / "b" / "2.jpg")]
    assert len(images.skipped) == 2 and all("already scanned" in r for _, r in images.skipped)
    bad_name = os.fsencode(root / "a") + b"/caf\xe9.jpg"
    with open(bad_name, "wb") as f:
        f.write((root / "a" / "1.jpg").read_bytes())
    out = extract([root], tmp_path / "f.h5", spec=DescriptorSpec(scales=(224,)),
                  model=tiny_vgg("A"), workers=0, progress=False)
    assert out.num_images == 2
    reasons = dict(vggfeat.load_features(out.output).failed)
    assert "not valid UTF-8" in reasons[str(root / "a") + "/caf\\xe9.jpg"]


def make_read_only(path):
    """Read-only even for root (immutable attribute), undone by the returned function."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        return lambda: path.chmod(mode)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a file read-only here (no chattr)")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_disk_full_read_only_and_leftovers_give_clear_errors(tmp_path, image_folder,
                                                             monkeypatch):
    model, out = tiny_vgg("A"), tmp_path / "f.h5"
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else str(file)
        if "w" in mode and ".shard-" in name:  # as a write() fails: no file name in the error
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    import vggfeat.fileio
    monkeypatch.setattr(vggfeat.fileio, "open", full_disk, raising=False)
    with pytest.raises(CacheError, match=r"cannot publish results to .*f\.h5\.parts/shard-\S+\.h5: "
                                         "No space left on device.*free some space"):
        run([image_folder], out, model)
    monkeypatch.undo()
    import vggfeat.cache.store as store
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1))
    with pytest.raises(CacheError, match=r"needs about \d+\.\d KiB .* has 1 bytes free; free "
                                         "some space"):
        run([image_folder], out, model)
    monkeypatch.undo()
    assert list((tmp_path / "f.h5.parts").glob("shard-*.h5"))  # computed rows were kept
    # what a merge or a shard write killed by SIGKILL leaves behind
    (tmp_path / ".f.h5.0badf00d.tmp").write_bytes(b"partial")
    (tmp_path / "f.h5.parts" / ".shard-r000-x.h5.12345678.tmp").write_bytes(b"partial")
    assert run([image_folder], out, model).computed == 0
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "f.h5.parts").exists()
    write_image(image_folder / "cat" / "new.jpg", seed=90)
    undo = make_read_only(out)
    try:  # root cannot be refused by permissions: the file is made immutable instead
        with pytest.raises(CacheError, match="f.h5 is immutable or append-only .*chattr -i"
                           if os.geteuid() == 0 else "f.h5 is read-only"):
            run([image_folder], out, model)
    finally:
        undo()
    folder = tmp_path / "locked"
    folder.mkdir()
    undo = make_read_only(folder)
    try:
        with pytest.raises(CacheError, match="cannot write in .*locked"):
            run([image_folder], folder / "f.h5", model)
    finally:
        undo()


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
    assert bad_layer.returncode == 2 and "unknown layer 'fc9'" in bad_layer.stderr
    small = run_cli("extract", image_folder, "-o", tmp_path / "y.h5", "--weights", tiny_weights,
                    "--scales", "128", check=False)
    assert small.returncode == 2 and "at least 224 px" in small.stderr


def test_sigkill_and_rerun_gives_the_uninterrupted_result(tmp_path, tiny_weights):
    _, args = slow_run(tmp_path, tiny_weights, 40)
    killed_out = tmp_path / "killed.h5"
    proc = start_extract(killed_out, args)
    parts = tmp_path / "killed.h5.parts"
    wait_for_shards(parts, 3, proc)
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


def test_cli_extract_stopped_by_sigterm_says_what_it_kept(tmp_path, image_folder, tiny_weights):
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_RUN.split("extract([")[0] + "from vggfeat.cli.main import main\n"
                      "main(['extract', '--layer', 'fc7', '--scales', '224', '--weights', "
                      "sys.argv[3], '--workers', '0', '--batch-size', '2', '--quiet', "
                      "sys.argv[1], '-o', sys.argv[2]])\n")
    out = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, str(script), str(image_folder), str(out),
                           str(tiny_weights)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM: 6 images done so far are kept in {out}.parts; run the same "
        "command again to go on from them")


# -- hostile or odd surroundings -----------------------------------------------------------------

def test_links_planted_at_the_lock_or_a_temporary_are_never_followed(tmp_path, image_folder,
                                                                    monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "f.h5.lock")
    with pytest.raises(CacheError, match=r"f\.h5\.lock is a symbolic link .*remove it"):
        run([image_folder], tmp_path / "f.h5", tiny_vgg("A"))
    assert victim.read_text() == "precious" and not (tmp_path / "f.h5").exists()
    import uuid

    import vggfeat.fileio
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=0))  # a name an attacker can guess
    os.symlink(victim, tmp_path / ".notes.json.00000000.tmp")
    with pytest.raises(FileExistsError):
        vggfeat.fileio.write_json_atomic(tmp_path / "notes.json", {"a": 1})
    assert victim.read_text() == "precious" and not (tmp_path / "notes.json").exists()


def test_a_fifo_named_like_an_image_is_recorded_not_waited_for(tmp_path, image_folder):
    fifo = image_folder / "cat" / "x.jpg"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise TimeoutError("extract waited for the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        result = run([image_folder], tmp_path / "f.h5", tiny_vgg("A"), verify=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.num_images == 8
    assert dict(result.failed)[str(fifo)].startswith("not a regular file (a FIFO)")


def test_non_finite_descriptors_are_failures_not_rows(tmp_path, image_folder):
    model = tiny_vgg("A")
    with torch.no_grad():
        model.head.fc7.weight.fill_(float("nan"))
    result = run([image_folder], tmp_path / "f.h5", model)
    assert (result.num_images, result.num_failed) == (0, 8)
    assert all(reason.startswith("non-finite descriptor") for _, reason in result.failed)
    assert vggfeat.load_features(tmp_path / "f.h5").data.shape == (0, 32)


def test_finished_images_are_published_as_shard_size_says(tmp_path, image_folder, monkeypatch):
    """Shapes in input order: A A C B A A C B; passes of 2 run A(0,1), A(4,5), then C(2,6).
    Before the third pass, 4 finished images must be on disk (not only 0 and 1)."""
    from vggfeat.descriptors import DescriptorNet

    parts, published = tmp_path / "f.h5.parts", []
    forward = DescriptorNet.forward_views

    def counting(self, scale, batch):
        published.append(sum(len(h5py.File(s)["paths"]) for s in parts.glob("shard-*.h5")))
        return forward(self, scale, batch)

    monkeypatch.setattr(DescriptorNet, "forward_views", counting)
    run([image_folder], tmp_path / "f.h5", tiny_vgg("A"), batch_size=2, shard_images=1)
    assert published[:3] == [0, 2, 4]


def test_disk_full_at_the_lock_and_honest_free_space_check(tmp_path, image_folder, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CacheError, match=r"cannot write the lock file .*f\.h5\.lock: No space "
                                         r"left on device; the disk is full"):
        run([image_folder], tmp_path / "f.h5", tiny_vgg("A"))
    monkeypatch.undo()
    assert not (tmp_path / "f.h5.lock").exists()
    import vggfeat.cache.store as store
    free = 3 << 20  # an empty 3 MiB file system: plenty for 8 rows of 32 floats
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(free, 0, free))
    assert run([image_folder], tmp_path / "f.h5", tiny_vgg("A")).num_images == 8
    assert (tmp_path / "f.h5").stat().st_size < store.estimated_bytes(8, 32, 1, "float32") < free


def test_a_name_too_long_for_the_temporaries_is_refused_before_any_work(tmp_path, image_folder):
    out = tmp_path / ("x" * 245 + ".h5")  # 248 bytes: fits alone, not as .NAME.XXXXXXXX.tmp
    with pytest.raises(CacheError, match=r"is 248 bytes long.*choose a name of at most 241 bytes"):
        run([image_folder], out, tiny_vgg("A"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_an_up_to_date_rerun_builds_no_net(tmp_path, image_folder, tiny_weights, monkeypatch):
    run_module = sys.modules["vggfeat.descriptors.run"]
    out, built = tmp_path / "f.h5", []
    extract([image_folder], out, spec=DescriptorSpec(scales=(224,)), weights=str(tiny_weights),
            workers=0, progress=False)

    def no_net(*args, **kwargs):
        raise AssertionError("the net was built for an up-to-date output")

    real_vgg = run_module.vgg
    monkeypatch.setattr(run_module, "DescriptorNet", no_net)
    monkeypatch.setattr(run_module, "vgg", lambda *a, **k: built.append(
        torch.get_default_device().type) or real_vgg(*a, **k))
    again = extract([image_folder], out, spec=DescriptorSpec(scales=(224,)),
                    weights=str(tiny_weights), workers=0, progress=False)
    assert again.up_to_date and built == ["meta"]


def test_an_up_to_date_rerun_loads_neither_torchvision_nor_scikit_learn(tmp_path, image_folder,
                                                                       tiny_weights):
    """Each costs about a second to import: a rerun with nothing to do needs neither."""
    out = tmp_path / "f.h5"
    run_cli("extract", image_folder, "-o", out, "--weights", tiny_weights, "--scales", "224",
            "--workers", "0")
    code = ("import sys; from vggfeat.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('loaded:', sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, "extract", str(image_folder), "-o",
                           str(out), "--weights", str(tiny_weights), "--scales", "224"],
                          capture_output=True, text=True, check=True)
    assert "is up to date" in proc.stderr + proc.stdout
    assert "loaded: []" in proc.stdout, proc.stdout + proc.stderr


def open_handles(path):
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path))


def test_lazy_features_hold_no_file_open_until_read_and_close(tmp_path, image_folder):
    out = run([image_folder], tmp_path / "f.h5", tiny_vgg("A")).output
    X, y = vggfeat.load_features(out, lazy=True, return_X_y=True)
    assert open_handles(out) == 0 and X.shape == (8, 32) and len(y) == 8
    whole = vggfeat.load_features(out).data
    np.testing.assert_array_equal(X[2:5], whole[2:5])
    np.testing.assert_array_equal(X[[7, 0, 7]], whole[[7, 0, 7]])
    X.close()
    assert open_handles(out) == 0
    run([image_folder], out, tiny_vgg("A", seed=1), overwrite=True)  # a writer replaces it
    with pytest.raises(CacheError, match="changed since its rows were listed"):
        X[0]


@pytest.mark.parametrize("suffix", [".h5", ""])
def test_an_output_name_too_long_for_the_file_system_is_a_usage_error(tmp_path, suffix):
    from click.testing import CliRunner

    from vggfeat.cli.main import cli

    name = str(tmp_path / ("x" * 300 + suffix))
    result = CliRunner().invoke(cli, ["extract", str(tmp_path), "-o", name])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '-o' / '--output'" in result.output
    assert "File name too long; choose another name" in result.output


def test_a_full_disk_is_reported_in_a_readable_unit(tmp_path, image_folder, monkeypatch):
    import vggfeat.cache.store as store

    free = 20 << 10  # a 16 KB output does not fit in 20 KiB once HDF5's overhead is counted
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(free, 0, free))
    with pytest.raises(CacheError, match=r"cannot write .*f\.h5: it needs about 5\d\.\d KiB and "
                                         r".* has 20\.0 KiB free; free some space"):
        run([image_folder], tmp_path / "f.h5", tiny_vgg("A"))
    monkeypatch.undo()
    run([image_folder], tmp_path / "f.h5", tiny_vgg("A"))  # the computed rows are kept
    size = (tmp_path / "f.h5").stat().st_size
    assert size < store.estimated_bytes(8, 32, 1, "float32") < 4 * size
    assert [store.readable_size(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30)] == [
        "0 bytes", "1023 bytes", "1.5 KiB", "5.0 MiB", "3.0 GiB"]
