"""`pixtok study` and `pixtok analyze` as a user runs them (subprocesses, tiny models, few
steps), the validation split, the pixel permutation, and the paper's permutation argument."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clirun import ENV, pixtok
from datafiles import learnable_fashion

from pixtok.cli import main
from pixtok.models.vit import ViT, vit_config
from training.analyze import analyze, block_attention
from training.data.permute import pixel_permutation
from training.study import Study, cpu_model, plot_lines, study_names

COMMON = """
base = "vit1-fashion"
seeds = [0]
metric = "acc1"
held_fixed = "input 14x14, ViT-F, the same steps"
analyze = ["p1", "p2"]
[overrides]
data_dir = "{data}"
image_size = [14, 14]
batch_size = 32
eval_batch_size = 128
threads = 1
amp = "off"
eval_every = 100
val_size = 128
"""
ARMS = """
[arms.p1]
model = "ViT-F/1"
max_steps = 30
ckpt_minutes = 0
[arms.p2]
model = "ViT-F/2"
max_steps = 6
"""


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return learnable_fashion(tmp_path_factory.mktemp("data") / "fashion")


def study_file(folder: Path, fashion: Path, arms: str = ARMS, **replace) -> Path:
    text = COMMON.format(data=fashion) + arms
    for old, new in replace.items():
        text = text.replace(old, new)
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def run_main(*args) -> tuple[int, str]:
    """`pixtok ARGS` through the CLI's entry point in this process: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    run_main.last = out.getvalue()
    return code, run_main.last


