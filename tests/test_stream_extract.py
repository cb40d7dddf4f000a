"""Extracting tars, Hugging Face Parquet files and URL lists into a store: the same rows as the
same images read from a folder, finished units skipped, damaged and failed inputs recorded."""

from __future__ import annotations

import http.server
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
from conftest import run_cli, tiny_vgg

import vggfeat
from vggfeat.data.sources import gather_images
from vggfeat.descriptors import DescriptorSpec, extract
from vggfeat.errors import ConfigError, InputError

SPEC = DescriptorSpec(scales=(224,))


@pytest.fixture(scope="module")
def net():
    return tiny_vgg("A")


def run(inputs, out, model, **kwargs):
    return extract(inputs, out, spec=SPEC, model=model,
                   **{"workers": 0, "progress": False, "backend": "eager", **kwargs})


def rows_by_name(path):
    """name of the image (file name or sample key) → (row, label name)."""
    bunch = vggfeat.load_features(path)
    names = [p.rsplit("#", 1)[1] if "#" in p else "/".join(p.split("/")[-2:])
             for p in bunch.paths]
    return {n.split(".")[0]: (bunch.data[i], None if bunch.target is None
                              else bunch.target_names[bunch.target[i]])
            for i, n in enumerate(names)}


def make_tar(path, images):
    with tarfile.open(path, "w") as tar:
        for p in images.paths:
            stem = "/".join(p.split("/")[-2:]).split(".")[0]  # class/name: keys are unique
            for name, data in ((f"{stem}.jpg", open(p, "rb").read()),
                               (f"{stem}.cls", p.split("/")[-2].encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def photos(tmp_path, image_folder):
    for p in image_folder.rglob("*"):  # sample keys stop at the first dot: plain names
        if p.is_file():
            p.rename(p.with_name(p.name.replace(" ", "_").replace("é", "e")))
    return gather_images([image_folder])


def test_a_tar_gives_the_rows_of_its_folder_and_is_skipped_when_unchanged(tmp_path, photos,
                                                                          net):
    run([photos.sources[0]], tmp_path / "ref.h5", net)
    make_tar(tmp_path / "train-000000.tar", photos)
    store = tmp_path / "feats"
    first = run([str(tmp_path / "train-{000000..000000}.tar")], store, net)
    assert (first.num_images, first.computed) == (8, 8)
    got, want = rows_by_name(store), rows_by_name(tmp_path / "ref.h5")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name][0], want[name][0], rtol=1e-5, atol=1e-6)
        assert got[name][1] == want[name][1]
    again = run([str(tmp_path / "train-000000.tar")], store, net)
    assert again.up_to_date and again.computed == 0
    (tmp_path / "train-000000.tar").touch()  # a new time, same content: nothing recomputed
    touched = run([str(tmp_path / "train-000000.tar")], store, net)
    assert touched.computed == 0 and not touched.up_to_date and touched.num_images == 8


def test_hf_parquet_gives_the_rows_of_its_folder(tmp_path, photos, net):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    run([photos.sources[0]], tmp_path / "ref.h5", net)
    images = [{"bytes": open(p, "rb").read(), "path": p.rsplit("/", 1)[-1]} for p in photos.paths]
    table = pa.table({"image": images, "label": photos.labels})
    meta = {b"huggingface": ('{"info": {"features": {"label": {"_type": "ClassLabel", '
                             '"names": ["cat", "dog"]}}}}').encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "train.parquet",
                   row_group_size=3)
    store = tmp_path / "feats"
    result = run([str(tmp_path / "train.parquet")], store, net, workers=2)
    assert result.num_images == 8
    bunch = vggfeat.load_features(store)
    ref = vggfeat.load_features(tmp_path / "ref.h5")
    rows = {int(p.rsplit("#", 1)[1]): i for i, p in enumerate(bunch.paths)}
    for row, path in enumerate(photos.paths):
        i, j = rows[row], ref.paths.index(path)
        np.testing.assert_allclose(bunch.data[i], ref.data[j], rtol=1e-5, atol=1e-6)
        assert bunch.target_names[bunch.target[i]] == ref.target_names[ref.target[j]]
    assert run([str(tmp_path / "train.parquet")], store, net).up_to_date


