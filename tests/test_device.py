"""Running on accelerators: no hidden copies or host syncs, the caller's model left alone,
process groups that cannot hang, scoped backend settings.  CPU tests count what CUDA would
block on; the CUDA tests run where a GPU exists."""

from __future__ import annotations

import copy
from datetime import timedelta

import numpy as np
import pytest
import torch
from conftest import tiny_vgg
from test_train import TINY, colours  # noqa: F401  (colours: the fixture of train/ and val/)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import vggfeat.distributed as distributed
from vggfeat.data.loader import PreparedBatch, stack_rows
from vggfeat.evaluate import Evaluator
from vggfeat.models.runner import cudnn_benchmark, memory_format_of, tf32_matmuls


def needs_cuda(test):
    """Marked ``cuda`` (``pytest -m cuda`` runs these on a GPU machine); skipped without one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


# Tensor calls that make the host wait for a GPU (results read on the host), or build a tensor
# from Python data (a blocking copy when it targets a GPU).
SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
HOST_BUILT = {"tensor", "as_tensor", "from_numpy"}


class HostTraffic(TorchFunctionMode):
    """Records every call that would block on a GPU: syncs, host-built tensors and copies to a
    device without ``non_blocking=True``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNCS or name in HOST_BUILT:
            self.calls.append(name)
        elif name == "to" and not kwargs.get("non_blocking") and any(
                isinstance(a, (str, torch.device)) for a in args[1:]):
            self.calls.append("to(device) without non_blocking")
        return func(*args, **kwargs)


