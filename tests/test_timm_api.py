"""timm's conventions on vggfeat's VGG: new heads on pretrained weights, the classifier API,
forward_head/forward_intermediates against timm's own VGG, torchvision's weight spellings."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from conftest import tiny_vgg
from timm.models.vgg import VGG as TimmVGG

import vggfeat
from vggfeat.errors import ConfigError, WeightsError
from vggfeat.models import NewHeadWarning, freeze
from vggfeat.models.factory import weights_source
from vggfeat.models.weights import PRETRAINED

X224 = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
X288 = torch.randn(1, 3, 288, 320, generator=torch.Generator().manual_seed(1))
TINY_A = [4, "M", 8, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"]  # Table 1's A at 1/16 width


@pytest.fixture(scope="module")
def timm_pair(tmp_path_factory):
    """timm's VGG (A at 1/16 width; timm fixes fc6/fc7 at 4096) and vggfeat's net loaded from
    its state dict saved in timm's layout."""
    torch.manual_seed(0)
    ref = TimmVGG(TINY_A, num_classes=7).eval()
    path = tmp_path_factory.mktemp("timm") / "tiny-a.pth"
    torch.save(ref.state_dict(), path)
    ours = vggfeat.vgg(weights=path).eval()  # config read from the file's shapes
    return ref, ours


def test_forward_head_matches_timm_pooled_logits(timm_pair):
    ref, ours = timm_pair
    with torch.no_grad():
        for x in (X224, X288):  # a 224 crop, and a larger image (dense fc6/fc7, then pooled)
            feats = ours.forward_features(x)
            torch.testing.assert_close(feats, ref.forward_features(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.forward_head(feats), ref.forward_head(feats),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.forward_head(feats, pre_logits=True),
                                       ref.forward_head(feats, pre_logits=True),
                                       rtol=1e-4, atol=1e-5)
        assert ours.forward_head(ours.forward_features(X288)).shape == (1, 7)
        # The dense map keeps its name; its spatial mean is the pooled logits.
        dense = ours.score_map(X288)
        assert dense.shape[-2:] == (3, 4)
        torch.testing.assert_close(dense.mean((2, 3)), ours.forward_head(ours.forward_features(X288)),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"indices": 2}, {"indices": [0, -1]},
                                    {"indices": [1, 3], "stop_early": True}])
def test_forward_intermediates_match_timm(timm_pair, kwargs):
    ref, ours = timm_pair
    with torch.no_grad():
        final, maps = ours.forward_intermediates(X224, **kwargs)
        ref_final, ref_maps = ref.forward_intermediates(X224, **kwargs)
        only = ours.forward_intermediates(X224, intermediates_only=True, **kwargs)
    assert len(maps) == len(ref_maps) == len(only)
    for a, b, c in zip(maps, ref_maps, only):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-5)


def test_forward_intermediates_are_the_stage_ends_by_name():
    model = tiny_vgg("D")
    with torch.no_grad():
        _, maps = model.forward_intermediates(X224)
        named = model.forward_layers(X224, ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3",
                                            "pool5"])
    for a, b in zip(maps, named.values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="6 intermediates"):
        model.forward_intermediates(X224, indices=[6])


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg19_bn"])
def test_feature_info_is_timms_entry_by_entry(name):
    """timm's meaning: one entry per stage end (5 conv stages, then pool5), as features_only and
    out_indices consumers read it; the per-layer table is layer_info."""
    with torch.device("meta"):  # shapes and metadata only: no weights are allocated
        ref = timm.create_model(name, pretrained=False)
        ours = vggfeat.VGG(name)
    assert len(ours.feature_info) == len(ref.feature_info) == 6
    for a, b in zip(ours.feature_info, ref.feature_info):
        assert (a["num_chs"], a["reduction"]) == (b["num_chs"], b["reduction"])
        # the same kind of module (the ReLU before each pool, then pool5) under vggfeat's names
        assert type(ours.get_submodule(a["module"])) is type(ref.get_submodule(b["module"]))
    info = timm.models.FeatureInfo(ours.feature_info, out_indices=(1, 3))
    assert info.channels() == [128, 512] and info.reduction() == [2, 8]
    assert [i["name"] for i in ours.layer_info] == [  # every layer, as before: now layer_info
        n for n in ours.layer_names if not n.endswith(":pre") and n != "prob"]


def test_forward_intermediates_are_indexed_like_feature_info():
    model = tiny_vgg("D")
    with torch.no_grad():
        maps = model.forward_intermediates(X224, intermediates_only=True)
        last_two = model.forward_intermediates(X224, indices=[-2, -1], intermediates_only=True)
    assert [m.shape[1] for m in maps] == [i["num_chs"] for i in model.feature_info]
    assert [224 // m.shape[-1] for m in maps] == [i["reduction"] for i in model.feature_info]
    named = model.forward_layers(X224, [i["name"] for i in model.feature_info[-2:]])
    for a, b in zip(last_two, named.values()):
        torch.testing.assert_close(a, b)


def test_reset_and_get_classifier_as_timm(timm_pair):
    _, loaded = timm_pair
    model = vggfeat.vgg(weights=loaded.weights_meta["file"]).eval()
    fc7 = model.forward_head(model.forward_features(X224), pre_logits=True)
    assert model.get_classifier() is model.head.fc8
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.get_classifier().weight.shape[0] == 3
    with torch.no_grad():
        assert model(X224).shape == (2, 3)
        torch.testing.assert_close(model.forward_head(model.forward_features(X224), pre_logits=True),
                                   fc7)
    assert model.layer_info[-1]["num_chs"] == 3
    model.reset_classifier(0)  # timm: no classifier, the model returns pooled pre-logits
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    assert "fc8" not in model.layer_names and "prob" not in model.layer_names
    with torch.no_grad():
        torch.testing.assert_close(model(X224), fc7)
    model.reset_classifier(5, global_pool="max")
    assert model.global_pool == "max"
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="median")


