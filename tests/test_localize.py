"""Localisation (Appendix A): box files, box geometry, the metric, the greedy merge, the nets, the
protocols and the CLI, on files written in the real ILSVRC layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vgg, write_image
from PIL import Image

import vggfeat
from vggfeat.data.boxes import ImageBoxes, read_boxes, write_loc_csv
from vggfeat.data.imagenet import imagenet_classes
from vggfeat.errors import InputError, WeightsError
from vggfeat.localize import (
    BoxAugment,
    Localizer,
    best_boxes,
    box_head,
    decode,
    encode,
    euclidean_loss,
    greedy_merge,
    gt_class_errors,
    iou,
    load_localizer,
    localized,
    score_guesses,
)
from vggfeat.localize.geometry import dense_boxes, to_original, view_geometry
from vggfeat.localize.net import attach_head, class_boxes
from vggfeat.train import train_transform

WNIDS = list(imagenet_classes()[0][:3])


def ilsvrc_xml(path: Path, filename: str, size: tuple[int, int], objects) -> Path:
    """A Pascal-VOC XML box file as in the ILSVRC2012 bbox archives."""
    w, h = size
    body = "".join(
        f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>" for wnid, (x0, y0, x1, y1) in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><folder>{path.parent.name}</folder><filename>{filename}"
                    f"</filename><source><database>ILSVRC_2012</database></source><size><width>"
                    f"{w}</width><height>{h}</height><depth>3</depth></size><segmented>0"
                    f"</segmented>{body}</annotation>")
    return path


# -- readers -------------------------------------------------------------------------------

def test_xml_folders_in_train_and_val_layouts(tmp_path):
    train = tmp_path / "bbox_train"
    ilsvrc_xml(train / WNIDS[0] / f"{WNIDS[0]}_10026.xml", f"{WNIDS[0]}_10026", (500, 375),
               [(WNIDS[0], (10, 20, 300, 200)), (WNIDS[0], (250, 100, 480, 370))])
    ilsvrc_xml(train / WNIDS[1] / f"{WNIDS[1]}_7.xml", f"{WNIDS[1]}_7", (200, 300),
               [(WNIDS[1], (0, 0, 200, 300))])
    table = read_boxes(train)
    assert sorted(table.boxes) == [f"{WNIDS[0]}_10026", f"{WNIDS[1]}_7"]
    first = table.get(f"/data/train/{WNIDS[0]}/{WNIDS[0]}_10026.JPEG")
    assert first.wnids == [WNIDS[0]] * 2 and first.size == (500, 375)
    np.testing.assert_array_equal(first.xyxy, [[10, 20, 300, 200], [250, 100, 480, 370]])

    val = tmp_path / "bbox_val"
    ilsvrc_xml(val / "ILSVRC2012_val_00000001.xml", "ILSVRC2012_val_00000001", (500, 375),
               [(WNIDS[2], (5, 5, 100, 100))])
    assert read_boxes(val).get("ILSVRC2012_val_00000001.JPEG").wnids == [WNIDS[2]]


def test_bad_boxes_are_dropped_and_reported_by_file(tmp_path):
    ilsvrc_xml(tmp_path / "a.xml", "a", (100, 100),
               [(WNIDS[0], (10, 10, 10, 50)), (WNIDS[0], (10, 10, 150, 50)),
                (WNIDS[0], (10, 10, 60, 50)), (WNIDS[0], (0, 0, 101, 100))])
    table = read_boxes(tmp_path)
    assert len(table.get("a").wnids) == 2  # the 1 px overhang is tolerated
    assert [Path(f).name for f, _ in table.bad] == ["a.xml", "a.xml"]
    assert "zero or negative area" in table.bad[0][1] and "outside the 100×100" in table.bad[1][1]
    csv_file = tmp_path / "LOC_val_solution.csv"
    csv_file.write_text(f"ImageId,PredictionString\nimg1,{WNIDS[0]} 1 2 30 40 {WNIDS[0]} 5 5 5 9 \n")
    table = read_boxes(csv_file)
    assert len(table.get("img1").wnids) == 1 and table.bad[0][0].endswith("LOC_val_solution.csv:2")


def test_a_non_numeric_image_size_in_an_xml_file_is_an_error_naming_file_and_field(tmp_path):
    xml = ilsvrc_xml(tmp_path / "a.xml", "a", (100, 100), [(WNIDS[0], (10, 10, 60, 50))])
    xml.write_text(xml.read_text().replace("<width>100</width>", "<width>abc</width>"))
    with pytest.raises(InputError, match=r"a.xml: <size><width> is 'abc', not a whole number "
                                         r"of pixels"):
        read_boxes(tmp_path)


def test_a_training_box_outside_its_image_is_reported_with_the_image(tmp_path):
    from vggfeat.localize.run import LocImages
    from vggfeat.localize.train import Localization

    images = vggfeat.data.ImageList(["/data/a.JPEG", "/data/b.JPEG"], [0, 1], WNIDS[:2])
    boxes = [np.array([[0, 0, 101, 50]], np.float32), np.array([[10, 10, 150, 50]], np.float32)]
    task = Localization(images, boxes, LocImages([], []), head="pcr")
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    transform = train_transform((224, 224), flip=False)
    view, target = task.sample(image, 0, transform)  # 1 px over the edge: clipped
    assert view.shape == (3, 224, 224) and target[0] == 0 and target[3] == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"/data/b.JPEG: box \(10, 10, 150, 50\) is outside the "
                                         r"100×100 image"):
        task.sample(image, 1, transform)


def test_loc_csv_reader_and_writer_round_trip(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\n"
                    f"ILSVRC2012_val_00008726,{WNIDS[1]} 124 117 323 268 {WNIDS[1]} 1 2 50 60 \n"
                    f"ILSVRC2012_val_00000001,{WNIDS[0]} 0 0 499 374 \n")
    table = read_boxes(path)
    assert table.get("ILSVRC2012_val_00008726").xyxy.tolist() == [[124, 117, 323, 268],
                                                                  [1, 2, 50, 60]]
    out = write_loc_csv(tmp_path / "copy.csv", {k: list(zip(v.wnids, v.xyxy))
                                                for k, v in table.boxes.items()})
    again = read_boxes(out)
    for name, boxes in table.boxes.items():
        assert again.boxes[name].wnids == boxes.wnids
        np.testing.assert_array_equal(again.boxes[name].xyxy, boxes.xyxy)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"ImageId,PredictionString\nx,{WNIDS[0]} 1 2 3\n")
    with pytest.raises(InputError, match=r"bad.csv:2.*'wnid xmin ymin xmax ymax' groups"):
        read_boxes(bad)
    with pytest.raises(InputError, match="x.jpg is not a text CSV file"):
        read_boxes(write_image(tmp_path / "x.jpg"))
    (tmp_path / "plain.csv").write_text("path,label\na.jpg,cat\n")
    with pytest.raises(InputError, match="plain.csv: expected the header 'ImageId,Prediction"):
        read_boxes(tmp_path / "plain.csv")


# -- geometry -------------------------------------------------------------------------------

def test_box_encoding_is_relative_to_the_224_window():
    box = torch.tensor([[0.0, 0.0, 224.0, 224.0], [56.0, 28.0, 112.0, 196.0]])
    np.testing.assert_allclose(encode(box), [[0.5, 0.5, 1, 1], [0.375, 0.5, 0.25, 0.75]])
    torch.testing.assert_close(decode(encode(box)), box)


def object_image(size, box, seed=0):
    """A flat grey image with a white rectangle at ``box`` (x0, y0, x1, y1): uint8 3×H×W."""
    h, w = size
    image = torch.full((3, h, w), 60, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = 255
    return image


def visible_box(view: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(view[0] > 160, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("scale,flip", [((256, 256), False), ((256, 256), True), ((300, 400), True)])
def test_augmented_box_follows_the_object_through_rescale_crop_and_flip(scale, flip):
    augment = BoxAugment(train_transform(scale, flip=flip))
    for seed in range(6):
        box = (60 + 10 * seed, 40, 260, 200 + 5 * seed)
        image = object_image((300, 420), box)
        torch.manual_seed(seed)
        view, target = augment((image, np.array([box], np.float32)))
        assert view.shape == (3, 224, 224)
        # The target is the object as the crop shows it (clipped at the crop's edges).
        np.testing.assert_allclose(decode(target).tolist(), visible_box(view), atol=3)


def test_a_crop_that_misses_the_object_is_redrawn_or_centred_on_it():
    box = (600, 10, 630, 40)  # a small object in a corner: random crops mostly miss it
    image = object_image((320, 640), box)
    augment = BoxAugment(train_transform((320, 320), flip=False), tries=1)
    for seed in range(10):
        torch.manual_seed(seed)
        view, target = augment((image, np.array([box], np.float32)))
        cx, cy, w, h = target.tolist()
        assert w * 224 >= 15 and h * 224 >= 15  # at least half of the object is in view
        np.testing.assert_allclose(decode(target).tolist(), visible_box(view), atol=3)


def test_view_geometry_maps_view_boxes_back_to_the_original_image():
    for (h, w), q in [((375, 500), 256), ((500, 333), 384), ((200, 1200), 224)]:
        g = view_geometry(h, w, q)
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        view = vggfeat.data.images.rescale_views(image, (q,))[0]
        assert (g.height, g.width) == tuple(view.shape[-2:])
        original = torch.tensor([[10.0, 20.0, w - 30.0, h - 5.0]])
        in_view = (original - torch.tensor([g.left, g.top, g.left, g.top])) * \
            torch.tensor([g.sx, g.sy, g.sx, g.sy])
        torch.testing.assert_close(to_original(in_view, g, w, h), original)


def test_dense_boxes_sit_in_each_positions_window_and_flips_mirror_back():
    params = torch.tensor([0.5, 0.5, 0.5, 0.5])  # a 112 px box centred in its window
    maps = params.view(1, 1, 4, 1, 1).expand(2, 1, 4, 2, 3)
    boxes = dense_boxes(maps, view_width=288)  # a 288×256 view: map 2×3
    assert boxes.shape == (2, 1, 2, 3, 4)
    torch.testing.assert_close(boxes[0, 0, 1, 2], torch.tensor([64 + 56.0, 32 + 56, 64 + 168, 32 + 168]))
    # In the flipped view, position (1, 2) is the window at x = 64 of the mirror image.
    torch.testing.assert_close(boxes[1, 0, 1, 2], torch.tensor([288 - 232.0, 88, 288 - 120, 200]))


# -- metric and merge ---------------------------------------------------------------------

def test_iou_and_the_localisation_metric_on_hand_computed_cases():
    assert iou([[0, 0, 10, 10]], [[5, 0, 15, 10]]).item() == pytest.approx(1 / 3)
    assert iou([[0, 0, 10, 10]], [[20, 20, 30, 30]]).item() == 0
    truth = ImageBoxes(["cat", "cat", "dog"], np.array([[0, 0, 100, 100], [200, 0, 300, 100],
                                                        [0, 200, 100, 300]], np.float32))
    good_cat, good_dog = (210, 0, 300, 100), (0, 200, 100, 251)  # IoU 0.9 and 0.51
    half_dog = (0, 200, 100, 250)  # IoU exactly 0.5
    assert localized([("cat", good_cat)], truth, 1)
    assert localized([("dog", good_dog)], truth, 1)
    assert not localized([("dog", half_dog)], truth, 1)  # the paper's rule: IoU above 0.5
    assert gt_class_errors(np.array([half_dog, good_dog], np.float32),
                           [truth.of_class("dog")] * 2).tolist() == [1.0, 0.0]
    assert not localized([("cat", good_dog)], truth, 5)  # right place, wrong class
    assert not localized([("dog", good_cat)], truth, 5)
    guesses = [("bird", good_cat), ("dog", (0, 0, 50, 50)), ("cat", good_cat)]
    assert not localized(guesses, truth, 1) and localized(guesses, truth, 5)
    assert not localized(guesses, truth, 2)
    from vggfeat.data.boxes import BoxTable

    table = BoxTable({"a": truth, "b": truth, "c": truth, "d": truth})
    score = score_guesses({"a": [("cat", good_cat)], "b": guesses, "c": [("cat", good_dog)]}, table)
    assert (score.top1_loc_error, score.top5_loc_error, score.missing) == (75.0, 50.0, 1)


def boxes_around(centre, size, n, jitter, rng):
    c = np.asarray(centre) + rng.uniform(-jitter, jitter, (n, 2))
    return np.concatenate([c - size / 2, c + size / 2], axis=1)


def test_greedy_merge_on_hand_made_box_sets():
    # Two identical pairs far apart: each pair merges into its own average, scores add up.
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11], [100, 100, 140, 140], [102, 100, 142, 140]]],
                     float)
    merged, scores, alive = greedy_merge(boxes, np.array([[0.1, 0.2, 0.3, 0.5]]))
    assert alive.tolist() == [[True, False, True, False]]
    np.testing.assert_allclose(merged[0, alive[0]], [[0.5, 0.5, 10.5, 10.5], [101, 100, 141, 140]])
    np.testing.assert_allclose(scores[0, alive[0]], [0.3, 0.8])
    # Nothing merges below the threshold; everything merges with a huge one.
    assert greedy_merge(boxes, np.ones((1, 4)), threshold=1e-3)[2].all()
    assert greedy_merge(boxes, np.ones((1, 4)), threshold=1e9)[2].sum() == 1
    # A crowd of weak boxes beats one strong outlier; padding takes no part; groups are separate.
    rng = np.random.default_rng(0)
    crowd = boxes_around((200, 200), 100, 30, 5, rng)
    group = np.concatenate([crowd, [[0, 0, 40, 40]], np.zeros((3, 4))])[None].repeat(2, 0)
    scores = np.concatenate([np.full(30, 0.05), [0.9], np.full(3, 100.0)])[None].repeat(2, 0)
    valid = np.arange(34) < 31
    valid = np.stack([valid, valid])
    group[1, :30] += 300
    best, rating = best_boxes(group, scores, valid=valid)
    np.testing.assert_allclose(best[0], crowd.mean(0), atol=1e-6)
    np.testing.assert_allclose(best[1], crowd.mean(0) + 300, atol=1e-6)
    np.testing.assert_allclose(rating, [1.5, 1.5])


def test_greedy_merge_matches_a_plain_pairwise_loop():
    from vggfeat.localize.merge import match_scores

    def plain(boxes, scores, threshold):
        boxes, scores, counts = [b for b in boxes], list(scores), [1] * len(boxes)
        while len(boxes) > 1:
            m = match_scores(np.array(boxes), np.array(boxes))
            np.fill_diagonal(m, np.inf)
            i, j = sorted(np.unravel_index(m.argmin(), m.shape))
            if m[i, j] >= threshold:
                break
            boxes[i] = (boxes[i] * counts[i] + boxes[j] * counts[j]) / (counts[i] + counts[j])
            scores[i] += scores[j]
            counts[i] += counts[j]
            del boxes[j], scores[j], counts[j]
        return sorted(scores)

    rng = np.random.default_rng(1)
    for _ in range(10):
        boxes = np.concatenate([boxes_around(rng.uniform(0, 400, 2), rng.uniform(40, 150), 8, 20,
                                             rng) for _ in range(3)])[None].repeat(2, 0)
        scores = rng.uniform(0, 1, (2, 24))
        _, merged, alive = greedy_merge(boxes, scores)
        for g in range(2):
            np.testing.assert_allclose(sorted(merged[g, alive[g]]), plain(boxes[g], scores[g], 1.0))


# -- nets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,outputs", [("scr", 4), ("pcr", 12)])
def test_scr_and_pcr_output_shapes(kind, outputs):
    head = box_head(kind, WNIDS)
    model = attach_head(tiny_vgg("D", num_classes=head.outputs), head)
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, outputs)
    assert model.score_map(torch.randn(1, 3, 256, 320)).shape == (1, outputs, 2, 4)
    out = torch.arange(2 * outputs, dtype=torch.float32).view(2, outputs)
    picked = class_boxes(out, torch.tensor([2, 1]), head)
    expected = out if kind == "scr" else torch.stack([out[0, 8:12], out[1, 4:8]])
    torch.testing.assert_close(picked, expected)
    targets = torch.cat([torch.tensor([[2.0], [1.0]]), expected + 1], 1)
    assert euclidean_loss(out, targets, head).item() == pytest.approx(2.0)  # ½·4·1 per image


def test_localisation_net_from_a_classifier_keeps_all_but_fc8_and_records_its_head(tmp_path):
    classifier = tmp_path / "cls.safetensors"
    cls_net = tiny_vgg("D", seed=5, num_classes=3)
    vggfeat.save_weights(cls_net, classifier, meta={"class_names": WNIDS})
    head = box_head("pcr", WNIDS)
    with pytest.warns(Warning):
        loc = vggfeat.localize.localization_net(head, weights=classifier, seed=1)
    for name, value in cls_net.state_dict().items():
        if name.startswith("head.fc8"):
            assert loc.state_dict()[name].shape[0] == 12
        else:
            torch.testing.assert_close(loc.state_dict()[name], value, msg=name)
    saved = vggfeat.save_weights(loc, tmp_path / "loc.safetensors")
    again, head_again = load_localizer(saved)
    assert head_again == head
    torch.testing.assert_close(again.state_dict(), loc.state_dict())
    with pytest.raises(WeightsError, match="not a localisation net"):
        load_localizer(classifier)


def constant_box_net(tmp_path) -> Path:
    """A saved SCR net whose every window predicts itself: fc8 weights 0, bias (½, ½, 1, 1)."""
    model = attach_head(tiny_vgg("A", num_classes=4), box_head("scr", WNIDS[:2]))
    with torch.no_grad():
        model.head.fc8.weight.zero_()
        model.head.fc8.bias.copy_(torch.tensor([0.5, 0.5, 1.0, 1.0]))
    return vggfeat.save_weights(model, tmp_path / "const.safetensors")


def test_protocols_map_boxes_back_to_the_original_image(tmp_path):
    loc = constant_box_net(tmp_path)
    classifier = vggfeat.save_weights(tiny_vgg("A", num_classes=2), tmp_path / "cls.safetensors",
                                      meta={"class_names": WNIDS[:2]})
    image = write_image(tmp_path / "a.png", size=(256, 320))
    # Centre crop of the 256×320 image at Q=256: the 224 window at (48, 16).
    (guess,) = Localizer(load_localizer(loc)[0], method="center-crop", scales=(256,))(
        image, class_index=1)
    assert guess.wnid == WNIDS[1] and guess.box == pytest.approx((48, 16, 272, 240))
    # At Q=512 the view is twice as big: the window is half as big in original pixels.
    (guess,) = Localizer(load_localizer(loc)[0], method="center-crop", scales=(512,))(
        image, class_index=0)
    assert guess.box == pytest.approx((104, 72, 216, 184))
    # Dense at Q=256: 2×4 windows 32 px apart, and those of the mirror image; they all merge
    # into their mean, the window centred in the image.  One call, from the weight files.
    guesses = vggfeat.localize.localize(image, weights=loc, cls_weights=classifier, scales=(256,))
    assert [g.score for g in guesses] == sorted((g.score for g in guesses), reverse=True)
    assert sorted(g.wnid for g in guesses) == WNIDS[:2]
    for g in guesses:
        assert g.box == pytest.approx((48, 16, 272, 240), abs=1e-3)
    assert sum(g.score for g in guesses) == pytest.approx(1.0, abs=1e-5)  # the 2 posteriors
    for method, scales in (("center-crop", (200,)), ("center-crop", (256, 384)), ("dense", (128,))):
        with pytest.raises(vggfeat.errors.ConfigError, match="scale"):
            Localizer(load_localizer(loc)[0], vggfeat.vgg(weights=classifier), method=method,
                      scales=scales)
    with pytest.raises(vggfeat.errors.ConfigError, match="needs a classification net"):
        Localizer(load_localizer(loc)[0], method="dense")


# -- end to end: photographs with pasted objects --------------------------------------------

def pasted_photo(rng, background, thing):
    """A crop of one real photograph with a crop of another pasted at a random place and size;
    returns the PIL image and the pasted box (x0, y0, x1, y1)."""
    height, width = int(rng.integers(230, 300)), int(rng.integers(280, 360))
    y, x = rng.integers(0, background.shape[0] - 200), rng.integers(0, background.shape[1] - 260)
    image = Image.fromarray(background[y:y + 200, x:x + 260]).resize((width, height))
    h, w = int(height * rng.uniform(0.3, 0.6)), int(width * rng.uniform(0.3, 0.6))
    y, x = rng.integers(0, thing.shape[0] - 150), rng.integers(0, thing.shape[1] - 150)
    patch = Image.fromarray(thing[y:y + 150, x:x + 150]).resize((w, h))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    image.paste(patch, (left, top))
    return image, (left, top, left + w, top + h)


@pytest.fixture(scope="module")
def pasted(tmp_path_factory):
    """ILSVRC layouts: train/<wnid>/<wnid>_<i>.JPEG with bbox XML files in <wnid>/ folders, flat
    val/ILSVRC2012_val_*.JPEG with LOC_val_solution.csv."""
    from sklearn.datasets import load_sample_image

    root = tmp_path_factory.mktemp("pasted")
    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    rng = np.random.default_rng(0)
    val_rows = {}
    for split, n in (("train", 48), ("val", 16)):
        for i in range(n):
            c = i % 2
            image, box = pasted_photo(rng, photos[c], photos[1 - c])
            if split == "train":
                name = f"{WNIDS[c]}_{i}"
                (root / "train" / WNIDS[c]).mkdir(parents=True, exist_ok=True)
                image.save(root / "train" / WNIDS[c] / f"{name}.JPEG", quality=90)
                ilsvrc_xml(root / "bbox" / WNIDS[c] / f"{name}.xml", name, image.size,
                           [(WNIDS[c], box)])
            else:
                name = f"ILSVRC2012_val_{i + 1:08d}"
                (root / "val").mkdir(exist_ok=True)
                image.save(root / "val" / f"{name}.JPEG", quality=90)
                val_rows[name] = [(WNIDS[c], box)]
    write_loc_csv(root / "LOC_val_solution.csv", val_rows)
    (root / "train" / WNIDS[0] / f"{WNIDS[0]}_nobox.JPEG").write_bytes(
        (root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").read_bytes())
    return root


@pytest.fixture
def one_thread():
    # Tiny convolutions gain nothing from a second thread, and lose a lot on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args):
    from click.testing import CliRunner

    from vggfeat.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(pasted, tmp_path_factory):
    """A reduced-width SCR net trained by `vggfeat localize train` on the pasted photographs."""
    out = tmp_path_factory.mktemp("loc-run") / "run"
    recipe = out.parent / "tiny.yaml"
    recipe.write_text("arch: A\nbatch_norm: true\nwidth_mult: 0.125\nfc_dim: 64\ndropout: 0.0\n"
                      "init: kaiming\npreprocessing: imagenet\ntrain_scale: 256\nbatch_size: 8\n"
                      "lr: 0.05\nlr_base_size: null\nweight_decay: 0.0\nepochs: 8\nworkers: 0\n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        invoke("localize", "train", "--data", pasted, "--boxes", pasted / "bbox", "--boxes",
               pasted / "LOC_val_solution.csv", "--recipe", recipe, "--head", "scr",
               "--out", out, "--device", "cpu", "--quiet")
    finally:
        torch.set_num_threads(before)
    return out


def test_a_reduced_width_net_learns_boxes_better_than_the_whole_image(pasted, trained, one_thread):
    from vggfeat.localize.run import evaluate_localization, images_with_boxes

    history = (trained / "metrics.csv").read_text().splitlines()
    assert len(history) == 9 and "val_loc_error" in history[0]
    model, head = load_localizer(trained / "final.safetensors")
    assert head.kind == "scr" and model.weights_meta["train_scale"] == "256"
    images = images_with_boxes(pasted / "val", read_boxes(pasted / "LOC_val_solution.csv"))
    result = evaluate_localization(Localizer(model, method="center-crop"), images, workers=0,
                                   progress=False)
    truths = [t.xyxy for t in images.truths]
    ours = np.array([iou(gs[0].box, t).max().item() for gs, t in zip(result.guesses, truths)])
    whole = np.array([iou([[0, 0, *Image.open(p).size]], t).max().item()
                      for p, t in zip(images.paths, truths)])
    assert ours.mean() > whole.mean() + 0.05, (ours.mean(), whole.mean())
    assert result.metrics["gt_class_loc_error"] < 100.0 * (whole < 0.5).mean()


def test_cli_evaluate_dense_and_center_crop_then_score_the_submission(pasted, trained, tmp_path,
                                                                      one_thread):
    classifier = tmp_path / "cls.safetensors"
    vggfeat.save_weights(tiny_vgg("A", num_classes=2), classifier, meta={"class_names": WNIDS[:2]})
    loc = trained / "final.safetensors"
    out = invoke("localize", "evaluate", "--weights", loc, "--weights", loc, "--cls-weights",
                 classifier, "--data", pasted, "--boxes", pasted / "LOC_val_solution.csv",
                 "--scales", "256,288", "--json", tmp_path / "dense.json", "--predictions",
                 tmp_path / "pred.csv", "--pictures", tmp_path / "pictures", "--workers", "0",
                 "--backend", "eager", "--quiet")
    summary = json.loads((tmp_path / "dense.json").read_text())
    assert summary["images"] == 16 and summary["method"] == "dense"
    assert summary["backend"] == "eager" and summary["net_scales"] == [[256, 288], [256, 288]]
    assert summary["cls_weights"] == [str(classifier)] and not list(tmp_path.glob("*.lock"))
    assert summary["scales"] == [256, 288] and "top5_loc_error" in out
    assert summary["top5_loc_error"] <= summary["top1_loc_error"]
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString" and len(rows) == 17
    groups = rows[1].split(",")[1].split()
    assert len(groups) == 10 and groups[0] in WNIDS  # 2 classes: 2 guesses of 5 fields
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 16
    assert not list(tmp_path.glob("*.partial.jsonl"))  # the journal goes once the outputs exist
    invoke("localize", "score", tmp_path / "pred.csv", "--boxes", pasted / "LOC_val_solution.csv",
           "--json", tmp_path / "score.json")
    score = json.loads((tmp_path / "score.json").read_text())
    assert (score["top1_loc_error"], score["top5_loc_error"], score["images"]) == \
        (summary["top1_loc_error"], summary["top5_loc_error"], 16)

    invoke("localize", "evaluate", "--weights", loc, "--data", pasted, "--boxes",
           pasted / "LOC_val_solution.csv", "--method", "center-crop", "--json",
           tmp_path / "cc.json", "--workers", "0", "--quiet")
    summary = json.loads((tmp_path / "cc.json").read_text())
    assert summary["scales"] == [256] and 0 <= summary["gt_class_loc_error"] <= 100


def test_shipped_localisation_recipes_record_their_table_rows():
    from vggfeat.localize.train import LocRecipe
    from vggfeat.train import load_recipe

    recipes = {p.stem: load_recipe(p, LocRecipe)
               for p in (Path(__file__).parent.parent / "recipes").glob("loc-*.yaml")}
    assert sorted(recipes) == ["loc-D-256", "loc-D-384", "loc-D-384-pcr-fc", "loc-D-384-scr-fc"]
    for name, r in recipes.items():
        assert (r.arch, r.lr, r.batch_size) == ("D", 1e-3, 256)
        assert r.weights == f"runs/D-{r.train_scale}/final.safetensors"
        assert name.startswith(f"loc-D-{r.train_scale}")
        assert (r.head, r.finetune) == (("scr" if "scr" in name else "pcr"),
                                        ("fc" if name.endswith("-fc") else "all"))
    # Table 8's three nets were trained (and tested) at S = 384; Table 9 has both S.
    table8 = {name for name, r in recipes.items() if "Table 8" in r.table_row}
    assert table8 == {"loc-D-384", "loc-D-384-pcr-fc", "loc-D-384-scr-fc"}
    assert all(recipes[name].train_scale == 384 and "S=384" in recipes[name].table_row
               for name in table8)
    assert {name for name, r in recipes.items() if "Table 9" in r.table_row} == \
        {"loc-D-256", "loc-D-384"}
    # Table 9's fusion runs the S=256 net at Q=256 and the S=384 net at Q=352,384.
    assert (recipes["loc-D-256"].test_scales, recipes["loc-D-384"].test_scales) == \
        ((256,), (352, 384))
    with pytest.raises(vggfeat.errors.RecipeError, match="test_scales must be a list of scales"):
        LocRecipe(test_scales=[200])
    with pytest.raises(vggfeat.errors.RecipeError, match="head must be scr or pcr"):
        LocRecipe(head="boxes")


def test_dense_guesses_only_classes_the_pcr_net_boxes(tmp_path):
    cls_net = tiny_vgg("A", num_classes=2)
    cls_net.weights_meta["class_names"] = WNIDS[:2]
    image = torch.randint(0, 255, (3, 240, 256), dtype=torch.uint8)
    partly = attach_head(tiny_vgg("A", num_classes=8), box_head("pcr", [WNIDS[0], WNIDS[2]]))
    with pytest.warns(UserWarning, match="1 of the classifier's 2 classes have no box"):
        guesses = Localizer(partly, cls_net, scales=(224,))(image)
    assert [g.wnid for g in guesses] == [WNIDS[0]]
    other = attach_head(tiny_vgg("A", num_classes=4), box_head("pcr", [WNIDS[2]]))
    with pytest.raises(vggfeat.errors.ConfigError, match="none of which the classification net"):
        Localizer(other, cls_net)


def test_a_pcr_net_of_fewer_classes_ranks_only_those_and_warns_once(tmp_path):
    """The classifier prefers two classes the PCR net cannot box: the guesses still come, from
    the class it can box, and one warning says how many classes differ."""
    cls_net = tiny_vgg("A", num_classes=3)
    cls_net.weights_meta["class_names"] = WNIDS
    with torch.no_grad():
        cls_net.head.fc8.weight.zero_()
        cls_net.head.fc8.bias.copy_(torch.tensor([0.0, 5.0, 4.0]))
    partly = attach_head(tiny_vgg("A", num_classes=4), box_head("pcr", [WNIDS[0]]))
    with pytest.warns(UserWarning) as caught:
        localizer = Localizer(partly, cls_net, scales=(224,), top_k=2)
    assert len(caught) == 1
    assert "2 of the classifier's 3 classes have no box" in str(caught[0].message)
    image = torch.randint(0, 255, (3, 240, 256), dtype=torch.uint8)
    guesses = localizer(image)
    assert [g.wnid for g in guesses] == [WNIDS[0]] and guesses[0].score < 0.1


def test_each_localisation_net_runs_at_its_own_test_scales(tmp_path):
    """Table 9's fusion: the S=256 net at Q=256, the S=384 net at the Q its recipe records;
    --scales is every net's Q."""
    def net(meta):
        model = attach_head(tiny_vgg("A", num_classes=4), box_head("scr", WNIDS[:2]))
        model.weights_meta.update(meta)
        return model

    cls_net = tiny_vgg("A", num_classes=2)
    cls_net.weights_meta["class_names"] = WNIDS[:2]
    s256 = net({"train_scale": "256"})
    s384 = net({"train_scale": "384", "recipe": {"test_scales": [352, 384]}})
    localizer = Localizer([s256, s384], vggfeat.localize.Classifier(cls_net, "dense", (256,)))
    assert localizer.net_scales == [(256,), (352, 384)] and localizer.scales == (256, 352, 384)
    assert localizer.settings()["scales"] == [[256], [352, 384]]
    image = torch.randint(0, 255, (3, 240, 320), dtype=torch.uint8)
    views, size = localizer.unpack(localizer.prepare(image))
    ran = []
    for runner in localizer.locs:
        forward = runner.model.score_map
        runner.model.score_map = lambda x, f=forward, r=runner: ran.append(
            (localizer.locs.index(r), x.shape[-2])) or f(x)
    assert len(localizer.dense(views, size)) == 2
    assert ran == [(0, 256), (1, 352), (1, 384)]  # each net at its own scales only
    assert Localizer([s256, s384], cls_net, scales=(288,)).net_scales == [(288,), (288,)]
    assert Localizer(s384, method="center-crop").net_scales == [(384,)]  # Table 8: Q = S


