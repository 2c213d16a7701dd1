"""`pixtok study` of generators (issue 19, study 6): tiny DiT/1 and DiT/2 arms over a tiny VQGAN,
measured by the [generator] protocol: two guidance scales, the real and VQGAN-reconstruction
floors, precision/recall and class agreement, and a judge pinned by the hash of its weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import pixtok
from datafiles import learnable_fashion

from pixtok.cli import main
from pixtok.errors import UserError
from training.evaluate_generator import PROTOCOL_METRICS, judge_sha256, reconstructions
from training.study import Study
from training.tasks.vqgan import weights_hash

STUDY = """
base = "dit1-fashion"
seeds = [0]
metric = "fid_proxy@2"
held_fixed = "DiT-F, the tiny VQGAN's latents, 6 steps"
[overrides]
data_dir = "{data}"
vqgan = "{vqgan}"
latent_dir = "{latents}"
batch_size = 32
eval_batch_size = 128
threads = 1
amp = "off"
ema = 0.9
lr = 1e-3
warmup_epochs = 0.25
eval_every = 100
eval_samples = 0
classifier = ""
max_steps = 6
[generator]
guidance = [1.0, 2.0]
samples = 16
judge = "{judge}"
judge_sha256 = "{sha}"
steps = 2
[arms.dit1]
model = "DiT-F/1"
[arms.dit2]
model = "DiT-F/2"
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(data folder, tiny VQGAN, judge): both trained by `pixtok train` for a few steps."""
    root = tmp_path_factory.mktemp("gen-study")
    data = learnable_fashion(root / "fashion")
    vqgan, judge = root / "vq", root / "judge"
    pixtok("train", "vqgan-fashion", "--out", vqgan, f"data_dir={data}", "vq_width=8",
           "codebook_size=32", "batch_size=32", "eval_batch_size=128", "threads=1", "amp=off",
           "max_steps=8", "eval_every=100")
    pixtok("train", "vit1-fashion", "--out", judge, f"data_dir={data}", "model=ViT-F/1",
           "image_size=14", "batch_size=32", "eval_batch_size=128", "threads=1", "amp=off",
           "max_steps=20", "lr=3e-3", "warmup_epochs=0.1")
    return root, data, vqgan, judge


def study_file(parts, **replace) -> Path:
    root, data, vqgan, judge = parts
    text = STUDY.format(data=data, vqgan=vqgan, latents=root / "latents", judge=judge,
                        sha=judge_sha256(judge))
    for old, new in replace.items():
        text = text.replace(old, new)
    path = root / f"study-{len(replace)}-{abs(hash(text)) % 10**6}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def finished(parts):
    spec = study_file(parts)
    out = parts[0] / "out"
    assert main(["study", str(spec), "--out", str(out)]) == 0
    return spec, out


def test_each_run_is_scored_at_every_guidance_beside_both_floors(finished, parts):
    spec, out = finished
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "fid_proxy@2" and results["lower_is_better"] is True
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("dit1", 0), ("dit2", 0)]
    sha = judge_sha256(parts[3])
    for run in results["runs"]:
        assert run["val"] == {}                     # nothing is chosen on a validation split
        test = run["test"]
        for g in ("1", "2"):
            for m in PROTOCOL_METRICS:
                assert f"{m}@{g}" in test, (m, g)
            assert 0 <= test[f"precision@{g}"] <= 1 and 0 <= test[f"class_agreement@{g}"] <= 1
        assert test["n"] == 16 and test["steps"] == 2 and test["judge_sha256"] == sha
        assert run["flops_per_image"] > 0 and run["params"] > 0
    dit1, dit2 = results["runs"]
    assert dit1["flops_per_image"] > dit2["flops_per_image"]      # 4x the tokens of /2
    assert dit1["test"]["fid_proxy@1"] != dit1["test"]["fid_proxy@2"]   # guidance was applied

    floors = json.loads((out / "floors.json").read_text())
    (vqgan_hash, floor), = floors.items()             # measured once for the study's VQGAN
    # keyed by the generators' VQGAN weights (the pipeline's vae/, the same for every arm)
    assert {r["test"]["vqgan_sha256"] for r in results["runs"]} == {vqgan_hash}
    vae = out / "runs/dit2/seed0/vae/diffusion_pytorch_model.safetensors"
    assert vqgan_hash == weights_hash(vae)
    assert floor["n"] == 16 and floor["judge_sha256"] == sha
    # two sets of real images are closer than six-step generators are to the real ones
    for run in results["runs"]:
        assert floor["real"]["fid_proxy"] < min(run["test"]["fid_proxy@1"],
                                                run["test"]["fid_proxy@2"])
    assert set(floor["real"]) == set(floor["vqgan_recon"]) == set(PROTOCOL_METRICS)

    report = (out / "report.md").read_text()
    assert "## Generators, measured by the pinned judge" in report and sha in report
    assert "floor: real test images" in report and "floor: VQGAN reconstructions" in report
    assert "| dit2 | 1 |" in report and "| dit2 | 2 |" in report


def test_reconstructions_are_the_vqgan_round_trip(parts):
    """The VQGAN floor's images: pad, encode, quantise, decode, exactly as generated latents are
    decoded, and close to the input (the VQGAN is trained, if only for a few steps)."""
    from training.evaluate_generator import load_pipeline

    out = parts[0] / "out" / "runs" / "dit1" / "seed0"
    if not (out / "model_index.json").is_file():
        pytest.skip("needs the finished study")
    pipe = load_pipeline(out)
    images = (torch.rand(3, 1, 28, 28) * 255).to(torch.uint8)
    pad = json.loads((out / "config.json").read_text())["input"]["pad"]
    recon = reconstructions(pipe, images, pad)
    size = 28 + 2 * pad
    assert recon.shape == (3, 1, size, size) and 0 <= recon.min() and recon.max() <= 1
    x = torch.nn.functional.pad(images.float() / 255, (pad,) * 4)
    z = pipe.encode_images(x)
    assert torch.equal(recon, pipe.decode_latents(z).float())


@pytest.mark.parametrize("replace, message", [
    ({'judge_sha256 = "': 'judge_sha256 = "0'}, "the study pins"),
    ({'metric = "fid_proxy@2"': 'metric = "fid_proxy@3"'}, "METRIC@GUIDANCE"),
    ({"samples = 16": "samples = 2"}, "samples must be a whole number >= 4"),
    ({"guidance = [1.0, 2.0]": "guidance = []"}, "guidance must list scales >= 1"),
    ({"steps = 2\n": "steps = 2\nsteps_typo = 3\n"}, "unknown key(s) steps_typo"),
    ({"[generator]": "[nothing]"}, "unknown study key(s) nothing"),
])
def test_a_bad_generator_table_is_one_line_exit_2(parts, replace, message, capsys, tmp_path):
    spec = study_file(parts, **replace)
    code = main(["study", str(spec), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_the_shipped_dit_study_pins_the_shipped_judge():
    study = Study("dit-patch-fashion")
    assert study.task == "dit" and study.generator["guidance"] == [1.0, 1.5]
    assert study.generator["samples"] >= 2000 and len(study.seeds) >= 2
    assert study.generator["judge_sha256"] == judge_sha256(study.generator["judge"])
    for recipe in study.recipes.values():      # the latent cache stays out of model_store/
        assert not recipe.latent_dir.startswith("model_store")
    with pytest.raises(UserError, match=r"\[generator\] is for dit studies"):
        Study("patch-size-fashion")._check_generator({"guidance": [1.0]}, "x")


@pytest.mark.slow
def test_snapshots_give_a_generator_curve_scored_by_a_second_judge(parts):
    """keep_every keeps the model every few steps (CKPT/snapshots/epochN/); the study scores
    each snapshot with the protocol (once: a resumed study reads protocol.json) for a curve,
    and a second, pinned judge of another patch size scores the same samples."""
    root, data, _, _ = parts
    judge2 = root / "judge2"
    pixtok("train", "vit1-fashion", "--out", judge2, f"data_dir={data}", "model=ViT-F/2",
           "image_size=14", "batch_size=32", "eval_batch_size=128", "threads=1", "amp=off",
           "max_steps=20", "lr=3e-3", "warmup_epochs=0.1")
    pin = f'judge2 = "{judge2}"\njudge2_sha256 = "{judge_sha256(judge2)}"\n'
    spec = study_file(parts, **{
        'steps = 2\n': 'steps = 2\n' + pin,
        "max_steps = 6\n": "max_steps = 6\nkeep_every = 0.125\nschedule = \"constant\"\n",
        '[arms.dit2]\nmodel = "DiT-F/2"\n': ""})
    out = root / "out-curve"
    assert main(["study", str(spec), "--out", str(out)]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    run_dir = out / "runs/dit1/seed0"
    snaps = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert snaps == ["epoch0.125", "epoch0.25"]          # steps 2 and 4 of 16 per epoch; 6 ends
    assert [e["epoch"] for e in run["curve"]] == [0.125, 0.25, 0.375]
    for point in run["curve"]:
        assert point["fid_proxy@2"] > 0 and point["judge2.fid_proxy@2"] > 0
    assert run["curve"][-1]["fid_proxy@2"] == run["test"]["fid_proxy@2"]
    assert run["test"]["judge2_sha256"] == judge_sha256(judge2)
    # the second judge sees other features: its score is not the first judge's
    assert run["test"]["judge2.fid_proxy@2"] != run["test"]["fid_proxy@2"]
    measured = json.loads((run_dir / "snapshots/epoch0.25/protocol.json").read_text())
    assert measured == {k: v for k, v in run["curve"][1].items() if k != "epoch"}
