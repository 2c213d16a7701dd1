"""Generation as a user runs it: `pixtok train vqgan-...`, `pixtok train dit1-...` (latent cache,
exact resume, the diffusers pipeline folder) and `pixtok sample`, in subprocesses on tiny models."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import ENV, ROOT, pixtok
from datafiles import learnable_fashion
from PIL import Image
from safetensors.torch import load_file

from pixtok.cli import main

VQ_TINY = ["vq_width=8", "codebook_size=32", "batch_size=32", "eval_batch_size=128", "threads=1",
           "amp=off"]
DIT_TINY = ["model=DiT-F/1", "batch_size=32", "eval_batch_size=128", "threads=1", "amp=off",
            "ema=0.9", "lr=1e-3", "warmup_epochs=0.25", "eval_every=0.25", "classifier=",
            "eval_samples=0"]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return learnable_fashion(tmp_path_factory.mktemp("data") / "fashion")


@pytest.fixture(scope="module")
def vqgan(fashion, tmp_path_factory):
    """A tiny VQGAN trained by the CLI: 24 steps, discriminator from step 16, restarts every 4."""
    out = tmp_path_factory.mktemp("runs") / "vq"
    pixtok("train", "vqgan-fashion", "--out", str(out), f"data_dir={fashion}", *VQ_TINY,
           "epochs=1.5", "eval_every=0.5", "restart_every=4", "gan_weight=0.1", "gan_start=16")
    return out


@pytest.fixture(scope="module")
def dit(vqgan, fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dit"
    pixtok("train", "dit1-fashion", "--out", str(out), f"vqgan={vqgan}", f"data_dir={fashion}",
           *DIT_TINY, "max_steps=24")
    return out


def test_vqgan_trains(vqgan):
    lines = metrics(vqgan)
    assert [m["step"] for m in lines] == [8, 16, 24]
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["psnr"] > lines[0]["psnr"] + 1
    last = lines[-1]
    assert 1 <= last["perplexity"] <= 32 and last["codes_used"] + last["dead_codes"] == 32
    assert last["restarts"] > 0                        # a fresh codebook has unused codes
    config = json.loads((vqgan / "config.json").read_text())
    assert config["task"] == "vqgan" and config["input"]["pad"] == 2
    assert config["model"]["args"]["block_out_channels"] == [8, 16, 16]
    state = torch.load(vqgan / "train_state.pt", weights_only=True)
    assert state["task"]["step"] == 24 and "disc_opt" in state["task"]   # the GAN ran
    weights = load_file(vqgan / "model.safetensors")
    assert weights["quantize.embedding.weight"].shape == (32, 4)


def test_dit_trains_on_a_latent_cache_into_a_pipeline_folder(dit, vqgan):
    lines = metrics(dit)
    assert [m["step"] for m in lines] == [4, 8, 12, 16, 20, 24]
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.05
    assert all(m["n"] == 128 for m in lines)
    for split in ("train", "test"):                    # built from the VQGAN on the first run
        assert (vqgan / "latents" / split / "index.json").is_file()
    assert {p.name for p in dit.iterdir()} >= {"model_index.json", "transformer", "vae",
                                               "scheduler", "config.json", "metrics.jsonl",
                                               "train_state.pt"}
    config = json.loads((dit / "config.json").read_text())
    assert config["task"] == "dit" and config["input"]["latent_shape"] == [4, 8, 8]
    vae_config = json.loads((dit / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(config["latent_scale"])
    # transformer/ holds the EMA weights, the ones the loop exports
    ema = torch.load(dit / "train_state.pt", weights_only=True)["ema"]
    exported = load_file(dit / "transformer" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_pipeline_folder_loads_offline_in_one_call_with_labels(dit):
    script = (
        "import sys, torch\n"
        "from pixtok.pipeline import PixelDiTPipeline\n"
        "pipe = PixelDiTPipeline.from_pretrained(sys.argv[1])\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "im = pipe(['Bag', 1], num_inference_steps=2, output_type='pt').images\n"
        "print(pipe.labels[8], len(pipe.labels), type(pipe.scheduler).__name__,"
        " type(pipe.vae).__name__, tuple(im.shape))\n")
    out = subprocess.run([sys.executable, "-c", script, str(dit)], cwd=dit, timeout=120,
                         env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Bag", "10", "DPMSolverMultistepScheduler", "VQModel",
                                  "(2,", "1,", "32,", "32)"]


def test_dit_resume_is_exact(dit, vqgan, fashion, tmp_path):
    args = [f"vqgan={vqgan}", f"data_dir={fashion}", *DIT_TINY]
    half = tmp_path / "half"
    pixtok("train", "dit1-fashion", "--out", str(half), *args, "max_steps=12")
    pixtok("train", "dit1-fashion", "--out", str(half), "--resume", "max_steps=24")
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(dit / name), load_file(half / name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in m.items() if k != "time"} for m in metrics(dit)]
    assert strip == [{k: v for k, v in m.items() if k != "time"} for m in metrics(half)]


def test_sample_same_seed_same_bytes(dit, tmp_path):
    args = ["sample", str(dit), "--label", "Trouser", "--seed", "3", "-n", "4", "--steps", "4"]
    first = json.loads(pixtok(*args, "--out", str(tmp_path / "a.png")).stdout)
    assert first == {"out": str(tmp_path / "a.png"), "label": "Trouser", "index": 1, "seed": 3,
                     "n": 4, "sampler": "dpm", "steps": 4, "guidance": 4.0}
    grid = Image.open(io.BytesIO((tmp_path / "a.png").read_bytes()))
    assert grid.format == "PNG" and grid.mode == "L" and grid.size == (64, 64)   # 2 x 2 of 32x32
    # a second run, the label given by index: the same bytes (same machine, same thread count:
    # a different number of torch threads may sum in another order)
    pixtok(*args[:3], "1", *args[4:], "--out", str(tmp_path / "b.png"))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # another seed: other images
    pixtok("sample", str(dit), "--label", "1", "--seed", "4", "-n", "4", "--steps", "4",
           "--out", str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--label", "Hat"], "unknown class 'Hat'"),
    (["--label", "10"], "class index 10 out of range 0..9"),
    (["--label", "0", "--steps", "0"], "num_inference_steps must be in 1..1000"),
    (["--label", "0", "-n", "0"], "-n 0: expected 1..1024"),
    (["--label", "0", "--guidance", "-1"], "--guidance -1.0"),
    (["--label", "0", "--out", "/nonexistent/x.png"], "folder /nonexistent does not exist"),
])
def test_sample_errors_are_one_line(dit, tmp_path, capsys, args, message):
    assert main(["sample", str(dit), "--out", str(tmp_path / "x.png"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_sample_on_a_folder_that_is_no_generator(vqgan, tmp_path, capsys):
    assert main(["sample", str(vqgan), "--label", "0", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a generator checkpoint (no model_index.json)" in err[0], err


def test_imagenet_dit_recipes_warm_up_then_hold_the_lr():
    from training.recipe import load_recipe
    from training.train import lr_at

    for name, model in (("dit-l1-imagenet", "DiT-L/1"), ("dit-l2-imagenet", "DiT-L/2")):
        r = load_recipe(name)
        assert (r.task, r.model, r.batch_size, r.lr, r.weight_decay) == ("dit", model, 2048,
                                                                          8e-4, 0.0)
        assert (r.epochs, r.warmup_epochs, r.ema, r.schedule) == (400, 100, 0.9999, "constant")
        steps = 625                                     # 1.28M images / 2048
        assert lr_at(0, r, steps) == pytest.approx(8e-4 / (100 * steps))
        assert lr_at(50 * steps - 1, r, steps) == pytest.approx(4e-4)
        assert lr_at(100 * steps, r, steps) == lr_at(399 * steps, r, steps) == 8e-4
    cosine = load_recipe("dit-l1-imagenet", ["schedule=cosine", "min_lr=0"])
    assert lr_at(399 * 625, cosine, 625) < 1e-5
