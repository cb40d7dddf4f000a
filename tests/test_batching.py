"""Full forward passes: same-shape images gathered across loader batches, rows in input order."""

import importlib
import re

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_vgg, write_image

import vggfeat
from vggfeat.data.sources import gather_images
from vggfeat.evaluate.run import evaluate
from vggfeat.descriptors import extract
from vggfeat.models.runner import ShapeBatches

ASPECTS = {(240, 320): 17, (320, 240): 16, (256, 256): 15}  # landscape, portrait, square


@pytest.fixture
def shuffled_photos(tmp_path):
    """48 photos in 3 aspect ratios, in a shuffled order, in two class folders."""
    sizes = [size for size, count in ASPECTS.items() for _ in range(count)]
    order = np.random.default_rng(0).permutation(len(sizes))
    for name, i in enumerate(order):
        write_image(tmp_path / "photos" / f"c{name % 2}" / f"{name:02d}.jpg", size=sizes[i],
                    seed=int(i))
    return tmp_path / "photos"


def test_stream_runs_one_shape_per_pass_within_its_window_and_keeps_input_order():
    shapes = [(4, 6), (6, 4), (5, 5)]
    rng = np.random.default_rng(1)
    images = [[torch.full((3, *shapes[k]), i, dtype=torch.uint8)] for i, k in
              enumerate(rng.integers(0, 3, 40))]
    passes = []

    def forward(scale, views):
        assert len({v.shape for v in views}) == 1 and len(views) <= 4
        passes.append(len(views))
        return torch.stack([v.float().mean() for v in views])

    stream = ShapeBatches(forward, batch_size=4, window=6)
    done = []
    for i, views in enumerate(images):
        stream.add(i, views)
        done += stream.take()
        assert len(stream.waiting) <= 6  # never more than the window held
    stream.finish()
    done += stream.take()
    assert [key for key, _ in done] == list(range(40))
    assert [float(r[0]) for _, r in done] == list(range(40))
    assert sum(passes) == 40 and len(passes) < 40 / 2


def test_run_loader_yields_finished_images_and_failures_after_each_batch():
    shapes = [(4, 6), (6, 4)]
    items = [(i, None, f"bad {i}") if i % 5 == 4 else
             (i, [torch.full((3, *shapes[i % 2]), i, dtype=torch.uint8)], None)
             for i in range(12)]
    loader = [items[k:k + 3] for k in range(0, 12, 3)]  # batches of 3: shapes alternate
    passes, progress = [], []

    def forward(scale, views):
        passes.append(len(views))
        return torch.stack([v.float().mean() for v in views])

    stream = ShapeBatches(forward, batch_size=2, window=8, on_progress=progress.append)
    turns = list(stream.run_loader(loader))
    assert len(turns) == len(loader) + 1  # one after each batch, one after the short passes
    finished = [key for done, _ in turns for key, _ in done]
    assert finished == [i for i in range(12) if i % 5 != 4]  # in input order, each once
    assert [float(r[0]) for done, _ in turns for _, r in done] == finished
    assert [item[2] for _, failed in turns for item in failed] == ["bad 4", "bad 9"]
    assert sum(progress) == pytest.approx(12) and sum(passes) == 10
    # unpack gives the key and the views; out_of_order hands over whatever is finished
    stream = ShapeBatches(forward, batch_size=2, window=8)
    keyed = stream.run_loader(loader, unpack=lambda item: (("key", item[0]), item[1]),
                              out_of_order=True)
    assert sorted(key for done, _ in keyed for key, _ in done) == [("key", i) for i in finished]


