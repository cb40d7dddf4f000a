"""Transfer: VOC and Caltech readers in their real layouts, splits, AP, protocols, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import COLOURS, coloured_image, run_cli, tiny_vgg, write_image

import vggfeat
from vggfeat.data.folders import caltech_root, class_folders
from vggfeat.data.sources import InputError
from vggfeat.data.voc import VOC_CLASSES, read_voc
from vggfeat.descriptors import DescriptorSpec, extract
from vggfeat.transfer import (
    PROTOCOLS,
    dataset_from_features,
    fraction_split,
    holdout,
    load_dataset,
    markdown_report,
    per_class_split,
    run_protocol,
    voc_ap,
)
from vggfeat.transfer.protocols import descriptor_spec, descriptors, extraction_inputs

# -- fixtures in the datasets' real layouts ----------------------------------------------------

def voc_object(name, difficult=False):
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>50</xmax><ymax>50</ymax></bndbox></object>")


def make_voc(root, year, sets):
    """VOCdevkit/VOC{year}: JPEGImages, Annotations (XML) and ImageSets/Main/{set}.txt.

    ``sets`` maps a set name to its number of images; image i of a set holds four classes
    (i, i+5, i+10, i+15 mod 20), so every class has positives in every set of ≥ 5 images.
    """
    base = root / "VOCdevkit" / f"VOC{year}"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    n = 0
    for name, count in sets.items():
        ids = []
        for i in range(count):
            image_id = f"{year}_{n:06d}"
            ids.append(image_id)
            classes = [(i + 5 * j) % 20 for j in range(4)]
            coloured_image(base / "JPEGImages" / f"{image_id}.jpg", COLOURS[i % 5], seed=n)
            objects = "".join(voc_object(VOC_CLASSES[c]) for c in classes)
            (base / "Annotations").mkdir(exist_ok=True)
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><folder>VOC{year}</folder><filename>{image_id}.jpg</filename>"
                f"<size><width>320</width><height>240</height><depth>3</depth></size>"
                f"{objects}</annotation>")
            n += 1
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return base


@pytest.fixture
def caltech(tmp_path):
    """101_ObjectCategories with 4 colour-coded classes of 9 images (one class is background)."""
    root = tmp_path / "caltech-101" / "101_ObjectCategories"
    for c, name in enumerate(["BACKGROUND_Google", "Faces", "airplanes", "ant"]):
        for i in range(9):
            coloured_image(root / name / f"image_{i + 1:04d}.jpg", COLOURS[c], seed=100 * c + i)
    return root


# -- readers ---------------------------------------------------------------------------------

def test_voc_labels_from_xml_with_difficult(tmp_path):
    base = make_voc(tmp_path, "2007", {"trainval": 1})
    xml = base / "Annotations" / "2007_000000.xml"
    xml.write_text("<annotation><filename>2007_000000.jpg</filename>"
                   + voc_object("cat", difficult=True) + voc_object("dog", difficult=True)
                   + voc_object("dog") + voc_object("person") + "</annotation>")
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        part = read_voc(root, "2007", "trainval")
        assert part.ids == ["2007_000000"] and part.paths[0].endswith("JPEGImages/2007_000000.jpg")
    labels = dict(zip(VOC_CLASSES, part.labels[0]))
    assert labels["cat"] == 0  # difficult only: ignored, as the devkit does
    assert labels["dog"] == 1 and labels["person"] == 1 and labels["car"] == -1


def test_voc_errors_name_the_problem(tmp_path):
    make_voc(tmp_path, "2012", {"train": 1, "val": 1})
    with pytest.raises(InputError, match="evaluation server"):
        read_voc(tmp_path, "2012", "test")
    with pytest.raises(InputError, match="not a VOC2007 folder"):
        read_voc(tmp_path, "2007", "test")
    xml = tmp_path / "VOCdevkit" / "VOC2012" / "Annotations" / "2012_000000.xml"
    xml.write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(InputError, match="unknown class 'unicorn'"):
        read_voc(tmp_path, "2012", "train")


def test_caltech_reader_takes_class_folders_only_one_level(tmp_path, caltech):
    # Caltech-256 ships 056.dog/greg/ with copies of images in 056.dog/: they must not count twice.
    write_image(caltech / "ant" / "greg" / "copy.jpg")
    (caltech / "ant" / "RENAME2").write_text("not an image")
    images = class_folders(caltech_root(tmp_path, "caltech101"))
    assert images.class_names == ["BACKGROUND_Google", "Faces", "airplanes", "ant"]
    assert len(images) == 36 and not any("greg" in p for p in images.paths)
    with pytest.raises(InputError, match="256_ObjectCategories"):
        caltech_root(tmp_path, "caltech256")


# -- splits and metrics ------------------------------------------------------------------------

def test_per_class_split_sizes_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [31, 40, 60, 35])
    train, test = per_class_split(labels, n_train=30, n_test=50, seed=1)
    assert np.bincount(labels[train]).tolist() == [30, 30, 30, 30]
    assert np.bincount(labels[test]).tolist() == [1, 10, 30, 5]
    assert not set(train) & set(test)
    again, _ = per_class_split(labels, n_train=30, n_test=50, seed=1)
    other, _ = per_class_split(labels, n_train=30, n_test=50, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    _, rest = per_class_split(labels, n_train=30, n_test=None, seed=1)
    assert len(rest) == len(labels) - 120
    fit, val = holdout(train, labels, fraction=0.2, seed=0)
    assert np.bincount(labels[val]).tolist() == [6, 6, 6, 6] and not set(fit) & set(val)
    images = np.arange(len(labels)) // 2  # two samples of each image
    fit, val = holdout(train, None, fraction=0.2, seed=0, groups=images)
    assert not set(images[fit]) & set(images[val])
    assert sorted(np.concatenate([fit, val])) == sorted(train)
    assert sorted(np.concatenate([fit, val])) == sorted(train)
    with pytest.raises(InputError, match="class 0 has 31 images"):
        per_class_split(labels, n_train=31, n_test=None, seed=0)
    tr, te = fraction_split(labels, train_fraction=0.75, seed=0)
    assert len(tr) + len(te) == len(labels) and not set(tr) & set(te)


def test_voc_ap_matches_hand_computation():
    labels = np.array([1, -1, 1, 0, -1, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.6, 0.3])
    # Ranked without the difficult one: + - + - +; precision 1, .5, 2/3, .5, .6 at recall
    # 1/3, 1/3, 2/3, 2/3, 1.  11-point: 4 points at 1, 3 at 2/3, 4 at .6.
    assert voc_ap(labels, scores, metric="11point") == pytest.approx((4 + 2 + 2.4) / 11)
    assert voc_ap(labels, scores, metric="area") == pytest.approx(1 / 3 + 2 / 9 + 0.2)
    assert voc_ap(labels, -scores + 2 * (labels == 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no positive"):
        voc_ap(np.array([-1, 0]), np.array([0.1, 0.2]))


# -- protocols on cached features -----------------------------------------------------------------

@pytest.fixture
def caltech_features(tmp_path, caltech):
    """Descriptors of the Caltech fixture, stored stacked and unnormalised over two scales."""
    dataset = load_dataset("caltech101", caltech.parent)
    spec = DescriptorSpec(scales=(224, 256), aggregate="stack", l2=False)
    out = tmp_path / "caltech-D.h5"
    extract(extraction_inputs(dataset), out, spec=spec, model=tiny_vgg("D"), workers=0,
            progress=False)
    return dataset, out


def test_transfer_extracts_with_the_backend_it_is_given(caltech, tiny_weights, tmp_path,
                                                       monkeypatch):
    import importlib

    from vggfeat.cli import main

    seen = []

    def spy(*args, **kwargs):
        result = extract(*args, **kwargs)
        seen.append((kwargs.get("backend"), result.backend))
        return result

    for module in ("vggfeat.descriptors", "vggfeat.descriptors.run", "vggfeat.cli.transfer"):
        monkeypatch.setattr(importlib.import_module(module), "extract", spy, raising=False)
    main(["transfer", str(tmp_path / "f.h5"), "--protocol", "folder", "--data", str(caltech),
          "--weights", str(tiny_weights), "--scales", "224", "--workers", "0", "--C", "1",
          "--splits", "1", "--backend", "eager", "--quiet"])
    assert seen == [("eager", "eager")]


def test_caltech_protocol_splits_scores_and_reproducibility(caltech_features):
    dataset, features = caltech_features
    kwargs = dict(train_per_class=5, test_per_class=3, splits=2, C_grid=(0.1, 10.0))
    result = run_protocol("caltech101", dataset, [features], **kwargs)
    assert result.aggregate == "stack"  # the paper's choice for Caltech
    assert len(result.scores) == 2 and result.sizes == {"classes": 4, "train": 20, "val": 4,
                                                       "test": 12}
    for split in result.splits:
        assert len(split["fit"]) == 16 and len(split["val"]) == 4 and len(split["test"]) == 12
        assert not (set(split["fit"]) | set(split["val"])) & set(split["test"])
    assert result.splits[0]["test"] != result.splits[1]["test"]
    assert result.mean > 60  # colour-coded classes: far above the 25% of chance
    again = run_protocol("caltech101", dataset, [features], **kwargs)
    assert again.scores == result.scores and again.splits == result.splits
    folder = run_protocol("folder", dataset_from_features(features), [features], splits=1,
                          C_grid=(1.0,))
    assert (folder.sizes["train"], folder.sizes["test"]) == (27, 9)  # 75% of 36 for training
    logreg = run_protocol("caltech101", dataset, [features], classifier="logreg", **kwargs)
    assert logreg.mean > 60
    report = markdown_report([result, logreg])
    assert "| paper: Net-D | linear SVM | 91.8 ± 1.0 |" in report  # the protocols that ran
    assert "logistic regression" in report


def test_mean_from_a_stack_equals_extracting_the_mean(tmp_path, caltech_features):
    dataset, stacked = caltech_features
    averaged = tmp_path / "mean.h5"
    extract(extraction_inputs(dataset), averaged, spec=DescriptorSpec(scales=(224, 256)),
            model=tiny_vgg("D"), workers=0, progress=False)
    X, keep, _, used = descriptors([stacked], dataset, aggregate="mean")
    np.testing.assert_allclose(X, vggfeat.load_features(averaged).data, rtol=1e-4, atol=1e-6)
    assert keep.all() and used == ["mean"]
    with pytest.raises(InputError, match="cannot be stacked"):
        descriptors([averaged], dataset, aggregate="stack")


def test_two_nets_are_stacked_and_unreadable_images_dropped(tmp_path, caltech_features):
    dataset, d_file = caltech_features
    bad = dataset.paths[3]
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 truncated")
    e_file = tmp_path / "caltech-E.h5"
    extract(extraction_inputs(dataset), e_file, spec=DescriptorSpec(scales=(224,)),
            model=tiny_vgg("E"), workers=0, progress=False)
    X, keep, described, _ = descriptors([d_file, e_file], dataset, aggregate=None,
                                        preferred="stack")
    assert X.shape == (35, 64 + 32) and not keep[3] and keep.sum() == 35
    assert "D (random) fc7, Q 224,256, stack" in described[0] and described[1].startswith("E")
    result = run_protocol("caltech101", dataset, [d_file, e_file], train_per_class=5, splits=1)
    assert result.dropped == [bad]


def test_missing_images_in_features_are_an_error(tmp_path, caltech_features):
    dataset, features = caltech_features
    write_image(caltech_root(tmp_path, "caltech101") / "ant" / "new.jpg")
    grown = load_dataset("caltech101", tmp_path)
    with pytest.raises(InputError, match="no descriptor for 1 of the 37 images"):
        run_protocol("caltech101", grown, [features], train_per_class=5, splits=1)


def test_cli_voc2007_extracts_then_reports_like_table_11(tmp_path, tiny_weights):
    make_voc(tmp_path, "2007", {"train": 10, "val": 10, "test": 10})
    features = tmp_path / "voc07.h5"
    report = tmp_path / "out" / "voc07.md"
    report.parent.mkdir()
    args = ["--protocol", "voc2007", "--data", tmp_path, "--weights", tiny_weights,
            "--scales", "224", "--workers", "0", "--C", "1", "--quiet"]
    proc = run_cli("transfer", features, *args, "--aggregate", "both", "--report", report)
    assert features.exists()
    data = json.loads(report.with_suffix(".json").read_text())
    first = data["results"][0]
    assert [r["aggregate"] for r in data["results"]] == ["mean", "stack"]
    assert first["sizes"] == {"classes": 20, "train": 20, "val": 10, "test": 10}
    assert set(first["per_class"]) == set(VOC_CLASSES)
    assert first["mean"] == pytest.approx(np.mean(list(first["per_class"].values())), abs=0.01)
    # Each image's colour gives its classes, so even a random tiny net separates them: far above
    # the ~20% AP of ranking at random (a class is in 1 image of 5).
    assert first["mean"] > 80 and min(first["per_class"].values()) > 50
    assert first["paper"]["Net-D"] == [89.3, None]
    splits = json.loads(report.with_suffix(".splits.json").read_text())["results"][0]["splits"]
    assert len(splits[0]["test"]) == 10 and not set(splits[0]["test"]) & set(splits[0]["fit"])
    assert "| paper: Net-D & Net-E | linear SVM | 89.7 |" in proc.stdout  # VOC-2007's column only
    assert "mAP, area (%)" in report.read_text()
    bad = run_cli("transfer", features, "--protocol", "voc2007", check=False)
    assert bad.returncode == 2 and "--data" in bad.stderr


def test_run_transfer_refuses_what_the_protocol_cannot_use_before_reading(tmp_path):
    from vggfeat.errors import ConfigError
    from vggfeat.transfer import run_transfer

    with pytest.raises(InputError, match="VOC-2007 labels come from the annotations: pass --data"):
        run_transfer("voc2007", [tmp_path / "f.h5"])
    with pytest.raises(ConfigError, match="voc2012-action only, not caltech101"):
        run_transfer("caltech101", [tmp_path / "f.h5"], data=tmp_path, setting="image")
    with pytest.raises(InputError, match="f.h5 does not exist; pass --data"):
        run_transfer("folder", [tmp_path / "f.h5"])
    with pytest.raises(InputError, match="one can be extracted per run"):
        run_transfer("folder", [tmp_path / "d.h5", tmp_path / "e.h5"], data=tmp_path)
    with pytest.raises(ConfigError, match="aggregate must be one of mean, stack, both"):
        run_transfer("folder", [tmp_path / "f.h5"], data=tmp_path, aggregate="max")


def test_protocols_extract_at_the_papers_scales():
    """Appendix B: Table 11's VOC figures use Q = 256…768; Caltech's use 256, 384, 512."""
    for protocol in ("voc2007", "voc2012"):
        spec = descriptor_spec(protocol)
        assert spec.scales == (256, 384, 512, 640, 768)
        assert (spec.aggregate, spec.l2, spec.layer) == ("stack", False, "fc7")
    assert descriptor_spec("caltech101").scales == descriptor_spec("caltech256").scales \
        == (256, 384, 512)
    assert descriptor_spec("voc2007", layer="fc6", scales=(224,)).scales == (224,)
    with pytest.raises(InputError, match="voc2007"):
        descriptor_spec("voc2010")


def test_voc2012_scores_val_and_says_test_is_on_the_server(tmp_path):
    make_voc(tmp_path, "2012", {"train": 15, "val": 10})
    dataset = load_dataset("voc2012", tmp_path)
    out = tmp_path / "voc12.h5"
    extract(extraction_inputs(dataset), out, spec=DescriptorSpec(scales=(224,)),
            model=tiny_vgg("D"), workers=0, progress=False)
    result = run_protocol("voc2012", dataset, [out], C_grid=(1.0,))
    assert result.sizes["test"] == 10 and result.sizes["train"] == 15
    assert "evaluation server" in PROTOCOLS["voc2012"].note
    assert "evaluation server" in markdown_report([result])


# -- VOC-2012 action classification (Table 12) ---------------------------------------------------

ACTION_COLOURS = [(230, 30, 30), (30, 210, 40), (40, 50, 230), (240, 230, 30), (220, 40, 220),
                  (30, 220, 220), (250, 140, 20), (120, 40, 160), (20, 110, 60), (150, 150, 150)]


def make_voc_actions(root, sets):
    """VOCdevkit/VOC2012 with ImageSets/Action/{set}.txt and person objects with <actions>.

    Image i of a set holds two people doing actions i and i+5 (mod 10), each a box filled with
    that action's colour, and a dog (an object without actions, which still counts in the
    devkit's object index).
    """
    from vggfeat.data.voc import VOC_ACTIONS
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Action").mkdir(parents=True)
    (base / "Annotations").mkdir()
    (base / "JPEGImages").mkdir()
    rng = np.random.default_rng(0)
    n = 0
    for name, count in sets.items():
        ids = []
        for i in range(count):
            image_id = f"2012_{n:06d}"
            pixels = rng.integers(0, 255, (240, 320, 3)).astype(np.uint8)
            objects = []
            for j, (action, box) in enumerate([(i % 10, (11, 21, 110, 150)),
                                               ((i + 5) % 10, (171, 41, 300, 230))]):
                x0, y0, x1, y1 = box
                pixels[y0 - 1:y1, x0 - 1:x1] = ACTION_COLOURS[action]
                flags = "".join(f"<{a}>{int(k == action)}</{a}>" for k, a in
                                enumerate(VOC_ACTIONS + ("other",)))
                objects.append(f"<object><name>person</name><actions>{flags}</actions><bndbox>"
                               f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                               f"<ymax>{y1}</ymax></bndbox></object>")
                if j == 0:
                    objects.append("<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                                   "<xmax>9</xmax><ymax>9</ymax></bndbox></object>")
            Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename>{''.join(objects)}</annotation>")
            ids.append(image_id)
            n += 1
        (base / "ImageSets" / "Action" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return base


def test_voc_actions_read_people_boxes_and_actions(tmp_path):
    from vggfeat.data.voc import VOC_ACTIONS, read_voc_actions

    base = make_voc_actions(tmp_path, {"train": 3})
    people = read_voc_actions(tmp_path, "train")
    assert people.ids[:2] == ["2012_000000_1", "2012_000000_3"]  # the dog is object 2
    assert people.boxes[0].tolist() == [10, 20, 110, 150]  # 0-based, end exclusive
    assert people.labels.shape == (6, len(VOC_ACTIONS)) and (people.labels == 1).sum() == 6
    assert people.labels[1, 5] == 1 and people.labels[1, 0] == -1
    with pytest.raises(InputError, match="val set of the VOC2012 action task is missing"):
        load_dataset("voc2012-action", tmp_path, progress=False)
    (base / "Annotations" / "2012_000001.xml").write_text("<annotation><object><name>dog</name>"
                                                          "</object></annotation>")
    with pytest.raises(InputError, match="no object in its annotation has <actions>"):
        read_voc_actions(tmp_path, "train")


def test_voc2012_action_protocol_both_settings_like_table_12(tmp_path, tiny_weights):
    from vggfeat.cli import main
    from PIL import Image

    make_voc_actions(tmp_path, {"train": 10, "val": 5})
    features = tmp_path / "actions.h5"
    report = tmp_path / "actions.md"
    main(["transfer", str(features), "--protocol", "voc2012-action", "--data", str(tmp_path),
          "--weights", str(tiny_weights), "--scales", "224", "--workers", "0", "--C", "1",
          "--quiet", "--report", str(report), "--crops", str(tmp_path / "crops")])
    crop = tmp_path / "crops" / "2012_000000_1.png"
    assert Image.open(crop).size == (100, 130)  # the person's box, cut out losslessly
    results = json.loads(report.with_suffix(".json").read_text())["results"]
    assert [r["setting"] for r in results] == ["image", "image+box"]
    for r in results:
        assert r["sizes"] == {"classes": 10, "train": 20, "val": 4, "test": 10}
        assert len(r["per_class"]) == 10 and r["mean"] == pytest.approx(
            np.mean(list(r["per_class"].values())), abs=0.01)
    text = report.read_text()
    assert "| paper: Net-D & Net-E | image | linear SVM | 79.2 |" in text
    assert "| paper: Net-D & Net-E | image+box | linear SVM | 84.0 |" in text
    # The box descriptor sees the person's colour alone: it separates the actions.
    dataset = load_dataset("voc2012-action", tmp_path, crops=tmp_path / "crops", progress=False)
    box = run_protocol("voc2012-action", dataset, [features], setting="image+box", C_grid=(1.0,))
    assert box.mean > 90 and box.mean == pytest.approx(results[1]["mean"])
    # C is chosen on held-out images, not people: no image has people on both sides.
    assert not set(box.splits[0]["fit"]) & set(box.splits[0]["val"])
    assert len(set(box.splits[0]["val"])) == 2 and len(box.splits[0]["val"]) == 4
    X, _, _, _ = descriptors([features], dataset, aggregate=None)
    assert X.shape[0] == 30 and len(set(dataset.paths)) == 15
    with pytest.raises(InputError, match="voc2012-action"):
        run_protocol("voc2012", dataset, [features], setting="image")


def test_a_stray_image_beside_class_folders_is_reported(tmp_path):
    from vggfeat.data.sources import gather_images

    for name in ("cat", "dog"):
        coloured_image(tmp_path / "photos" / name / "1.jpg", COLOURS[0], seed=1)
    assert gather_images([tmp_path / "photos"]).class_names == ["cat", "dog"]
    coloured_image(tmp_path / "photos" / "stray.jpg", COLOURS[1], seed=2)
    with pytest.warns(UserWarning, match="1 image.*stray.jpg.*none of its images gets a class"):
        images = gather_images([tmp_path / "photos"])
    assert images.labels is None and len(images) == 3
