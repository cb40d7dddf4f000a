"""Weights from torchvision, timm, Caffe conversions and files, matched against the source libraries."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import tiny_vgg
from safetensors.torch import save_file

import vggfeat
from vggfeat.models import (
    CAFFE,
    IMAGENET,
    PAPER,
    WeightsError,
    detect_format,
    to_torchvision,
)
from vggfeat.models.weights import PRETRAINED

X224 = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def random_torchvision(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def random_timm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def perturb_bn(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so a mis-mapped batch-norm buffer would show."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.fixture
def offline_hubs(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, with downloads disabled."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VGGFEAT_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("name", ["vgg11", "vgg16_bn"])
def test_torchvision_hub_cache_offline(name, offline_hubs):
    ref = random_torchvision(name)
    perturb_bn(ref)
    entry = PRETRAINED[(name, "torchvision")]
    cached = offline_hubs / "torch" / "hub" / "checkpoints" / entry.filename
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    model = vggfeat.vgg(name, weights="torchvision").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X224), ref(X224), rtol=1e-4, atol=1e-4)
    assert model.preprocessing == IMAGENET
    published = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta["_metrics"]
    assert model.weights_meta["metrics"] == published
    assert model.weights_meta["file"] == str(cached)


def put_in_hf_cache(hub: Path, name: str, model: torch.nn.Module) -> None:
    """``model``'s weights where the Hugging Face hub keeps timm's ``{name}.tv_in1k``."""
    repo = hub / f"models--timm--{name}.tv_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))


@pytest.mark.parametrize("name", ["vgg13", "vgg19_bn"])
def test_timm_hf_cache_offline(name, offline_hubs):
    ref = random_timm(name)
    perturb_bn(ref)
    put_in_hf_cache(offline_hubs / "hf", name, ref)
    model = vggfeat.vgg(name, weights="timm").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X224), ref(X224), rtol=1e-4, atol=1e-4)


def test_dense_parity_with_timm_at_384(tmp_path):
    """timm's fully-convolutional VGG pools the fc8 map; so does the mean of our score map."""
    ref = random_timm("vgg16")
    path = tmp_path / "timm-vgg16.pth"
    torch.save(ref.state_dict(), path)
    model = vggfeat.vgg("D", weights=path).eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        ours = model.score_map(x)
        assert ours.shape == (1, 1000, 6, 6)
        torch.testing.assert_close(ours.mean(dim=(2, 3)), ref(x), rtol=1e-4, atol=1e-4)


def test_missing_hub_file_names_file_and_folder(offline_hubs):
    with pytest.raises(WeightsError, match=r"vgg19-dcbb9e9d\.pth.*torch[/\\]hub[/\\]checkpoints"):
        vggfeat.vgg("E", weights="torchvision")
    with pytest.raises(WeightsError, match="models--timm--vgg11.tv_in1k/snapshots"):
        vggfeat.vgg("A", weights="timm")


def test_configs_without_published_weights():
    with pytest.raises(WeightsError, match="no torchvision weights exist for VGG C"):
        vggfeat.vgg("C", weights="torchvision")
    with pytest.raises(WeightsError, match="A-LRN"):
        vggfeat.vgg("A-LRN", weights="timm")


def test_file_layouts_round_trip(tmp_path):
    """torchvision and timm .pth, vggfeat .safetensors: one model, three files, same outputs."""
    model = tiny_vgg("E")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    tv_path = tmp_path / "tv.pth"
    torch.save(to_torchvision(model.state_dict(), model), tv_path)
    own = vggfeat.save_weights(model, tmp_path / "own.safetensors", meta={"train_scale": 256})
    loaded_tv = vggfeat.vgg("E", weights=tv_path, width_mult=1 / 16, fc_dim=32).eval()
    loaded_own = vggfeat.vgg(weights=own).eval()  # the file records the architecture
    with torch.no_grad():
        torch.testing.assert_close(loaded_tv(x), expected)
        torch.testing.assert_close(loaded_own(x), expected)
    assert loaded_own.spec.config == "E" and loaded_own.config == model.config
    assert loaded_own.weights_meta["train_scale"] == 256
    assert len(loaded_own.weights_meta["sha256"]) == 64
    assert detect_format(torch.load(tv_path, weights_only=True)) == "torchvision"
    with pytest.raises(WeightsError, match=r"holds VGG E \(vgg19, .*not the requested VGG D"):
        vggfeat.vgg("D", weights=own)