def test_dense_localisation_shares_passes_across_loader_batches_with_the_same_guesses(
        tmp_path, one_thread):
    from vggfeat.localize.run import LocImages, evaluate_localization

    # Landscape and portrait images alternate: a loader batch of 2 holds one of each shape, so
    # only passes gathered across batches can hold 2 images.
    paths = [str(write_image(tmp_path / f"{k}.png", size=(240, 320) if k % 2 else (320, 240),
                             seed=k)) for k in range(8)]
    truth = ImageBoxes([WNIDS[0]], np.array([[10, 10, 100, 100]], np.float32))
    cls_net = tiny_vgg("A", num_classes=2)
    cls_net.weights_meta["class_names"] = WNIDS[:2]
    localizer = Localizer(load_localizer(constant_box_net(tmp_path))[0],
                          vggfeat.localize.Classifier(cls_net, "dense", (256,)), scales=(256, 288),
                          batch_size=2)
    result = evaluate_localization(localizer, LocImages(paths, [truth] * 8), batch_size=2,
                                   workers=0, progress=False)
    assert result.images_per_forward == 2.0 and result.summary()["images_per_forward"] == 2.0
    assert result.paths == paths
    for path, guesses in zip(paths, result.guesses):
        views, size = localizer.unpack(localizer.prepare(vggfeat.data.images.read_image(path)))
        alone = localizer.dense(views, size)
        assert [g.wnid for g in guesses] == [g.wnid for g in alone]
        np.testing.assert_allclose([g.box for g in guesses], [g.box for g in alone], rtol=1e-5)
        np.testing.assert_allclose([g.score for g in guesses], [g.score for g in alone],
                                   rtol=1e-5)


