"""`pixtok bench load` against the session's real TorchServe: the JSON and plot the issue names,
and one-line errors for bad options. Latency figures are measured, never asserted."""
from __future__ import annotations

import json

import pytest
from clirun import ENV, pixtok

from pixtok.errors import UserError
from serving import launcher
from tools.bench_load import parse_mix, slope_mb_per_h, summarise


def load_env(server) -> dict:
    return {**ENV, "PIXTOK_RUN_DIR": str(server.run_dir), "PIXTOK_CLASSIFIER": "tiny-cls",
            "PIXTOK_DEPTH_MODEL": "tiny-depth", "PIXTOK_GENERATOR": "tiny-gen"}


def test_bench_load_writes_json_and_plot(server, tmp_path):
    out, plot = tmp_path / "load.json", tmp_path / "load.png"
    res = pixtok("bench", "load", "--users", "3", "--seconds", "4", "--mix",
                 "classify=0.6,depth=0.3,generate=0.1", "--json", out, "--plot", plot,
                 env=load_env(server), timeout=200)
    data = json.loads(out.read_text())
    assert data == json.loads(res.stdout)
    assert data["suite"] == "load" and data["mode"] == "fixed" and data["users"] == 3
    assert data["server_models"] == {"classify": "tiny-cls", "depth": "tiny-depth",
                                     "generate": "tiny-gen"}
    assert data["requests"] > 0 and data["requests_per_s"] > 0
    assert data["errors"] == {"total": 0, "by_status": {}, "by_type": {}}
    classify = data["routes"]["classify"]
    assert classify["ok"] == classify["requests"] > 0
    assert classify["p50_s"] <= classify["p95_s"] <= classify["p99_s"]
    # the workers' memory, sampled by pid from the management API, and the gate's
    pids = {str(w["pid"]) for m in data["server_models"].values()
            for w in server.client().describe(m)["workers"]}
    gate = str(launcher.running_gate_pid(server.run_dir))
    assert data["memory"]["workers"][gate]["model"] == "gate"
    assert set(data["memory"]["workers"]) - {gate} <= pids and len(data["memory"]["workers"]) > 1
    assert all(w["max_mb"] > 10 for w in data["memory"]["workers"].values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--mix", "classify=1,paint=2"], "unknown route 'paint'"),
    (["--mix", "classify=x"], "not route=share"),
    (["--mix", "classify=0"], "add up to 0"),
    (["--users", "0"], "--users"),
    (["--ramp", "--soak", "5"], "choose one"),
])
def test_bench_load_bad_options_are_one_line_errors(server, args, words):
    done = pixtok("bench", "load", *args, env=load_env(server), check=False, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr


def test_bench_load_without_a_server_says_so(tmp_path):
    env = {**ENV, "PIXTOK_RUN_DIR": str(tmp_path / "nothing")}
    done = pixtok("bench", "load", "--seconds", "1", env=env, check=False, timeout=60)
    assert done.returncode == 2 and "no `pixtok serve` running" in done.stderr


def test_bench_load_unknown_model_names_the_variable(server):
    env = {**load_env(server), "PIXTOK_DEPTH_MODEL": "no-such-model"}
    done = pixtok("bench", "load", "--seconds", "1", env=env, check=False, timeout=60)
    assert done.returncode == 2 and "PIXTOK_DEPTH_MODEL" in done.stderr


def test_mix_slope_and_summary_arithmetic():
    assert parse_mix("classify=7,depth=2,generate=1") == {"classify": 0.7, "depth": 0.2,
                                                         "generate": 0.1}
    assert parse_mix("depth=1,generate=0") == {"depth": 1.0}
    with pytest.raises(UserError):
        parse_mix("classify=nan")
    flat = [(t, 500.0) for t in range(0, 3600, 60)]
    assert slope_mb_per_h(flat) == 0.0
    growing = [(t, 500.0 + t / 3600 * 12) for t in range(0, 3600, 60)]
    assert slope_mb_per_h(growing) == pytest.approx(12.0, abs=0.01)
    samples = [[0, 0.1, "classify", 0.5, 200, None], [0, 0.2, "classify", 1.5, 503, "server_busy"],
               [0, 0.3, "depth", 2.0, 200, None]]
    got = summarise(samples, 2.0)
    assert got["requests_per_s"] == 1.5 and got["routes"]["classify"]["ok"] == 1
    assert got["errors"] == {"total": 1, "by_status": {"503": 1},
                             "by_type": {"server_busy": 1}}
