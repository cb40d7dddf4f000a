"""Feature stores: a folder of immutable shards and index entries, updated at the cost of what
changed, read as one dataset, compacted and exported; faults and kills on real image files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli, tiny_vgg, write_image

import vggfeat
from vggfeat.cache import CacheError
from vggfeat.cache.sharded import compact, iter_features, read_state
from vggfeat.data.sources import gather_images
from vggfeat.descriptors import DescriptorSpec, extract

SPEC = DescriptorSpec(scales=(224,))


def run(images, out, model, **kwargs):
    return extract(images, out, spec=SPEC, model=model,
                   **{"workers": 0, "progress": False, **kwargs})


def by_path(bunch):
    """A file's rows in the store's order (sorted by path)."""
    order = np.argsort(bunch.paths)
    return [bunch.paths[i] for i in order], bunch.data[order], (
        None if bunch.target is None else bunch.target[order])


def assert_same_rows(store, file):
    s, f = vggfeat.load_features(store), vggfeat.load_features(file)
    paths, data, target = by_path(f)
    assert s.paths == paths
    np.testing.assert_allclose(s.data, data, rtol=1e-5, atol=1e-6)
    if target is None:
        assert s.target is None
    else:
        assert [s.target_names[t] for t in s.target] == [f.target_names[t] for t in target]
    assert sorted(s.failed) == sorted(f.failed)


def files_of(store):
    return {p.relative_to(store): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in store.rglob("*") if p.is_file()}


def test_a_store_holds_what_a_file_holds_and_reads_lazily_and_in_blocks(tmp_path, image_folder):
    (image_folder / "cat" / "bad.jpg").write_bytes(b"not an image")
    model, store = tiny_vgg("A"), tmp_path / "feats"
    result = run([image_folder], store, model, shard_images=3)
    assert (result.num_images, result.num_failed, result.computed) == (8, 1, 8)
    run([image_folder], tmp_path / "ref.h5", model)
    assert_same_rows(store, tmp_path / "ref.h5")
    assert sorted(p.name for p in store.iterdir()) == ["index", "settings.json", "shards"]
    whole = vggfeat.load_features(store)
    assert whole.paths == sorted(whole.paths) and whole.attrs["layer"] == "fc7"
    assert whole.input_sizes.shape == (8, 1, 2)
    lazy = vggfeat.load_features(store, lazy=True)
    np.testing.assert_array_equal(lazy.data[[7, 0, 3]], whole.data[[7, 0, 3]])
    np.testing.assert_array_equal(lazy.data[2:6], whole.data[2:6])
    lazy.data.close()
    X, y = vggfeat.load_features(store, return_X_y=True)
    np.testing.assert_array_equal(X, whole.data)
    blocks = list(iter_features(store, rows=3))
    assert [len(b) for b, _ in blocks] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate([b for b, _ in blocks]), X)
    np.testing.assert_array_equal(np.concatenate([t for _, t in blocks]), y)
    again = run([image_folder], store, model)
    assert again.up_to_date and again.reused == 8


def test_an_update_writes_only_what_changed(tmp_path, image_folder):
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model, shard_images=2)
    before = files_of(store)
    new = write_image(image_folder / "cat" / "new.jpg", seed=70)
    write_image(image_folder / "dog" / "0.jpg", size=(250, 330), seed=71)  # changed
    (image_folder / "cat" / "2.jpg").unlink()
    updated = run([image_folder], store, model)
    assert (updated.computed, updated.reused, updated.removed) == (2, 6, 1)
    after = files_of(store)
    assert all(after[name] == stamp for name, stamp in before.items())  # nothing rewritten
    added = set(after) - set(before)
    assert len([p for p in added if p.parts[0] == "shards"]) == 1
    assert len([p for p in added if p.parts[0] == "index"]) == 1
    run([image_folder], tmp_path / "ref.h5", model)
    assert_same_rows(store, tmp_path / "ref.h5")
    assert str(new) in vggfeat.load_features(store).paths


def test_labels_follow_the_list_without_recomputing(tmp_path, image_folder, monkeypatch):
    paths = gather_images([image_folder]).paths
    listed = tmp_path / "list.csv"
    listed.write_text("path,label\n" + "".join(f"{p},{'a' if i < 4 else 'b'}\n"
                                               for i, p in enumerate(paths)))
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([listed], store, model)
    listed.write_text("path,label\n" + "".join(f"{p},{'a' if i < 2 else 'c'}\n"
                                               for i, p in enumerate(paths)))
    relabelled = run([listed], store, model)
    assert relabelled.computed == 0 and not relabelled.up_to_date
    run([listed], tmp_path / "ref.h5", model)
    assert_same_rows(store, tmp_path / "ref.h5")
    assert vggfeat.load_features(store).target_names == ["a", "c"]


def test_compaction_keeps_the_rows_and_frees_the_dead(tmp_path, image_folder):
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model, shard_images=4)
    for i, path in enumerate(sorted(image_folder.rglob("*.*"))[:3]):
        write_image(path, size=(250, 300), seed=100 + i)  # changed: their old rows die
    run([image_folder], store, model, shard_images=4)
    rows_before = vggfeat.load_features(store)
    state = read_state(store)
    assert any(not s.live.all() for s in state.shards)
    done = compact(store, threshold=0.01)
    assert done.rewritten >= 1 and done.bytes_after < done.bytes_before
    after = vggfeat.load_features(store)
    assert after.paths == rows_before.paths
    np.testing.assert_array_equal(after.data, rows_before.data)
    assert all(s.live.all() for s in read_state(store).shards)
    live = {s.name for s in read_state(store).shards}
    assert {p.name for p in (store / "shards").iterdir()} == live  # retired files deleted
    assert run([image_folder], store, model).up_to_date


def test_updates_compact_by_themselves(tmp_path, image_folder, monkeypatch):
    import vggfeat.cache.sharded as sharded

    monkeypatch.setattr(sharded, "PACK_SMALL_SHARDS", 4)
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model, shard_images=1)  # 8 small shards: packed into one
    assert len(read_state(store).shards) == 1 and len(list((store / "shards").iterdir())) == 1
    for path in sorted(image_folder.rglob("*.*"))[:5]:
        path.unlink()  # 5 of 8 rows dead: more than half the bytes
    run([image_folder], store, model)
    state = read_state(store)
    assert all(s.live.all() for s in state.shards) and len(state.live_rows()) == 3
    run([image_folder], tmp_path / "ref.h5", model)
    assert_same_rows(store, tmp_path / "ref.h5")


def test_store_commands_info_compact_export(tmp_path, image_folder, tiny_weights):
    store = tmp_path / "feats"
    common = ["--weights", tiny_weights, "--scales", "224", "--workers", "0", "--quiet"]
    run_cli("extract", image_folder, "-o", store, *common)
    (store / "notes.txt").write_text("mine")
    info = run_cli("store", "info", store).stdout
    assert "8 live, 0 failed" in info and "layer fc7" in info and "notes.txt" in info
    assert "ignored" in info
    run_cli("store", "export", store, "--to", tmp_path / "all.h5")
    to_url = run_cli("store", "export", store, "--to", "s3://b/all.h5", check=False,
                     cwd=tmp_path)
    assert to_url.returncode == 2 and "written on this machine" in to_url.stderr
    assert not (tmp_path / "s3:").exists()  # (a Path made of the URL would be s3:/b/all.h5)
    run_cli("extract", image_folder, "-o", tmp_path / "ref.h5", *common)
    assert_same_rows(store, tmp_path / "ref.h5")
    exported = vggfeat.load_features(tmp_path / "all.h5")
    assert exported.paths == vggfeat.load_features(store).paths
    compacted = run_cli("store", "compact", store).stderr
    assert "rewritten" in compacted and " KiB → " in compacted  # not "0.0 MiB → 0.0 MiB"
    assert vggfeat.load_features(store).paths == exported.paths  # foreign file ignored


def test_damaged_missing_linked_and_foreign_files_are_named(tmp_path, image_folder):
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model, shard_images=4)
    shard = sorted((store / "shards").iterdir())[0]
    entry = sorted((store / "index").iterdir())[0]
    content = shard.read_bytes()
    shard.write_bytes(content[:1000])
    with pytest.raises(CacheError, match=f"shard {shard} is damaged or truncated.*restore it"):
        vggfeat.load_features(store)
    shard.unlink()
    with pytest.raises(CacheError, match=f"shard {shard} is missing.*restore it"):
        vggfeat.load_features(store)
    target = tmp_path / "elsewhere.h5"
    target.write_bytes(content)
    os.symlink(target, shard)
    with pytest.raises(CacheError, match=f"shard {shard} is a symbolic link"):
        vggfeat.load_features(store)
    shard.unlink()
    shard.write_bytes(content)
    text = entry.read_text()
    entry.write_text(text[:20])
    with pytest.raises(CacheError, match=f"index entry {entry} is damaged"):
        vggfeat.load_features(store)
    entry.write_text(text)
    (store / "shards" / "README").write_text("foreign")
    (store / "index" / "notes.json").write_text("{}")
    assert len(vggfeat.load_features(store).paths) == 8
    with pytest.raises(CacheError, match="other settings.*scales: \\[224\\] → \\[256\\]"):
        extract([image_folder], store, spec=DescriptorSpec(scales=(256,)), model=model,
                workers=0, progress=False)
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(CacheError, match="not a vggfeat feature store .* not empty"):
        run([image_folder], other, model)
    with pytest.raises(CacheError, match="feat.npy must be named .h5 or .hdf5"):
        run([image_folder], tmp_path / "feat.npy", model)


KILLED = """
import importlib, os, signal, sys
from pathlib import Path
import vggfeat.cache.sharded as sharded
run = importlib.import_module("vggfeat.descriptors.run")
step, point, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = 0

