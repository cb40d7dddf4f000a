"""scikit-learn: VGGFeatures over image paths (pipelines, grid search, cache) and array transformers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks
from conftest import write_image

import vggfeat
from vggfeat.cache import CacheError
from vggfeat.data.sources import gather_images
from vggfeat.descriptors import DescriptorSpec, extract
from vggfeat.sklearn import PowerNormalizer, ScaleAggregator, VGGFeatures


@parametrize_with_checks([ScaleAggregator(), ScaleAggregator(aggregate="stack"),
                          PowerNormalizer(), PowerNormalizer(alpha=2.0)])
def test_array_transformers_follow_sklearn_conventions(estimator, check):
    check(estimator)


def test_array_transformers_values():
    X = np.arange(12, dtype=np.float64).reshape(2, 6) - 5  # 3 scales × 2 dims
    np.testing.assert_allclose(ScaleAggregator(n_scales=3).fit_transform(X),
                               [[-3, -2], [3, 4]])
    assert ScaleAggregator(n_scales=3).fit(X).get_feature_names_out().tolist() == [
        "scaleaggregator0", "scaleaggregator1"]
    np.testing.assert_allclose(PowerNormalizer().fit_transform(np.array([[-4.0, 9.0]])),
                               [[-2.0, 3.0]])
    with pytest.raises(ValueError, match="n_scales=4 must be a positive integer dividing"):
        ScaleAggregator(n_scales=4).fit(X)


def features(tiny_weights, **kwargs):
    return VGGFeatures(weights=str(tiny_weights), **{"scales": (224,), **kwargs})


def test_vggfeatures_equals_extract_and_names_its_features(tmp_path, image_folder, tiny_weights):
    images = gather_images([image_folder])
    model = vggfeat.vgg(weights=str(tiny_weights))
    ref = extract(images, tmp_path / "ref.h5", spec=DescriptorSpec(scales=(224,)), model=model,
                  workers=0, progress=False)
    est = features(tiny_weights)
    assert est.get_params()["scales"] == (224,) and clone(est).get_params() == est.get_params()
    X = est.fit_transform(np.array(images.paths[::-1]))  # order follows the input
    np.testing.assert_allclose(X, vggfeat.load_features(ref.output).data[::-1], atol=1e-6)
    assert est.get_feature_names_out()[:2].tolist() == ["fc7_0", "fc7_1"]
    stacked = features(tiny_weights, scales=(224, 256), aggregate="stack").fit(None)
    assert stacked.get_feature_names_out()[32] == "fc7_q256_0"
    assert est.set_output(transform="default") is est
    with pytest.raises(TypeError, match="image paths"):
        est.transform(np.zeros((3, 4)))


def test_pipeline_grid_search_and_cache(tmp_path, image_folder, tiny_weights):
    images = gather_images([image_folder])
    paths, y = np.array(images.paths), np.array(images.labels)
    cache = tmp_path / "cache.h5"
    pipe = make_pipeline(features(tiny_weights, cache=cache), Normalizer(), LinearSVC())
    search = GridSearchCV(pipe, {"linearsvc__C": [0.1, 10.0]}, cv=2).fit(paths, y)
    assert search.predict(paths).shape == (8,)
    cached = vggfeat.load_features(cache)
    assert sorted(cached.paths) == sorted(images.paths)  # every image computed exactly once
    first = features(tiny_weights, cache=cache).fit_transform(paths)
    for p in images.paths:  # a second pass reads the cache only: the images are not needed
        os.remove(p)
    again = features(tiny_weights, cache=cache).fit_transform(paths)
    np.testing.assert_array_equal(first, again)


def test_one_cache_serves_a_grid_search_over_layers(tmp_path, image_folder, tiny_weights):
    images = gather_images([image_folder])
    paths, y = np.array(images.paths), np.array(images.labels)
    cache = tmp_path / "cache.h5"
    pipe = make_pipeline(features(tiny_weights, cache=cache), Normalizer(), LinearSVC())
    GridSearchCV(pipe, {"vggfeatures__layer": ["fc6", "fc7"]}, cv=2).fit(paths, y)
    for layer in ("fc6", "fc7"):
        est = features(tiny_weights, layer=layer, cache=cache).fit(None)
        stored = vggfeat.load_features(cache, group=est.cache_group_)
        assert stored.attrs["layer"] == layer and sorted(stored.paths) == sorted(images.paths)
        np.testing.assert_allclose(est.transform(paths),
                                   features(tiny_weights, layer=layer).fit_transform(paths),
                                   atol=1e-6)
    first = vggfeat.load_features(cache)  # the root: the setting the cache was made with
    assert first.attrs["layer"] in ("fc6", "fc7") and sorted(first.paths) == sorted(images.paths)


def test_cache_recomputes_changed_files_and_retries_fixed_ones(tmp_path, image_folder,
                                                               tiny_weights):
    paths = gather_images([image_folder]).paths
    Path(paths[2]).write_bytes(b"not a jpeg")
    cache = tmp_path / "c.h5"
    X = features(tiny_weights, on_error="nan", cache=cache).fit_transform(paths)
    assert np.isnan(X[2]).all()
    write_image(Path(paths[2]), seed=90)  # fixed: retried because the file changed
    write_image(Path(paths[5]), size=(250, 260), seed=91)  # replaced: its row is recomputed
    X = features(tiny_weights, cache=cache).fit_transform(paths)
    np.testing.assert_allclose(X, features(tiny_weights).fit_transform(paths), atol=1e-6)
    assert len(vggfeat.load_features(cache).paths) == 8


CONCURRENT_USER = """
import sys
from vggfeat.sklearn import VGGFeatures
paths = sys.argv[3:]
VGGFeatures(weights=sys.argv[1], scales=(224,), cache=sys.argv[2], workers=0).fit_transform(paths)
"""


def test_cache_is_safe_under_concurrent_use(tmp_path, image_folder, tiny_weights):
    paths = gather_images([image_folder]).paths
    script = tmp_path / "user.py"
    script.write_text(CONCURRENT_USER)
    cache = tmp_path / "shared.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    users = [subprocess.Popen([sys.executable, str(script), str(tiny_weights), str(cache), *half],
                              env=env, stderr=subprocess.PIPE, text=True)
             for half in (paths[:5], paths[4:])]
    for user in users:
        assert user.wait(timeout=300) == 0, user.stderr.read()
    stored = vggfeat.load_features(cache)
    assert sorted(stored.paths) == sorted(paths)  # no update lost, no row twice
    # The users ran on 1 thread, where the auto backend may pick other layer paths: descriptors
    # then agree to ~1e-6 rather than bit for bit.
    np.testing.assert_allclose(features(tiny_weights, cache=cache).fit_transform(paths),
                               features(tiny_weights).fit_transform(paths), atol=1e-5)


def test_unreadable_images_raise_or_give_nan(tmp_path, image_folder, tiny_weights):
    images = gather_images([image_folder])
    bad = images.paths[2]
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(ValueError, match=re.escape(f"1 image(s) could not be read ({bad}")):
        features(tiny_weights).fit_transform(images.paths)
    cache = tmp_path / "c.h5"
    X = features(tiny_weights, on_error="nan", cache=cache).fit_transform(images.paths)
    assert np.isnan(X[2]).all() and not np.isnan(np.delete(X, 2, axis=0)).any()
    assert vggfeat.load_features(cache).failed[0][0] == bad  # kept: not retried on every call


def reversed_copy(cache, group, to):
    """The cache as another writer could publish it: the same rows, in the opposite order."""
    import shutil

    import h5py

    shutil.copy(cache, to)
    with h5py.File(to, "r+") as f:
        g = f[group]
        for name in ("features", "paths", "file_size", "file_mtime_ns", "file_sha256",
                     "input_sizes"):
            g[name][...] = g[name][:][::-1]
    return to


def test_cache_reads_index_and_rows_from_one_version(tmp_path, image_folder, tiny_weights,
                                                     monkeypatch):
    import vggfeat.cache.store as store

    paths = gather_images([image_folder]).paths
    cache = tmp_path / "c.h5"
    est = features(tiny_weights, cache=cache)
    expected = est.fit_transform(paths)
    replacement = reversed_copy(cache, "/", tmp_path / "next.h5")  # its first setting: the root
    real_strings = store._strings

    def writer_publishes_after_the_index_is_read(dataset):
        if replacement.exists():
            os.replace(replacement, cache)  # a concurrent writer's rename, between two reads
        return real_strings(dataset)

    monkeypatch.setattr(store, "_strings", writer_publishes_after_the_index_is_read)
    np.testing.assert_array_equal(est.transform(paths), expected)
    assert not replacement.exists()  # the writer did publish meanwhile


def test_cache_refuses_garbage_links_and_non_finite_rows(tmp_path, image_folder, tiny_weights):
    import torch

    paths = gather_images([image_folder]).paths
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not HDF5 at all")
    with pytest.raises(CacheError, match=f"{garbage} is not an HDF5 feature file"):
        features(tiny_weights, cache=garbage).fit_transform(paths)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "c.h5.lock")
    with pytest.raises(CacheError, match=r"c\.h5\.lock is a symbolic link"):
        features(tiny_weights, cache=tmp_path / "c.h5").fit_transform(paths)
    assert victim.read_text() == "precious"
    est = features(tiny_weights).fit(paths)
    with torch.no_grad():
        est.model_.head.fc7.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite descriptor"):
        est.transform(paths)
