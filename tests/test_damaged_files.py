"""Damaged files are one-line errors that name the file (issue 22): `pixtok export` and `pixtok
eval` on broken checkpoints, and a training run whose loss turns non-finite."""
from __future__ import annotations

import json
import re

import pytest
from clirun import pixtok
from conftest import make_classifier, make_generator
from datafiles import learnable_fashion

FASHION = "/usr/share/datasets/fashion-mnist"


def cut_weights(folder):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


DAMAGE = {   # name: (how the folder is damaged, the file the error names, words in the error)
    "weights_cut_short": (cut_weights, "model.safetensors", "damaged or cut short"),
    "config_not_json": (lambda f: (f / "config.json").write_text("{not json"), "config.json",
                        "not valid JSON"),
    "weights_of_another_model": (
        lambda f: edit_config(f, lambda c: c["model"]["args"].update(depth=9)),
        "model.safetensors", "do not fit"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["export", "eval"])
def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, damage, command):
    how, file, words = DAMAGE[damage]
    ckpt = make_classifier(tmp_path / "ckpt")
    how(ckpt)
    args = (["export", ckpt, "--out", tmp_path / "store"] if command == "export"
            else ["eval", ckpt, "--data", FASHION])
    done = pixtok(*args, check=False, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"{ckpt / file}" in done.stderr and words in done.stderr
    assert not (tmp_path / "store" / "ckpt.mar").exists()


def test_eval_of_an_unknown_model_architecture_is_a_one_line_error(tmp_path):
    ckpt = make_classifier(tmp_path / "ckpt")
    edit_config(ckpt, lambda c: c["model"].update(arch="resnet"))
    done = pixtok("eval", ckpt, "--data", FASHION, check=False, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "config.json" in done.stderr and "'resnet'" in done.stderr


def test_a_generator_with_cut_weights_is_a_one_line_error(tmp_path):
    pipe = make_generator(tmp_path / "gen")
    weights = next((pipe / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    for args in (["export", pipe, "--out", tmp_path / "store"], ["eval", pipe]):
        done = pixtok(*args, check=False, timeout=300)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert str(pipe) in done.stderr


def test_a_loss_that_turns_non_finite_stops_and_keeps_the_last_checkpoint(tmp_path):
    fashion = learnable_fashion(tmp_path / "fashion")
    out = tmp_path / "run"
    tiny = ["model=ViT-F/1", "image_size=14", "batch_size=32", "eval_batch_size=128",
            "threads=1", "amp=off"]
    pixtok("train", "vit1-fashion", "--out", out, f"data_dir={fashion}", *tiny, "epochs=1")
    good = (out / "model.safetensors").read_bytes()
    # the same run continued with a learning rate that blows the weights up
    done = pixtok("train", "vit1-fashion", "--out", out, "--resume", "epochs=3", "lr=1e30",
                  "grad_clip=0", "warmup_epochs=0", check=False, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    # one error line (the progress bar's own lines aside)
    errors = [line for line in re.split(r"[\r\n]", done.stderr) if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("pixtok train: error: loss is "), errors
    assert "last good checkpoint" in errors[0]
    assert "Traceback" not in done.stderr
    assert (out / "model.safetensors").read_bytes() == good
    metrics = json.loads(pixtok("eval", out).stdout)       # and it still loads and evaluates
    assert metrics["n"] > 0