def killed_after(fn):
    def wrapper(*args, **kwargs):
        global calls
        out = fn(*args, **kwargs)
        calls += 1
        if calls == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper

if point == "write_shard":
    run.write_shard = killed_after(run.write_shard)
    sharded.write_shard = killed_after(sharded.write_shard)
elif point == "publish_entry":
    sharded.publish_entry = killed_after(sharded.publish_entry)
else:
    Path.unlink = killed_after(Path.unlink)
if step == "update":
    from vggfeat.cli.main import main
    main(["extract", sys.argv[4], "-o", sys.argv[5], "--weights", sys.argv[6], "--scales",
          "224", "--workers", "0", "--batch-size", "1", "--shard-size", "1", "--quiet"])
else:
    sharded.compact(Path(sys.argv[4]), threshold=0.01)
"""


def killed(*args):
    proc = subprocess.run([sys.executable, "-c", KILLED, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it did die where asked


@pytest.mark.parametrize("step,point,at", [
    ("update", "write_shard", 1), ("update", "write_shard", 4), ("update", "publish_entry", 1),
    ("compact", "write_shard", 1), ("compact", "publish_entry", 1), ("compact", "unlink", 1)])
def test_sigkill_during_update_or_compaction_then_rerun_gives_the_clean_rows(
        tmp_path, image_folder, tiny_weights, step, point, at):
    model, store = vggfeat.vgg(weights=str(tiny_weights)), tmp_path / "feats"
    run([image_folder], store, model, shard_images=2)
    for i, path in enumerate(sorted(image_folder.rglob("*.*"))[::2]):
        write_image(path, size=(250, 300), seed=200 + i)  # changed: their old rows die
    for k in range(3):
        write_image(image_folder / "dog" / f"more{k}.jpg", seed=300 + k)
    if step == "update":
        killed(step, point, at, image_folder, store, tiny_weights)
    else:
        run([image_folder], store, model)
        killed(step, point, at, store)
        compact(store, threshold=0.01)
    rerun = run([image_folder], store, model)
    assert rerun.up_to_date == (step == "compact" or point == "publish_entry")
    run([image_folder], tmp_path / "clean.h5", model)
    assert_same_rows(store, tmp_path / "clean.h5")
    state = read_state(store)
    on_disk = {p.name for p in (store / "shards").iterdir()}
    assert {s.name for s in state.shards} <= on_disk
    if step == "compact":  # the next compaction left only live shards
        assert on_disk == {s.name for s in state.shards}


def test_a_store_settings_file_is_never_written_through_a_link(tmp_path, image_folder):
    store = tmp_path / "feats"
    store.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, store / "settings.json")
    with pytest.raises(CacheError, match="settings file .*settings.json is a symbolic link"):
        run([image_folder], store, tiny_vgg("A"))
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in store.iterdir()) == ["settings.json"]


def plant_entry(store, **fields):
    """A hand-written index entry after the store's own ones."""
    import json

    seq = len(list((store / "index").iterdir())) + 1
    entry = store / "index" / f"{seq:012d}-{'0' * 32}.json"
    data = {"format": "vggfeat-store/1", "added": {}, "removed": {}, "retired": [], **fields}
    entry.write_text(json.dumps(data))
    return entry