def test_flip_pass_gives_the_image_and_its_mirror_image_as_separate_passes_would():
    runner = vggfeat.evaluate.Evaluator(tiny_vgg("A", num_classes=3), "dense")
    batch = torch.randint(0, 256, (2, 3, 224, 256), dtype=torch.uint8)
    with torch.inference_mode():
        maps = runner.flip_pass(batch)
        alone = runner.model.score_map(runner.network_input(batch))
        mirrored = runner.model.score_map(runner.network_input(batch.flip(-1)))
        pooled = runner.flip_pass(batch, lambda x: runner.model.score_map(x).mean((2, 3)),
                                  flip=False)
    assert maps.shape == (2, *alone.shape) and maps.dtype == torch.float32
    torch.testing.assert_close(maps[0], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maps[1], mirrored, rtol=1e-4, atol=1e-5)
    assert pooled.shape == (1, 2, 3)
    torch.testing.assert_close(pooled[0], alone.mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_extract_fills_passes_across_batches_with_the_same_rows(tmp_path, shuffled_photos,
                                                               tiny_weights):
    out = tmp_path / "batched.h5"
    proc = run_cli("extract", shuffled_photos, "-o", out, "--weights", tiny_weights, "--scales",
                   "224,256", "--batch-size", "8", "--workers", "0")
    per_forward = float(re.search(r"images per forward: ([\d.]+)", proc.stderr).group(1))
    assert per_forward >= 6  # grouping within each loader batch of 8 alone gives 3.0 here
    single = extract([shuffled_photos], tmp_path / "single.h5", model=vggfeat.vgg(
        weights=str(tiny_weights)), spec=vggfeat.DescriptorSpec(scales=(224, 256)),
        batch_size=1, workers=0, progress=False)
    assert single.images_per_forward == 1.0
    batched, alone = vggfeat.load_features(out), vggfeat.load_features(single.output)
    assert batched.paths == alone.paths == gather_images([shuffled_photos]).paths
    np.testing.assert_allclose(batched.data, alone.data, rtol=1e-5, atol=1e-6)


def test_dense_evaluation_fills_passes_with_the_same_posteriors(shuffled_photos):
    images, model = gather_images([shuffled_photos]), tiny_vgg("A")
    batched = evaluate(images, model, method="dense", scales=(224,), batch_size=8, workers=0,
                       progress=False)
    alone = evaluate(images, model, method="dense", scales=(224,), batch_size=1, workers=0,
                     progress=False)
    assert batched.images_per_forward >= 6 and alone.images_per_forward == 1.0
    assert batched.paths == alone.paths == images.paths
    np.testing.assert_allclose(batched.posteriors, alone.posteriors, rtol=1e-5, atol=1e-7)


def test_progress_moves_with_every_pass_not_only_when_images_finish():
    """Two scales, three shapes: images finish in bursts, but every pass reports its share."""
    reports = []
    stream = ShapeBatches(lambda s, views: torch.zeros(len(views)), batch_size=2, window=8,
                          on_progress=reports.append)
    shapes = [(4, 6), (6, 4), (5, 5)] * 2
    for i, shape in enumerate(shapes):
        stream.add(i, [torch.zeros(3, *shape, dtype=torch.uint8),
                       torch.zeros(3, shape[0] * 2, shape[1] * 2, dtype=torch.uint8)])
    stream.finish()
    assert reports == [1.0] * 6  # each pass: 2 views of 2-scale images = one image's worth
    assert sum(reports) == pytest.approx(len(shapes))


def test_extract_progress_bar_moves_per_pass(tmp_path, image_folder, tiny_weights, monkeypatch):
    run = importlib.import_module("vggfeat.descriptors.run")
    updates, make_bar = [], run.image_bar

    def recording_bar(*args, **kwargs):
        bar = make_bar(*args, **kwargs)
        update = bar.update
        bar.update = lambda n=1: (updates.append(n), update(n))[1]
        return bar

    monkeypatch.setattr(run, "image_bar", recording_bar)
    model = vggfeat.vgg(weights=str(tiny_weights))
    extract([image_folder], tmp_path / "f.h5", model=model,
            spec=vggfeat.DescriptorSpec(scales=(224, 256)), batch_size=8, workers=0)
    assert sum(updates) == pytest.approx(8)  # 8 images, each counted once in all
    assert len(updates) > 2  # not one jump per loader batch of 8


def test_cpu_passes_are_split_to_a_pixel_budget_with_the_same_rows():
    """8 same-shape images in one group run as 4 passes of 2 when a pass may hold 2 images'
    pixels: the memory of a pass is bounded, the descriptors are those of one big pass."""
    from vggfeat.descriptors import DescriptorNet, DescriptorSpec
    from vggfeat.models.runner import CPU_MAP_BYTES_PER_PASS

    gen = torch.Generator().manual_seed(0)
    items = [[torch.randint(0, 256, (3, 224, 256), generator=gen, dtype=torch.uint8)]
             for _ in range(8)]
    model, spec = tiny_vgg("A"), DescriptorSpec(scales=(224,))
    whole = DescriptorNet(model, spec, batch_size=8)
    # the default on a CPU: the first map (4 channels here) of an image and its mirror
    assert whole.pixels_per_pass == CPU_MAP_BYTES_PER_PASS // (4 * 4 * 2)
    assert DescriptorNet(vggfeat.vgg("D", weights="random"), spec).pixels_per_pass == 1 << 19
    whole.pixels_per_pass = None
    split = DescriptorNet(model, spec, batch_size=8)
    split.pixels_per_pass = 2 * 224 * 256
    np.testing.assert_allclose(split(items).numpy(), whole(items).numpy(), rtol=1e-5, atol=1e-6)
    assert (whole.forward_passes, split.forward_passes) == (1, 4)
    assert split.images_per_forward == 2.0