def test_class_scores_are_vggfeat_evaluates_fusion_of_several_classifiers(tmp_path):
    """Two classification nets, each with its own method and scales: the class scores are the
    posteriors that `vggfeat evaluate` computes and fuses for the same image."""
    from vggfeat.evaluate import evaluate, fuse
    from vggfeat.localize.predict import Classifier, parse_classifier

    path = write_image(tmp_path / "a.png", size=(240, 300))
    nets = [tiny_vgg("A", seed=k, num_classes=2) for k in (1, 2)]
    for n in nets:
        n.weights_meta["class_names"] = WNIDS[:2]
    members = [Classifier(nets[0], "dense", (256, 320)), Classifier(nets[1], "multi-crop", (256,))]
    loc = load_localizer(constant_box_net(tmp_path))[0]
    localizer = Localizer(loc, members, scales=(256,), device="cpu")
    views, size = localizer.unpack(localizer.prepare(vggfeat.data.images.read_image(path)))
    scores = localizer.class_scores(dict(zip(localizer.view_scales, views)))
    images = vggfeat.data.ImageList([str(path)], [0], WNIDS[:2])
    fused = fuse([evaluate(images, m.net, method=m.method, scales=m.scales, workers=0,
                           device="cpu", progress=False) for m in members])
    np.testing.assert_allclose(scores.numpy(), fused.posteriors[0], rtol=1e-5, atol=1e-6)
    guesses = localizer.dense(views, size)
    assert {g.wnid: g.score for g in guesses} == pytest.approx(
        {WNIDS[k]: float(fused.posteriors[0, k]) for k in range(2)}, rel=1e-5)
    assert parse_classifier("runs/a@b.safetensors@dense+multi-crop@256,384,512") == \
        ("runs/a@b.safetensors", "dense+multi-crop", (256, 384, 512))
    assert parse_classifier("torchvision") == ("torchvision", "dense", None)
    with pytest.raises(vggfeat.errors.ConfigError, match="scales must be ≥ 224"):
        parse_classifier("timm@128")
    with pytest.raises(vggfeat.errors.ConfigError, match="'dens' is neither a method"):
        parse_classifier("torchvision@dens")