def test_preprocessing_travels_with_the_file(tmp_path):
    model = tiny_vgg("A", preprocessing="paper")
    path = vggfeat.save_weights(model, tmp_path / "paper.safetensors")
    assert vggfeat.vgg(weights=path).preprocessing == PAPER
    assert vggfeat.vgg(weights=path, preprocessing="caffe").preprocessing == CAFFE


def test_caffe_layout_gets_caffe_preprocessing(tmp_path):
    model = tiny_vgg("D")
    caffe = {}
    for key, value in model.state_dict().items():
        _, layer, param = key.split(".")
        caffe[f"{layer}.{param}"] = value.flatten(1) if layer.startswith("fc") and param == "weight" else value
    path = tmp_path / "VGG_ILSVRC_16_layers.pth"
    torch.save(caffe, path)
    loaded = vggfeat.vgg("D", weights=path, width_mult=1 / 16, fc_dim=32).eval()
    assert loaded.preprocessing == CAFFE and loaded.weights_meta["layout"] == "caffe"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_preprocessing_values():
    pixel = torch.tensor([[[[255]], [[0]], [[128]]]], dtype=torch.uint8)  # R=255, G=0, B=128
    caffe = CAFFE(pixel).flatten().tolist()
    assert caffe == pytest.approx([128 - 103.939, 0 - 116.779, 255 - 123.68])  # B, G, R
    assert PAPER(pixel).flatten().tolist() == pytest.approx([255 - 123.68, -116.779, 128 - 103.939])
    assert IMAGENET(pixel).flatten()[0].item() == pytest.approx((1 - 0.485) / 0.229)


def test_wrong_shapes_are_named(tmp_path):
    path = tmp_path / "b.pth"
    torch.save(to_torchvision(tiny_vgg("B").state_dict(), tiny_vgg("B")), path)
    with pytest.raises(WeightsError, match=r"holds VGG B \(vgg13, .*not the requested VGG A"):
        vggfeat.vgg("A", weights=path, width_mult=1 / 16, fc_dim=32)
    torch.save({"classifier.0.weight": torch.zeros(32, 49)}, path)
    with pytest.raises(WeightsError, match="not a VGG state dict"):
        vggfeat.vgg(weights=path)
    path.write_text("# notes, not weights\n")
    with pytest.raises(WeightsError, match="b.pth is not a weights file: expected a .safetensors"):
        vggfeat.vgg(weights=path)


