"""`pixtok train` / `pixtok eval` for depth regression on procedural scenes, run as a user runs
them; the depth task's augmentation and MAE start in process; the depth case of `pixtok bench`."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from clirun import pixtok
from flop_formulas import vit_flops

from pixtok.checkpoint import save_weights, write_json
from pixtok.errors import UserError
from pixtok.models.depth import depth_loss
from pixtok.models.mae import MAE, MAEConfig
from pixtok.models.vit import vit_config
from tools.bench_infer import build_depth, forward_flops
from training.data.depth import build_depth_dataset
from training.distributed import Dist
from training.metrics.depth import depth_metrics, mean_depth_baseline
from training.recipe import load_recipe
from training.tasks.depth import DepthTask

# the CPU recipe, shrunk: 12x16 scenes (192 pixel tokens), 256 to train on, 64 to test on
TINY = ["image_size=12x16", "n_train=256", "n_test=64", "threads=1"]


def test_train_then_eval_beats_the_mean_depth(tmp_path):
    out = tmp_path / "run"
    res = pixtok("train", "depth1-scenes", "--out", str(out), *TINY, "batch_size=16", "epochs=6",
                 "eval_every=2", "ema=0.9", f"cache_dir={tmp_path / 'cache'}")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "scenes-test-seed0-12x16.npz", "scenes-train-seed0-12x16.npz"]   # for the next run
    final = json.loads(res.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [2, 4, 6]
    # it learns: the scale-free error falls and the error ends below the mean-depth baseline's
    # (the absolute rmse of a 96-step run wobbles with the CPU's float paths: on one machine it
    # ends 0.006 above its first evaluation while its scale-free part falls 8%)
    assert lines[-1]["rmse_scaled"] < lines[0]["rmse_scaled"]
    assert lines[-1]["rmse"] < lines[-1]["baseline_rmse"]

    # the baseline is the training set's mean depth, scored on the test set
    train = build_depth_dataset("scenes", split="train", image_size=(12, 16), n=256)
    test = build_depth_dataset("scenes", split="test", image_size=(12, 16), n=64)
    mean = mean_depth_baseline(train.depths)
    trivial = depth_metrics(torch.full_like(test.depths, mean), test.depths)
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "depth" and config["model"]["arch"] == "vit-depth"
    assert config["train_mean_depth"] == pytest.approx(mean)
    assert config["model"]["args"]["head"]["init_depth"] == pytest.approx(mean)
    assert config["input"]["image_size"] == [12, 16] and config["unit"] == "m"
    assert config["data"] == {"dataset": "scenes", "data_dir": None, "image_size": [12, 16],
                              "n_train": 256, "n_test": 64}

    metrics = json.loads(pixtok("eval", str(out)).stdout)
    assert set(metrics) >= {"rmse", "rel", "delta1", "delta2", "delta3", "log10", "n",
                            "baseline_rmse", "baseline_rel", "baseline_delta1"}
    assert metrics["n"] == 64 * 12 * 16                    # every scene pixel has a depth
    assert metrics["baseline_rmse"] == pytest.approx(trivial["rmse"])
    assert metrics["baseline_delta1"] == pytest.approx(trivial["delta1"])
    assert metrics["rmse"] == pytest.approx(final["rmse"], rel=1e-6)   # the exported weights
    assert metrics["rmse"] < 0.93 * metrics["baseline_rmse"], metrics
    assert metrics["delta1"] > metrics["baseline_delta1"]


def write_nyu(folder: Path, n: int = 12, size=(24, 32), seed: int = 0) -> tuple:
    """nyu_depth_v2_labeled.mat as MATLAB -v7.3 stores it (column-major: images (N, 3, W, H),
    depths (N, W, H)) and splits.mat (1-based trainNdxs / testNdxs) -> (images, depths)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.0, (n, *size)).astype(np.float32)
    depths[:, :2] = 0.0                                          # no reading in the top rows
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
    with h5py.File(folder / "splits.mat", "w") as f:
        f["trainNdxs"] = np.arange(1, n - 3, dtype=np.float64)[None]
        f["testNdxs"] = np.arange(n - 3, n + 1, dtype=np.float64)[None]
    return images, depths


def test_nyu_recipe_trains_and_evaluates_on_another_copy(tmp_path):
    write_nyu(tmp_path / "nyu")
    out = tmp_path / "run"
    pixtok("train", "depth-s2-nyu", "--out", str(out), f"data_dir={tmp_path / 'nyu'}",
           "model=ViT-F/2", "image_size=12x16", "batch_size=4", "max_steps=2", "threads=1",
           "amp=off")
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["dataset"] == "nyu" and config["data"]["splits"] is None
    assert config["model"]["args"]["patch_size"] == 2
    write_nyu(tmp_path / "copy", seed=1)                         # other pixels, same layout
    metrics = json.loads(pixtok("eval", str(out), "--data", str(tmp_path / "copy")).stdout)
    assert metrics["n"] == 4 * 11 * 16                           # 4 test images; nearest resize
    assert 0 < metrics["rmse"] < 10                              # keeps 11 of 12 rows measured