@contextmanager
def serving(handler, folder=None):
    """A threaded HTTP server on 127.0.0.1 (``handler``, serving ``folder``): its base URL."""
    if folder is not None:
        handler = partial(handler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()


def names_of(photos):
    """The images' paths below their folder, as a server of that folder names them."""
    return [p.split(str(photos.sources[0]) + "/", 1)[1] for p in photos.paths]


class _Images(http.server.SimpleHTTPRequestHandler):
    gets = 0

    def log_message(self, *args):
        pass

    def do_GET(self):  # counts downloads of images (fsspec may GET a missing one for its size)
        type(self).gets += os.path.isfile(self.translate_path(self.path))
        super().do_GET()


def test_a_url_list_records_failures_and_downloads_nothing_when_unchanged(tmp_path, photos,
                                                                          net):
    with serving(_Images, photos.sources[0]) as base:
        names = names_of(photos)
        lines = [base + n for n in names[:4]] + [base + "missing.jpg"]
        (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
        store = tmp_path / "feats"
        result = run([str(tmp_path / "urls.txt")], store, net, unit_images=2)
        assert (result.num_images, result.num_failed) == (4, 1)
        assert "404" in dict(result.failed)[base + "missing.jpg"]
        ref = run(photos.paths[:4], tmp_path / "ref.h5", net)
        assert ref.num_images == 4
        bunch, want = vggfeat.load_features(store), vggfeat.load_features(tmp_path / "ref.h5")
        for url, row in zip(bunch.paths, bunch.data):
            j = want.paths.index(str(photos.sources[0]) + "/" + url[len(base):])
            np.testing.assert_allclose(row, want.data[j], rtol=1e-5, atol=1e-6)
        _Images.gets = 0
        again = run([str(tmp_path / "urls.txt")], store, net, unit_images=2)
        # every unit is skipped: HEAD proves the images unchanged (and the missing one still
        # missing), so nothing is downloaded
        assert _Images.gets == 0 and again.up_to_date and again.num_images == 4


def test_streams_need_a_store_and_a_damaged_tar_is_named(tmp_path, photos, net):
    make_tar(tmp_path / "a.tar", photos)
    with pytest.raises(ConfigError, match="into a feature store"):
        run([str(tmp_path / "a.tar")], tmp_path / "f.h5", net)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="a.tar"):
        result = run([str(tmp_path / "a.tar")], tmp_path / "feats", net)
    assert 0 < result.num_images < 8


def test_a_bad_tar_member_is_a_recorded_failure(tmp_path, photos, net):
    make_tar(tmp_path / "a.tar", photos)
    with tarfile.open(tmp_path / "a.tar", "a") as tar:
        for name, data in (("broken.jpg", b"not a jpeg"), ("notes.txt", b"no image here")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = run([str(tmp_path / "a.tar")], tmp_path / "feats", net)
    failed = dict(result.failed)
    assert (result.num_images, result.num_failed) == (8, 2)
    assert "not an image" in failed[f"{tmp_path / 'a.tar'}#broken"]
    assert "no image member" in failed[f"{tmp_path / 'a.tar'}#notes"]


def test_a_parquet_file_without_the_column_is_named(tmp_path, tiny_weights):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"picture": [b"x"], "label": [0]}), tmp_path / "t.parquet")
    proc = run_cli("extract", tmp_path / "t.parquet", "-o", tmp_path / "feats", "--weights",
                   tiny_weights, check=False)
    assert proc.returncode != 0
    assert "t.parquet" in proc.stderr and "picture" in proc.stderr
    assert "--image-column" in proc.stderr and "Traceback" not in proc.stderr
    assert run_cli("extract", tmp_path / "t.parquet", "-o", tmp_path / "feats", "--weights",
                   tiny_weights, "--image-column", "picture", "--scales", "224", "--quiet",
                   check=False).returncode == 0


class _Slow(_Images):
    """Serves the images; those named in ``slow`` only after a long wait."""

    slow: set[str] = set()

    def do_GET(self):
        if self.path.lstrip("/") in self.slow:
            time.sleep(30)
        super().do_GET()


def test_a_killed_url_run_resumes_with_what_it_published(tmp_path, photos, tiny_weights):
    with serving(_Slow, photos.sources[0]) as base:
        names = names_of(photos)
        (tmp_path / "urls.txt").write_text("".join(base + n + "\n" for n in names))
        _Slow.slow = set(names[4:])  # the second unit (of 4) stalls
        args = ["extract", tmp_path / "urls.txt", "-o", tmp_path / "feats", "--weights",
                tiny_weights, "--scales", "224", "--workers", "0", "--quiet", "--backend",
                "eager", "--unit-size", "4", "--batch-size", "1", "--shard-size", "2"]
        proc = subprocess.Popen([sys.executable, "-m", "vggfeat", *map(str, args)],
                                stderr=subprocess.PIPE)
        shards = tmp_path / "feats" / "shards"
        deadline = time.monotonic() + 120
        while not (shards.is_dir() and any(p.suffix == ".h5" and not p.name.startswith(".")
                                           for p in shards.iterdir())) \
                and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        _Slow.slow = set()
        again = run_cli(*args)
        reused = int(re.search(r"(\d+) reused, (\d+) computed", again.stderr).group(1))
        assert 2 <= reused <= 4 and f"{reused} reused, {8 - reused} computed" in again.stderr
        clean = run_cli(*[str(a) for a in args[:3]], str(tmp_path / "clean"), *args[4:])
        assert "0 reused, 8 computed" in clean.stderr
        a, b = vggfeat.load_features(tmp_path / "feats"), vggfeat.load_features(tmp_path / "clean")
        assert a.paths == b.paths
        np.testing.assert_array_equal(a.data, b.data)


