"""Images as they come: formats, modes, orientation, bad files, extreme shapes, input lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from vggfeat.data import BadImage, InputError, gather_images, read_image
from vggfeat.data.sources import ImageList
from vggfeat.data.images import limit_aspect, resize_short_side


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".bmp", ".tif", ".gif"])
def test_formats(tmp_path, suffix):
    image = read_image(write_image(tmp_path / f"x{suffix}", size=(40, 60)))
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 60)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_modes_become_rgb(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    image = read_image(write_image(tmp_path / f"x{suffix}", size=(30, 50), mode=mode))
    assert image.shape == (3, 30, 50)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    ramp = (np.linspace(0, 65535, 64 * 8).reshape(8, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    image = read_image(path)
    assert image.shape == (3, 8, 64)
    assert image[0, 0, 0] == 0 and image[0, -1, -1] == 255
    assert 100 < image[0, 4, 32] < 160  # mid-grey, not saturated white


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(path, exif=exif)
    assert read_image(path).shape == (3, 60, 20)


def test_bad_files_say_why(tmp_path):
    good = write_image(tmp_path / "good.jpg", size=(200, 200))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    cases = {truncated: "truncated", empty: "empty file", text: "not an image",
             tmp_path / "missing.jpg": "file not found"}
    for path, reason in cases.items():
        with pytest.raises(BadImage, match=reason):
            read_image(path)
    with pytest.raises(BadImage, match="decompression bomb"):
        read_image(good, max_pixels=100 * 100)


def test_extreme_aspect_is_cropped_before_resizing():
    strip = torch.zeros(3, 4000, 1, dtype=torch.uint8)
    capped = limit_aspect(strip, 4.0)
    assert capped.shape == (3, 4, 1)
    assert resize_short_side(capped, 256).shape == (3, 1024, 256)
    assert limit_aspect(torch.zeros(3, 300, 400), 4.0).shape == (3, 300, 400)


def test_resize_short_side_is_isotropic():
    assert resize_short_side(torch.zeros(3, 300, 400, dtype=torch.uint8), 384).shape == (3, 384, 512)
    assert resize_short_side(torch.zeros(3, 300, 230, dtype=torch.uint8), 256).shape == (3, 333, 256)


def test_gather_class_folders(image_folder):
    images = gather_images([image_folder])
    assert images.class_names == ["cat", "dog"]
    assert images.labels == [0, 0, 0, 0, 1, 1, 1, 1]
    assert any("photo 1 é.jpg" in p for p in images.paths)


def test_fingerprint_follows_the_images_their_order_and_labels(tmp_path, image_folder):
    images = gather_images([image_folder])
    fp = images.fingerprint()
    assert fp == gather_images([image_folder]).fingerprint()  # same input, another run
    reordered = tmp_path / "list.txt"
    reordered.write_text("\n".join(reversed(images.paths)) + "\n")
    assert gather_images([reordered]).fingerprint() == ImageList(images.paths[::-1]).fingerprint()
    assert ImageList(images.paths[::-1]).fingerprint() != ImageList(images.paths).fingerprint()
    relabelled = [1 - y for y in images.labels]
    unlabelled = ImageList(images.paths).fingerprint()
    assert len({fp, unlabelled, ImageList(images.paths, relabelled, ["a", "b"]).fingerprint()}) == 3
    write_image(image_folder / "dog" / "4.jpg", seed=99)
    assert gather_images([image_folder]).fingerprint() != fp


def test_gather_lists_and_files(tmp_path, image_folder):
    (tmp_path / "list.txt").write_text("# my images\nimages/cat/0.jpg\n\nimages/dog/3.png\n")
    listed = gather_images([tmp_path / "list.txt"])
    assert [p.rsplit("/", 2)[-2:] for p in listed.paths] == [["cat", "0.jpg"], ["dog", "3.png"]]
    assert listed.labels is None
    (tmp_path / "list.csv").write_text("path,label\nimages/cat/0.jpg,kitty\nimages/dog/0.jpg,pup\n")
    csv = gather_images([tmp_path / "list.csv"])
    assert csv.class_names == ["kitty", "pup"] and csv.labels == [0, 1]
    (tmp_path / "numbers.csv").write_text("path,label\nimages/cat/0.jpg,2\nimages/cat/1.jpg,10\n"
                                          "images/dog/0.jpg,1\n")
    numbers = gather_images([tmp_path / "numbers.csv"])
    assert numbers.class_names == ["1", "2", "10"] and numbers.labels == [1, 2, 0]
    single = gather_images([image_folder / "cat" / "0.jpg"])
    assert len(single) == 1 and single.labels is None
    with pytest.raises(InputError, match="nowhere.*does not exist"):
        gather_images([tmp_path / "nowhere"])
    with pytest.raises(InputError, match="listed twice"):
        gather_images([image_folder, image_folder / "cat" / "0.jpg"])
    (tmp_path / "bad.csv").write_text("file\nx.jpg\n")
    with pytest.raises(InputError, match="needs a 'path' \(or 'url'\) column"):
        gather_images([tmp_path / "bad.csv"])


def test_csv_lists_with_a_bom_a_missing_path_or_a_missing_label(tmp_path, image_folder):
    bom = tmp_path / "excel.csv"  # spreadsheet programs save "CSV UTF-8" with a byte-order mark
    bom.write_text("path,label\nimages/cat/0.jpg,kitty\nimages/dog/0.jpg,pup\n", encoding="utf-8-sig")
    listed = gather_images([bom])
    assert listed.class_names == ["kitty", "pup"] and listed.labels == [0, 1]
    (tmp_path / "short.csv").write_text("path,label\nimages/cat/0.jpg,kitty\n\n,pup\n")
    with pytest.raises(InputError, match=r"short\.csv line 4 has no path"):
        gather_images([tmp_path / "short.csv"])
    (tmp_path / "ragged.csv").write_text("label,path\nkitty,images/cat/0.jpg\npup\n")
    with pytest.raises(InputError, match=r"ragged\.csv line 3 has no path"):
        gather_images([tmp_path / "ragged.csv"])
    (tmp_path / "gap.csv").write_text("path,label\nimages/cat/0.jpg,kitty\nimages/cat/1.jpg\n"
                                      "images/dog/0.jpg,\n")
    with pytest.warns(UserWarning, match=r"gap\.csv line 3 \(images/cat/1\.jpg\) has no label"
                                         r".*2 of its 3 rows.*none of its images"):
        unlabelled = gather_images([tmp_path / "gap.csv"])
    assert len(unlabelled) == 3 and unlabelled.labels is None


def test_vggfeat_max_pixels_governs_over_pillows_own_limit(tmp_path, monkeypatch):
    """VGGFEAT_MAX_PIXELS raises the limit as well as lowering it: Pillow's module-wide limit
    (here shrunk to 10,000 px so that a small image stands for a 95-megapixel one) must not refuse
    an image first, also past twice that limit, where Pillow raises instead of warning."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    over = write_image(tmp_path / "over.png", size=(100, 150))  # 1.5 × Pillow's limit: a warning
    far_over = write_image(tmp_path / "far.png", size=(100, 250))  # 2.5 ×: Pillow's error
    monkeypatch.setenv("VGGFEAT_MAX_PIXELS", "30000")
    assert read_image(over).shape == (3, 100, 150)
    assert read_image(far_over).shape == (3, 100, 250)
    assert PILImage.MAX_IMAGE_PIXELS == 10_000  # lifted only while vggfeat reads
    monkeypatch.setenv("VGGFEAT_MAX_PIXELS", "20000")
    with pytest.raises(BadImage, match=r"decompression bomb.* 20000 p"):
        read_image(far_over)
    assert read_image(over).shape == (3, 100, 150)
    assert read_image(over, max_pixels=16_000).shape == (3, 100, 150)
    with pytest.raises(BadImage, match=r"decompression bomb.* 14000 p"):
        read_image(over, max_pixels=14_000)
    assert PILImage.MAX_IMAGE_PIXELS == 10_000
