"""Units of work: processes that share a store (--num-shards/--shard-index, a Slurm array,
torchrun's ranks) each publish their own units, with no merge; reruns skip unchanged units."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import numpy as np

import pytest
from conftest import run_cli, tiny_vgg, write_image
from test_store import assert_same_rows, files_of, run

import vggfeat
from vggfeat.cache.sharded import compact, read_state
from vggfeat.cache.store import FileIds, write_shard
from vggfeat.data.sources import gather_images
from vggfeat.data.units import WorkShare, file_units
from vggfeat.data.urls import Fetcher, url_identity
from vggfeat.errors import ConfigError


@pytest.fixture
def tiny():
    return tiny_vgg("A")


def test_units_are_fixed_runs_of_the_listing(image_folder):
    images = gather_images([image_folder])
    units = file_units(images, 3)
    assert [(u.id, u.start, u.stop) for u in units] == [
        ("files:00000000", 0, 3), ("files:00000001", 3, 6), ("files:00000002", 6, 8)]
    assert WorkShare(1, 2).mine(units) == [units[1]]


def test_two_shares_fill_one_store_like_one_process(tmp_path, image_folder, tiny):
    store = tmp_path / "feats"
    first = run([image_folder], store, tiny, num_shards=2, shard_index=1, unit_images=3)
    assert first.computed == 3  # units 1 (3 images) of 0, 1, 2
    second = run([image_folder], store, tiny, num_shards=2, shard_index=0, unit_images=3)
    assert second.computed == 5 and second.num_images == 8
    run([image_folder], tmp_path / "ref.h5", tiny)
    assert_same_rows(store, tmp_path / "ref.h5")
    assert sorted(read_state(store).units) == [f"files:{k:08d}" for k in range(3)]
    before = files_of(store)
    for index in (0, 1):  # unchanged units are skipped, each process's alike
        again = run([image_folder], store, tiny, num_shards=2, shard_index=index, unit_images=3)
        assert again.up_to_date and again.computed == 0
    assert files_of(store) == before


def test_only_the_first_share_drops_removed_images(tmp_path, image_folder, tiny):
    store = tmp_path / "feats"
    run([image_folder], store, tiny, unit_images=3)
    gone = sorted((image_folder / "dog").iterdir())[-1]
    gone.unlink()
    second = run([image_folder], store, tiny, num_shards=2, shard_index=1, unit_images=3)
    assert second.computed == 0 and second.removed == 0
    assert str(gone) in vggfeat.load_features(store).paths
    first = run([image_folder], store, tiny, num_shards=2, shard_index=0, unit_images=3)
    assert first.removed == 1 and str(gone) not in vggfeat.load_features(store).paths
    run([image_folder], tmp_path / "ref.h5", tiny)
    assert_same_rows(store, tmp_path / "ref.h5")


def test_a_changed_image_recomputes_only_itself(tmp_path, image_folder, tiny):
    store = tmp_path / "feats"
    run([image_folder], store, tiny, unit_images=3)
    write_image(sorted((image_folder / "cat").iterdir())[0], size=(250, 250), seed=99)
    again = run([image_folder], store, tiny, unit_images=3)
    assert (again.computed, again.reused) == (1, 7)
    run([image_folder], tmp_path / "ref.h5", tiny)
    assert_same_rows(store, tmp_path / "ref.h5")


def test_the_share_comes_from_slurm_or_torchrun(monkeypatch):
    for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                 "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert WorkShare.resolve() == WorkShare(0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert WorkShare.resolve() == WorkShare(3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert WorkShare.resolve() == WorkShare(6, 10)
    assert WorkShare.resolve(2, 1) == WorkShare(1, 2)  # given values win
    with pytest.raises(ConfigError, match="--shard-index must be in 0..1"):
        WorkShare.resolve(2, 2)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="needs --shard-index"):
        WorkShare.resolve(3, None)
    with pytest.raises(ConfigError, match="needs --num-shards"):
        WorkShare.resolve(None, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")  # --array=5-9:2 runs tasks 5, 7, 9
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    assert WorkShare.resolve() == WorkShare(2, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")  # not a task of that array (or a list)
    with pytest.raises(ConfigError, match="--array=0-N"):
        WorkShare.resolve()
    monkeypatch.delenv("SLURM_ARRAY_TASK_STEP")
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "x")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_ID='x'"):
        WorkShare.resolve()


def test_a_file_output_refuses_shares(tmp_path, image_folder, tiny):
    with pytest.raises(ConfigError, match="write to a store"):
        run([image_folder], tmp_path / "f.h5", tiny, num_shards=2, shard_index=0)


def test_processes_at_once_and_racing_on_a_unit_leave_one_copy(tmp_path, image_folder,
                                                              tiny_weights):
    store = tmp_path / "feats"
    common = ["extract", image_folder, "-o", store, "--weights", tiny_weights, "--scales",
              "224", "--workers", "0", "--quiet", "--backend", "eager", "--unit-size", "3",
              "--num-shards", "2"]
    # shares 1 and 1 again race on the same units; share 0 runs beside them.  (One backend for
    # all: auto may choose differently per process, within 1e-5 of each other.)
    procs = [subprocess.Popen([sys.executable, "-m", "vggfeat", *map(str, common),
                               "--shard-index", str(i)], stderr=subprocess.PIPE, text=True)
             for i in (1, 1, 0)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    run_cli("extract", image_folder, "-o", tmp_path / "ref.h5", "--weights", tiny_weights,
            "--scales", "224", "--workers", "0", "--quiet", "--backend", "eager")
    bunch = vggfeat.load_features(store)
    assert len(bunch.paths) == len(set(bunch.paths)) == 8
    assert_same_rows(store, tmp_path / "ref.h5")


def test_compaction_deletes_the_shard_of_a_writer_that_lost_a_race(tmp_path, image_folder, tiny):
    store = tmp_path / "feats"
    run([image_folder], store, tiny)
    live = sorted((store / "shards").iterdir())[0]
    loser = live.with_name("shard-r000-loser.h5")  # the same rows, published by nobody
    loser.write_bytes(live.read_bytes())
    killed = live.with_name("shard-r000-killed.h5")  # rows the store lacks: kept for reuse
    write_image(image_folder / "cat" / "new.jpg", seed=5)
    write_shard(store / "shards", killed.name, paths=[str(image_folder / "cat" / "new.jpg")],
                ids=FileIds.empty(1), features=np.zeros((1, 32)), input_sizes=np.zeros((1, 1, 2)),
                failed_paths=[], failed_reasons=[], failed_ids=FileIds.empty(0),
                dtype="float32", label_names=["cat"])
    compact(store)
    assert not loser.exists() and killed.exists()


def test_a_url_whose_head_never_answers_cannot_hang_a_run(tmp_path):
    class Silent(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            time.sleep(30)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        began = time.monotonic()
        found = url_identity(f"http://127.0.0.1:{server.server_port}/x.jpg",
                             Fetcher(timeout=0.3, retries=1, backoff=0.01))
        assert found is None and time.monotonic() - began < 5
    finally:
        server.shutdown()
