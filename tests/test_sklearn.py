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


def counting_extract(monkeypatch):
    """Record what VGGFeatures computes into its cache (it adds through vggfeat extract)."""
    import vggfeat.sklearn as sk

    calls, real = [], sk.extract
    monkeypatch.setattr(sk, "extract", lambda images, output, **kw: (
        kw.get("add") and calls.append((len(images), output))) or real(images, output, **kw))
    return calls


def tiny_extract(images, output, tiny_weights, **kwargs):
    return extract(images, output, spec=DescriptorSpec(scales=(224,)),
                   model=vggfeat.vgg(weights=str(tiny_weights)), workers=0, progress=False,
                   **kwargs)


def test_an_extract_output_is_a_cache_and_holds_further_settings(tmp_path, image_folder,
                                                                   tiny_weights, monkeypatch):
    import h5py

    from vggfeat.cache.store import descriptor_groups

    images, out = gather_images([image_folder]), tmp_path / "feats.h5"
    tiny_extract(images, out, tiny_weights)
    ref, calls = vggfeat.load_features(out), counting_extract(monkeypatch)
    paths = images.paths[::-1]
    np.testing.assert_array_equal(features(tiny_weights, cache=out).fit_transform(paths),
                                  ref.data[::-1])
    assert calls == []  # the extract output's rows, nothing computed
    fc6 = features(tiny_weights, layer="fc6", cache=out).fit(None)
    X6 = fc6.transform(paths)
    np.testing.assert_allclose(X6, features(tiny_weights, layer="fc6").fit_transform(paths),
                               atol=1e-6)
    with h5py.File(out) as f:
        assert descriptor_groups(f) == ["/", fc6.cache_group_]
    extra = str(write_image(tmp_path / "more" / "x.jpg", seed=5))
    features(tiny_weights, cache=out).fit_transform([extra, paths[0]])  # added to the root
    grown = vggfeat.load_features(out)
    assert grown.paths == ref.paths + [extra] and grown.target.tolist() == [*ref.target, -1]
    assert grown.target_names == ref.target_names and len(calls) == 2
    write_image(Path(images.paths[0]), seed=77)  # changed: extract's rerun rewrites the root
    rerun = tiny_extract(images, out, tiny_weights)
    assert rerun.computed == 1 and rerun.removed == 1  # (extract: the output holds its inputs)
    kept = vggfeat.load_features(out, group=fc6.cache_group_)
    assert kept.paths == paths and kept.attrs["layer"] == "fc6"  # the other setting, kept
    np.testing.assert_array_equal(kept.data, X6)
    for p in images.paths:  # rows of deleted images are served: nothing computed
        os.remove(p)
    np.testing.assert_array_equal(fc6.transform(paths), X6)
    assert len(calls) == 2


def test_a_store_is_a_cache_and_holds_further_settings_in_sub_stores(tmp_path, image_folder,
                                                                     tiny_weights, monkeypatch):
    from vggfeat.cache.sharded import describe

    images, store = gather_images([image_folder]), tmp_path / "feats"
    tiny_extract(images, store, tiny_weights)
    ref, calls = vggfeat.load_features(store), counting_extract(monkeypatch)
    est = features(tiny_weights, cache=store)
    X = est.fit_transform(ref.paths)
    assert calls == [] and est.cache_group_ and np.array_equal(X, ref.data)
    extra = str(write_image(tmp_path / "more" / "x.jpg", seed=5))
    np.testing.assert_allclose(est.transform([extra]),
                               features(tiny_weights).fit_transform([extra]), atol=1e-6)
    grown = vggfeat.load_features(store)  # the others kept, with their labels
    assert grown.paths == sorted(ref.paths + [extra]) and len(calls) == 1
    assert [grown.target_names[t] if t >= 0 else None for t in grown.target] == [
        None if p == extra else ref.target_names[ref.target[ref.paths.index(p)]]
        for p in grown.paths]
    fc6 = features(tiny_weights, layer="fc6", cache=store).fit(None)
    X6 = fc6.transform(ref.paths)
    assert (store / "alt" / fc6.cache_group_ / "settings.json").is_file()
    np.testing.assert_array_equal(vggfeat.load_features(store, group=fc6.cache_group_).data, X6)
    np.testing.assert_array_equal(vggfeat.load_features(store, group=est.cache_group_).data,
                                  grown.data)
    info = "\n".join(describe(store))
    assert f"alt/{fc6.cache_group_}: layer fc6" in info and "foreign" not in info
    assert tiny_extract(images, store, tiny_weights).removed == 1  # the extra row goes
    for p in images.paths:
        os.remove(p)
    np.testing.assert_array_equal(fc6.transform(ref.paths), X6)
    np.testing.assert_array_equal(est.transform(ref.paths), X)
    assert len(calls) == 2