def test_an_interrupted_localisation_run_resumes_to_the_same_weights(pasted, tmp_path, one_thread):
    from safetensors.torch import load_file

    from vggfeat.localize.train import Localization, LocRecipe
    from vggfeat.train import train

    task = Localization.from_folders(pasted, [pasted / "bbox", pasted / "LOC_val_solution.csv"],
                                     head="pcr")
    assert task.without_boxes == 1 and len(task.train_set) == 48 and len(task.val_set) == 16
    recipe = LocRecipe(arch="A", width_mult=1 / 16, fc_dim=16, train_scale=224, batch_size=16,
                       epochs=1, workers=0, val_limit=4, checkpoint_steps=1, head="pcr")
    whole = train(recipe, task, tmp_path / "whole", device="cpu", progress=False)
    train(recipe, task, tmp_path / "cut", device="cpu", progress=False, max_steps=2)
    resumed = train(None, task, tmp_path / "cut", device="cpu", progress=False, resume=True)
    a, b = load_file(whole.final), load_file(resumed.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_localizer(resumed.final)[1] == task.head


@pytest.mark.parametrize("finetune", ["fc", "all"])
def test_finetune_fc_freezes_the_conv_layers_of_the_classifier(tmp_path, finetune):
    from vggfeat.localize.run import LocImages
    from vggfeat.localize.train import Localization, LocRecipe

    classifier = vggfeat.save_weights(tiny_vgg("A", num_classes=2), tmp_path / "cls.safetensors",
                                      meta={"class_names": WNIDS[:2]})
    task = Localization(vggfeat.data.ImageList(["a.jpg"], [0], WNIDS[:2]),
                        [np.zeros((1, 4), np.float32)], LocImages([], []), head="pcr")
    recipe = LocRecipe(arch="A", width_mult=1 / 16, fc_dim=32, weights=str(classifier),
                       finetune=finetune)
    with pytest.warns(Warning):
        model = task.build_model(recipe)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fc = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert trainable == (fc if finetune == "fc" else {n for n, _ in model.named_parameters()})
    assert model.num_classes == 8 and model.weights_meta["localization"]["head"] == "pcr"


def test_a_killed_evaluation_goes_on_from_its_journal(pasted, tmp_path, one_thread):
    from vggfeat.localize.run import evaluate_localization, images_with_boxes

    images = images_with_boxes(pasted / "val", read_boxes(pasted / "LOC_val_solution.csv"))
    model = load_localizer(constant_box_net(tmp_path))[0]
    journal = tmp_path / "run.partial.jsonl"
    whole = evaluate_localization(Localizer(model, method="center-crop"), images, workers=0,
                                  progress=False, journal=journal)
    lines = journal.read_text().splitlines()
    assert len(lines) == 17  # the settings, then one line per image
    # As if killed after 5 images, halfway through writing the 6th line.
    journal.write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])
    localizer = Localizer(model, method="center-crop")
    ran = []
    crop = localizer.center_crop
    localizer.center_crop = lambda views, *a: ran.append(len(views)) or crop(views, *a)
    again = evaluate_localization(localizer, images, workers=0, progress=False, journal=journal)
    assert sum(ran) == 11 and again.paths == whole.paths and again.metrics == whole.metrics
    np.testing.assert_allclose([g[0].box for g in again.guesses],
                               [g[0].box for g in whole.guesses], rtol=1e-6)
    with pytest.raises(InputError, match="other settings"):
        evaluate_localization(Localizer(model, method="center-crop", scales=(288,)), images,
                              workers=0, progress=False, journal=journal)


