"""A feature store in a bucket (``-o s3://bucket/feats``), on a moto S3 server on 127.0.0.1: the
rows of a local store, updates that only add objects, kills, damaged objects, the store
commands, and the refusal of a single .h5 file in a bucket."""

from __future__ import annotations

import io
import tarfile
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import moto_bucket, tiny_vgg, write_image

import vggfeat
from vggfeat.cache import CacheError
from vggfeat.cache.location import Url
from vggfeat.cache.sharded import iter_features, read_state, unlisted_shards
from vggfeat.cache.store import read_index
from vggfeat.descriptors import DescriptorSpec, extract

SPEC = DescriptorSpec(scales=(224,))


@pytest.fixture(scope="module")
def net():
    return tiny_vgg("A")


@pytest.fixture
def bucket(moto_server, monkeypatch):
    yield from moto_bucket(moto_server, monkeypatch, "AWS_ENDPOINT_URL",
                           f"feats{time.time_ns() % 10**9}")


def run(inputs, out, model, **kwargs):
    return extract(inputs, str(out), spec=SPEC, model=model,
                   **{"workers": 0, "progress": False, "backend": "eager", **kwargs})


def assert_same_rows(a, b):
    x, y = vggfeat.load_features(a), vggfeat.load_features(b)
    assert x.paths == y.paths and sorted(x.failed) == sorted(y.failed)
    np.testing.assert_allclose(x.data, y.data, rtol=1e-5, atol=1e-6)
    assert [x.target_names[t] for t in x.target] == [y.target_names[t] for t in y.target]


def objects(fs, bucket):
    """Every object of the bucket: key → (ETag, LastModified)."""
    fs.invalidate_cache()
    return {info["name"]: (info["ETag"], info["LastModified"])
            for info in fs.find(bucket, detail=True).values()}


def test_a_store_in_a_bucket_holds_what_a_local_store_holds(tmp_path, image_folder, bucket,
                                                             net):
    fs, name = bucket
    (image_folder / "cat" / "bad.jpg").write_bytes(b"not an image")
    url = f"s3://{name}/feats"
    result = run([image_folder], url, net, shard_images=3, batch_size=3)
    assert (result.num_images, result.num_failed, result.computed) == (8, 1, 8)
    assert str(result.output) == url
    run([image_folder], tmp_path / "local", net)
    assert_same_rows(url, tmp_path / "local")
    assert sorted(k.rsplit("/", 1)[-1] for k in fs.ls(f"{name}/feats")) == [
        "index", "settings.json", "shards"]
    whole = vggfeat.load_features(url)
    lazy = vggfeat.load_features(url + "/", lazy=True)  # (a trailing slash names it too)
    np.testing.assert_array_equal(lazy.data[[7, 0, 3]], whole.data[[7, 0, 3]])
    np.testing.assert_array_equal(lazy.data[2:6], whole.data[2:6])
    lazy.data.close()
    blocks = list(iter_features(url, rows=3))
    np.testing.assert_array_equal(np.concatenate([b for b, _ in blocks]), whole.data)
    lazy = vggfeat.load_features(url, lazy=True)
    first, second = sorted(fs.ls(f"{name}/feats/shards"))[:2]
    kept = fs.cat_file(first)
    fs.pipe_file(first, fs.cat_file(second))  # replaced behind the view's back: refused
    with pytest.raises(CacheError, match="changed since its rows were listed|cannot read"):
        lazy.data[:]
    fs.pipe_file(first, b"")
    with pytest.raises(CacheError, match=f"shard s3://{first} is damaged or truncated"):
        vggfeat.load_features(url)
    fs.pipe_file(first, kept)  # restored from a copy
    again = run([image_folder], url, net)
    assert again.up_to_date and again.reused == 8


def test_an_update_in_a_bucket_only_adds_objects(tmp_path, image_folder, bucket, net):
    fs, name = bucket
    url = f"s3://{name}/feats"
    run([image_folder], url, net, shard_images=2)
    before = objects(fs, name)
    write_image(image_folder / "dog" / "0.jpg", size=(250, 330), seed=71)  # changed
    (image_folder / "cat" / "2.jpg").unlink()
    updated = run([image_folder], url, net)
    assert (updated.computed, updated.reused, updated.removed) == (1, 6, 1)
    after = objects(fs, name)
    assert all(after[key] == stamp for key, stamp in before.items())  # none rewritten or gone
    added = sorted(k.split("/")[2] for k in set(after) - set(before))
    assert added == ["index", "shards"]  # one shard of the new row, one entry
    run([image_folder], tmp_path / "local", net)
    assert_same_rows(url, tmp_path / "local")