class CopiesOf(TorchDispatchMode):
    """Records the non-view operations whose output has ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and not func.is_view:
            self.ops.append(str(func))
        return out


# -- the model -----------------------------------------------------------------------------

def test_crop_mode_reads_a_channels_last_fc6_weight_without_copying_it():
    model = tiny_vgg("A", fc_dim=72).train()  # fc6: 72×32×7×7, no activation has that size
    reference = copy.deepcopy(model)
    model = model.to(memory_format=torch.channels_last)
    fc6 = model.head.fc6.weight
    assert memory_format_of(model) == torch.channels_last and not fc6.is_contiguous()
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    with CopiesOf(fc6.numel()) as copies:
        logits = model(x)
    assert copies.ops == []  # the 4096×512×7×7 weight would be copied on every forward
    torch.manual_seed(0)
    torch.testing.assert_close(logits, reference(x.contiguous()), rtol=0, atol=6e-5)
    logits.sum().backward()
    assert fc6.grad.is_contiguous(memory_format=torch.channels_last)  # as its weight


def test_runners_never_change_the_callers_model():
    model = tiny_vgg("A").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator = Evaluator(model, "dense")
    image = torch.randint(0, 256, (3, 256, 288), dtype=torch.uint8)
    evaluator([[image]])
    assert model.training and memory_format_of(model) == torch.contiguous_format
    assert evaluator.model is not model and not evaluator.model.training
    assert memory_format_of(evaluator.model) == torch.channels_last
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.is_contiguous(), key
    ready = tiny_vgg("A").eval()  # already in eval mode on the device, in the asked layout
    assert Evaluator(ready, "dense", channels_last=False, backend="eager").model is ready
    # the CPU backends' layers wrap the same parameters: nothing is copied
    shared = Evaluator(ready, "dense", channels_last=False, backend="winograd").model
    assert [p is q for p, q in zip(shared.parameters(), ready.parameters())] == [True] * 22
    assert type(ready.features.conv1_1) is torch.nn.Conv2d


# -- loading -------------------------------------------------------------------------------

def _prepared_batch() -> PreparedBatch:
    views = [[torch.full((3, 224, 240 + 16 * (i % 2)), i, dtype=torch.uint8)] for i in range(4)]
    return PreparedBatch([(i, v, None) for i, v in enumerate(views)] + [(4, None, "bad file")])


def test_stacking_rows_of_one_block_does_not_copy():
    block = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    rows = [block[i] for i in range(4)]
    assert stack_rows(rows).data_ptr() == block.data_ptr() and torch.equal(stack_rows(rows), block)
    assert torch.equal(stack_rows([rows[0], rows[2]]), block[[0, 2]])  # not consecutive: a copy


@needs_cuda
def test_loader_batches_are_pinned_as_whole_stacks():
    pinned = _prepared_batch().pin_memory()
    assert [r for _, _, r in pinned] == [None] * 4 + ["bad file"]
    wide = [pinned[i][1][0] for i in (1, 3)]  # the two 3×224×256 views
    stacked = stack_rows(wide)
    assert stacked.is_pinned() and stacked.data_ptr() == wide[0].data_ptr()
    assert torch.equal(stacked[:, 0, 0, 0], torch.tensor([1, 3], dtype=torch.uint8))


def test_image_loader_gives_prepared_batches(tmp_path):
    from conftest import write_image

    from vggfeat.data.loader import image_loader

    paths = [str(write_image(tmp_path / f"{i}.jpg", size=(224, 240), seed=i)) for i in range(3)]
    batch = next(iter(image_loader(paths, np.arange(3), lambda image: [image], batch_size=3,
                                   workers=0, pin_memory=False)))
    assert isinstance(batch, PreparedBatch) and [i for i, _, _ in batch] == [0, 1, 2]


# -- evaluation ----------------------------------------------------------------------------

def test_multi_crop_sends_each_image_to_the_device_once_and_matches_cpu_crops():
    model = tiny_vgg("A")
    evaluator = Evaluator(model, "multi-crop", batch_size=4)
    view = torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8)
    sent = []
    original = evaluator.network_input
    evaluator.network_input = lambda batch: sent.append(tuple(batch.shape)) or original(batch)
    posteriors = evaluator([[view]])[0]
    assert sent == [(1, 3, 256, 320)]  # not 50 crops of 224² per image and scale
    from vggfeat.evaluate.methods import crop_grid
    crops = torch.stack([view[:, t:t + 224, left:left + 224] for t, left in crop_grid(256, 320)])
    crops = torch.cat([crops, crops.flip(-1)])
    with torch.no_grad():
        expected = model(model.preprocessing(crops)).softmax(1).mean(0)
    torch.testing.assert_close(posteriors, expected, rtol=1e-5, atol=1e-6)


def test_descriptors_come_back_to_the_host_in_one_copy_per_batch():
    from vggfeat.descriptors.descriptor import DescriptorNet, DescriptorSpec

    spec = DescriptorSpec(layer="fc7", scales=(224, 256))
    net = DescriptorNet(tiny_vgg("A"), spec, batch_size=4)
    items = [[torch.randint(0, 256, (3, q, q + 32 * (i % 2)), dtype=torch.uint8)
              for q in spec.scales] for i in range(3)]  # 2 shapes per scale: 4 chunks
    with HostTraffic() as traffic:
        out = net(items)
    assert traffic.calls.count("cpu") == 1
    for i, item in enumerate(items):  # batching does not change a descriptor
        torch.testing.assert_close(out[i], net([item])[0], rtol=1e-5, atol=1e-6)


def test_dense_evaluation_turns_cudnn_benchmark_off_and_restores_it():
    model = tiny_vgg("A")
    seen = []
    evaluator = Evaluator(model, "dense")
    evaluator.model.features.register_forward_hook(
        lambda *_: seen.append(torch.backends.cudnn.benchmark))
    with cudnn_benchmark(True):
        evaluator([[torch.randint(0, 256, (3, 224, 256), dtype=torch.uint8)]])
        assert torch.backends.cudnn.benchmark  # restored for the caller
    assert seen == [False]  # every image size is a new shape in dense mode
    before = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_evaluate_progress_keeps_running_counts(monkeypatch, tmp_path):
    """The progress bar's top-1 must not rescore every image so far after each batch."""
    from conftest import write_image

    import vggfeat.evaluate.run as run
    from vggfeat.data.sources import ImageList

    paths = [str(write_image(tmp_path / f"{i}.jpg", size=(224, 240), seed=i)) for i in range(12)]
    scored = []
    for name in ("topk_error", "topk_misses"):
        original = getattr(run, name, None)
        if original is not None:
            monkeypatch.setattr(run, name, lambda p, lab, k, f=original: scored.append(len(lab))
                                or f(p, lab, k))
    result = run.evaluate(ImageList(paths, [i % 3 for i in range(12)], ["a", "b", "c"]),
                          tiny_vgg("A", num_classes=3), method="center-crop", batch_size=4,
                          workers=0)
    assert len(result.labels) == 12 and scored and max(scored) <= 4