def test_broken_safetensors_are_one_line_errors(tiny_weights, image_folder, tmp_path, capsys):
    from vggfeat.cli import main

    whole = tiny_weights.read_bytes()
    for name, data in [("empty", b""), ("junk", b"junk\n"), ("cut", whole[: len(whole) // 2])]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(WeightsError, match=f"cannot read weights file .*{name}.safetensors"):
            vggfeat.vgg(weights=path)
    for command in (["extract", str(image_folder), "-o", str(tmp_path / "f.h5")],
                    ["evaluate", "--data", str(image_folder)]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--weights", str(tmp_path / "junk.safetensors"), "--device", "cpu"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "junk.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "f.h5").exists()


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"features.conv1_1.weight": _RunsCommand(marker)}, path)  # a .pth as torch writes it
    legacy = tmp_path / "evil-legacy.pth"
    with open(legacy, "wb") as f:  # and the pre-zip pickle format
        pickle.dump({"features.conv1_1.weight": _RunsCommand(marker)}, f)
    with pytest.raises(WeightsError, match="could run code"):
        vggfeat.vgg("D", weights=legacy)
    with pytest.raises(WeightsError, match="refusing to load .*evil.pth.*could run code"):
        vggfeat.vgg("D", weights=path)
    assert not marker.exists()


def test_random_weights_are_seeded():
    a = vggfeat.vgg("A", weights="random", seed=5, width_mult=1 / 16, fc_dim=32)
    b = vggfeat.vgg("A", weights="random", seed=5, width_mult=1 / 16, fc_dim=32)
    c = vggfeat.vgg("A", weights="random", seed=6, width_mult=1 / 16, fc_dim=32)
    assert torch.equal(a.head.fc6.weight, b.head.fc6.weight)
    assert not torch.equal(a.head.fc6.weight, c.head.fc6.weight)


def test_a_new_fc8_on_loaded_weights_is_seeded_by_default(tiny_weights):
    with pytest.warns(vggfeat.models.factory.NewHeadWarning, match=r"\(glorot, seed 0\)"):
        a = vggfeat.vgg(weights=tiny_weights, num_classes=3)
    torch.manual_seed(123)  # the global generator plays no part
    with pytest.warns(vggfeat.models.factory.NewHeadWarning):
        b = vggfeat.vgg(weights=tiny_weights, num_classes=3)
    assert torch.equal(a.head.fc8.weight, b.head.fc8.weight)
    assert a.weights_meta["new_head"]["seed"] == 0


def test_init_from_a_file(tmp_path):
    net_a = tiny_vgg("A", seed=9)
    path = vggfeat.save_weights(net_a, tmp_path / "a.safetensors")
    deep = vggfeat.vgg("D", width_mult=1 / 16, fc_dim=32, init_from_a=path, seed=1)
    assert torch.equal(deep.features.conv3_2.weight, net_a.features.conv3_2.weight)
    assert torch.equal(deep.head.fc8.bias, net_a.head.fc8.bias)
    with pytest.raises(ValueError, match="must be a net A"):
        vggfeat.vgg("D", width_mult=1 / 16, fc_dim=32, init_from_a=tiny_vgg("B"))


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, image_folder, capsys):
    from vggfeat.cli import main

    model = tiny_vgg("A")
    with torch.no_grad():
        model.head.fc7.weight[3, 1] = float("nan")
    path = vggfeat.save_weights(model, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match=r"nan\.safetensors.*head\.fc7\.weight.*1 NaN"):
        vggfeat.vgg(weights=path)
    state = to_torchvision(tiny_vgg("A").state_dict(), tiny_vgg("A"))
    state["features.0.bias"][:2] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(WeightsError, match=r"inf\.pth.*features\.0\.bias.*2 infinite"):
        vggfeat.vgg("A", weights=tmp_path / "inf.pth", width_mult=1 / 16, fc_dim=32)
    out = tmp_path / "f.h5"
    with pytest.raises(SystemExit) as stop:
        main(["extract", str(image_folder), "-o", str(out), "--weights", str(path), "--device",
              "cpu"])
    assert stop.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "head.fc7.weight" in err and "Traceback" not in err


