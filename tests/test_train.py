"""Training: recipes, augmentation, the loop (overfit, resume after SIGKILL, DDP, NaN stop)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLOURS, coloured_image, run_cli

import vggfeat
from vggfeat.train import (
    PCA_EIGVAL,
    PCA_EIGVEC,
    Recipe,
    RecipeError,
    TrainingError,
    epoch_order,
    load_recipe,
    micro_batches,
    pca_lighting,
    train,
    train_transform,
)
from vggfeat.train.augment import augment
from vggfeat.train.checkpoint import CHECKPOINT

RECIPES = Path(__file__).parent.parent / "recipes"
# A reduced-width net A through the same builder; ImageNet-style input scaling keeps a tiny net
# with a tiny batch stable at lr 0.02 (0.64 per 256 images, scaled to the batch of 8).
TINY = dict(arch="A", width_mult=1 / 16, fc_dim=32, batch_size=8, micro_batch=4, epochs=3,
            lr=0.64, preprocessing="imagenet", workers=0, checkpoint_steps=1)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """train/ and val/ folders of three colour-coded classes (real JPEG files)."""
    root = tmp_path_factory.mktemp("colours")
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(["blue", "green", "red"]):
            for i in range(n):
                coloured_image(root / split / name / f"{i}.jpg", COLOURS[c],
                               seed=100 * c + i + (50 if split == "val" else 0))
    return root


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)["model"]
    return vggfeat.vgg(weights=path).state_dict()


# -- recipes -------------------------------------------------------------------------------

def test_shipped_recipes_record_how_each_row_was_made():
    recipes = {p.stem: load_recipe(p) for p in RECIPES.glob("*.yaml")
               if not p.stem.startswith("loc-")}
    assert sorted(recipes) == sorted(["A-256", "A-LRN-256", "B-256", "C-256", "C-384", "C-256-512",
                                      "D-256", "D-384", "D-256-512", "E-256", "E-384",
                                      "E-256-512"])
    for name, r in recipes.items():
        assert (r.batch_size, r.momentum, r.weight_decay, r.dropout, r.epochs) == (256, 0.9, 5e-4,
                                                                                   0.5, 74)
        if name.startswith("A"):
            assert r.init_from_a is None and r.weights is None and r.lr == 0.01
        elif name.endswith("-256"):
            assert r.init_from_a == "runs/A-256/final.safetensors" and r.lr == 0.01
        elif name.endswith("-384"):
            assert r.weights == f"runs/{r.arch}-256/final.safetensors" and r.lr == 1e-3
        else:
            assert r.train_scale == (256, 512) and r.weights == f"runs/{r.arch}-384/final.safetensors"
            assert r.scale_label == "256-512" and r.val_scale == 384


def test_recipe_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: D\nlearning_rate: 0.1\n")
    with pytest.raises(RecipeError, match="bad.yaml: unknown recipe key\\(s\\) learning_rate"):
        load_recipe(bad)
    bad.write_text("train_scale: [512, 256]\n")
    with pytest.raises(RecipeError, match="Smin < Smax"):
        load_recipe(bad)
    bad.write_text("arch: F\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="smaller than the 224 px crop"):
        Recipe(train_scale=200)
    r = load_recipe(RECIPES / "D-256.yaml").with_overrides(lr=0.1, epochs=None)
    assert r.lr == 0.1 and r.epochs == 74 and r.name == "D-256"


# -- augmentation --------------------------------------------------------------------------

def test_scale_jitter_draws_s_from_the_range():
    rescale = train_transform((256, 512)).transforms[0]
    image = torch.zeros(3, 300, 400, dtype=torch.uint8)
    sides = []
    for seed in range(300):
        torch.manual_seed(seed)
        sides.append(min(rescale(image).shape[-2:]))
    assert 256 <= min(sides) < 270 and 500 < max(sides) <= 512
    assert abs(np.mean(sides) - 384) < 15  # uniform on [256; 512]
    torch.manual_seed(0)
    assert min(train_transform((256, 256)).transforms[0](image).shape[-2:]) == 256


def test_crop_is_a_window_of_the_rescaled_image_and_flips_half_the_time():
    h, w = 256, 300  # short side = S: the rescale keeps the pixels, so the crop can be located
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([rows, cols % 256, cols // 256]).to(torch.uint8)
    transform = train_transform((256, 256))
    flips = 0
    for seed in range(40):
        view, alphas, _ = augment(image, transform, seed=seed, lighting=0.1)
        assert view.shape == (3, 224, 224) and alphas.shape == (3,)
        r, c = view[0].long(), view[1].long() + 256 * view[2].long()
        assert (r == r[:, :1]).all() and torch.equal(r[:, 0], r[0, 0] + torch.arange(224))
        assert 0 <= r[0, 0] <= h - 224 and (c == c[:1]).all()
        step = c[0, 1:] - c[0, :-1]
        assert (step == 1).all() or (step == -1).all()
        flips += int((step == -1).all())
    assert 8 <= flips <= 32
    rng_before = torch.get_rng_state()
    again = augment(image, transform, seed=7, lighting=0.1)
    assert torch.equal(again[0], augment(image, transform, seed=7, lighting=0.1)[0])
    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout's stream is left alone


def test_pca_lighting_has_alexnets_statistics():
    torch.manual_seed(0)
    alphas = torch.randn(20000, 3) * 0.1
    shifted = pca_lighting(torch.zeros(20000, 3, 2, 2), alphas)
    assert torch.equal(shifted[:, :, 0, 0], shifted[:, :, 1, 1])  # one shift for every pixel
    shift = shifted[:, :, 0, 0].double() / 255
    expected = PCA_EIGVEC.double() @ torch.diag((0.1 * PCA_EIGVAL.double()) ** 2) @ PCA_EIGVEC.double().T
    np.testing.assert_allclose(torch.cov(shift.T), expected, atol=2e-5, rtol=0.05)


def test_data_order_and_sharding_cover_each_batch_once():
    order = epoch_order(40, seed=1, epoch=2)
    assert sorted(order) == list(range(40)) and not np.array_equal(order, epoch_order(40, seed=1,
                                                                                          epoch=3))
    one = micro_batches(order, epoch=2, first_step=1, batch_size=16, rank=0, world_size=1,
                        micro_batch=16)
    two = [micro_batches(order, epoch=2, first_step=1, batch_size=16, rank=r, world_size=2,
                         micro_batch=4) for r in (0, 1)]
    assert [k for _, k in one[0]] == list(order[16:32]) and len(one) == 1  # last 8 dropped
    assert sorted(k for b in two[0] + two[1] for _, k in b) == sorted(order[16:32])
    assert all(len(b) == 4 for b in two[0])


# -- the loop ------------------------------------------------------------------------------

def test_tiny_net_learns_and_exports_weights_for_extract_and_evaluate(tmp_path, colours):
    recipe = Recipe(**{**TINY, "epochs": 4})
    result = train(recipe, colours, tmp_path / "run", device="cpu", progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and min(losses[1:]) < 0.8 * losses[0]  # it learns
    run = tmp_path / "run"
    for name in ("final.safetensors", "best.safetensors", "metrics.csv", "curves.png",
                 "recipe.yaml", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")
    model = vggfeat.vgg(weights=run / "final.safetensors")
    assert model.weights_meta["train_scale"] == "256" and model.num_classes == 3
    assert model.weights_meta["class_names"] == ["blue", "green", "red"]
    assert model.weights_meta["recipe"]["lr"] == 0.64 and model.weights_meta["lr"] == 0.02
    assert model.preprocessing.name == "imagenet"
    proc = run_cli("evaluate", "--weights", run / "final.safetensors", "--data", colours / "val",
                   "--method", "dense", "--workers", "0", "--quiet")
    assert "| A | 256 | dense | 224,256,288 | 9 |" in proc.stdout
    with pytest.raises(RecipeError, match="already holds a run"):
        train(recipe, colours, run, device="cpu", progress=False)
    with pytest.raises(RecipeError, match="lr: 0.64 → 0.1"):
        train(recipe.with_overrides(lr=0.1), colours, run, device="cpu", resume=True,
              progress=False)
    # Resuming a finished run leaves its export byte for byte (caches key on the weights' hash).
    exported = (run / "final.safetensors").read_bytes()
    again = train(recipe, colours, run, device="cpu", resume=True, progress=False)
    assert again.final == run / "final.safetensors"
    assert (run / "final.safetensors").read_bytes() == exported


def test_sigkill_and_resume_gives_the_same_weights(tmp_path, colours):
    recipe_file = tmp_path / "tiny.yaml"
    recipe = Recipe(**TINY)
    recipe_file.write_text("\n".join(f"{k}: {v}" for k, v in TINY.items()) + "\n")
    reference = train(recipe, colours, tmp_path / "ref", device="cpu", progress=False)
    args = [sys.executable, "-m", "vggfeat", "train", "--recipe", recipe_file, "--data", colours,
            "--out", tmp_path / "killed", "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert killed_at < reference.global_step == 9  # killed mid-run
    resumed = train(recipe, colours, tmp_path / "killed", device="cpu", resume=True,
                    progress=False)
    assert resumed.global_step == 9
    expected = weights_of(reference.final)
    for key, value in weights_of(resumed.final).items():
        assert torch.equal(value, expected[key]), key
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in
                                                         reference.history]
    # Stopping and resuming without any kill: validation in between must not change the net
    # behind the loop's back, and --resume alone continues with the run's own recipe.
    train(recipe, colours, tmp_path / "stepped", device="cpu", progress=False, max_steps=4)
    run_cli("train", "--data", colours, "--out", tmp_path / "stepped", "--resume", "--device",
            "cpu", "--quiet")
    for key, value in weights_of(tmp_path / "stepped" / "final.safetensors").items():
        assert torch.equal(value, expected[key]), key


def test_checkpoint_holds_every_field_of_the_loop_state(tmp_path):
    from dataclasses import fields

    from vggfeat.train.checkpoint import TrainState, state_entries, state_from_entries

    state = TrainState(epoch=2, step=5, global_step=17, best=0.25, skipped=1,
                       history=[{"epoch": 1, "train_loss": 1.5}], epoch_loss=3.0, epoch_images=12)
    torch.save(state_entries(state), tmp_path / "last.pt")
    entries = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(entries) == {f.name for f in fields(TrainState)}
    assert state_from_entries(entries, tmp_path / "last.pt") == state
    del entries["epoch_images"]
    with pytest.raises(TrainingError, match="last.pt has no epoch_images"):
        state_from_entries(entries, tmp_path / "last.pt")


def test_a_task_without_metrics_is_a_config_error(tmp_path, colours):
    from vggfeat.errors import ConfigError
    from vggfeat.train import ImageClassification

    class Unscored(ImageClassification):
        metrics = ()

    with pytest.raises(ConfigError, match="Unscored names no validation metric"):
        train(Recipe(**TINY), Unscored.from_folders(colours), tmp_path / "run", device="cpu",
              progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_two_gloo_processes_make_the_same_update_as_one(tmp_path, colours):
    common = ["--data", colours, "--arch", "A", "--width-mult", "0.0625", "--fc-dim", "32",
              "--batch-size", "8", "--dropout", "0", "--max-steps", "2", "--device", "cpu",
              "--workers", "0", "--quiet"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preprocessing: imagenet\n")
    run_cli("train", "--recipe", recipe, "--out", tmp_path / "one", "--micro-batch", "8", *common)
    run_cli("train", "--recipe", recipe, "--out", tmp_path / "accum", "--micro-batch", "2",
            *common)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "29533", "-m", "vggfeat", "train", "--recipe", str(recipe),
                    "--out", str(tmp_path / "ddp"), "--micro-batch", "2", *map(str, common)],
                   check=True, env=env, capture_output=True, timeout=300)
    one = weights_of(tmp_path / "one" / "checkpoints" / "last.pt")
    for other in ("accum", "ddp"):
        state = weights_of(tmp_path / other / "checkpoints" / "last.pt")
        for key in one:
            torch.testing.assert_close(state[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    assert not torch.equal(one["features.conv1_1.weight"],
                           vggfeat.vgg("A", weights="random", width_mult=1 / 16, fc_dim=32,
                                       num_classes=3).state_dict()["features.conv1_1.weight"])


def test_resume_without_a_recipe_needs_the_run_folder(tmp_path, colours):
    from click.testing import CliRunner

    from vggfeat.cli.main import cli

    result = CliRunner().invoke(cli, ["train", "--data", str(colours), "--out",
                                      str(tmp_path / "none"), "--resume", "--device", "cpu"])
    assert isinstance(result.exception, RecipeError)
    assert "none/recipe.yaml does not exist" in str(result.exception)


def test_recipe_values_are_checked():
    for bad in ({"lr": float("inf")}, {"lr": float("nan")}, {"lr": -0.1}, {"lr": "0.01"},
                {"momentum": 1.0}, {"weight_decay": float("nan")}, {"micro_batch": 0},
                {"checkpoint_minutes": 0}, {"lighting": -1}):
        key = next(iter(bad))
        with pytest.raises(RecipeError, match=key):
            Recipe(**bad)


def test_lr_is_given_per_256_images_and_scaled_to_the_batch():
    assert Recipe().scaled_lr == 0.01 and Recipe(batch_size=64).scaled_lr == 0.0025
    assert Recipe(weights="x.safetensors").base_lr == 1e-3  # the paper's fine-tuning lr
    assert Recipe(batch_size=64, lr=0.1, lr_base_size=None).scaled_lr == 0.1


def test_glorot_counts_every_kernel_position_in_a_convs_fan_out():
    from vggfeat.models.init import init_weights

    model = init_weights(vggfeat.VGG("A", width_mult=1 / 4, fc_dim=64, num_classes=10), "glorot",
                         seed=0)
    for conv in (model.features.conv1_1, model.features.conv3_1):
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(conv.weight)  # k·k each
        expected = 2.0 / (fan_in + fan_out)  # Glorot & Bengio's variance
        assert abs(conv.weight.var().item() / expected - 1) < 0.1
    fc6 = model.head.fc6.weight  # a Linear 16·7·7·8 → 64 stored as a 7×7 conv
    assert abs(fc6.var().item() / (2.0 / (fc6[0].numel() + 64)) - 1) < 0.1


def test_a_quick_run_with_default_settings_trains(tmp_path):
    """Defaults only (paper preprocessing, Glorot init, lr scaled to a batch of 4)."""
    data = tmp_path / "photos"
    for split, n in (("train", 8), ("val", 2)):
        for c, name in enumerate(["a", "b"]):
            for i in range(n):
                coloured_image(data / split / name / f"{i}.jpg", COLOURS[c + 2], seed=10 * c + i)
    result = train(Recipe(arch="A", width_mult=1 / 16, fc_dim=32, epochs=2, batch_size=4,
                          workers=0), data, tmp_path / "run", device="cpu", progress=False)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert result.history[0]["lr"] == pytest.approx(0.01 * 4 / 256) and result.final


def test_non_finite_weights_are_never_written(tmp_path, colours):
    recipe = Recipe(**{**TINY, "lr": 1e38, "checkpoint_steps": None, "epochs": 1})
    with pytest.raises(TrainingError) as error:
        train(recipe, colours, tmp_path / "run", device="cpu", progress=False)
    message = str(error.value)
    assert "not finite" in message or "loss is" in message
    assert "No checkpoint had been written yet" in message and "last.pt" not in message
    assert not list((tmp_path / "run").glob("*.safetensors"))


WALL_CLOCK = ("seconds", "images_per_s")  # history entries that differ from run to run


def assert_same_checkpoints(path: Path, expected: Path) -> None:
    """Every tensor and number of two checkpoints is equal: weights, optimiser state (momentum),
    lr schedule, loss scaler and the loop's position and history."""
    def flat(value, key=""):
        if isinstance(value, (list, tuple)):
            value = dict(enumerate(value))
        if not isinstance(value, dict):
            return {key: value}
        return {k: v for name, item in value.items() for k, v in flat(item, f"{key}/{name}").items()}

    def load(file):
        checkpoint = torch.load(file, weights_only=True)
        checkpoint["history"] = [{k: v for k, v in row.items() if k not in WALL_CLOCK}
                                 for row in json.loads(checkpoint["history"])]
        return flat(checkpoint)

    got, want = load(path), load(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_resuming_with_fp16_a_run_started_in_fp32(tmp_path, colours):
    recipe = Recipe(**{**TINY, "epochs": 1})
    fp16 = recipe.with_overrides(amp="fp16")
    # An fp16 run stopped and resumed ends where an uninterrupted one does: same weights,
    # optimiser state, loss scale and growth tracker.
    uninterrupted = train(fp16, colours, tmp_path / "fp16", device="cpu", progress=False)
    train(fp16, colours, tmp_path / "fp16-resumed", device="cpu", progress=False, max_steps=1)
    resumed = train(fp16, colours, tmp_path / "fp16-resumed", device="cpu", resume=True,
                    progress=False)
    assert resumed.global_step == uninterrupted.global_step == 3
    assert_same_checkpoints(tmp_path / "fp16-resumed" / CHECKPOINT,
                            tmp_path / "fp16" / CHECKPOINT)
    scaler = torch.load(tmp_path / "fp16" / CHECKPOINT, weights_only=True)["scaler"]
    assert scaler["_growth_tracker"] == 3  # the scaler ran (three finite steps)
    # Started in fp32, the run has no scaler state: the scaler starts afresh.
    train(recipe, colours, tmp_path / "run", device="cpu", progress=False, max_steps=1)
    result = train(fp16, colours, tmp_path / "run", device="cpu", resume=True, progress=False)
    assert result.global_step == 3 and result.final is not None
    scaler = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["scaler"]
    assert scaler["_growth_tracker"] == 2  # a fresh scaler, then two steps


DDP_TASK = """
import os, sys
from vggfeat.train import ImageClassification, Recipe, train

class Recording(ImageClassification):  # a Task subclass: the loop's extension point
    def validate(self, model, images, recipe, **kwargs):
        with open(os.path.join(sys.argv[2], "val-rank" + os.environ["RANK"]), "w") as f:
            f.write("\\n".join(images.paths))
        return super().validate(model, images, recipe, **kwargs)

recipe = Recipe(arch="A", width_mult=1 / 16, fc_dim=32, batch_size=2, micro_batch=1, epochs=1,
                lr=0.64, preprocessing="imagenet", workers=0)
train(recipe, Recording.from_folders(sys.argv[1]), sys.argv[2], device="cpu", progress=False)
"""


def test_ddp_survives_an_empty_micro_batch_and_shards_validation(tmp_path, colours):
    """Two gloo processes, one image each per step, one unreadable JPEG: the process whose
    micro-batch is empty must still join the gradient all-reduce; validation is split."""
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "train" / "green" / "3.jpg").write_bytes(b"\xff\xd8 truncated")
    script = tmp_path / "ddp_task.py"
    script.write_text(DDP_TASK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29534", str(script), str(data), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    skipped = "".join(p.read_text() for p in run.glob("skipped-rank*.tsv"))
    assert skipped.count("green/3.jpg") == 1
    assert (run / "metrics.csv").read_text().splitlines()[1].split(",")[6] == "1"  # all ranks'
    shards = [(run / f"val-rank{r}").read_text().splitlines() for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == 9
    assert (run / "final.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, colours):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1.0e+8\ncheckpoint_steps: 1\npreprocessing: paper\n")
    proc = run_cli("train", "--recipe", recipe, "--data", colours, "--out", tmp_path / "run",
                   "--arch", "A", "--width-mult", "0.0625", "--fc-dim", "32", "--batch-size", "8",
                   "--workers", "0", "--device", "cpu", "--quiet", check=False)
    assert proc.returncode == 1
    assert f"The last good checkpoint {tmp_path / 'run' / CHECKPOINT} is intact" in proc.stderr
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "run" / "final.safetensors").exists()


def test_unreadable_training_images_are_skipped_and_counted(tmp_path, colours):
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "train" / "red" / "0.jpg").write_bytes(b"\xff\xd8 truncated")
    # bf16 autocast on the CPU exercises the mixed-precision path of the loop too
    result = train(Recipe(**{**TINY, "epochs": 1, "amp": "bf16"}), data, tmp_path / "run",
                   device="cpu", progress=False)
    assert result.skipped == 1 and result.final is not None
    assert "red/0.jpg" in (tmp_path / "run" / "skipped-rank0.tsv").read_text()
    for jpeg in (data / "train").rglob("*.jpg"):  # nothing readable: stop, do not "train"
        jpeg.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(TrainingError, match="no training image of epoch 1 could be read"):
        train(Recipe(**{**TINY, "epochs": 1}), data, tmp_path / "none", device="cpu",
              progress=False)


def test_max_steps_says_it_stopped_and_how_to_continue(tmp_path, colours):
    run = tmp_path / "run dir"
    common = ["--arch", "A", "--width-mult", "0.0625", "--fc-dim", "32", "--batch-size", "8",
              "--device", "cpu", "--workers", "0", "--quiet"]
    err = run_cli("train", "--data", colours, "--out", run, "--max-steps", "1", *common).stderr
    assert f"stopped after 1 steps, as asked by --max-steps 1; the checkpoint is in {run}" in err
    again = shlex.split(err.split("continue with: ")[1].splitlines()[0])
    assert again[:4] == ["vggfeat", "train", "--resume", "--data"] and again[-1] == str(run)
    err = run_cli(*again[1:], "--max-steps", "2", "--device", "cpu", "--quiet").stderr
    assert "stopped after 2 steps, as asked by --max-steps 2" in err