# -- preprocessing and the training step -----------------------------------------------------

def test_input_constants_are_built_once_per_device():
    from vggfeat.train.augment import pca_lighting

    model = tiny_vgg("A")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    alphas = torch.randn(2, 3)
    model.preprocessing(pca_lighting(images.float(), alphas))  # first use builds them
    with HostTraffic() as traffic:
        for _ in range(3):
            model.preprocessing(pca_lighting(images.float(), alphas))
    assert traffic.calls == []


def test_training_steps_do_not_wait_for_the_device(monkeypatch, tmp_path, colours):
    """Between loss reads (every 10 steps), a step neither syncs nor builds tensors on the host;
    images are decoded in a worker process, so only the loop itself is watched.  The first step
    of a process may copy the per-device constants (preprocessing, PCA lighting) once: they are
    cached, so whether it does depends on which tests ran before in the same process."""
    from vggfeat.train import Recipe, train
    from vggfeat.train.loop import _Trainer

    per_step = []
    original = _Trainer.step

    def watched(self, loader):
        with HostTraffic() as traffic:
            images = original(self, loader)
        per_step.append(traffic.calls)
        return images

    monkeypatch.setattr(_Trainer, "step", watched)
    recipe = Recipe(**{**TINY, "workers": 1, "checkpoint_steps": None, "micro_batch": 2})
    train(recipe, colours, tmp_path / "run", device="cpu", progress=False, max_steps=4)
    assert len(per_step) == 4 and per_step[1:] == [[], [], []]


@needs_cuda
def test_cuda_training_steps_never_synchronise(tmp_path, colours, monkeypatch):
    from vggfeat.train import Recipe, train
    from vggfeat.train.loop import _Trainer

    original = _Trainer.step

    def strict(self, loader):
        if self.state.global_step == 0:  # the first step warms up cuDNN and the allocator
            return original(self, loader)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(_Trainer, "step", strict)
    recipe = Recipe(**{**TINY, "workers": 1, "checkpoint_steps": None})
    train(recipe, colours, tmp_path / "run", device="cuda", progress=False, max_steps=3)


@needs_cuda
def test_cuda_training_defaults_to_bf16_and_restores_backend_settings(tmp_path, colours):
    from vggfeat.train import Recipe, train
    from vggfeat.train.loop import resolved_amp

    assert resolved_amp(Recipe(), torch.device("cuda")) == "bf16"
    benchmark, tf32 = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    train(Recipe(**TINY), colours, tmp_path / "run", device="cuda", progress=False, max_steps=2)
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == \
        (benchmark, tf32)


def test_amp_defaults():
    from vggfeat.train import Recipe
    from vggfeat.train.loop import resolved_amp

    assert resolved_amp(Recipe(), torch.device("cuda")) == "bf16"  # bf16 keeps fp32's range
    assert resolved_amp(Recipe(), torch.device("cpu")) is None
    assert resolved_amp(Recipe(amp="fp32"), torch.device("cuda")) is None
    assert resolved_amp(Recipe(amp="fp16"), torch.device("cpu")) == "fp16"


# -- process groups --------------------------------------------------------------------------

def test_each_torchrun_process_takes_its_own_gpu_and_a_finite_timeout(monkeypatch):
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch_dist, "init_process_group",
                        lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(distributed.torch_dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.torch_dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.update(gpu=device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs, on any machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    dist = distributed.Distributed.from_env("cuda:0")  # as `--device cuda:0` under torchrun
    assert dist.device == torch.device("cuda", 1) and joined["gpu"] == torch.device("cuda", 1)
    assert joined["backend"] == "nccl" and joined["timeout"] == distributed.DEFAULT_TIMEOUT
    assert timedelta(minutes=5) <= distributed.DEFAULT_TIMEOUT < timedelta(hours=2)
    dist = distributed.Distributed.from_env("cpu", timeout=timedelta(minutes=3))
    assert dist.device == torch.device("cpu") and joined["backend"] == "gloo"
    assert joined["timeout"] == timedelta(minutes=3)