def test_shard_names_leading_out_of_the_store_are_refused(tmp_path, image_folder):
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    entry = plant_entry(store, retired=["../../victim.txt"])
    with pytest.raises(CacheError, match=f"index entry {entry} names the shard "
                                         "'../../victim.txt'.*move it out"):
        compact(store)
    assert victim.read_text() == "keep me"
    entry.unlink()
    run([image_folder / "cat"], tmp_path / "outside.h5", model)
    entry = plant_entry(store, added={"../../outside.h5": [4, 0, 1]})
    with pytest.raises(CacheError, match=f"index entry {entry} names the shard"):
        vggfeat.load_features(store)
    entry.unlink()
    entry = plant_entry(store, removed={"shard-x/../../y.h5": [0]})
    with pytest.raises(CacheError, match="not a shard name"):
        read_state(store)


def test_damaged_numbers_in_an_index_entry_are_named(tmp_path, image_folder):
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model)
    shard = sorted((store / "shards").iterdir())[0].name
    for removed in (["x"], [-1], [True], [9]):
        entry = plant_entry(store, removed={shard: removed})
        with pytest.raises(CacheError, match=f"index entry {entry} is damaged .*{shard}"):
            vggfeat.load_features(store)
        entry.unlink()
    entry = plant_entry(store, added={shard: [8, -1, 5]})
    with pytest.raises(CacheError, match=f"index entry {entry} is damaged"):
        read_state(store)
    entry.unlink()
    assert len(vggfeat.load_features(store).paths) == 8