def test_new_head_on_a_weights_file_keeps_fc7_and_says_so(tiny_weights):
    base = vggfeat.vgg(weights=tiny_weights).eval()
    with pytest.warns(NewHeadWarning, match="fc8 is new.*for 4 classes"):
        model = vggfeat.vgg(weights=tiny_weights, num_classes=4, seed=1).eval()
    with torch.no_grad():
        ours = model.forward_layers(X224, ["fc7"])["fc7"]
        torch.testing.assert_close(ours, base.forward_layers(X224, ["fc7"])["fc7"])
        assert model(X224).shape == (2, 4)
    assert model.weights_meta["new_head"] == {"num_classes": 4, "replaced_classes": 1000,
                                              "init": "glorot", "seed": 1}
    # Everything but fc8 is the file's; the same seed gives the same new head.
    ref = base.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if "fc8" not in k)
    assert model.head.fc8.weight.shape == (4, 32, 1, 1)
    with pytest.warns(NewHeadWarning):
        again = vggfeat.vgg(weights=tiny_weights, num_classes=4, seed=1)
    torch.testing.assert_close(again.head.fc8.weight, model.head.fc8.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the weights' own class count: nothing to say
        vggfeat.vgg(weights=tiny_weights, num_classes=1000)


def test_torchvision_enum_default_and_true_with_new_head(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("VGGFEAT_OFFLINE", "1")
    torch.manual_seed(0)
    ref = torchvision.models.vgg11().eval()
    cached = tmp_path / "hub" / "checkpoints" / PRETRAINED[("vgg11", "torchvision")].filename
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    with pytest.warns(NewHeadWarning, match="for 10 classes"):
        model = vggfeat.vgg(weights=torchvision.models.VGG11_Weights.DEFAULT, num_classes=10)
    model.eval()
    assert model.spec.config == "A" and model.num_classes == 10  # the enum names the config
    with torch.no_grad():
        ref_fc7 = ref.classifier[:5](torch.flatten(ref.avgpool(ref.features(X224)), 1))
        torch.testing.assert_close(model.forward_head(model.forward_features(X224),
                                                      pre_logits=True), ref_fc7,
                                   rtol=1e-4, atol=1e-4)
    assert model.weights_meta["weights_enum"] == "VGG11_Weights.IMAGENET1K_V1"


@pytest.mark.parametrize("weights, pretrained, expected", [
    ("DEFAULT", None, ("torchvision", None)), (True, None, ("torchvision", None)),
    (None, True, ("torchvision", None)), (None, False, (None, None)), (False, None, (None, None)),
    (torchvision.models.VGG19_BN_Weights.IMAGENET1K_V1, None, ("torchvision", "vgg19_bn")),
    ("timm", None, ("timm", None))])
def test_weight_spellings(weights, pretrained, expected):
    assert weights_source(weights, pretrained) == expected


def test_weight_spellings_refused_with_a_reason():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        vggfeat.vgg(weights=torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES)
    with pytest.raises(ConfigError, match="VGG D \\(vgg16\\), not the requested E"):
        vggfeat.vgg("E", weights=torchvision.models.VGG16_Weights.DEFAULT)
    with pytest.raises(ConfigError, match="not both"):
        vggfeat.vgg(weights="timm", pretrained=True)
    with pytest.raises(ConfigError, match="weights must be"):
        vggfeat.vgg(weights=3)


def test_foreign_file_config_is_inferred_or_named(tmp_path):
    torch.manual_seed(0)
    ref = TimmVGG([4, 4, "M", 8, 8, "M", 16, 16, 16, 16, "M", 32, 32, 32, 32, "M",
                   32, 32, 32, 32, "M"], num_classes=5).eval()  # E, 1/16 width
    path = tmp_path / "e.pth"
    torch.save(ref.state_dict(), path)
    model = vggfeat.vgg(weights=path)
    assert (model.spec.config, model.num_classes, model.config["width_mult"]) == ("E", 5, 1 / 16)
    with pytest.raises(WeightsError, match=r"holds VGG E \(vgg19, width_mult=0.0625"):
        vggfeat.vgg("D", weights=path)


def test_freeze_conv_or_up_to_a_layer():
    model = tiny_vgg("B", batch_norm=True, num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze(model, "conv4_2")
    assert "features.conv4_2.weight" in frozen and "features.conv5_1.weight" not in frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X224).logsumexp(1).sum().backward()
    opt.step()
    after = model.state_dict()
    # Frozen weights and batch-norm statistics stay; later layers move.
    for key in ("features.conv1_1.weight", "features.bn4_2.running_mean",
                "features.bn4_2.running_var", "features.bn4_2.weight"):
        torch.testing.assert_close(after[key], before[key])
    assert not torch.equal(after["features.bn5_1.running_mean"],
                           before["features.bn5_1.running_mean"])
    assert not torch.equal(after["head.fc8.weight"], before["head.fc8.weight"])
    assert freeze(tiny_vgg("A"), "none") == []
    conv = tiny_vgg("A")
    freeze(conv, "conv")
    assert [n for n, p in conv.named_parameters() if p.requires_grad][0] == "head.fc6.weight"
    with pytest.raises(ConfigError, match="before fc8"):
        freeze(tiny_vgg("A"), "fc8")
    with pytest.raises(ConfigError, match="conv1_1, pool1, conv2_1"):
        freeze(tiny_vgg("A"), "conv9_9")