def small_task(world: int = 1, rank: int = 0, **overrides) -> DepthTask:
    values = {"model": "ViT-F/1", "image_size": "12x16", "n_train": "8", "n_test": "2",
              "batch_size": "8", **overrides}
    recipe = load_recipe("depth1-scenes", [f"{k}={v}" for k, v in values.items()])
    return DepthTask(recipe, Dist(rank=rank, world=world))


def test_flip_moves_image_and_depth_together_and_ranks_agree():
    task = small_task()
    images, depths = task.train_set.images.float() / 255, task.train_set.depths
    x, d = next(task.batches([list(range(8))], [5]))
    flipped = []
    for i in range(8):
        if torch.equal(x[i], images[i]):
            assert torch.equal(d[i], depths[i])
            flipped.append(False)
        else:
            assert torch.equal(x[i], images[i].flip(-1)) and torch.equal(d[i], depths[i].flip(-1))
            flipped.append(True)
    assert any(flipped) and not all(flipped)
    # two processes, each with its half of the global batch, augment like one process
    halves = [next(small_task(2, r).batches([list(range(4 * r, 4 * r + 4))], [5]))
              for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x)
    assert torch.equal(torch.cat([h[1] for h in halves]), d)
    # padding for the random crop is 0 m: no depth, ignored by the loss and the metrics
    _, d = next(small_task(crop_padding=3).batches([list(range(8))], [5]))
    assert (d == 0).any() and task.loss(task.model, (x, d), 0).isfinite()


def test_silog_lambda_reaches_the_loss():
    # the same model and batch under two recipes: the loss is silog with the recipe's weight
    tasks = {lam: small_task(token_drop=0, silog_lambda=lam) for lam in (0.0, 1.0)}
    x, d = next(tasks[0.0].batches([list(range(8))], [5]))
    model = tasks[0.0].model
    with torch.no_grad():
        pred = model(x)
        for lam, task in tasks.items():
            expected = depth_loss(pred, d, kind="silog", silog_lambda=lam)
            assert task.loss(model, (x, d), 0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert tasks[0.0].loss(model, (x, d), 0) > tasks[1.0].loss(model, (x, d), 0)


def test_init_from_an_mae_checkpoint_loads_the_encoder(tmp_path):
    task = small_task()
    enc = vit_config("ViT-F/1", image_size=(12, 16), pool="mean")
    mae = MAE(MAEConfig(enc, decoder_width=16, decoder_depth=1, decoder_heads=2))
    for p in mae.parameters():
        p.data.normal_()
    write_json(tmp_path / "config.json", {"format": "pixtok-checkpoint/1", "task": "mae",
                                          "model": {"arch": "mae", "args": mae.cfg.to_dict()}})
    save_weights(tmp_path / "model.safetensors", mae.state_dict())
    head = task.model.head.mlp[-1].bias.detach().clone()
    task.init_from(tmp_path)
    for name, p in mae.encoder.state_dict().items():
        assert torch.equal(task.model.encoder.state_dict()[name], p), name
    assert torch.equal(task.model.head.mlp[-1].bias, head)


def test_a_later_phase_on_more_scenes_starts_from_every_weight(tmp_path):
    # more training scenes measure other input statistics and mean depth: the new phase keeps
    # its own (as --resume rebuilds them) and still takes every weight of the first
    first, later = small_task(), small_task(n_train="16", drop_path="0.1")
    assert first.spec["args"]["mean"] != later.spec["args"]["mean"]
    assert first.spec["args"]["head"]["init_depth"] != later.spec["args"]["head"]["init_depth"]
    for p in first.model.parameters():
        p.data.normal_()
    write_json(tmp_path / "config.json", {"format": "pixtok-checkpoint/1", **first.config()})
    save_weights(tmp_path / "model.safetensors", first.model.state_dict())
    own = json.loads(json.dumps(later.spec))
    later.init_from(tmp_path)
    for name, p in first.model.state_dict().items():
        assert torch.equal(later.model.state_dict()[name], p), name
    assert later.spec == own and later.config()["model"] == own
    # what does decide the weights' meaning still has to match, and the error names it
    with pytest.raises(UserError, match=r"holds another model \(depth 2 vs 4\)"):
        small_task(n_train="16", depth="4").init_from(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["dataset=kitti"], "depth data set 'kitti'"),
    (["depth_loss=l2"], "depth_loss='l2'"),
    (["dataset=nyu", "data_dir=/nonexistent/nyu"], "/nonexistent/nyu"),
])
def test_depth_cli_errors_are_one_line(args, message, tmp_path):
    res = pixtok("train", "depth1-scenes", "--out", str(tmp_path / "x"), *args, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr


def test_bench_counts_a_depth_models_flops_as_the_hand_formula_does():
    """`pixtok bench infer` counts FLOPs with FlopCounterMode; the hand formula is the oracle:
    the encoder's, plus the dense head's one linear layer per token."""
    case = {"build": lambda: build_depth("ViT-F/1", (6, 8)), "image_size": [6, 8], "batch": 2}
    cfg = vit_config("ViT-F/1", image_size=(6, 8), pool="mean")
    counted = forward_flops(case, case["build"]())
    assert counted == vit_flops(cfg) + 2 * 48 * 32