def test_export_refuses_to_replace_or_write_inside_and_carries_the_attributes(tmp_path,
                                                                             image_folder):
    from vggfeat.cache.sharded import export_file
    from vggfeat.cache.store import read_attrs

    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model)
    run([image_folder], tmp_path / "ref.h5", model)
    other = tmp_path / "other.h5"
    other.write_bytes(b"someone's file")
    with pytest.raises(CacheError, match=f"{other} already exists: pass --overwrite"):
        export_file(store, other)
    assert other.read_bytes() == b"someone's file"
    with pytest.raises(CacheError, match="inside the feature store"):
        export_file(store, store / "inside.h5")
    with pytest.raises(CacheError, match="inside the feature store"):
        export_file(store, store / "shards" / "x.h5", overwrite=True)
    assert sorted(p.name for p in store.iterdir()) == ["index", "settings.json", "shards"]
    with pytest.raises(CacheError, match=r"export file .*z.npy must be named .h5 or .hdf5: "
                                         r"vggfeat writes HDF5 files \(e.g. z.h5\)$"):
        export_file(store, tmp_path / "z.npy")
    assert export_file(store, other, overwrite=True) == 8
    attrs, ref = read_attrs(other), read_attrs(tmp_path / "ref.h5")
    for key in ("weights_source", "vggfeat_version", "torch_version"):
        assert attrs[key] == ref[key]
    assert attrs["created"][:4] == ref["created"][:4] and attrs["complete"]
    compact(store, threshold=0.0001)  # a compaction's entry carries the writer on
    export_file(store, other, overwrite=True)
    assert read_attrs(other)["weights_source"] == ref["weights_source"]