@pytest.fixture(scope="module")
def finished(fashion, tmp_path_factory):
    """A tiny study run as a user would: one shard, then the whole study killed midway through
    its first run and resumed, then gathered with --report."""
    folder = tmp_path_factory.mktemp("study")
    spec, out = study_file(folder, fashion), folder / "out"
    # the entry point in-process where a process adds nothing but its start-up time (15-25 s
    # on a shared 2-core machine); the study that is killed is a real process group
    assert run_main("study", spec, "--out", out, "--shard", "1/2")[0] == 0    # runs p2 only
    assert "shard 1/2 holds 1, 1 to do" in run_main.last
    assert (out / "runs/p2/seed0/result.json").is_file()
    assert not (out / "runs/p1").exists()

    proc = subprocess.Popen([sys.executable, "-m", "pixtok", "study", str(spec), "--out",
                             str(out), "--resume"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "runs/p1/seed0/train_state.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if state.is_file() and torch.load(state, weights_only=True)["step"] >= 3:
                break
        except (RuntimeError, EOFError, OSError):       # caught between write and rename
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)                 # the study and the run it started
    proc.wait()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 3 <= killed_at < 30, "the study should have been killed within its first run"
    assert not (out / "runs/p1/seed0/result.json").exists()

    code, stdout = run_main("study", spec, "--out", out, "--resume")
    assert code == 0
    return spec, out, stdout, killed_at


def test_a_killed_study_resumes_each_run_where_it_stopped(finished):
    spec, out, stdout, killed_at = finished
    assert "2 runs (2 arms x 1 seeds), shard 0/1 holds 2, 1 to do" in stdout
    assert "p1 seed 0: continues pixtok train vit1-fashion" in stdout
    p1 = json.loads((out / "runs/p1/seed0/result.json").read_text())
    assert p1["steps"] == 30 and p1["images_seen"] == 30 * 32
    steps = [json.loads(x)["step"] for x in
             (out / "runs/p1/seed0/metrics.jsonl").read_text().splitlines()]
    assert steps == [30]                  # one evaluation, at the end, none lost or repeated
    log = (out / "runs/p1/seed0/study.log").read_text()
    assert log.count("--resume") == 2     # started, killed, continued by the second invocation


def test_results_and_report_follow_the_contract(finished, capsys):
    spec, out, _, _ = finished
    results = json.loads((out / "results.json").read_text())
    assert results["study"] == "tiny" and results["metric"] == "acc1"
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("p1", 0), ("p2", 0)]
    for run in results["runs"]:
        assert set(run) >= {"arm", "seed", "val", "test", "params", "flops_per_image",
                            "images_seen", "wall_s", "device"}
        assert run["val"]["n"] == 128 and run["test"]["n"] == 128    # held out, and test once
        assert 0 <= run["test"]["acc1"] <= 1 and run["wall_s"] > 0
        # which CPU ran it: the same seed on another CPU sums floats differently
        assert run["device"].startswith(f"cpu ({cpu_model()}, ")
    p1, p2 = results["runs"]
    # ViT-F/1 on 14x14 = 196 tokens against 49 for /2: more FLOPs, a bigger position table
    assert p1["flops_per_image"] > 3 * p2["flops_per_image"]
    cfg = vit_config("ViT-F/1", image_size=(14, 14), in_channels=1, num_classes=10)
    assert p1["params"] == sum(p.numel() for p in ViT(cfg).parameters())
    assert [(a["arm"], a["n"]) for a in results["arms"]] == [("p1", 1), ("p2", 1)]
    assert results["arms"][0]["mean"] == p1["test"]["acc1"]
    assert results["arms"][0]["std"] is None         # one seed: no spread, not a spread of 0
    report = (out / "report.md").read_text()
    assert "| p1 |" in report and "| p2 |" in report and " (n=1) |" in report
    assert "± 0.0000" not in report
    assert "Held fixed:** input 14x14, ViT-F, the same steps" in report
    assert "## Where the heads look" in report and "| p1 | " in report.split("heads look")[1]
    for arm in ("p1", "p2"):                                  # the study file's analyze list
        layers = json.loads((out / f"analysis/{arm}/analysis.json").read_text())["layers"]
        assert len(layers) == 2 and f"(analysis/{arm}/attention_offsets.png)" in report
    for png in ("metric_vs_flops.png", "metric_vs_arm.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # eval of a study's run on its validation split gives what the study recorded
    assert main(["eval", str(out / "runs/p1/seed0"), "--split", "val"]) == 0
    val = json.loads(capsys.readouterr().out)
    assert val["acc1"] == p1["val"]["acc1"] and val["n"] == p1["val"]["n"]
    assert val["loss"] == pytest.approx(p1["val"]["loss"], rel=1e-5)


def test_report_gathers_shard_folders(finished, tmp_path, capsys):
    """Shards on machines without a shared disk: each writes its own folder, --report reads them
    all (here: the finished folder's p2 copied into a second folder, p1 left out)."""
    spec, out, _, _ = finished
    import shutil
    other = tmp_path / "other"
    (other / "runs").mkdir(parents=True)
    shutil.copy(out / "study.json", other / "study.json")
    shutil.copytree(out / "runs/p2", other / "runs/p2")
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    shutil.copy(out / "study.json", gathered / "study.json")
    assert main(["study", str(spec), "--out", str(gathered), "--report", str(other)]) == 0
    assert "1 of 2 runs finished" in capsys.readouterr().out
    results = json.loads((gathered / "results.json").read_text())
    assert [r["arm"] for r in results["runs"]] == ["p2"]
    assert "not yet run" in (gathered / "report.md").read_text()       # p1's row


@pytest.mark.parametrize("case, message", [
    ("unknown_key", "[arms.p2]: unknown recipe key(s) modle"),
    ("bad_patch", "arm p2 (model=ViT-F/4, image 14x14): patch size 4 must divide"),
    ("no_seeds", "seeds is empty"),
    ("other_file", "holds a study made by a different study file"),
    ("bad_shard", "--shard 2/2: expected i/n"),
])
def test_bad_input_is_one_line_exit_2(case, message, fashion, tmp_path, finished, capsys):
    extra = []
    if case == "unknown_key":
        spec = study_file(tmp_path, fashion, **{'model = "ViT-F/2"': 'modle = "ViT-F/2"'})
    elif case == "bad_patch":
        spec = study_file(tmp_path, fashion, **{'model = "ViT-F/2"': 'model = "ViT-F/4"'})
    elif case == "no_seeds":
        spec = study_file(tmp_path, fashion, **{"seeds = [0]": "seeds = []"})
    elif case == "other_file":
        spec = study_file(tmp_path, fashion, **{"max_steps = 6": "max_steps = 7"})
        extra = ["--out", finished[1], "--resume"]
    else:
        spec = study_file(tmp_path, fashion)
        extra = ["--shard", "2/2"]
    args = ["study", str(spec), *map(str, extra or ["--out", tmp_path / "out"])]
    if case == "other_file":                 # one case end to end, as a process
        res = pixtok(*args, check=False)
        code, stderr = res.returncode, res.stderr
    else:                                    # the others through the same entry point, in-process
        code, stderr = main(args), capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert lines[0].startswith("pixtok study: error: ") and "Traceback" not in stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_analyze_a_tiny_checkpoint(finished, tmp_path):
    _, out, _, _ = finished
    res = pixtok("analyze", out / "runs/p1/seed0", "--out", tmp_path / "a", "-n", "16")
    summary = json.loads(res.stdout)
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert result["split"] == "val" and result["images"] == 16 and result["patch_size"] == 1
    assert [row["layer"] for row in result["layers"]] == [0, 1]          # ViT-F: 2 blocks
    for row in result["layers"]:
        assert len(row["heads"]) == 2 and all(0 < d < 14 * 1.5 for d in row["heads"])
        assert len(row["offset_map"]) == 27 and len(row["offset_map"][0]) == 27
    assert summary["mean_distance_by_layer"] == [row["mean"] for row in result["layers"]]
    for png in ("attention_distance.png", "attention_offsets.png"):
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"


def test_analysis_attention_is_the_blocks_attention_and_measures_distance():
    """The explicit probabilities times V are the block's SDPA output; a head made to attend
    nowhere in particular (uniformly) has the mean distance of all token pairs."""
    torch.manual_seed(0)
    cfg = vit_config("ViT-F/2", image_size=(8, 8), in_channels=1, num_classes=3, pool="mean")
    model = ViT(cfg).double()
    t = torch.randn(2, cfg.num_tokens, cfg.width, dtype=torch.float64)
    block = model.blocks[0]
    probs = block_attention(block, t)
    n, length, d = t.shape
    qkv = block.attn.qkv(block.norm1(t)).view(n, length, 3, cfg.heads, d // cfg.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(probs @ v, F.scaled_dot_product_attention(q, k, v))

    # uniform attention (zero queries): the distance of uniform attention, for every head
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    model = ViT(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight[:cfg.width] = 0
            b.attn.qkv.bias[:cfg.width] = 0
    result = analyze(model, images)
    for row in result["layers"]:
        assert row["heads"] == pytest.approx([result["uniform_distance"]] * cfg.heads, abs=1e-3)
    cells = [(y, x) for y in range(4) for x in range(4)]            # the 4x4 grid of 2x2 patches
    pairs = [((a - c) ** 2 + (b - d) ** 2) ** 0.5 for a, b in cells for c, d in cells]
    assert result["uniform_distance"] == pytest.approx(2 * sum(pairs) / len(pairs), abs=1e-4)
    centre = [row["offset_map"][3][3] for row in result["layers"]]   # offset (0, 0)
    assert centre == pytest.approx([1 / cfg.num_tokens] * cfg.depth, rel=1e-4)


def test_permuting_pixels_and_learned_position_rows_together_changes_nothing():
    """The paper's Sec. 5 argument, exactly: a ViT/1 with a learned position embedding has no
    notion of pixel order beyond its embedding's rows, so a fixed permutation of the pixels with
    the same permutation of the rows gives the same logits; the pixels alone do not."""
    torch.manual_seed(0)
    for pool in ("cls", "mean"):
        cfg = vit_config("ViT-F/1", image_size=(6, 6), in_channels=1, num_classes=5, pool=pool)
        model = ViT(cfg).double().eval()
        with torch.no_grad():
            model.pos_embed.normal_()              # rows that differ a lot, and pixels
            model.embed.proj.weight.normal_()      # that matter (the init's are tiny)
        x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
        perm = pixel_permutation(6, 6, swaps=36, distance=0, seed=1)
        assert not torch.equal(perm, torch.arange(36))
        x_perm = x.flatten(2)[..., perm].view_as(x)
        moved = copy.deepcopy(model)
        with torch.no_grad():
            moved.pos_embed.copy_(model.pos_embed[:, perm])
            logits, logits_both = model(x), moved(x_perm)
            logits_pixels_only = model(x_perm)
        torch.testing.assert_close(logits_both, logits, rtol=0, atol=1e-12)
        assert (logits_pixels_only - logits).abs().max() > 1e-3


def test_pixel_permutation_swaps_within_the_distance():
    assert torch.equal(pixel_permutation(5, 7, 0), torch.arange(35))
    one = pixel_permutation(9, 9, swaps=1, distance=1, seed=3)
    moved = (one != torch.arange(81)).nonzero().flatten().tolist()
    assert len(moved) == 2
    (y0, x0), (y1, x1) = (divmod(i, 9) for i in moved)
    assert max(abs(y0 - y1), abs(x0 - x1)) == 1
    many = pixel_permutation(9, 9, swaps=500, distance=2, seed=3)
    assert sorted(many.tolist()) == list(range(81))                      # a permutation
    assert torch.equal(many, pixel_permutation(9, 9, swaps=500, distance=2, seed=3))
    assert not torch.equal(many, pixel_permutation(9, 9, swaps=500, distance=2, seed=4))


def test_plot_lines_join_only_arms_that_differ_in_plot_x():
    """A line in metric_vs_arm.png joins arms that differ in plot_x alone: a line from one
    model's last arm to another model's first would draw a trend that no run measured."""
    permutation = Study("permutation-fashion")
    assert dict(plot_lines(permutation, list(permutation.arms))) == {
        "model=ViT-P/1 permute_distance=0": ["p1-T0", "p1-T196-any"],
        "model=ViT-P/1 permute_distance=1": ["p1-T196-d1"],
        "model=ViT-P/2 permute_distance=0": ["p2-T0", "p2-T196-any"],
        "model=ViT-P/2 permute_distance=1": ["p2-T196-d1"]}
    pos = Study("pos-embed-fashion")
    assert [arms for _, arms in plot_lines(pos, list(pos.arms))] == \
        [["p1-learned", "p1-sincos", "p1-none"], ["p2-learned", "p2-sincos", "p2-none"]]
    dit = Study("dit-patch-fashion")       # an arm that leaves pos_embed out has the default
    assert dict(plot_lines(dit, ["dit1", "dit2", "dit1-sincos"])) == \
        {"pos_embed=learned": ["dit1", "dit2"], "pos_embed=sincos": ["dit1-sincos"]}
    patch = Study("patch-size-fashion")
    assert plot_lines(patch, ["p7", "p1"]) == [("", ["p7", "p1"])]
    fixed = Study("fixed-length-fashion")   # no plot_x: every arm its own point
    assert [arms for _, arms in plot_lines(fixed, list(fixed.arms))] == \
        [[arm] for arm in fixed.arms]


@pytest.mark.parametrize("name", study_names())
def test_every_shipped_study_loads_with_its_scales(name):
    """Shipped study files are read only when someone runs them: every arm must resolve to a
    recipe its data can take, at the CPU size and at every [scales.*] set. The DiT study
    resolves too, its judge's pinned hash checked (tests/test_study_generator.py)."""
    study = Study(name)
    assert len(study.seeds) >= 2 and len(study.arms) >= 2
    import tomllib
    scales = tomllib.loads(study.path.read_text()).get("scales", {})
    assert scales, f"{name}: no [scales.*] set for a GPU"
    for scale in scales:
        Study(name, [f"scale={scale}"])
