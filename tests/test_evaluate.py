"""`vggfeat evaluate`: crop grid, dense/multi-crop posteriors, top-k, fusion, ImageNet layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_vgg, write_image
from PIL import Image
from scipy.io import savemat

from vggfeat.data.imagenet import imagenet_classes, imagenet_folder
from vggfeat.data.images import read_image, rescale_views
from vggfeat.evaluate import (
    Evaluator,
    crop_grid,
    default_test_scales,
    evaluate,
    fuse,
    load_posteriors,
    markdown_report,
    save_posteriors,
    topk_error,
)

WNIDS = ["n01440764", "n01443537", "n02119789"]  # torchvision indices 0, 1 and 278


@pytest.fixture
def val_folder(tmp_path):
    root = tmp_path / "val"
    for c, wnid in enumerate(WNIDS):
        for i in range(2):
            write_image(root / wnid / f"ILSVRC2012_val_{c * 2 + i + 1:08d}.JPEG", size=(256, 300),
                        seed=c * 2 + i, format="JPEG")
    return root


def test_crop_grid_geometry():
    grid = crop_grid(256, 341)
    assert len(grid) == 25 and grid[0] == (0, 0) and grid[-1] == (256 - 224, 341 - 224)
    assert sorted({t for t, _ in grid}) == [0, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="at least 224"):
        crop_grid(200, 300)


def test_multi_crop_runs_150_crops_for_three_scales():
    model = tiny_vgg("A")
    evaluator = Evaluator(model, "multi-crop")
    image = torch.randint(0, 255, (3, 240, 320), dtype=torch.uint8)
    post = evaluator([rescale_views(image, (256, 288, 320))])
    assert evaluator.crops_run == 150
    assert post.shape == (1, 1000) and torch.allclose(post.sum(1), torch.ones(1))


def test_dense_posterior_is_flip_averaged_softmax_of_mean_scores():
    model = tiny_vgg("B")
    image = torch.randint(0, 255, (3, 256, 300), dtype=torch.uint8)
    post = Evaluator(model, "dense")([[image]])[0]
    x = model.preprocessing(image[None])
    with torch.no_grad():
        a = model.score_map(x).mean((2, 3)).softmax(1)
        b = model.score_map(x.flip(-1)).mean((2, 3)).softmax(1)
    torch.testing.assert_close(post, ((a + b) / 2)[0], rtol=1e-4, atol=1e-6)
    both = Evaluator(model, "dense+multi-crop")([[image]])[0]
    crops = Evaluator(model, "multi-crop")([[image]])[0]
    torch.testing.assert_close(both, (post + crops) / 2, rtol=1e-4, atol=1e-6)


def test_topk_math():
    post = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    labels = np.array([1, 2, 0, 2])
    assert topk_error(post, labels, 1) == 75.0  # only the first is right
    assert topk_error(post, labels, 2) == 50.0  # image 1 (label 2 second best) joins
    assert topk_error(post, labels, 3) == 0.0


def test_fusion_averages_posteriors(tmp_path):
    from vggfeat.evaluate import EvalResult

    labels = np.array([0, 1])
    a = EvalResult(np.array([[0.9, 0.1], [0.6, 0.4]], np.float32), labels, ["x", "y"], "dense",
                   (384,), {"arch": "D"})
    b = EvalResult(np.array([[0.4, 0.6], [0.1, 0.9]], np.float32), labels[::-1].copy(), ["y", "x"],
                   "multi-crop", (384,), {"arch": "E"})
    b.labels = np.array([1, 0])
    fused = fuse([load_posteriors(save_posteriors(a, tmp_path / "a.h5")),
                  load_posteriors(save_posteriors(b, tmp_path / "b.h5"))])
    np.testing.assert_allclose(fused.posteriors, [[0.5, 0.5], [0.5, 0.5]])
    assert fused.attrs["arch"] == "D+E"
    # Nets of unknown S, one dense and one multi-crop at Q=384: no row of Table 6 is comparable.
    assert markdown_report(fused).rstrip().endswith("| — |")


def _net(arch, s, method, scales=(256, 384, 512)):
    from vggfeat.evaluate import EvalResult

    return EvalResult(np.eye(3, dtype=np.float32), np.arange(3), ["x", "y", "z"], method, scales,
                      {"arch": arch, "train_scale": s})


@pytest.mark.parametrize("method,row", [("dense", "24.0 / 7.1"), ("multi-crop", "23.9 / 7.2"),
                                        ("dense+multi-crop", "23.7 / 6.8")])
def test_fusion_report_cites_the_table_6_row_of_what_was_fused(tmp_path, method, row):
    fused = fuse([_net("D", "256-512", method), _net("E", "256-512", method)])
    assert f"| {row} (Table 6) |" in markdown_report(fused)
    again = load_posteriors(save_posteriors(fused, tmp_path / "de.h5"))  # members survive the file
    assert f"| {row} (Table 6) |" in markdown_report(again)


def test_fusion_report_has_no_paper_row_for_other_fusions():
    jitter = "256-512"
    for nets in ([_net("D", jitter, "dense", (256,)), _net("E", jitter, "dense", (256,))],
                 [_net("D", jitter, "dense"), _net("E", jitter, "multi-crop")],
                 [_net("D", "256", "dense"), _net("E", jitter, "dense")],
                 [_net("D", jitter, "dense"), _net("D", jitter, "dense")],
                 [_net("C", jitter, "dense"), _net("D", jitter, "dense"), _net("E", jitter, "dense")]):
        assert markdown_report(fuse(nets)).rstrip().endswith("| — |"), nets
    submission = [_net(c, s, "dense", q) for c, s, q in [
        ("D", "256", (224, 256, 288)), ("D", "384", (352, 384, 416)), ("D", jitter, (256, 384, 512)),
        ("C", "256", (224, 256, 288)), ("C", "384", (352, 384, 416)), ("E", "256", (224, 256, 288)),
        ("E", "384", (352, 384, 416))]]
    assert "| 24.7 / 7.5 (Table 6, ILSVRC submission) |" in markdown_report(fuse(submission))
    # Fusing a fusion counts its nets: (D+E)+C is the same three nets as above.
    three = fuse([fuse([_net("D", jitter, "dense"), _net("E", jitter, "dense")]),
                  _net("C", jitter, "dense")])
    assert three.attrs["fused"] == 3 and markdown_report(three).rstrip().endswith("| — |")


def test_default_test_scales_follow_the_paper():
    assert default_test_scales("dense", "256") == (224, 256, 288)
    assert default_test_scales("dense", "256-512") == (256, 384, 512)
    assert default_test_scales("center-crop", None) == (256,)
    # S − 32 would fall below the 224 window that dense evaluation needs: 224, 256 instead.
    assert default_test_scales("dense", "224") == (224, 256)
    assert default_test_scales("multi-crop", "224") == (224, 256)


def test_class_folders_use_torchvision_order(val_folder):
    images = imagenet_folder(val_folder)
    assert images.labels == [0, 0, 1, 1, 278, 278]
    assert imagenet_classes()[0][278] == "n02119789" and len(images.class_names) == 1000


def test_flat_val_with_devkit(tmp_path, val_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(val_folder.glob("*/*.JPEG")):
        p.rename(flat / p.name)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # The devkit numbers synsets its own way (kit fox is 1), not in sorted-wnid order.
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(1, "n02119789", "kit fox", 0), (2, "n01440764", "tench", 0),
                        (3, "n01443537", "goldfish", 0), (1001, "n00001740", "entity", 3)],
                       dtype=dtype)
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n2\n3\n3\n1\n1\n")
    images = imagenet_folder(flat, devkit=devkit.parent)
    assert images.labels == [0, 0, 1, 1, 278, 278]
    with pytest.raises(ValueError, match="--devkit"):
        imagenet_folder(flat)


def test_evaluate_end_to_end_and_bad_files(val_folder, tmp_path):
    bad = val_folder / WNIDS[0] / "ILSVRC2012_val_00000099.JPEG"
    bad.write_bytes(b"")
    model = tiny_vgg("D")
    result = evaluate(imagenet_folder(val_folder), model, method="dense", scales=(224, 256),
                      workers=0, progress=False)
    assert [Path(p).name for p, _ in result.failed] == [bad.name]
    assert result.labels.tolist() == [0, 0, 1, 1, 278, 278]
    # Each row is the dense posterior of that very image, whatever the batching and the loader.
    evaluator = Evaluator(model, "dense")
    expected = torch.cat([evaluator([rescale_views(read_image(p), (224, 256))])
                          for p in result.paths])
    np.testing.assert_allclose(result.posteriors, expected.numpy(), rtol=1e-4, atol=1e-7)
    # The errors are those of the posteriors: a known top-1/top-5 pattern is scored exactly.
    ranked = np.argsort(-result.posteriors, axis=1)
    planted = result.labels.copy()
    planted[:2] = ranked[:2, 0]  # two top-1 hits
    planted[2:4] = ranked[2:4, 3]  # two top-5 hits only
    result.labels = planted
    assert result.top1_error == pytest.approx(100 * 4 / 6)
    assert result.top5_error == pytest.approx(100 * 2 / 6)


def test_evaluate_takes_the_training_scale_without_touching_the_model(val_folder):
    model = tiny_vgg("A")
    meta = dict(model.weights_meta)
    result = evaluate(imagenet_folder(val_folder), model, method="dense", train_scale="256",
                      workers=0, progress=False)
    assert result.scales == (224, 256, 288)  # the paper's {S-32, S, S+32}
    assert result.attrs["train_scale"] == "256"
    assert model.weights_meta == meta


def test_cli_evaluate_fuse_and_scoremap(val_folder, tmp_path, tiny_weights):
    out = tmp_path / "d.json"
    run_cli("evaluate", "--weights", tiny_weights, "--data", val_folder, "--method",
            "dense+multi-crop", "--scales", "256", "--json", out, "--save-posteriors",
            tmp_path / "d.h5", "--workers", "0", "--quiet", "--train-scale", "256-512",
            "--backend", "winograd")
    summary = json.loads(out.read_text())
    assert {"top1_error", "top5_error", "images", "method", "scales"} <= set(summary)
    assert summary["backend"] == "winograd"
    assert summary["images"] == 6 and summary["scales"] == [256]
    run_cli("evaluate", "--weights", tiny_weights, "--data", val_folder, "--method", "center-crop",
            "--save-posteriors", tmp_path / "c.h5", "--workers", "0", "--quiet")
    fused = run_cli("evaluate", "--fuse", tmp_path / "d.h5", "--fuse", tmp_path / "c.h5")
    assert "| D+D |" in fused.stdout
    png = tmp_path / "map.png"
    run_cli("scoremap", next(val_folder.glob("*/*.JPEG")), "-o", png, "--weights", tiny_weights,
            "--scale", "256")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 200


def test_the_fused_row_describes_each_members_method_and_test_scales(tmp_path):
    fused = fuse([_net("D", "256", "dense", (224, 256, 288)),
                  _net("D", "256", "multi-crop", (256,))])
    assert fused.method == "fusion"  # not "dense+multi-crop", the method of Table 5
    row = markdown_report(fused).splitlines()[-1]
    assert row.startswith("| D+D | 256 | fusion (dense, multi-crop) | 224,256,288 + 256 | 3 |")
    again = load_posteriors(save_posteriors(fused, tmp_path / "f.h5"))
    assert markdown_report(again).splitlines()[-1] == row
