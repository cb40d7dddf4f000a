"""Fine-tuning on a user's own class folders: a new head on pretrained weights, frozen layers."""

from __future__ import annotations

import torch
from conftest import COLOURS, coloured_image, tiny_vgg

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


def stand_in_pretrained(path):
    """A tiny net whose fc7 separates colours: He-initialised throughout (fc6/fc7 included), so
    activations keep their scale through the 16 layers; it stands in for pretrained weights."""
    net = tiny_vgg("D", seed=3, init="kaiming")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for fc in (net.head.fc6, net.head.fc7):
            torch.nn.init.kaiming_normal_(fc.weight, nonlinearity="relu", generator=gen)
    return vggfeat.save_weights(net, path)


def test_finetune_new_head_on_frozen_layers_learns(tmp_path, capsys):
    data = pets(tmp_path / "pets")
    weights = stand_in_pretrained(tmp_path / "pretrained.safetensors")
    out = tmp_path / "run"
    # fc8 alone on fixed fc7 (a linear classifier trained by SGD): lr 8 per 256 images is
    # 0.0625 at batch 2; 8 epochs of 8 steps.
    main(["train", "--data", str(data), "--weights", str(weights), "--freeze", "fc7",
          "--out", str(out), "--epochs", "8", "--batch-size", "2", "--lr", "8", "--dropout", "0",
          "--train-scale", "224", "--device", "cpu", "--workers", "0", "--seed", "0", "--quiet"])
    assert ("Warning: VGG D: conv1_1 … fc7 come from the weights (file, 1000 classes); fc8 is new"
            in capsys.readouterr().err)  # one line, not a source location
    tuned = vggfeat.vgg(weights=out / "final.safetensors")
    base = vggfeat.vgg(weights=weights)
    assert tuned.num_classes == 2 and tuned.weights_meta["class_names"] == ["cat", "dog"]
    assert tuned.weights_meta["recipe"]["freeze"] == "fc7"
    # Everything up to fc7 is the pretrained net's, to the bit; fc8 is new and trained.
    for key, value in base.state_dict().items():
        if "fc8" not in key:
            assert torch.equal(tuned.state_dict()[key], value), key
    # The held-out images of both classes are classified right (chance: 50% error).
    best = vggfeat.vgg(weights=out / "best.safetensors")
    assert best.weights_meta["metrics"]["val_top1_error"] == 0.0


def test_a_run_from_a_weights_file_records_the_files_net(tmp_path, capsys):
    import pytest
    import yaml

    data = pets(tmp_path / "pets", per_class=4)
    weights = vggfeat.save_weights(tiny_vgg("A", seed=2), tmp_path / "clsA.safetensors")
    flags = ["train", "--data", str(data), "--weights", str(weights), "--epochs", "1",
             "--batch-size", "4", "--train-scale", "224", "--device", "cpu", "--workers", "0",
             "--quiet"]
    with pytest.raises(SystemExit) as stop:  # an explicit arch the file contradicts
        main([*flags, "--arch", "D", "--out", str(tmp_path / "d")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "clsA.safetensors holds VGG A" in err and "not the requested VGG D" in err
    main([*flags, "--out", str(tmp_path / "run")])
    net = {"arch": "A", "batch_norm": False, "width_mult": 1 / 16, "fc_dim": 32}
    recorded = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert {k: recorded[k] for k in net} == net
    final = vggfeat.vgg(weights=tmp_path / "run" / "final.safetensors")
    assert {k: final.weights_meta["recipe"][k] for k in net} == net
