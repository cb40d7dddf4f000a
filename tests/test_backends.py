"""CPU backends: Winograd 3×3 layers and GEMM fc layers agree with torch's, and auto chooses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_vgg, write_image

import vggfeat
from vggfeat.errors import ConfigError
from vggfeat.descriptors import DescriptorNet, DescriptorSpec, ExtractOptions
from vggfeat.models import backends, winograd
from vggfeat.models.backends import GemmDenseLinear, LayerChoices, resolve_backend, with_backend
from vggfeat.models.vgg import DenseLinear
from vggfeat.models.winograd import WinogradConv2d, filter_transform, winograd_conv3x3
from vggfeat.sklearn import VGGFeatures

SHAPES = [(2, 3, 8, 5, 7), (1, 70, 65, 9, 13), (1, 16, 16, 1, 1), (3, 64, 128, 12, 8)]


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """load_kernels() as on a first run, with its cache in tmp_path/cache."""
    monkeypatch.setenv("VGGFEAT_CACHE", str(tmp_path / "cache"))
    winograd.load_kernels.cache_clear()
    yield tmp_path / "cache" / "kernels"
    winograd.load_kernels.cache_clear()


def conv_is_right() -> bool:
    x, w = torch.randn(1, 5, 7, 6), torch.randn(4, 5, 3, 3)
    return torch.allclose(winograd_conv3x3(x, filter_transform(w), None), F.conv2d(x, w, padding=1),
                          atol=1e-4)


def reference(x, w, b, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    return y.relu() if relu else y


@pytest.mark.parametrize("fallback", [False, True], ids=["kernels", "torch-fallback"])
@pytest.mark.parametrize("n,c,k,h,w", SHAPES)
def test_winograd_conv_matches_float64_convolution(n, c, k, h, w, fallback, monkeypatch):
    if fallback:
        monkeypatch.setattr(winograd, "load_kernels", lambda: None)
    torch.manual_seed(c + k)
    x = torch.randn(n, c, h, w)
    weight, bias = torch.randn(k, c, 3, 3) / (3 * c ** 0.5), torch.randn(k)
    for b, relu in ((bias, False), (None, True)):
        got = winograd_conv3x3(x, filter_transform(weight), b, relu=relu)
        want = reference(x, weight, b, relu)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        if relu:
            assert got.min() == 0


@pytest.mark.parametrize("c,k,tiles", [(64, 64, 2048), (128, 128, 1024), (512, 512, 256),
                                         (3, 64, 3912)])
def test_blocks_grow_where_channels_are_few_within_the_same_memory(c, k, tiles):
    """Fewer blocks, so fewer thread synchronisations, in the first layers; V and M of a block
    never exceed what a 512→512 layer's 256-tile block holds."""
    assert winograd.block_tiles(c, k) == tiles
    assert 36 * tiles * (c + k) * 4 <= max(winograd.BLOCK_BYTES,
                                           36 * winograd.BLOCK_TILES * (c + k) * 4)