def test_vggfeatures_transforms_urls(tmp_path, photos, tiny_weights):
    from vggfeat.sklearn import VGGFeatures

    with serving(_Images, photos.sources[0]) as base:
        names = names_of(photos)[:3]
        features = VGGFeatures(weights=str(tiny_weights), scales=(224,), workers=0,
                               backend="eager", cache=str(tmp_path / "c.h5")).fit()
        from_urls = features.transform([base + n for n in names])
        from_files = features.transform(photos.paths[:3])
        np.testing.assert_allclose(from_urls, from_files, rtol=1e-5, atol=1e-6)
        _Images.gets = 0
        again = features.transform([base + n for n in names])  # from the cache: no download
        assert _Images.gets == 0
        np.testing.assert_array_equal(again, from_urls)


def test_a_tar_cut_later_keeps_its_rows_and_records_the_damage(tmp_path, photos, net):
    make_tar(tmp_path / "a.tar", photos)
    store = tmp_path / "feats"
    run([str(tmp_path / "a.tar")], store, net)
    before = rows_by_name(store)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="a.tar"):
        result = run([str(tmp_path / "a.tar")], store, net)
    assert result.num_images == 8 and result.removed == 0
    assert any(p == f"{tmp_path / 'a.tar'}#" for p, _ in result.failed)
    after = rows_by_name(store)
    for name in before:
        np.testing.assert_array_equal(after[name][0], before[name][0])


def test_a_tar_missing_from_a_range_is_an_error_not_a_removal(tmp_path, photos, net):
    make_tar(tmp_path / "p-0.tar", photos)
    make_tar(tmp_path / "p-1.tar", gather_images(photos.paths[:2]))
    store = tmp_path / "feats"
    run([str(tmp_path / "p-{0..1}.tar")], store, net)
    (tmp_path / "p-0.tar").unlink()
    with pytest.raises(InputError, match="p-0.tar"):
        run([str(tmp_path / "p-{0..1}.tar")], store, net)
    assert len(vggfeat.load_features(store).paths) == 10
    with pytest.raises(InputError, match="p-0.tar"):  # a new store is not even created
        run([str(tmp_path / "p-{0..1}.tar")], tmp_path / "new", net)
    assert not (tmp_path / "new").exists()


def test_a_smaller_tar_counts_its_removed_rows(tmp_path, photos, net):
    make_tar(tmp_path / "a.tar", photos)
    store = tmp_path / "feats"
    run([str(tmp_path / "a.tar")], store, net)
    make_tar(tmp_path / "a.tar", gather_images(photos.paths[:5]))
    result = run([str(tmp_path / "a.tar")], store, net)
    assert (result.num_images, result.removed, result.computed) == (5, 3, 0)


def test_a_dropped_connection_is_a_warning_and_a_failure_not_a_traceback(tmp_path, photos, net):
    make_tar(tmp_path / "a.tar", photos)
    data = (tmp_path / "a.tar").read_bytes()

    class Cut(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()

        def do_GET(self):  # promises the whole tar, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

    with serving(Cut) as base:
        url = base + "a.tar"
        with pytest.warns(UserWarning, match="a.tar"):
            result = run([url], tmp_path / "feats", net)
        assert any(p == f"{url}#" for p, _ in result.failed)


def test_mixing_folders_and_tars_names_two_stores(tmp_path, photos, net):
    make_tar(tmp_path / "a.tar", photos)
    with pytest.raises(InputError, match="two stores"):
        run([photos.sources[0], str(tmp_path / "a.tar")], tmp_path / "feats", net)


class _Bare(_Images):
    """Serves images with neither Last-Modified nor ETag: nothing proves them unchanged."""

    def send_header(self, keyword, value):
        if keyword.lower() not in ("last-modified", "etag"):
            super().send_header(keyword, value)


def test_a_url_without_metadata_is_downloaded_again_and_an_etag_counts(tmp_path, photos, net):
    from vggfeat.data.remote import ObjectId

    assert ObjectId(10, -1, '"a"').stamp() != ObjectId(10, -1, '"b"').stamp()
    assert ObjectId(10, -1, "").stamp() is None
    with serving(_Bare, photos.sources[0]) as base:
        url = base + names_of(photos)[0]
        run([url], tmp_path / "f.h5", net)
        _Bare.gets = 0
        again = run([url], tmp_path / "f.h5", net)
        assert _Bare.gets == 1 and (again.computed, again.num_images) == (1, 1)


def test_parquet_columns_without_a_parquet_input_are_refused(tmp_path, photos, net):
    with pytest.raises(ConfigError, match="--image-column"):
        run([photos.sources[0]], tmp_path / "feats", net, image_column="img")


def test_an_unlabelled_sample_among_labelled_ones_is_named(tmp_path, photos, net):
    make_tar(tmp_path / "a.tar", photos)
    with tarfile.open(tmp_path / "a.tar", "a") as tar:
        data = open(photos.paths[0], "rb").read()
        info = tarfile.TarInfo("extra/one.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.warns(UserWarning, match="extra/one has no label"):
        run([str(tmp_path / "a.tar")], tmp_path / "feats", net)