def _with_metadata(source, path, **changes):
    """A copy of a vggfeat weights file with some metadata entries replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(source), framework="pt") as f:
        metadata = {**f.metadata(), **changes}
    save_file(load_file(str(source)), str(path), metadata=metadata)
    return path


def test_metadata_that_is_not_json_names_the_file(tiny_weights, tmp_path):
    for key in ("config", "meta", "preprocessing"):
        bad = _with_metadata(tiny_weights, tmp_path / f"bad-{key}.safetensors", **{key: "{oops"})
        with pytest.raises(WeightsError, match=rf"bad-{key}\.safetensors.*'{key}'.*not valid"):
            vggfeat.vgg(weights=bad)
    odd = _with_metadata(tiny_weights, tmp_path / "odd.safetensors", config='{"arch": "D"}')
    with pytest.raises(WeightsError, match=r"odd\.safetensors.*'config'.*not valid"):
        vggfeat.vgg(weights=odd)
    not_a_dict = _with_metadata(tiny_weights, tmp_path / "list.safetensors", preprocessing="[1]")
    with pytest.raises(WeightsError, match=r"list\.safetensors.*'preprocessing'.*not valid"):
        vggfeat.vgg(weights=not_a_dict)


def test_metadata_contradicting_the_tensors_names_the_file_and_the_fix(tiny_weights, tmp_path):
    import json

    config = {"arch": "E", "batch_norm": False, "num_classes": 1000, "width_mult": 1 / 16,
              "fc_dim": 32}  # the tensors are a tiny D
    wrong = _with_metadata(tiny_weights, tmp_path / "wrong.safetensors", config=json.dumps(config))
    with pytest.raises(WeightsError, match=r"wrong\.safetensors.*records VGG E .*its tensors.*"
                                           r"VGG D \(vgg16.*save_file"):
        vggfeat.vgg(weights=wrong)


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Empty hub caches, downloads allowed, and no network: no host name resolves."""
    import socket

    def unresolved(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VGGFEAT_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", unresolved)
    return tmp_path


@pytest.mark.parametrize("source, arch, cached", [
    ("torchvision", "D", r"vgg16-397923af\.pth .*torch[/\\]hub[/\\]checkpoints"),
    ("timm", "A", r"models--timm--vgg11\.tv_in1k")])
def test_no_network_is_said_at_once_with_the_offline_choices(no_network, source, arch, cached):
    """The hubs' clients would retry for half a minute; the error comes at once and says what
    works offline: the hub's file in its cache folder, a local weights file, random weights."""
    import time

    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        vggfeat.vgg(arch, weights=source)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert message.startswith("no network")
    assert re.search(cached, message), message
    assert "--weights random" in message and ".safetensors" in message


def test_hub_weights_in_the_cache_load_at_once_without_network(no_network):
    import time

    ref = random_timm("vgg11")
    put_in_hf_cache(no_network / "hf", "vgg11", ref)
    start = time.monotonic()
    model = vggfeat.vgg("A", weights="timm")
    assert time.monotonic() - start < 15  # reading 0.5 GB; the hub's retries alone take 30 s
    assert model.weights_meta["name"] == "timm/vgg11.tv_in1k"


def test_disabled_downloads_name_the_offline_choices(offline_hubs):
    for source in ("torchvision", "timm"):
        with pytest.raises(WeightsError, match=r"VGGFEAT_OFFLINE.*--weights random") as err:
            vggfeat.vgg("D", weights=source)
        assert "no network" not in str(err.value)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_weights_get_the_usual_file_mode_of_the_umask(tiny_weights, tmp_path, umask):
    model = vggfeat.vgg(weights=tiny_weights)
    before = os.umask(umask)
    try:
        paths = [vggfeat.save_weights(model, tmp_path / "w.safetensors"),
                 vggfeat.fileio.write_json_atomic(tmp_path / "w.json", {"a": 1})]
    finally:
        os.umask(before)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == [oct(0o666 & ~umask)] * 2


def test_weights_messages_name_the_cli_form_the_folder_and_the_bad_entry(tmp_path):
    with pytest.raises(vggfeat.errors.ConfigError,
                       match=r"drop width_mult/fc_dim \(--width-mult/--fc-dim\), or use random "
                             r"weights \(weights='random', --weights random\)"):
        vggfeat.vgg(weights="torchvision", width_mult=1 / 16)
    folder = tmp_path / "somefolder"
    folder.mkdir()
    with pytest.raises(WeightsError, match=r"somefolder is a folder; give the weights file in it"):
        vggfeat.vgg(weights=str(folder))
    torch.save({"features.0.weight": torch.zeros(2), "epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match=r"ckpt\.pth does not hold a state dict of tensors: "
                                           r"entry 'epoch' is of type int, not a tensor"):
        vggfeat.vgg(weights=tmp_path / "ckpt.pth")