def test_compact_refuses_a_folder_that_is_not_a_store(tmp_path, image_folder):
    before = files_of(image_folder)
    proc = run_cli("store", "compact", image_folder, check=False)
    assert proc.returncode != 0
    assert f"Error: {image_folder} is not a vggfeat feature store" in proc.stderr
    with pytest.raises(CacheError, match="not a vggfeat feature store"):
        compact(image_folder)
    assert files_of(image_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


@pytest.mark.parametrize("folder", ["shards", "index"])
def test_readers_refuse_a_link_at_a_store_folder(tmp_path, image_folder, folder):
    from vggfeat.cache.sharded import export_file

    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model)
    (store / folder).rename(tmp_path / "moved")
    os.symlink(tmp_path / "moved", store / folder)
    link = f"{store / folder} is a symbolic link, which vggfeat never follows"
    for read in (lambda: vggfeat.load_features(store),
                 lambda: vggfeat.load_features(store, lazy=True),
                 lambda: list(iter_features(store)),
                 lambda: export_file(store, tmp_path / "x.h5")):
        with pytest.raises(CacheError, match=link):
            read()
    assert not (tmp_path / "x.h5").exists()


def test_an_immutable_store_is_called_immutable(tmp_path, image_folder):
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder / "cat"], store, model)
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(store)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and chattr to make a folder immutable")
    try:
        with pytest.raises(CacheError, match=f"{store} is immutable or append-only .*chattr -i"):
            run([image_folder], store, model)
    finally:
        subprocess.run(["chattr", "-i", str(store)], check=True)
    assert len(vggfeat.load_features(store).paths) == 4


def test_iter_features_feeds_partial_fit_from_a_store_or_a_file(tmp_path, image_folder):
    from sklearn.linear_model import SGDClassifier

    model = tiny_vgg("A")
    run([image_folder], tmp_path / "feats", model)
    run([image_folder], tmp_path / "f.h5", model)
    for path in (tmp_path / "feats", tmp_path / "f.h5"):
        X, y = vggfeat.load_features(path, return_X_y=True)
        blocks = list(vggfeat.iter_features(path, rows=3))
        assert [len(b) for b, _ in blocks] == [3, 3, 2]
        np.testing.assert_array_equal(np.concatenate([b for b, _ in blocks]), X)
        np.testing.assert_array_equal(np.concatenate([t for _, t in blocks]), y)
        clf = SGDClassifier(random_state=0)
        for X_block, y_block in vggfeat.iter_features(path, rows=3):
            clf.partial_fit(X_block, y_block, classes=[0, 1])
        assert clf.predict(X).shape == (8,)


