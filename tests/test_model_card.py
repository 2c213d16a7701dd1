"""tools.model_card: a run folder becomes a shipped model with its card and learning curve."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tools.model_card import recipe_toml
from training.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def run_folder(tmp_path, task="classify", metrics=((1, 0.5), (2, 0.7), (3, 0.8))):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "format": "pixtok-checkpoint/1", "task": task, "step": 300, "epoch": 3.0,
        "recipe_name": "vit1-fashion", "git_commit": "abc123",
        "recipe": {"model": "ViT-P/1", "dataset": "fashion-mnist", "batch_size": 128,
                   "source": "a paper"}}))
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "train_state.pt").write_bytes(b"optimizer state")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 100 * e, "epoch": e, "acc1": a, "loss": 1 - a}) + "\n"
        for e, a in metrics))
    (tmp_path / "eval.json").write_text(json.dumps({"acc1": 0.81, "n": 10000}))
    return run


def card(tmp_path, *extra):
    out = subprocess.run([sys.executable, "-m", "tools.model_card", str(tmp_path / "run"),
                          "--name", "my-model", "--store", str(tmp_path / "store"),
                          "--eval", str(tmp_path / "eval.json"), "--hours", "1.5",
                          "--command", "pixtok train vit1-fashion --out runs/x", *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tmp_path / "store" / "my-model"


def test_card_carries_commands_metrics_and_curve(tmp_path):
    run_folder(tmp_path)
    dst = card(tmp_path, "--notes", "Trained while other work ran.")
    assert sorted(p.name for p in dst.iterdir()) == [
        "README.md", "config.json", "curve.png", "metrics.jsonl", "model.safetensors",
        "recipe.toml"]
    text = (dst / "README.md").read_text()
    assert "pixtok train vit1-fashion --out runs/x" in text
    assert "Its last phase is the recipe `vit1-fashion`" in text
    assert 'model = "ViT-P/1"' in (dst / "recipe.toml").read_text()
    assert '"acc1": 0.81' in text and "1.50 hours" in text and "3.00 epochs" in text
    assert "![learning curve](curve.png)" in text and "Trained while other work ran." in text
    assert Image.open(dst / "curve.png").size == (500, 320)
    assert "(no GPU), one torch thread, niced and shared with other work;" in text
    dst = card(tmp_path, "--compute", "two torch threads for its last 4 epochs")
    assert "(no GPU), two torch threads for its last 4 epochs;" in (dst / "README.md").read_text()
    dst = card(tmp_path, "--machine", "one NVIDIA H200 GPU", "--compute", "bf16 autocast")
    assert "hours of wall time on one NVIDIA H200 GPU, bf16 autocast;" in \
        (dst / "README.md").read_text()


def test_curve_from_another_file_with_two_metrics(tmp_path):
    run_folder(tmp_path, task="dit")
    curve = tmp_path / "snapshots.jsonl"
    curve.write_text("".join(json.dumps({"epoch": e, "class_agreement": c, "fid_proxy": f}) + "\n"
                             for e, c, f in ((1, 0.4, 9.0), (2, 0.6, 5.0))))
    dst = card(tmp_path, "--curve", str(curve), "--key", "class_agreement", "--key", "fid_proxy")
    assert (dst / "curve.jsonl").read_text() == curve.read_text()
    assert Image.open(dst / "curve.png").format == "PNG"


def test_a_run_without_evaluations_says_so(tmp_path):
    run_folder(tmp_path, metrics=())
    dst = card(tmp_path)
    assert not (dst / "curve.png").exists()
    assert "No evaluation during training yet" in (dst / "README.md").read_text()


# recipe keys that say where and how fast a run went, not what it computed
MACHINE_KEYS = {"name", "source", "init_from", "threads", "ckpt_minutes", "cache_dir",
                "num_workers", "data_dir"}
SHIPPED = sorted(p.parent for p in (ROOT / "model_store").glob("*/config.json"))


@pytest.mark.parametrize("model", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_model_names_a_frozen_recipe_that_equals_what_ran(model):
    """The card's recipe file computes what config.json says ran; recipe.toml is that run."""
    config = json.loads((model / "config.json").read_text())
    card = (model / "README.md").read_text()
    found = re.search(r"Its last phase is the recipe `([^`]+)`", card)
    assert found, "the card names no recipe"
    frozen, default = load_recipe(found.group(1)).to_dict(), Recipe().to_dict()
    ran = {k: (default[k] if v is None else v) for k, v in config["recipe"].items()}
    differ = {k: (ran.get(k, default[k]), v) for k, v in frozen.items()
              if k not in MACHINE_KEYS and ran.get(k, default[k]) != v
              and not (k == "epochs" and round(ran[k], 3) == round(v, 3))}
    assert not differ, f"{found.group(1)} differs from what ran: {differ}"
    as_ran = load_recipe(str(model / "recipe.toml")).to_dict()
    assert as_ran == {**default, **ran}
    assert f"pixtok train model_store/{model.name}/recipe.toml" in card


def test_recipe_toml_round_trips_every_kind_of_value(tmp_path):
    config = {"git_commit": "abc", "recipe_name": "x", "recipe": {
        "name": "x", "source": 'a "quoted" source\\with a backslash', "model": "ViT-F/1",
        "image_size": [14, 14], "hflip": True, "lr": 1e-6, "epochs": 22.162393162393162,
        "budget_minutes": None}}
    (tmp_path / "r.toml").write_text(recipe_toml(config))
    got = load_recipe(str(tmp_path / "r.toml")).to_dict()
    want = {k: v for k, v in config["recipe"].items() if v is not None}
    assert {k: got[k] for k in want} == want