def test_many_uneven_blocks_match_one(monkeypatch):
    """Tiles split over blocks (the last one short) give the same output as one block."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 8, 37, 29), torch.randn(16, 8, 3, 3) / 9, torch.randn(16)
    u = filter_transform(weight)
    one = winograd_conv3x3(x, u, bias, relu=True)  # 2·10·8 = 160 tiles: one block
    monkeypatch.setattr(winograd, "block_tiles", lambda c, k: 7)  # 23 blocks, the last of 6
    many = winograd_conv3x3(x, u, bias, relu=True)
    assert torch.allclose(one, many, rtol=0, atol=1e-6 * one.abs().max())
    assert (many.double() - reference(x, weight, bias, True)).abs().max() <= 1e-5 * many.abs().max()


@pytest.mark.parametrize("kernel,size", [(7, (9, 12)), (1, (3, 5))])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("im2col_bytes", [backends.IM2COL_BYTES, 3000], ids=["whole", "chunked"])
def test_gemm_fc_layer_matches_dense_convolution(kernel, size, channels_last, im2col_bytes,
                                                 monkeypatch):
    monkeypatch.setattr(backends, "IM2COL_BYTES", im2col_bytes)  # 3000: a row or two at a time
    torch.manual_seed(kernel)
    layer = DenseLinear(16, 24, kernel)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer = layer.to(memory_format=fmt)
    x = torch.randn(2, 16, *size).contiguous(memory_format=fmt)
    gemm = GemmDenseLinear.from_dense(layer)
    with torch.no_grad():
        assert torch.allclose(gemm(x), layer(x), atol=1e-5)
    assert gemm.weight is layer.weight  # shared, not copied


def descriptors(model, backend, items, layer="fc7", pool="avg"):
    spec = DescriptorSpec(layer=layer, scales=(256,), pool=pool)
    net = DescriptorNet(model, spec, batch_size=2, backend=backend)
    return net.backend, net(items)


def test_paper_net_descriptors_agree_across_backends_within_1e4(tmp_path):
    """VGG-16 at full width: every backend gives the eager descriptor to 1e-4 (L2-normalised)."""
    model = vggfeat.vgg("D", weights="random", seed=0).eval()
    before = [(name, type(m), m.weight) for name, m in model.named_modules() if hasattr(m, "weight")]
    image = vggfeat.data.images.read_image(write_image(tmp_path / "a.jpg", size=(256, 300)))
    items = [[vggfeat.data.images.resize_short_side(image, 256)]]
    results = {b: descriptors(model, b, items) for b in ("eager", "winograd", "auto")}
    assert {b: ran for b, (ran, _) in results.items()} == {
        "eager": "eager", "winograd": "winograd", "auto": "auto"}
    eager = results["eager"][1]
    for backend in ("winograd", "auto"):
        assert (results[backend][1] - eager).abs().max() < 1e-4
    # the caller's net is untouched: same module types, same parameters
    assert before == [(n, type(m), m.weight) for n, m in model.named_modules()
                      if hasattr(m, "weight")]


def test_pre_activation_reads_are_not_fused_away(tmp_path):
    model = tiny_vgg("D")
    image = vggfeat.data.images.read_image(write_image(tmp_path / "a.png", size=(256, 256)))
    items = [[image]]
    _, eager = descriptors(model, "eager", items, layer="conv3_2:pre", pool="max")
    _, wino = descriptors(model, "winograd", items, layer="conv3_2:pre", pool="max")
    assert torch.allclose(eager, wino, atol=1e-5)
    fused = with_backend(model, "winograd", reads=["conv3_2:pre"])
    assert not fused.features.conv3_2.relu and fused.features.conv3_3.relu
    assert isinstance(fused.features.relu3_3, torch.nn.Identity)
    assert isinstance(fused.features.relu3_2, torch.nn.ReLU)


def test_backend_layers_keep_autograd():
    model = tiny_vgg("A")
    fast = with_backend(model, "winograd", reads=["fc7"])
    x = torch.randn(1, 3, 240, 256)  # an input that needs no gradient: the weights still do
    out = fast.forward_layers(x, ["fc7"])["fc7"]
    assert out.requires_grad
    out.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == ["head.fc8.weight",
                                                                          "head.fc8.bias"]
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv, relu=True)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    layer(x).sum().backward()  # gradients flow through the eager path
    assert x.grad is not None and conv.weight.grad is not None
    with torch.inference_mode():
        assert torch.allclose(layer(x), conv(x).relu(), atol=1e-5)


def test_auto_measures_each_case_once_and_remembers_it(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    model = tiny_vgg("A")
    x = torch.rand(1, 3, 64, 80)
    with torch.inference_mode():
        want = model.features(x)
        got = with_backend(model, "auto", choices=LayerChoices(path)).features(x)
    assert torch.allclose(got, want, atol=1e-5)
    saved = json.loads(path.read_text())
    cases = set()
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d):
            cases.add(backends._case(layer, x))
        x_next = layer(x) if not isinstance(layer, torch.nn.ReLU) else x
        x = x_next
    assert set(saved) == cases and set(saved.values()) <= {"fast", "eager"}
    x = torch.rand(1, 3, 64, 80)

    def no_timing(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(backends, "_measure", no_timing)
    again = with_backend(model, "auto", choices=LayerChoices(path))
    with torch.inference_mode():
        again.features(x)  # every case known: nothing is timed
    path.write_text("{not json")
    monkeypatch.undo()
    choices = LayerChoices(path)  # unreadable: measured again and rewritten
    assert choices.choices == {}
    with torch.inference_mode():
        with_backend(model, "auto", choices=choices).features(x)
    assert set(json.loads(path.read_text())) == cases


@pytest.mark.parametrize("faster", ["fast", "eager"])
def test_auto_measuring_a_new_case_returns_a_measured_output(faster, monkeypatch):
    """A new case costs three extra runs of the layer, not four: the output of the last timed
    run is the result, whichever path wins; a known case runs its path once."""
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).eval()
    layer = with_backend_layer(conv)
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(backends.time, "perf_counter", lambda: next(clock))

    def path(name, fn, cost):
        def run(x):
            calls.append(name)
            for _ in range(cost - 1):  # the winner takes 1 tick, the loser 3
                next(clock)
            return fn(x)
        return run

    layer.fast = path("fast", layer.fast, 1 if faster == "fast" else 3)
    layer.eager = path("eager", layer.eager, 1 if faster == "eager" else 3)
    x = torch.rand(1, 4, 12, 12)
    with torch.inference_mode():
        got = layer(x)
        assert torch.allclose(got, conv(x), atol=1e-5)
        assert sorted(calls) == ["eager", "eager", "fast", "fast"] and calls[-1] == faster
        assert layer.auto.__self__.choices == {backends._case(layer, x): faster}
        calls.clear()
        layer(x)
    assert calls == [faster]


def with_backend_layer(conv):
    return WinogradConv2d.from_conv(conv, auto=LayerChoices(None).run)


def test_without_a_compiler_winograd_falls_back_to_torch_and_auto_to_eager(fresh_kernels,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(winograd.KernelBuildWarning, match="no-such-cc"):
        assert winograd.load_kernels() is None
    assert resolve_backend("auto", device=torch.device("cpu"), amp_dtype=None) == "eager"
    assert conv_is_right()  # on torch ops


def test_kernels_are_built_privately_when_the_cache_cannot_be_written(fresh_kernels, tmp_path,
                                                                       monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("VGGFEAT_CACHE", str(not_a_folder))
    monkeypatch.setattr(winograd.tempfile, "tempdir", str(tmp_path / "tmp"))
    # Someone else's library at a predictable place must never be loaded.
    planted = tmp_path / "tmp" / f"vggfeat-{os.getuid()}"
    planted.mkdir(parents=True)
    for name in ("winograd.so", *(f"winograd-{i:016x}.so" for i in range(3))):
        (planted / name).write_text("not a library")
    with pytest.warns(winograd.KernelBuildWarning, match="cannot be written.*VGGFEAT_CACHE"):
        assert winograd.load_kernels() is not None
    assert conv_is_right()
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [planted.name]  # cleaned up


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_library_in_the_cache_is_rebuilt_before_it_is_loaded(fresh_kernels, damage):
    assert winograd.load_kernels() is not None
    (library,) = fresh_kernels.glob("winograd-*.so")
    good = library.read_bytes()
    library.unlink()  # a new file: this process keeps the first one mapped
    library.write_bytes(good[:5000] if damage == "truncate" else b"\x7fELF" + bytes(4000))
    # Loading a truncated ELF file crashes the process (SIGBUS): a new process must notice the
    # damage first, and rebuild quietly.
    check = ("import warnings; warnings.simplefilter('error'); import torch; "
             "from vggfeat.models import winograd; assert winograd.load_kernels() is not None")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert library.read_bytes() == good


def test_compiler_may_have_arguments_and_failures_say_why(fresh_kernels, monkeypatch):
    stale = fresh_kernels / "build-killed"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))  # left by a build killed long ago
    monkeypatch.setenv("CC", "cc -O2")
    assert winograd.load_kernels() is not None
    assert not stale.exists()
    monkeypatch.setenv("CC", "false")
    winograd.load_kernels.cache_clear()
    with pytest.warns(winograd.KernelBuildWarning, match="exit status 1: nothing printed"):
        assert winograd.load_kernels() is None
    monkeypatch.setenv("CC", "true")  # succeeds, writes nothing
    winograd.load_kernels.cache_clear()
    with pytest.warns(winograd.KernelBuildWarning, match="wrote no library") as caught:
        # said when the backend is chosen, before a progress bar starts
        assert resolve_backend("winograd", device=torch.device("cpu"), amp_dtype=None)
    assert len(caught) == 1  # not mistaken for a cache that cannot be written


def test_a_folder_in_the_way_of_the_library_or_its_stamp_is_replaced(fresh_kernels):
    assert winograd.load_kernels() is not None
    (library,) = fresh_kernels.glob("winograd-*.so")
    stamp = library.with_name(library.name + ".sha256")
    stamp.unlink()
    stamp.mkdir()
    winograd.load_kernels.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert winograd.load_kernels() is not None
    assert stamp.is_file()


def test_backend_copy_shares_parameters_but_not_the_callers_state():
    model = tiny_vgg("D")
    fast = with_backend(model, "winograd", reads=["fc7"])
    assert isinstance(model.features.conv1_1, torch.nn.Conv2d)  # the caller's layers stay
    assert fast.features.conv1_1.weight is model.features.conv1_1.weight
    assert fast.layer_info == model.layer_info and fast.feature_info == model.feature_info
    fast.reset_classifier(3)  # a new head on the copy leaves the caller's net as it was
    assert model.config["num_classes"] == model.num_classes == 1000
    assert "fc8" in model.layer_names and model.head.fc8.weight.shape[0] == 1000
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        assert fast(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_winograd_layers_follow_weights_changed_in_place():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    layer = WinogradConv2d.from_conv(conv)
    x = torch.randn(1, 4, 9, 7)
    with torch.no_grad():
        conv.weight.mul_(2)  # e.g. an optimiser step on the shared parameter
        assert torch.allclose(layer(x), conv(x), atol=1e-5)


def test_backend_names_and_where_they_apply_are_checked():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="auto, eager, winograd"):
        resolve_backend("fast", device=cpu, amp_dtype=None)
    with pytest.raises(ConfigError, match="--backend eager"):
        resolve_backend("winograd", device=cpu, amp_dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="--backend eager"):
        resolve_backend("winograd", device=torch.device("cuda"), amp_dtype=None)
    assert resolve_backend("auto", device=torch.device("cuda"), amp_dtype=None) == "eager"
    assert resolve_backend("auto", device=cpu, amp_dtype=torch.bfloat16) == "eager"
    with pytest.raises(ConfigError, match="backend"):
        ExtractOptions(backend="Winograd")
    with pytest.raises(ConfigError, match="backend"):  # at fit, before any image is read
        VGGFeatures(weights="random", backend="bogus").fit()


def test_cli_backend_option(tmp_path, image_folder, tiny_weights):
    out = run_cli("extract", image_folder, "-o", tmp_path / "w.h5", "--weights", tiny_weights,
                  "--scales", "224", "--backend", "winograd", "--quiet")
    assert "backend: winograd" in out.stderr
    bad = run_cli("extract", image_folder, "-o", tmp_path / "x.h5", "--weights", tiny_weights,
                  "--backend", "fast", check=False)
    assert bad.returncode == 2 and "--backend" in bad.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to become another user")
def test_a_cache_folder_the_user_cannot_enter_only_costs_measuring_again(tmp_path):
    """$HOME/.cache not enterable by this user (HOME of another user): auto runs, measuring
    its choices again, instead of a PermissionError traceback."""
    private = tmp_path / "private"
    (private / "backend-choices").mkdir(parents=True)
    (private / "backend-choices" / "x.json").write_text('{"conv3x8@2^10": "fast"}')
    private.chmod(0o700)
    tmp_path.chmod(0o755)
    pid = os.fork()
    if pid == 0:  # a child that becomes nobody: it cannot enter ``private``
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            code = 0 if LayerChoices(private / "backend-choices" / "x.json").choices == {} else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
