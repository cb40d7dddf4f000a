"""Fine-tuning on a user's own class folders: a new head on pretrained weights, frozen layers."""

from __future__ import annotations

import torch
from conftest import COLOURS, coloured_image

import vggfeat
from vggfeat.cli import main
from vggfeat.train.data import training_data


def pets(root, per_class=10):
    """Two classes of real JPEG photos, no train/ val/: the trainer holds out a val split."""
    for c, name in enumerate(["cat", "dog"]):
        for i in range(per_class):
            coloured_image(root / name / f"{i}.jpg", COLOURS[c], seed=100 * c + i)
    return root


def test_class_folders_alone_get_a_seeded_held_out_val(tmp_path):
    train, val = training_data(pets(tmp_path / "pets"))
    assert train.class_names == val.class_names == ["cat", "dog"]
    assert len(val) == 4 and len(train) == 16 and not set(train.paths) & set(val.paths)
    assert training_data(tmp_path / "pets")[1].paths == val.paths  # the same split every time


def test_finetune_new_head_with_frozen_convs_learns(tmp_path, tiny_weights):
    data = pets(tmp_path / "pets")
    out = tmp_path / "run"
    main(["train", "--data", str(data), "--weights", str(tiny_weights), "--freeze", "conv",
          "--out", str(out), "--epochs", "4", "--batch-size", "4", "--lr", "16",
          "--train-scale", "224", "--device", "cpu", "--workers", "0", "--seed", "0", "--quiet"])
    tuned = vggfeat.vgg(weights=out / "final.safetensors")
    base = vggfeat.vgg(weights=tiny_weights)
    assert tuned.num_classes == 2 and tuned.weights_meta["class_names"] == ["cat", "dog"]
    # Frozen conv layers are the pretrained ones, to the bit; the head moved.
    for key, value in base.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(tuned.state_dict()[key], value), key
    assert not torch.equal(tuned.head.fc6.weight, base.head.fc6.weight)
    assert tuned.weights_meta["recipe"]["freeze"] == "conv"