def test_a_cache_of_an_earlier_version_is_read_and_updated_as_it_is(tmp_path, image_folder,
                                                                    tiny_weights):
    import h5py

    images = gather_images([image_folder])
    tiny_extract(images, tmp_path / "ref.h5", tiny_weights)
    est, old = features(tiny_weights).fit(None), tmp_path / "old.h5"
    with h5py.File(tmp_path / "ref.h5") as src, h5py.File(old, "w") as dst:
        group = dst.create_group(est.cache_group_)  # what VGGFeatures wrote before: groups only
        for member in src:
            src.copy(src[member], group, name=member)
        group.attrs.update(src.attrs)
    extra = str(write_image(tmp_path / "more" / "x.jpg", seed=5))
    X = features(tiny_weights, cache=old).fit_transform(images.paths + [extra])
    np.testing.assert_allclose(X, features(tiny_weights).fit_transform(images.paths + [extra]),
                               atol=1e-6)
    with h5py.File(old) as f:
        assert list(f) == [est.cache_group_] and len(f[est.cache_group_]["paths"]) == 9
    assert len(vggfeat.load_features(old).paths) == 9
    assert vggfeat.load_features(old, group=est.cache_group_).paths[-1] == extra


def test_a_killed_call_resumes_from_what_it_published(tmp_path, image_folder, tiny_weights,
                                                      monkeypatch):
    import vggfeat.descriptors.run as run
    from vggfeat.cache.store import parts_dir

    paths, cache = gather_images([image_folder]).paths, tmp_path / "c.h5"
    features(tiny_weights, cache=cache).fit_transform(paths[:2])
    fc6 = features(tiny_weights, layer="fc6", cache=cache).fit(None)
    real_finish = run._finish
    monkeypatch.setattr(run, "_finish", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed once every row was published
        fc6.transform(paths)
    assert (parts_dir(cache, fc6.cache_group_) / "manifest.json").is_file()
    monkeypatch.setattr(run, "_finish", real_finish)
    expected, nets = features(tiny_weights, layer="fc6").fit_transform(paths), []
    monkeypatch.setattr(run, "DescriptorNet", lambda *a, **k: nets.append(1))
    np.testing.assert_allclose(fc6.transform(paths), expected, atol=1e-6)
    assert nets == [] and not parts_dir(cache, fc6.cache_group_).exists()


def test_links_planted_at_a_store_lock_or_a_setting_parts_are_refused(tmp_path, image_folder,
                                                                     tiny_weights):
    from vggfeat.cache.store import parts_dir

    paths = gather_images([image_folder]).paths[:2]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "feats.lock")
    with pytest.raises(CacheError, match=r"feats\.lock is a symbolic link"):
        features(tiny_weights, cache=tmp_path / "feats").fit_transform(paths)
    cache = tmp_path / "c.h5"
    features(tiny_weights, cache=cache).fit_transform(paths)
    fc6 = features(tiny_weights, layer="fc6", cache=cache).fit(None)
    os.symlink(tmp_path, parts_dir(cache, fc6.cache_group_))
    with pytest.raises(CacheError, match=r"\.parts is a symbolic link"):
        fc6.transform(paths)
    assert victim.read_text() == "precious"


def test_a_store_cache_reads_one_state_while_a_writer_compacts(tmp_path, image_folder,
                                                              tiny_weights, monkeypatch):
    import vggfeat.cache.lookup as lookup
    from vggfeat.cache.sharded import compact

    paths, store = gather_images([image_folder]).paths, tmp_path / "feats"
    est = features(tiny_weights, cache=store)
    est.fit_transform(paths[:4])
    expected = est.transform(paths)  # two updates: two shards
    real, done = lookup.plan_update, []

    def compaction_after_the_replay(*args, **kwargs):
        plan = real(*args, **kwargs)
        if not done:  # retires and deletes every shard the reader listed
            done.append(compact(store, threshold=0.0))
        return plan

    monkeypatch.setattr(lookup, "plan_update", compaction_after_the_replay)
    np.testing.assert_array_equal(est.transform(paths), expected)
    assert done and done[0].retired == 2