def test_a_journal_whose_settings_line_was_cut_is_never_trusted(pasted, tmp_path, one_thread):
    from vggfeat.localize.run import evaluate_localization, images_with_boxes

    images = images_with_boxes(pasted / "val", read_boxes(pasted / "LOC_val_solution.csv"))
    images.paths, images.truths = images.paths[:2], images.truths[:2]
    model = load_localizer(constant_box_net(tmp_path))[0]
    journal = tmp_path / "run.partial.jsonl"
    # As if killed while writing the settings line: the run starts afresh and checks again.
    journal.write_text('{"settings": {"meth')
    evaluate_localization(Localizer(model, method="center-crop"), images, workers=0,
                          progress=False, journal=journal)
    first = json.loads(journal.read_text().splitlines()[0])
    assert first == {"settings": Localizer(model, method="center-crop").settings()}
    with pytest.raises(InputError, match="other settings"):
        evaluate_localization(Localizer(model, method="center-crop", scales=(288,)), images,
                              workers=0, progress=False, journal=journal)
    # Guesses behind a cut settings line could be of any settings: refused, not reused.
    lines = journal.read_text().splitlines()
    journal.write_text(lines[0][:20] + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(InputError, match="does not start with the settings"):
        evaluate_localization(Localizer(model, method="center-crop", scales=(288,)), images,
                              workers=0, progress=False, journal=journal)


# -- messages -------------------------------------------------------------------------------

def test_a_second_evaluation_writing_the_same_predictions_stops_with_one_line(tmp_path, capsys):
    from vggfeat.cache.lock import OutputLock
    from vggfeat.cli.main import main

    write_image(tmp_path / "val" / "a.JPEG")
    write_loc_csv(tmp_path / "boxes.csv", {"a": [(WNIDS[0], (10, 10, 200, 150))]})
    predictions = tmp_path / "pred.csv"
    with OutputLock(predictions), pytest.raises(SystemExit) as stop:  # as a first run would
        main(["localize", "evaluate", "--weights", str(constant_box_net(tmp_path)), "--data",
              str(tmp_path), "--boxes", str(tmp_path / "boxes.csv"), "--method", "center-crop",
              "--predictions", str(predictions), "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"Error: {predictions} is being written by process ")
    assert not predictions.exists() and not list(tmp_path.glob("*.partial.jsonl"))


def test_the_new_fc8_warning_speaks_of_box_outputs_for_a_localisation_net(tmp_path):
    classifier = vggfeat.save_weights(tiny_vgg("A", num_classes=3), tmp_path / "cls.safetensors",
                                      meta={"class_names": WNIDS})
    for kind, words in (("pcr", "new box layer, initialised (glorot, seed 1): 4×2 = 8 outputs "
                                "(PCR, one box per class, 2 classes)"),
                        ("scr", "new box layer, initialised (glorot, seed 1): 4 outputs (SCR")):
        with pytest.warns(vggfeat.models.factory.NewHeadWarning) as caught:
            vggfeat.localize.localization_net(box_head(kind, WNIDS[:2]), weights=classifier,
                                              seed=1)
        message = str(caught[0].message)
        assert words in message and "for 8 classes" not in message, message
    with pytest.warns(vggfeat.models.factory.NewHeadWarning, match="for 5 classes"):
        vggfeat.vgg(weights=classifier, num_classes=5)  # the classifier's wording stays


def test_localize_train_reports_its_box_layer_and_bad_boxes_by_reason_even_when_quiet(
        tmp_path, capsys, one_thread):
    """Two WordNet-id classes: the PCR head boxes those 2 (not ImageNet's 1000); a CSV box outside
    its image is skipped with that reason; --quiet keeps the warnings about the data."""
    from vggfeat.cli.main import main

    rows = {}
    for c in range(2):
        for i in range(3):
            name = f"{WNIDS[c]}_{i}"
            write_image(tmp_path / "train" / WNIDS[c] / f"{name}.JPEG", seed=i)
            rows[name] = [(WNIDS[c], (10, 10, 200, 150))]
    rows[f"{WNIDS[0]}_2"] = [(WNIDS[0], (200, 100, 900, 700))]  # the image is 320×240
    write_image(tmp_path / "train" / WNIDS[1] / "nobox.JPEG")
    write_image(tmp_path / "val" / "v1.JPEG")
    write_image(tmp_path / "val" / "v2.JPEG")  # a class without training boxes: not validated
    rows.update(v1=[(WNIDS[0], (20, 20, 100, 100))], v2=[(WNIDS[2], (20, 20, 100, 100))])
    write_loc_csv(tmp_path / "boxes.csv", rows)
    with open(tmp_path / "boxes.csv", "a") as f:
        f.write(f"v3,{WNIDS[0]} 50 50 40 60\n")
    classifier = vggfeat.save_weights(tiny_vgg("A", num_classes=3), tmp_path / "cls.safetensors",
                                      meta={"class_names": WNIDS})
    main(["localize", "train", "--data", str(tmp_path), "--boxes", str(tmp_path / "boxes.csv"),
          "--weights", str(classifier), "--head", "pcr", "--train-scale", "224",
          "--batch-size", "6", "--epochs", "1", "--workers", "0", "--device", "cpu",
          "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert "box layer fc8: 4×2 = 8 outputs (PCR, one box per class, 2 classes)" in err
    assert "new box layer" in err and "4000" not in err
    assert "bad box dropped: " in err and "boxes.csv:" in err
    assert "1 training images have no box" in err
    assert "1 training image(s) skipped, e.g. " in err and "unreadable" not in err
    assert f"{WNIDS[0]}_2.JPEG: box (200, 100, 900, 700) is outside the 320×240 image" in err
    _, head = load_localizer(tmp_path / "run" / "final.safetensors")
    assert head.class_names == tuple(WNIDS[:2])
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 2


def test_evaluate_skips_and_names_a_ground_truth_box_outside_its_image(tmp_path):
    from vggfeat.localize.run import evaluate_localization, images_with_boxes

    write_image(tmp_path / "val" / "good.JPEG")
    write_image(tmp_path / "val" / "bad.JPEG")  # 320×240
    write_loc_csv(tmp_path / "boxes.csv", {"good": [(WNIDS[0], (10, 10, 200, 150))],
                                           "bad": [(WNIDS[0], (200, 100, 900, 700))]})
    images = images_with_boxes(tmp_path / "val", read_boxes(tmp_path / "boxes.csv"))
    model = load_localizer(constant_box_net(tmp_path))[0]
    result = evaluate_localization(Localizer(model, method="center-crop"), images, workers=0,
                                   progress=False)
    assert [Path(p).name for p in result.paths] == ["good.JPEG"]
    assert [(Path(p).name, r) for p, r in result.failed] == [
        ("bad.JPEG", "ground-truth box (200, 100, 900, 700) is outside the 320×240 image; fix "
                     "or drop it in the box file")]


def test_a_classifier_trained_at_224_runs_at_its_default_scales_224_and_256():
    cls_net = tiny_vgg("A", num_classes=2)
    cls_net.weights_meta.update(class_names=WNIDS[:2], train_scale="224")
    loc = attach_head(tiny_vgg("A", num_classes=8), box_head("pcr", WNIDS[:2]))
    localizer = Localizer(loc, vggfeat.localize.Classifier(cls_net, "dense"), scales=(224,))
    assert localizer.cls_scales == [(224, 256)]


def test_offline_the_default_classifier_error_names_cls_weights(tmp_path, monkeypatch, capsys):
    from vggfeat.cli.main import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VGGFEAT_OFFLINE", "1")
    write_image(tmp_path / "val" / "a.JPEG")
    write_loc_csv(tmp_path / "boxes.csv", {"a": [(WNIDS[0], (10, 10, 200, 150))]})
    with pytest.raises(SystemExit):
        main(["localize", "evaluate", "--weights", str(constant_box_net(tmp_path)), "--data",
              str(tmp_path), "--boxes", str(tmp_path / "boxes.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert err.startswith("Error: the default classifier (--cls-weights "
                          "torchvision@dense@256,384,512): vgg16-"), err
    assert "--cls-weights my-vgg.safetensors" in err and "--cls-weights random" in err
    assert "--weights" not in err.replace("--cls-weights", "")


@pytest.mark.parametrize("names", [[1, 2], [WNIDS[0], WNIDS[0]]])
def test_localisation_weights_with_bad_class_names_are_refused_naming_the_file(tmp_path, names):
    model = attach_head(tiny_vgg("A", num_classes=8), box_head("pcr", WNIDS[:2]))
    path = vggfeat.save_weights(model, tmp_path / "odd.safetensors", meta={"class_names": names})
    with pytest.raises(WeightsError, match=r"odd\.safetensors: its class_names must be a list "
                                           r"of distinct class names"):
        load_localizer(path)


def test_score_refuses_non_finite_and_repeated_rows_and_warns_of_over_five_guesses(
        tmp_path, capsys):
    from vggfeat.cli.main import main

    truth = write_loc_csv(tmp_path / "truth.csv", {"a": [(WNIDS[0], (10, 10, 200, 150))],
                                                   "b": [(WNIDS[1], (10, 10, 200, 150))]})
    guess = f"{WNIDS[0]} 10 10 200 150"
    cases = {"nan": (f"a,{WNIDS[0]} nan 10 200 150\n", "nan.csv:2: box 1 of a has non-finite"),
             "inf": (f"b,{WNIDS[1]} 10 10 200 150\na,{WNIDS[0]} 10 10 inf 150\n",
                     "inf.csv:3: box 1 of a has non-finite"),
             "twice": (f"a,{guess}\nb,{guess}\na.JPEG,{guess}\n",
                       "twice.csv:4: a.JPEG already has a row (line 2)")}
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_text("ImageId,PredictionString\n" + rows)
        with pytest.raises(SystemExit):
            main(["localize", "score", str(path), "--boxes", str(truth)])
        assert message in capsys.readouterr().err
    many = tmp_path / "many.csv"
    many.write_text(f"ImageId,PredictionString\na,{' '.join([guess] * 6)}\nb,{guess}\n")
    main(["localize", "score", str(many), "--boxes", str(truth)])
    captured = capsys.readouterr()
    assert "1 image(s) of " in captured.err and "have more than 5 guesses, e.g. a (6)" in \
        captured.err
    assert "top-1 localisation error 50.00%" in captured.out


@pytest.mark.parametrize("method", ["dense", "center-crop"])
def test_images_of_classes_the_pcr_net_lacks_are_counted_not_scored(tmp_path, method):
    from vggfeat.localize.run import evaluate_localization, images_with_boxes

    rows = {}
    for k, wnid in enumerate([WNIDS[0], WNIDS[1], WNIDS[2]]):
        write_image(tmp_path / "val" / f"v{k}.JPEG", size=(100, 120), seed=k)
        rows[f"v{k}"] = [(wnid, (10, 10, 80, 60))]
    write_loc_csv(tmp_path / "boxes.csv", rows)
    images = images_with_boxes(tmp_path / "val", read_boxes(tmp_path / "boxes.csv"))
    loc = attach_head(tiny_vgg("A", num_classes=8), box_head("pcr", WNIDS[:2]))
    cls_net = tiny_vgg("A", num_classes=2)
    cls_net.weights_meta["class_names"] = WNIDS[:2]
    localizer = Localizer(loc, cls_net if method == "dense" else None, method=method,
                          scales=(224,), device="cpu")
    result = evaluate_localization(localizer, images, workers=0, progress=False)
    assert [Path(p).name for p in result.paths] == ["v0.JPEG", "v1.JPEG"]
    assert [Path(p).name for p in result.other_classes] == ["v2.JPEG"]
    assert result.summary()["other_classes"] == 1 and result.summary()["images"] == 2


def test_xml_boxes_belong_to_the_image_of_the_xml_files_name(tmp_path):
    from vggfeat.localize.run import images_with_boxes

    # The <filename> tag names another image: the XML file's own name is the image's.
    ilsvrc_xml(tmp_path / "bbox" / WNIDS[0] / f"{WNIDS[0]}_5.xml", f"{WNIDS[0]}_77", (320, 240),
               [(WNIDS[0], (10, 20, 300, 200))])
    table = read_boxes(tmp_path / "bbox")
    assert sorted(table.boxes) == [f"{WNIDS[0]}_5"]
    write_image(tmp_path / "val" / "other.JPEG")
    with pytest.raises(InputError, match=rf"1 boxes read from .*bbox, none matches an image "
                                         rf"name, e.g. {WNIDS[0]}_5 vs other"):
        images_with_boxes(tmp_path / "val", table)


def test_json_and_predictions_naming_one_file_are_refused_up_front(tmp_path, capsys):
    from vggfeat.cli.main import main

    write_image(tmp_path / "val" / "a.JPEG")
    write_loc_csv(tmp_path / "boxes.csv", {"a": [(WNIDS[0], (10, 10, 200, 150))]})
    out = tmp_path / "out.csv"
    with pytest.raises(SystemExit) as stop:
        main(["localize", "evaluate", "--weights", str(constant_box_net(tmp_path)), "--data",
              str(tmp_path), "--boxes", str(tmp_path / "boxes.csv"), "--method", "center-crop",
              "--json", str(out), "--predictions", str(tmp_path / "." / "out.csv"),
              "--workers", "0", "--quiet"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"Error: --json and --predictions both name {out}; give " \
                                      "each its own file\n"
    assert not out.exists()


def test_a_classifier_spec_repeating_its_method_or_scales_is_refused():
    from vggfeat.localize.predict import parse_classifier

    with pytest.raises(vggfeat.errors.ConfigError, match="two scales parts, '224' and '384'"):
        parse_classifier("W.safetensors@dense@224@384")
    with pytest.raises(vggfeat.errors.ConfigError,
                       match="two method parts, 'dense' and 'multi-crop'"):
        parse_classifier("W.safetensors@224@dense@multi-crop")
    assert parse_classifier("W.safetensors@224@dense") == ("W.safetensors", "dense", (224,))
