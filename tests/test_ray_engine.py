"""``--engine ray``: a store's units computed by the actors of a Ray cluster give the rows one
process gives; reruns skip unchanged units; a unit whose worker died is computed again."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import pytest
from conftest import run_cli, tiny_vgg
from test_store import assert_same_rows, files_of

import vggfeat
from vggfeat.cache.sharded import read_state
from vggfeat.cli import main
from vggfeat.descriptors import DescriptorSpec, extract
from vggfeat.errors import ConfigError, ExtractError, MissingDependencyError

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

SPEC = DescriptorSpec(scales=(224,))
# One backend everywhere: auto may choose differently per process (within 1e-5).
COMMON = dict(spec=SPEC, workers=0, progress=False, backend="eager", unit_images=3)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs for the module; its address."""
    before = os.environ.get("PYTHONPATH")
    # Ray's workers inherit this environment: they import this vggfeat, and this module (the
    # hook of the killed-worker test is pickled by reference).
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)]
                                               + ([before] if before else []))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's sockets live there
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def with_ray(images, store, model, **kwargs):
    return vggfeat.extract_with_ray(images, store, model=model,
                                    **{**COMMON, "actors": (1, 2), "cpus_per_actor": 1,
                                       **kwargs})


def reference(images, path):
    extract(images, path, model=tiny_vgg("A"), **COMMON)
    return path


def test_actors_give_the_rows_of_one_process_and_a_rerun_computes_nothing(cluster, tmp_path,
                                                                          image_folder):
    store = tmp_path / "feats"
    result = with_ray([image_folder], store, tiny_vgg("A"))
    assert (result.computed, result.num_images, result.reused, result.up_to_date) == (
        8, 8, 0, False)
    assert result.backend == "eager" and result.images_per_forward >= 1
    assert sorted(read_state(store).units) == [f"files:{k:08d}" for k in range(3)]
    assert_same_rows(store, reference([image_folder], tmp_path / "ref.h5"))
    before = files_of(store)
    again = with_ray([image_folder], store, tiny_vgg("A"))
    assert again.up_to_date and (again.computed, again.reused) == (0, 8)
    assert files_of(store) == before


def die_once(marker: Path, module, args) -> None:
    """A forward hook: the worker process dies the first time a net runs (no Python error)."""
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)


def test_a_killed_workers_unit_is_computed_again(cluster, tmp_path, image_folder):
    marker = tmp_path / "died"
    model = tiny_vgg("A")
    model.features[0].register_forward_pre_hook(partial(die_once, marker))
    result = with_ray([image_folder], tmp_path / "feats", model, actors=(1, 1))
    assert marker.exists()  # the worker did die, with os._exit(1), in its first unit
    assert (result.computed, result.num_images) == (8, 8)
    assert_same_rows(tmp_path / "feats", reference([image_folder], tmp_path / "ref.h5"))


def always_die(module, args) -> None:
    os._exit(1)


def test_a_unit_that_always_kills_its_worker_is_reported_not_tried_forever(cluster, tmp_path,
                                                                           image_folder):
    model = tiny_vgg("A")
    model.features[0].register_forward_pre_hook(always_die)
    with pytest.raises(ExtractError, match=r"1 of 1 units were not computed, e\.g\. "
                                           r"files:00000000: its worker process died 3 times"):
        with_ray([image_folder], tmp_path / "feats", model, actors=(1, 1), unit_images=8)


def test_removed_images_are_dropped_and_new_ones_computed(cluster, tmp_path, image_folder):
    store = tmp_path / "feats"
    with_ray([image_folder], store, tiny_vgg("A"))
    gone = sorted((image_folder / "cat").iterdir())[0]
    shutil.move(gone, image_folder / "dog" / "moved.jpg")
    again = with_ray([image_folder], store, tiny_vgg("A"))
    assert (again.removed, again.num_images) == (1, 8) and again.computed == 1
    assert str(gone) not in vggfeat.load_features(store).paths
    assert_same_rows(store, reference([image_folder], tmp_path / "ref.h5"))


def test_the_command_line_joins_a_running_cluster(cluster, tmp_path, image_folder,
                                                  tiny_weights):
    common = ["--weights", tiny_weights, "--scales", "224", "--workers", "0", "--quiet",
              "--backend", "eager", "--unit-size", "3"]
    proc = run_cli("extract", image_folder, "-o", tmp_path / "feats", *common, "--engine", "ray",
                   "--ray-address", cluster, "--actors", "1")
    assert f"8 images → {tmp_path / 'feats'}: 0 reused, 8 computed, 0 removed" in proc.stderr
    run_cli("extract", image_folder, "-o", tmp_path / "ref.h5", *common)
    assert_same_rows(tmp_path / "feats", tmp_path / "ref.h5")


def test_a_file_output_and_shares_are_refused(tmp_path, image_folder):
    with pytest.raises(ConfigError, match=r"writes a feature store .*\(e\.g\. -o f\) and export it"):
        vggfeat.extract_with_ray([image_folder], tmp_path / "f.h5", model=tiny_vgg("A"))
    with pytest.raises(ConfigError, match="drop --num-shards"):
        vggfeat.extract_with_ray([image_folder], tmp_path / "f", model=tiny_vgg("A"),
                                 num_shards=2, shard_index=0)


def test_missing_ray_names_the_extra(tmp_path, image_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(MissingDependencyError, match=r'needs ray.*pip install "vggfeat\[ray\]"'):
        vggfeat.extract_with_ray([image_folder], tmp_path / "feats", model=tiny_vgg("A"))


@pytest.mark.parametrize("args, message", [
    (["--actors", "2"], "go with --engine ray"),
    (["--engine", "ray", "--actors", "3:1"], "1 ≤ MIN ≤ MAX"),
    (["--engine", "ray", "--actors", "x"], "give MIN or MIN:MAX"),
])
def test_engine_options_are_checked_first(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["extract", "img", "-o", "feats", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_tars_are_units_of_their_own(cluster, tmp_path, image_folder):
    from test_stream_extract import make_tar

    from vggfeat.data.sources import gather_images

    images = gather_images([image_folder])
    for k, half in enumerate((images.paths[:4], images.paths[4:])):
        part = gather_images(half)
        make_tar(tmp_path / f"part-{k}.tar", part)
    pattern = str(tmp_path / "part-{0..1}.tar")
    result = with_ray([pattern], tmp_path / "feats", tiny_vgg("A"))
    assert (result.computed, result.num_images) == (8, 8)
    extract([pattern], tmp_path / "ref", model=tiny_vgg("A"), **COMMON)
    assert_same_rows(tmp_path / "feats", tmp_path / "ref")
    assert with_ray([pattern], tmp_path / "feats", tiny_vgg("A")).up_to_date