def test_export_to_npy_and_parquet_for_embedding_readers(tmp_path, image_folder, monkeypatch):
    from vggfeat.cache.npy import export_npy
    from vggfeat.errors import MissingDependencyError

    pq = pytest.importorskip("pyarrow.parquet")
    model, store, out = tiny_vgg("A"), tmp_path / "feats", tmp_path / "npy"
    run([image_folder], store, model)
    whole = vggfeat.load_features(store)
    assert export_npy(store, out, file_bytes=3 * 32 * 4) == 8  # 3 rows of 32 float32 a file
    embs = sorted((out / "emb").iterdir())
    metas = sorted((out / "metadata").iterdir())
    assert [p.name for p in embs] == ["emb_00000.npy", "emb_00001.npy", "emb_00002.npy"]
    assert [p.name for p in metas] == [f"metadata_0000{k}.parquet" for k in range(3)]
    X = np.concatenate([np.load(p) for p in embs])
    meta = [pq.read_table(p).to_pydict() for p in metas]
    assert [len(np.load(e)) for e in embs] == [len(m["path"]) for m in meta] == [3, 3, 2]
    np.testing.assert_array_equal(X, whole.data)
    assert sum((m["path"] for m in meta), []) == whole.paths
    assert sum((m["label"] for m in meta), []) == whole.target.tolist()
    assert sum((m["class_name"] for m in meta), []) == [whole.target_names[t]
                                                        for t in whole.target]
    with pytest.raises(CacheError, match=f"{out} is not empty: pass --overwrite"):
        export_npy(store, out)
    assert export_npy(store, out, overwrite=True) == 8  # one file now: no stale pairs left
    assert [p.name for p in (out / "emb").iterdir()] == ["emb_00000.npy"]
    assert [p.name for p in (out / "metadata").iterdir()] == ["metadata_00000.parquet"]
    with pytest.raises(CacheError, match="inside the feature store"):
        export_npy(store, store / "npy")
    assert "8 rows" in run_cli("store", "export", store, "--to-npy", tmp_path / "cli").stderr
    assert np.array_equal(np.load(tmp_path / "cli" / "emb" / "emb_00000.npy"), whole.data)
    both = run_cli("store", "export", store, "--to", tmp_path / "a.h5", "--to-npy", out,
                   check=False)
    assert both.returncode == 2 and "give one of --to FILE.h5 and --to-npy FOLDER" in both.stderr
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingDependencyError, match=r"--to-npy needs pyarrow.*vggfeat\[parquet\]"):
        export_npy(store, tmp_path / "npy2")
    assert not (tmp_path / "npy2").exists()


def test_an_update_removes_stale_temporaries_of_killed_writers_only(tmp_path, image_folder):
    import time

    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model)
    stale = [store / ".settings.json.1a2b3c4d.tmp",
             store / "shards" / ".shard-r000-0000000000-1a2b3c4d.h5.5e6f7a8b.tmp",
             store / "index" / ".000000000002-1a2b.json.5e6f7a8b.tmp"]
    fresh = store / "shards" / ".shard-r000-0000000004-9c9c9c9c.h5.0d0d0d0d.tmp"  # at work
    for path in [*stale, fresh]:
        path.write_bytes(b"half a file")
    for path in stale:  # two hours old: their writers were killed
        os.utime(path, (time.time() - 7200,) * 2)
    write_image(image_folder / "dog" / "new.jpg", seed=99)
    assert run([image_folder], store, model).computed == 1
    assert not any(p.exists() for p in stale) and fresh.exists()


def test_a_lock_left_to_a_dead_writers_worker_says_so(tmp_path):
    from vggfeat.cache.lock import OutputLock

    script = ("import os, sys, time\n"
              "from vggfeat.cache.lock import OutputLock\n"
              "OutputLock(sys.argv[1]).acquire()\n"
              "if os.fork() == 0:\n"  # a worker that inherits the lock's file description
              "    null = os.open(os.devnull, os.O_WRONLY)\n"
              "    os.dup2(null, 1); os.dup2(null, 2)\n"  # (so that run() does not wait)
              "    time.sleep(20); os._exit(0)\n"
              "print('locked', flush=True); os._exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "feats")],
                          capture_output=True, text=True, timeout=60)
    assert "locked" in proc.stdout
    with pytest.raises(CacheError, match="which has ended: a decoding worker"):
        OutputLock(tmp_path / "feats").acquire()


