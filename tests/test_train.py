"""`pixtok train` / `pixtok eval` run as a user runs them: subprocesses on small IDX files."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clirun import ENV, pixtok
from datafiles import learnable_fashion
from safetensors.torch import load_file

from training.data import build_dataset
from training.recipe import load_recipe, recipe_names
from training.train import Budget, schedule_steps

TINY = ["model=ViT-F/1", "image_size=14", "batch_size=32", "eval_batch_size=128", "threads=1",
        "amp=off"]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return learnable_fashion(tmp_path_factory.mktemp("data") / "fashion")


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_train_then_eval(fashion, tmp_path):
    out = tmp_path / "run"
    res = pixtok("train", "vit1-fashion", "--out", str(out), f"data_dir={fashion}", *TINY,
                 "epochs=4", "lr=3e-3", "warmup_epochs=0.5", "eval_every=1", "ema=0.9")
    final = json.loads(res.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert all(a["loss"] > b["loss"] for a, b in zip(lines, lines[1:]))
    assert final["acc1"] > 0.3 and final["n"] == 128          # chance is 0.1
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "pixtok-checkpoint/1" and config["task"] == "classify"
    assert config["labels"][0] == "T-shirt/top" and len(config["labels"]) == 10
    assert config["input"] == {"image_size": [14, 14], "channels": 1, "resize": "bicubic"}
    assert config["model"]["args"]["num_classes"] == 10
    assert config["recipe"]["ema"] == 0.9 and config["recipe_name"] == "vit1-fashion"
    train_set = build_dataset("fashion-mnist", fashion, image_size=14)  # stats measured on it
    mean = train_set.images.double().mean().item() / 255
    assert config["model"]["args"]["mean"][0] == pytest.approx(mean, abs=1e-4)
    assert not list(out.glob("*.tmp"))
    # eval reproduces the final number from the exported (EMA) weights
    res = pixtok("eval", str(out))
    metrics = json.loads(res.stdout)
    assert metrics["acc1"] == pytest.approx(final["acc1"]) and metrics["n"] == 128
    assert set(metrics) >= {"acc1", "acc5", "n"}


def test_kill_and_resume_equals_uninterrupted(fashion, tmp_path):
    args = [f"data_dir={fashion}", *TINY, "epochs=2", "max_steps=24", "eval_every=0.5",
            "drop_path=0.1", "ema=0.8", "ckpt_minutes=0",         # checkpoint after every step
            "val_size=128"]                     # and keep the best on validation as it goes
    pixtok("train", "vit1-fashion", "--out", str(tmp_path / "a"), *args)

    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "pixtok", "train", "vit1-fashion", "--out",
                             str(b), *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        state = b / "train_state.pt"
        if state.is_file() and torch.load(state, weights_only=True)["step"] >= 9:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(b / "train_state.pt", weights_only=True)["step"]
    assert 9 <= killed_at < 24, "the run should have been killed midway"
    pixtok("train", "vit1-fashion", "--out", str(b), "--resume")

    for folder in ("", "best"):        # the last weights and the ones validation chose
        wa, wb = weights(tmp_path / "a" / folder), weights(b / folder)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (folder, k)
    assert (json.loads((tmp_path / "a/best/config.json").read_text())["selected"]
            == json.loads((b / "best/config.json").read_text())["selected"])
    strip = [{k: v for k, v in json.loads(x).items() if k != "time"}
             for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    strip_b = [{k: v for k, v in json.loads(x).items() if k != "time"}
               for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert strip == strip_b


def test_validation_keeps_the_best_weights_for_the_test_set(fashion, tmp_path):
    """With val_size=N, CKPT/best/ holds the weights of the evaluation that was best on the
    validation split (first of equals), a checkpoint folder of its own that `pixtok eval`
    scores exactly as training did; the last weights stay in CKPT/."""
    out = tmp_path / "run"
    pixtok("train", "vit1-fashion", "--out", str(out), f"data_dir={fashion}", *TINY,
           "epochs=3", "lr=2e-2", "warmup_epochs=0", "eval_every=0.25", "val_size=128")
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 12
    best_acc = max(m["acc1"] for m in evals)
    first = next(m for m in evals if m["acc1"] == best_acc)
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["selected"] == {"split": "val", "metric": "acc1", "mode": "max",
                                "value": best_acc, "step": first["step"]}
    assert best["step"] == first["step"] and best["metrics"]["acc1"] == best_acc
    rescored = json.loads(pixtok("eval", str(out / "best"), "--split", "val").stdout)
    assert rescored["acc1"] == best_acc and rescored["n"] == 128
    if first["step"] != evals[-1]["step"]:       # a different checkpoint from the last one
        assert not all(torch.equal(a, b) for a, b in zip(weights(out).values(),
                                                       weights(out / "best").values()))
    assert not list(out.glob("best.*"))          # nothing left of the swaps


def test_a_kill_inside_the_best_folder_swap_leaves_a_whole_one(tmp_path):
    from training.checkpoint import publish_folder, settle_folder

    final = tmp_path / "best"

    def write(step):
        def fill(folder):
            (folder / "model.safetensors").write_text(f"weights {step}")
            (folder / "config.json").write_text(json.dumps({"step": step}))
        return fill

    publish_folder(final, write(1))
    publish_folder(final, write(2))
    assert json.loads((final / "config.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    # killed after the old copy moved aside, before the new one moved in: the new one is whole
    final.rename(tmp_path / "best.old")
    (tmp_path / "best.partial").mkdir()
    write(3)(tmp_path / "best.partial")
    assert settle_folder(final) == final and json.loads((final / "config.json").read_text()) \
        == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    # killed while the new copy was written (no config.json yet), the old moved aside: the old
    final.rename(tmp_path / "best.old")
    (tmp_path / "best.partial").mkdir()
    (tmp_path / "best.partial" / "model.safetensors").write_text("half")
    assert settle_folder(final) == final and json.loads((final / "config.json").read_text()) \
        == {"step": 3}
    assert (final / "model.safetensors").read_text() == "weights 3"
    assert settle_folder(tmp_path / "none") is None


def test_a_stored_length_gives_its_steps_back():
    """A budget stores its length as steps / steps_per_epoch; --resume must read the same
    number of steps back, or the resumed run trains a step more than the one never stopped."""
    for steps_per_epoch in (7, 117, 125, 469):
        for steps in range(51, 5000, 13):
            assert schedule_steps(steps / steps_per_epoch, steps_per_epoch) == steps
    assert schedule_steps(40.829, 117) == 4777 and schedule_steps(0.5, 3) == 2


def test_budget_times_the_median_step():
    """Other work on the machine during some of the timed steps (here the first 15 of 40 take
    5x longer) must not cut the run short, and a checkpoint's pause is no step's time."""
    budget = Budget(10, 0, time.time(), torch.device("cpu"))
    clock = [0.0]
    budget.clock = lambda: clock[0]
    for step in range(1, 61):
        clock[0] += 5.0 if step <= 25 else 1.0
        budget.lap(step)
        if step == 30:                             # a checkpoint after step 30
            clock[0] += 30.0
            budget.pause(30.0)
    assert (budget.start, budget.end) == (10, 50) and len(budget.times) == 40
    assert budget.times[:15] == [5.0] * 15 and budget.times[15:] == [1.0] * 25
    assert budget.step_s() == 1.0                  # the mean would say 2.5


def test_budget_fits_the_schedule_to_wall_time(fashion, tmp_path):
    """budget_minutes: the first steps are timed, the schedule is cut to fit, and the stored
    recipe carries the result, so --resume of the finished run has nothing left to do."""
    out = tmp_path / "run"
    pixtok("train", "vit1-fashion", "--out", str(out), f"data_dir={fashion}", *TINY,
           "budget_minutes=0.3", "eval_every=2", "warmup_epochs=0.5")
    config = json.loads((out / "config.json").read_text())
    budget, recipe = config["budget"], config["recipe"]
    steps_per_epoch = 512 // 32
    assert budget["minutes"] == 0.3 and budget["steps"] == config["step"] > 50
    assert budget["step_s"] > 0 and budget["eval_s"] > 0
    assert recipe["budget_minutes"] == 0
    assert recipe["epochs"] == pytest.approx(budget["steps"] / steps_per_epoch)
    # what the measured rates say the steps after calibration cost fits in the budget
    after, every = budget["steps"] - 50, 2 * steps_per_epoch
    assert after * budget["step_s"] + (after / every + 1) * budget["eval_s"] <= 0.3 * 60
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 50 in [m["step"] for m in lines]             # the evaluation that timed evaluations
    assert lines[-1]["step"] == budget["steps"]
    before = weights(out)
    pixtok("train", "vit1-fashion", "--out", str(out), "--resume")
    after_resume = weights(out)
    assert all(torch.equal(before[k], after_resume[k]) for k in before)
    assert json.loads((out / "config.json").read_text())["step"] == budget["steps"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(fashion, tmp_path, mode):
    """DDP (or FSDP2) over gloo: 2 processes x 16 images = 1 process x 32 images, step for step,
    EMA and evaluation included."""
    args = [f"data_dir={fashion}", *TINY, "epochs=1", "max_steps=6", "eval_every=0.25",
            "ema=0.5", f"fsdp={mode == 'fsdp'}"]
    pixtok("train", "vit1-fashion", "--out", str(tmp_path / "one"), *args)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "pixtok",
                          "train", "vit1-fashion", "--out", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4, msg=k)
    state = torch.load(tmp_path / "two" / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["model"].keys() == state["ema"].keys()
    metrics = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("one", "two")]
    for a, b in zip(*metrics):              # same evaluations (pooled over both processes)
        a, b = json.loads(a), json.loads(b)
        assert a["acc1"] == b["acc1"] and abs(a["loss"] - b["loss"]) < 1e-4


@pytest.mark.parametrize("args, message", [
    (["train", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["train", "vit1-fashion", "data_dir=/nonexistent/fashion"], "/nonexistent/fashion"),
    (["train", "vit1-fashion", "nosuchkey=1"], "unknown key(s) nosuchkey"),
    (["train", "vit1-fashion", "epochs=many"], "epochs=many: expected a number"),
    (["train", "vit1-fashion", "image_size=0"], "image_size=0"),
    (["train", "vit1-fashion", "model=ViT-Q/1"], "unknown model 'ViT-Q/1'"),
    (["train", "vit1-fashion", "token_drop=1"], "token_drop=1.0: expected a fraction in [0, 1)"),
    (["train", "vqgan-fashion", "token_drop=0.5"], "task 'vqgan' does not take token_drop"),
    (["train", "mae-t1-cifar100", "init_from=runs/x"], "task 'mae' does not take init_from"),
    (["train", "vit1-fashion", "mask_ratio=0.5", "silog_lambda=0.1"],
     "task 'classify' does not take silog_lambda, mask_ratio"),
    (["train", "depth1-scenes", "silog_lambda=1.5"], "silog_lambda=1.5: expected a weight"),
    (["train", "vit1-fashion", "budget_minutes=-1"], "budget_minutes=-1.0: expected minutes"),
    (["eval", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    res = pixtok(*args, "--out", str(tmp_path / "x"), check=False) if args[0] == "train" else \
        pixtok(*args, check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_a_finished_run_is_not_overwritten(fashion, tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), f"data_dir={fashion}", *TINY, "max_steps=1", "eval_every=100"]
    pixtok("train", "vit1-fashion", *args)
    before = (out / "model.safetensors").read_bytes()
    res = pixtok("train", "vit1-fashion", *args, check=False)
    assert res.returncode == 2 and "--resume" in res.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_init_from_a_run_of_the_same_model_starts_a_new_phase(fashion, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [f"data_dir={fashion}", *TINY, "eval_every=100"]
    pixtok("train", "vit1-fashion", "--out", str(first), *common, "max_steps=6", "lr=3e-3")
    before = weights(first)
    # a later phase with its own schedule and token dropout: every weight (head included) starts
    # where the first run ended, so one step at a vanishing lr leaves them there
    pixtok("train", "vit1-fashion", "--out", str(second), *common, f"init_from={first}",
           "max_steps=1", "lr=1e-9", "warmup_epochs=0", "token_drop=0.5")
    after = weights(second)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=0, msg=k)
    config = json.loads((second / "config.json").read_text())
    assert config["recipe"]["init_from"] == str(first)
    # a run of another width or position embedding cannot adapt: one line naming it, exit 2
    for extra, message in [(["model=ViT-P/1"], "width 32 vs 64"),
                           (["pos_embed=sincos"], "pos_embed learned vs sincos")]:
        res = pixtok("train", "vit1-fashion", "--out", str(tmp_path / "x"), *common, *extra,
                     f"init_from={first}", "max_steps=1", check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert message in lines[0] and str(first) in lines[0], res.stderr
        assert not (tmp_path / "x" / "model.safetensors").exists()


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_loads_and_chains(name):
    """A recipe is only read when someone trains it: a typo must fail here, not on a user's GPU.
    A later phase's init_from (and a DiT's vqgan) under runs/ must be the folder that another
    shipped recipe writes by default."""
    recipe = load_recipe(name)
    assert recipe.name == name
    for key in ("init_from", "vqgan"):
        folder = Path(getattr(recipe, key))
        if folder.parts[:1] == ("runs",):
            assert folder.name in recipe_names() and folder.name != name, f"{key}={folder}"