def test_a_killed_run_into_a_bucket_is_finished_by_the_next(tmp_path, image_folder, bucket,
                                                           net, monkeypatch):
    """Killed after its first shard was uploaded: the rerun reuses it, computes the rest and
    ends with the rows of a clean run."""
    import vggfeat.descriptors.run as run_module

    fs, name = bucket
    url, real, calls = f"s3://{name}/feats", run_module.write_shard, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            real(*args, **kwargs)
        raise KeyboardInterrupt  # (no later shard reaches the bucket)

    monkeypatch.setattr(run_module, "write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        run([image_folder], url, net, shard_images=2, batch_size=2)
    monkeypatch.undo()
    state = read_state(Url(url))
    [shard] = unlisted_shards(Url(url), state)
    kept = len(read_index(shard).paths)
    assert state.shards == [] and 0 < kept < 8
    assert vggfeat.load_features(url).paths == []  # unlisted: invisible to readers
    rerun = run([image_folder], url, net)
    assert (rerun.computed, rerun.num_images) == (8 - kept, 8)
    run([image_folder], tmp_path / "local", net)
    assert_same_rows(url, tmp_path / "local")


def test_store_commands_and_damaged_objects_in_a_bucket(tmp_path, image_folder, bucket, net):
    from vggfeat.cli.main import cli

    fs, name = bucket
    url, shards = f"s3://{name}/feats", f"{name}/feats/shards"
    run([image_folder], url, net, shard_images=3, batch_size=3)
    (image_folder / "cat" / "2.jpg").unlink()
    run([image_folder], url, net)  # one dead row: no compaction by itself in a bucket
    before = set(fs.ls(shards, refresh=True))
    runner = CliRunner()
    info = runner.invoke(cli, ["store", "info", url])
    assert info.exit_code == 0 and "7 live, 0 failed" in info.output and url in info.output
    exported = runner.invoke(cli, ["store", "export", url, "--to", str(tmp_path / "all.h5")])
    assert exported.exit_code == 0, exported.output
    assert_same_rows(url, tmp_path / "all.h5")
    compacted = runner.invoke(cli, ["store", "compact", url, "--threshold", "0.01"])
    assert compacted.exit_code == 0 and "1 shards rewritten into 1, 1 files deleted" in (
        compacted.output), compacted.output
    after = set(fs.ls(shards, refresh=True))
    assert len(after - before) == 1 and len(before - after) == 1
    assert_same_rows(url, tmp_path / "all.h5")
    entry = sorted(fs.ls(f"{name}/feats/index"))[-1]
    fs.pipe_file(entry, b"{not json")
    with pytest.raises(CacheError, match=f"index entry s3://{entry} is damaged"):
        vggfeat.load_features(url)
    fs.rm_file(entry)  # the compaction's entry dropped: the retired shard is missing
    with pytest.raises(CacheError, match=f"shard s3://{shards}/.* is missing"):
        vggfeat.load_features(url)


def test_a_single_file_in_a_bucket_is_refused(image_folder, bucket, net):
    fs, name = bucket
    with pytest.raises(CacheError, match=f"s3://{name}/f.h5 is one .h5 file in a bucket.*"
                                         f"-o s3://{name}/f\\b"):
        run([image_folder], f"s3://{name}/f.h5", net)
    assert fs.ls(name) == []


def test_a_tar_in_a_bucket_into_a_store_in_the_bucket(tmp_path, image_folder, bucket, net):
    fs, name = bucket
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as out:
        for p in sorted(image_folder.rglob("*.jpg"))[:3]:
            info = tarfile.TarInfo(f"{p.parent.name}/{p.stem.replace(' ', '_')}.jpg")
            info.size = p.stat().st_size
            out.addfile(info, io.BytesIO(p.read_bytes()))
    fs.pipe_file(f"{name}/in/train-0.tar", tar.getvalue())
    url = f"s3://{name}/feats"
    first = run([f"s3://{name}/in/train-0.tar"], url, net)
    assert (first.num_images, first.computed) == (3, 3)
    again = run([f"s3://{name}/in/train-0.tar"], url, net)
    assert again.up_to_date and again.computed == 0


def test_settings_are_published_once_in_a_bucket_and_elsewhere(bucket):
    """S3: a conditional PUT; another fsspec back end (memory://): checked, then put."""
    from vggfeat.cache.location import publish_once, read_bytes

    fs, name = bucket
    for where in (Url(f"s3://{name}/s/settings.json"),
                  Url(f"memory://vggfeat-{time.time_ns()}/settings.json")):
        publish_once(where, b"first")
        publish_once(where, b"second")
        assert read_bytes(where) == b"first"