def test_labels_come_and_go_without_recomputing(tmp_path, image_folder):
    """A store of unlabelled rows (no labels stored) takes labels from a later listing, and
    drops them again, by republishing rows, not computing them."""
    paths = gather_images([image_folder]).paths
    plain, labelled = tmp_path / "plain.txt", tmp_path / "labelled.csv"
    plain.write_text("".join(f"{p}\n" for p in paths))
    labelled.write_text("path,label\n" + "".join(f"{p},{'ab'[i % 2]}\n"
                                                 for i, p in enumerate(paths)))
    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([plain], store, model)
    assert vggfeat.load_features(store).target is None
    assert run([labelled], store, model).computed == 0
    got = vggfeat.load_features(store)
    assert [got.target_names[t] for t in got.target] == [
        "ab"[paths.index(p) % 2] for p in got.paths]
    assert run([plain], store, model).computed == 0
    assert vggfeat.load_features(store).target is None


def test_many_inputs_are_statted_in_processes_alike(tmp_path, monkeypatch):
    """Past STAT_PER_PROCESS files the stat is split over processes: same sizes and times."""
    from vggfeat.cache import store

    files = []
    for i in range(7):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(b"x" * i)
    paths = [str(f) for f in files] + [str(tmp_path / "missing.jpg")]
    monkeypatch.setattr(store, "STAT_PER_PROCESS", 2)
    ids = store.stat_files(paths)
    assert ids.size.tolist() == list(range(7)) + [store.MISSING]
    assert ids.mtime_ns.tolist() == [f.stat().st_mtime_ns for f in files] + [0]


def test_a_relabelling_leaves_no_retired_copy_behind(tmp_path, image_folder):
    """Relabelling republishes every row and retires the old shards: their files go at once
    (they are not dead bytes of live shards, so the automatic compaction never saw them)."""
    paths = gather_images([image_folder]).paths
    model, store, listed = tiny_vgg("A"), tmp_path / "feats", tmp_path / "list.csv"
    for names in ("ab", "cd", "ab"):
        listed.write_text("path,label\n" + "".join(f"{p},{names[i % 2]}\n"
                                                   for i, p in enumerate(paths)))
        assert run([listed], store, model).computed in (0, len(paths))
    live = {s.name for s in read_state(store).shards}
    assert {p.name for p in (store / "shards").iterdir()} == live
    assert vggfeat.load_features(store).target_names == ["a", "b"]


def test_a_store_reached_through_a_link_takes_the_same_lock(tmp_path, image_folder):
    from vggfeat.cache.lock import OutputLock

    model, store = tiny_vgg("A"), tmp_path / "feats"
    run([image_folder], store, model)
    (tmp_path / "link").symlink_to(store)
    write_image(image_folder / "cat" / "new.jpg", seed=80)
    with OutputLock(store), pytest.raises(CacheError, match="is being written"):
        run([image_folder], tmp_path / "link", model)


def test_a_listed_path_with_a_nul_is_recorded_as_failed(tmp_path, image_folder):
    """No traceback, no half-made store: the line is recorded as a failure, named."""
    from vggfeat.data.sources import NUL_IN_PATH

    paths = gather_images([image_folder]).paths
    listed = tmp_path / "list.txt"
    listed.write_text(f"{paths[0]}\n{paths[1]}\0x.jpg\n")
    run([listed], tmp_path / "feats", tiny_vgg("A"))
    got = vggfeat.load_features(tmp_path / "feats")
    assert got.paths == [paths[0]]
    assert got.failed == [(f"{paths[1]}\\x00x.jpg", NUL_IN_PATH)]


@pytest.mark.parametrize("rows", [0, -1, 2.5])
def test_iter_features_refuses_a_block_size_below_one(tmp_path, rows):
    from vggfeat.errors import ConfigError

    with pytest.raises(ConfigError, match="rows must be a whole number"):
        next(iter_features(tmp_path / "feats", rows=rows))
