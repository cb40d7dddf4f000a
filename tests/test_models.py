"""The VGG family against the paper's Table 1/2 and the two execution modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_vgg
from torch import nn

from vggfeat.models import (
    CFGS,
    VGG,
    count_macs,
    count_params,
    init_weights,
    parse_arch,
    preinit_from_a,
    score_map_size,
    weight_layers,
)

PAPER_PARAMS = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848, "C": 133_638_952,
                "D": 138_357_544, "E": 143_667_240}
PAPER_GMACS = {"A": 7.609, "A-LRN": 7.609, "B": 11.308, "C": 11.771, "D": 15.470, "E": 19.632}
PAPER_DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}


def meta_vgg(arch: str, **kwargs) -> VGG:
    with torch.device("meta"):
        return VGG(arch, **kwargs)


@pytest.mark.parametrize("arch", list(CFGS))
def test_table2_exact(arch):
    model = meta_vgg(arch)
    assert count_params(model) == PAPER_PARAMS[arch]
    assert weight_layers(model) == PAPER_DEPTH[arch]
    assert round(count_macs(model) / 1e9, 3) == PAPER_GMACS[arch]
    fc = sum(p.numel() for p in model.head.parameters())
    assert fc == 123_642_856


def test_lrn_and_1x1_convs_where_the_paper_puts_them():
    a_lrn = meta_vgg("A-LRN")
    names = list(a_lrn.features._modules)
    assert names[:3] == ["conv1_1", "relu1_1", "norm1"]
    lrn = a_lrn.features.norm1
    assert isinstance(lrn, nn.LocalResponseNorm)
    assert (lrn.size, lrn.beta, lrn.k) == (5, 0.75, 2.0)
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in meta_vgg("A").modules())
    c = meta_vgg("C")
    kernels = {n: m.kernel_size for n, m in c.features.named_children() if isinstance(m, nn.Conv2d)}
    assert [n for n, k in kernels.items() if k == (1, 1)] == ["conv3_3", "conv4_3", "conv5_3"]
    assert c.features.conv3_3.padding == (0, 0)
    assert all(k == (3, 3) for k in {n: m.kernel_size for n, m in meta_vgg("D").features.named_children()
                                     if isinstance(m, nn.Conv2d)}.values())


def test_lrn_is_alexnets_formula():
    """Krizhevsky et al. (2012), Sect. 3.3: b_i = a_i / (k + α Σ_j a_j²)^β over the n = 5
    neighbouring channels j, with k = 2, α = 1e-4, β = 0.75 (the sum is not divided by n)."""
    lrn = tiny_vgg("A-LRN").features.norm1
    a = torch.randn(2, 12, 5, 6, dtype=torch.float64) * 30  # large enough for α to matter
    k, alpha, beta, n = 2.0, 1e-4, 0.75, 5
    expected = torch.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        window = a[:, max(0, i - n // 2):min(channels, i + n // 2 + 1)]
        expected[:, i] = a[:, i] / (k + alpha * (window ** 2).sum(1)) ** beta
    assert torch.allclose(lrn(a), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("alias,config,bn", [("vgg16", "D", False), ("VGG19_BN", "E", True),
                                             ("a-lrn", "A-LRN", False), ("vgg11", "A", False),
                                             ("vgg16_c", "C", False), ("B", "B", False)])
def test_aliases(alias, config, bn):
    spec = parse_arch(alias)
    assert (spec.config, spec.batch_norm) == (config, bn)


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="valid choices: A, A-LRN, B, C, D, E"):
        parse_arch("vgg17")


def test_batch_norm_variant_matches_torchvision_count():
    from torchvision.models import vgg16_bn

    with torch.device("meta"):
        assert count_params(VGG("D", batch_norm=True)) == sum(p.numel() for p in vgg16_bn().parameters())


def test_reduced_width_uses_the_same_table():
    full, tiny = meta_vgg("E"), meta_vgg("E", **TINY)
    assert list(full.features._modules) == list(tiny.features._modules)
    assert tiny.features.conv1_1.out_channels == 4 and tiny.features.conv5_4.out_channels == 32
    assert tiny.head.fc7.weight.shape[:2] == (32, 32)


@pytest.mark.parametrize("arch", ["A-LRN", "C", "E"])
def test_dense_at_224_equals_crop_mode(arch):
    model = tiny_vgg(arch)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        dense = model.score_map(x)
    assert logits.shape == (2, 1000) and dense.shape == (2, 1000, 1, 1)
    torch.testing.assert_close(dense.flatten(1), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q", [224, 256, 288, 384])
def test_score_map_size(q):
    model = tiny_vgg("B")
    with torch.no_grad():
        out = model.score_map(torch.randn(1, 3, q, q + 64))
    assert out.shape[-2:] == score_map_size(q, q + 64) == (q // 32 - 6, (q + 64) // 32 - 6)


def test_modes_share_parameters_and_reject_wrong_sizes():
    model = tiny_vgg("D")
    # fc6/fc7/fc8 are stored once, as convs; nothing is duplicated for the dense mode.
    assert len(list(model.parameters())) == 2 * 16
    with pytest.raises(ValueError, match="crop mode needs a 224×224"):
        model(torch.randn(1, 3, 256, 256))
    with pytest.raises(ValueError, match="at least 224 px"):
        model.score_map(torch.randn(1, 3, 200, 300))


def test_pre_and_post_relu_layers_are_distinct():
    model = tiny_vgg("D")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model.forward_layers(x, ["conv5_3:pre", "conv5_3", "fc7:pre", "fc7", "fc8", "prob"])
    assert (out["fc7:pre"] < 0).any() and (out["conv5_3:pre"] < 0).any()
    torch.testing.assert_close(out["fc7"], F.relu(out["fc7:pre"]))
    torch.testing.assert_close(out["conv5_3"], F.relu(out["conv5_3:pre"]))
    torch.testing.assert_close(out["fc8"].flatten(1), model(x))
    torch.testing.assert_close(out["prob"].sum(1), torch.ones(2, 1, 1))


def test_bn_pre_value_is_after_batch_norm():
    model = tiny_vgg("vgg11_bn")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_layers(x, ["conv1_1:pre", "conv1_1", "pool1"])
        ref = model.features.bn1_1(model.features.conv1_1(x))
    torch.testing.assert_close(out["conv1_1:pre"], ref)
    assert out["pool1"].shape == (2, 4, 32, 32)


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(ValueError, match="valid layers: conv1_1:pre, conv1_1"):
        tiny_vgg("A").forward_layers(torch.randn(1, 3, 224, 224), ["bottleneck"])
    with pytest.raises(ValueError, match="'FC7' for VGG A; did you mean 'fc7'"):
        tiny_vgg("A").check_layer("FC7")
    assert "norm1" in tiny_vgg("A-LRN").layer_names and "conv5_4" in tiny_vgg("E").layer_names


def test_layer_info_metadata():
    info = {i["name"]: i for i in tiny_vgg("D").layer_info}
    assert info["conv3_3"] == {"name": "conv3_3", "num_chs": 16, "reduction": 4,
                               "module": "features.relu3_3"}
    assert info["pool5"]["reduction"] == 32 and info["fc7"]["num_chs"] == 32


def test_init_schemes():
    model = VGG("B", **TINY, num_classes=10)
    init_weights(model, "paper", seed=0)
    w = model.features.conv3_1.weight
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.002
    assert model.features.conv3_1.bias.abs().sum() == 0
    init_weights(model, "glorot", seed=0)
    fc6 = model.head.fc6.weight
    bound = (6 / (fc6[0].numel() + fc6.shape[0])) ** 0.5
    assert fc6.abs().max() <= bound and fc6.abs().max() > 0.9 * bound
    first = model.features.conv1_1.weight.clone()
    init_weights(model, "glorot", seed=0)
    torch.testing.assert_close(model.features.conv1_1.weight, first)
    with pytest.raises(ValueError, match="valid choices: paper, glorot, kaiming"):
        init_weights(model, "xavier")


def test_preinit_from_a_copies_the_paper_layers():
    net_a = tiny_vgg("A", seed=1)
    deep = tiny_vgg("E", seed=2)
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    copied = preinit_from_a(deep, net_a)
    assert sorted({k.split(".")[1] for k in copied}) == ["conv1_1", "conv2_1", "conv3_1",
                                                        "conv3_2", "fc6", "fc7", "fc8"]
    after, source = deep.state_dict(), net_a.state_dict()
    for key in after:
        if key in copied:
            assert torch.equal(after[key], source[key])
        else:
            assert torch.equal(after[key], before[key])
    assert "features.conv1_2.weight" not in copied


def test_cli_info_prints_table2_and_layers():
    from click.testing import CliRunner

    from vggfeat.cli.main import cli

    result = CliRunner().invoke(cli, ["info", "--arch", "vgg19"])
    assert result.exit_code == 0, result.output
    assert "138,357,544" in result.output and "19.632G" in result.output
    assert "conv5_4:pre  512×14×14" in result.output and "fc7          4096×1×1" in result.output
    dense = CliRunner().invoke(cli, ["info", "--arch", "D", "--size", "384"])
    assert "fc8          1000×6×6" in dense.output
    bad = CliRunner().invoke(cli, ["info", "--arch", "vgg20"])
    assert bad.exit_code == 2 and "valid choices" in bad.output
