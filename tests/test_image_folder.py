"""From a class-folder tree to scikit-learn in two lines: vggfeat.image_folder + VGGFeatures."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image

import vggfeat
from vggfeat.errors import InputError
from vggfeat.sklearn import VGGFeatures


def test_class_folders_become_paths_labels_and_names_for_vggfeatures(image_folder, tiny_weights,
                                                                     capfd):
    paths, y, class_names = vggfeat.image_folder(image_folder)
    assert class_names == ["cat", "dog"] and y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(p.startswith(str(image_folder / class_names[k])) for p, k in zip(paths, y))
    features = VGGFeatures(weights=str(tiny_weights), scales=(224,), workers=0, progress=True)
    X = features.fit_transform(paths)
    assert X.shape == (8, 32) and np.isfinite(X).all()
    bar = capfd.readouterr().err.replace("\r", "\n")
    assert "8/8" in bar and "clamping" not in bar  # progress=True shows the images' bar


def test_image_folder_refuses_what_is_not_a_class_tree(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        vggfeat.image_folder(tmp_path / "nope")
    write_image(tmp_path / "flat" / "a.jpg", size=(40, 40))
    with pytest.raises(InputError, match="not a class-folder tree.*CLASS"):
        vggfeat.image_folder(tmp_path / "flat")
