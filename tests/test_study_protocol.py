"""A study's pre-registered protocol: the decision rule and its statistics, the lr grid, the
seeds the rule adds, convergence, and a study that resumes on a fresh clone from its committed
records alone."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
from datafiles import learnable_fashion
from test_study import COMMON, run_main

from pixtok.cli import main
from training.study import Study
from training.study_protocol import late_movement, paired_interval, verdict

# test_study's tiny study, at two seeds, with a curve of 12 evaluations, an lr grid and a rule
TINY = COMMON.replace("seeds = [0]", "seeds = [0, 1]").replace(
    'analyze = ["p1", "p2"]\n', "").replace(
    "eval_every = 100", "eval_every = 0.1\nmax_steps = 16\nepochs = 1\nckpt_minutes = 0") + """
[arms.p2]
model = "ViT-F/2"
[arms.p7]
model = "ViT-F/7"
[lr_grid]
lr = [1e-3, 3e-3]
[decision]
margin = 0.003
add_seeds = [5]
[[decision.comparisons]]
arms = ["p2", "p7"]
paper = "better"
source = "Tab. 3(a)"
"""


def write_study(folder: Path, data: Path, **replace) -> Path:
    text = TINY.format(data=data)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = folder / "tiny-protocol.toml"
    path.write_text(text)
    return path


# --- the statistics, against numbers worked by hand ---------------------------------------------

def test_paired_interval_is_the_t_interval_of_the_differences():
    diffs = [0.010, 0.014, 0.006]
    row = paired_interval(diffs)
    # mean 0.010, sd 0.004, t(0.975, 2) = 4.302653: half-width 4.302653 * 0.004 / sqrt(3)
    assert row["mean"] == pytest.approx(0.010)
    assert row["sd"] == pytest.approx(statistics.stdev(diffs))
    assert row["high"] - row["mean"] == pytest.approx(4.302653 * 0.004 / 3 ** 0.5, rel=1e-5)
    assert paired_interval([0.01])["low"] is None          # one pair has no interval


@pytest.mark.parametrize("low, high, paper, converged, expected", [
    (0.002, 0.010, "better", True, "replicated"),
    (-0.010, -0.002, "better", True, "contradicted"),
    (-0.002, 0.002, "better", True, "contradicted"),           # within the margin: no effect
    (-0.002, 0.010, "better", True, "inconclusive"),
    (-0.010, -0.002, "worse", True, "replicated"),
    (0.002, 0.010, "worse", True, "contradicted"),
    (-0.002, 0.002, "equal", True, "replicated"),
    (0.004, 0.010, "equal", True, "contradicted"),
    (0.001, 0.010, "equal", True, "inconclusive"),
    (0.002, 0.010, "better", False, "inconclusive (not converged)"),
    (None, None, "better", True, "pending"),
])
def test_the_verdict_follows_the_rule(low, high, paper, converged, expected):
    row = {"low": low, "high": high}
    assert verdict(row, paper, 0.003, converged) == expected


def test_late_movement_reads_the_last_quarter_of_the_curve():
    curve = [{"epoch": e, "acc1": v} for e, v in
             [(2, 0.5), (4, 0.6), (6, 0.7), (8, 0.8)]]
    assert late_movement(curve, "acc1", False) == pytest.approx(0.1)     # 6 -> 8 epochs
    assert late_movement(curve, "acc1", True) == pytest.approx(-0.1)     # lower is better
    assert late_movement(curve[:3], "acc1", False) is None              # too few to show


# --- the plan: the lr grid, then the chosen rate, then the seeds the rule adds -------------------

def result(arm: str, seed: int, lr: float, val: float, test: float, late: float = 0.0) -> dict:
    curve = [{"epoch": e, "acc1": val - late * (e == 6)} for e in (2, 4, 6, 8)]
    return {"arm": arm, "seed": seed, "lr": lr, "val": {"acc1": val}, "test": {"acc1": test},
            "curve": curve}


def test_plan_runs_the_grid_first_then_each_arm_at_its_best_rate(tmp_path):
    study = Study(str(write_study(tmp_path, tmp_path)))
    plan = study.plan({})
    assert plan[:4] == [(("p2", 0, 1e-3), True), (("p2", 0, 3e-3), True),
                        (("p7", 0, 1e-3), True), (("p7", 0, 3e-3), True)]
    assert plan[4:] == [(("p2", 1, None), False), (("p7", 1, None), False)]   # lr not chosen
    done = {("p2", 0, 1e-3): result("p2", 0, 1e-3, 0.80, 0.79),
            ("p2", 0, 3e-3): result("p2", 0, 3e-3, 0.82, 0.70),     # val chooses, not test
            ("p7", 0, 1e-3): result("p7", 0, 1e-3, 0.75, 0.75),
            ("p7", 0, 3e-3): result("p7", 0, 3e-3, 0.74, 0.74)}
    assert study.chosen_lrs(done) == {"p2": 3e-3, "p7": 1e-3}
    assert study.plan(done)[4:] == [(("p2", 1, 3e-3), True), (("p7", 1, 1e-3), True)]
    assert study.shard_of("p2", 0, 2) == study.shard_of("p2", 0, 2) != study.shard_of("p7", 0, 2)


def test_inconclusive_converged_comparisons_get_the_added_seeds(tmp_path):
    study = Study(str(write_study(tmp_path, tmp_path)))
    base = {("p2", 0, 1e-3): result("p2", 0, 1e-3, 0.80, 0.80),
            ("p2", 0, 3e-3): result("p2", 0, 3e-3, 0.70, 0.70),
            ("p7", 0, 1e-3): result("p7", 0, 1e-3, 0.75, 0.75),
            ("p7", 0, 3e-3): result("p7", 0, 3e-3, 0.70, 0.70)}
    # straddling: +0.05 and -0.01 -> interval across 0; converged (flat curves)
    straddle = {**base, ("p2", 1, 1e-3): result("p2", 1, 1e-3, 0.74, 0.74),
                ("p7", 1, 1e-3): result("p7", 1, 1e-3, 0.75, 0.75)}
    assert study.verdicts(straddle)[0]["verdict"] == "inconclusive"
    assert [k for k, _ in study.plan(straddle)][-2:] == [("p2", 5, 1e-3), ("p7", 5, 1e-3)]
    # still moving: not converged, so more seeds would not decide it; none are added
    moving = {**base, ("p2", 1, 1e-3): result("p2", 1, 1e-3, 0.74, 0.74, late=0.05),
              ("p7", 1, 1e-3): result("p7", 1, 1e-3, 0.75, 0.75)}
    row = study.verdicts(moving)[0]
    assert row["verdict"] == "inconclusive (not converged)" and not row["converged"]
    assert all(seed != 5 for (_, seed, _), _ in study.plan(moving))


@pytest.mark.parametrize("replace, message", [
    ({'arms = ["p2", "p7"]': 'arms = ["p2", "p9"]'}, "must name two different arms"),
    ({'paper = "better"': 'paper = "more"'}, "paper must be one of better, worse, equal"),
    ({"add_seeds = [5]": "add_seeds = [1]"}, "add_seeds must be distinct whole numbers not in"),
    ({"lr = [1e-3, 3e-3]": "lr = [1e-3]"}, "lr must list at least two rates"),
    ({'model = "ViT-F/7"': 'model = "ViT-F/7"\nlr = 1e-3'}, "an arm sets lr"),
    ({'source = "Tab. 3(a)"': 'source = ""'}, "source must say where the paper claims it"),
])
def test_a_bad_protocol_is_one_line_before_any_run(replace, message, tmp_path, capsys):
    spec = write_study(tmp_path, tmp_path, **replace)
    assert main(["study", str(spec), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


# --- end to end: records, a fresh clone, and --report from the records alone --------------------

@pytest.mark.slow
def test_a_fresh_clone_resumes_from_the_committed_records(tmp_path):
    data = learnable_fashion(tmp_path / "fashion")
    spec, records = write_study(tmp_path, data), tmp_path / "repo/docs/studies/tiny/records"
    out = tmp_path / "machine1"
    assert run_main("study", spec, "--out", out, "--records", records)[0] == 0
    first = run_main.last
    assert "2 arms x 2 seeds) + an lr grid of 2" in first
    made = sorted(str(p.relative_to(records)) for p in records.rglob("*.json"))
    grid = ["p2/lr0.001/seed0.json", "p2/lr0.003/seed0.json", "p7/lr0.001/seed0.json",
            "p7/lr0.003/seed0.json"]
    assert set(grid) <= set(made) and len(made) in (6, 8)       # + seed 1 (+ seed 5 if added)
    results = json.loads((records.parent / "results.json").read_text())
    chosen = {r["arm"]: r["lr"] for r in results["lr_grid"] if r["chosen"]}
    assert [(r["arm"], r["seed"], r["lr"]) for r in results["runs"]][:4] == [
        ("p2", 0, chosen["p2"]), ("p7", 0, chosen["p7"]), ("p2", 1, chosen["p2"]),
        ("p7", 1, chosen["p7"])]
    for run in results["runs"]:                           # >= 8 val points, the curve kept
        assert len(run["curve"]) >= 8 and all("acc1" in e for e in run["curve"])
    (row,) = results["verdicts"]
    assert row["arms"] == ["p2", "p7"] and row["verdict"] in (
        "replicated", "contradicted", "inconclusive", "inconclusive (not converged)")
    report = (records.parent / "report.md").read_text()
    assert "## Decision" in report and "Fixed in the study file before any run" in report
    assert f"**{row['verdict']}**" in report and "## Learning rate, chosen on val" in report
    assert (records.parent / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # a new machine: no study folder, the records as committed, one of them not (unfinished)
    shutil.rmtree(out)
    redo = records / "p7" / f"lr{chosen['p7']:g}" / "seed1.json"
    kept = {p: p.read_bytes() for p in records.rglob("*.json") if p != redo}
    redo.unlink()
    out2 = tmp_path / "machine2"
    assert run_main("study", spec, "--out", out2, "--records", records, "--resume")[0] == 0
    assert ", 1 to do;" in run_main.last
    assert [p.parent.name for p in (out2 / "runs").rglob("result.json")] == ["seed1"]
    assert redo.is_file() and all(p.read_bytes() == b for p, b in kept.items())

    # --report from the records alone (no study folder at all)
    (records.parent / "report.md").unlink()
    assert main(["study", str(spec), "--out", str(tmp_path / "none"), "--records",
                 str(records), "--report"]) == 0
    assert "## Decision" in (records.parent / "report.md").read_text()
