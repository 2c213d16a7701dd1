"""Dist.local_first over two real gloo processes, and a depth run under torchrun with a scene
cache (each node's first process fills it, the other reads it)."""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from clirun import ENV

from training.distributed import Dist


def local_first_worker(rank: int, folder: str, fail: bool) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                                  world_size=2)
    log = Path(folder) / "log"

    def build():
        with open(log, "a") as f:
            f.write(f"{rank} start\n")
        if rank == 0:
            time.sleep(0.5)               # the other rank would start meanwhile if it did not wait
            if fail:
                raise RuntimeError("rank 0 failed")
        with open(log, "a") as f:
            f.write(f"{rank} end\n")
        return rank * 10

    try:
        result = Dist(rank, 2, rank, torch.device("cpu")).local_first(build)
    except RuntimeError as e:
        result = str(e)
    (Path(folder) / f"result{rank}").write_text(json.dumps(result))
    torch_dist.destroy_process_group()


def run_pair(folder: Path, fail: bool = False) -> tuple[list[str], list]:
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=local_first_worker, args=(r, str(folder), fail)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = [json.loads((folder / f"result{r}").read_text()) for r in (0, 1)]
    return (folder / "log").read_text().splitlines(), results


def test_local_first_runs_the_first_rank_alone_then_the_others(tmp_path):
    log, results = run_pair(tmp_path)
    assert log == ["0 start", "0 end", "1 start", "1 end"] and results == [0, 10]


def test_local_first_lets_the_others_go_on_when_the_first_rank_fails(tmp_path):
    log, results = run_pair(tmp_path, fail=True)          # no deadlock: rank 1 runs and returns
    assert log == ["0 start", "1 start", "1 end"] and results == ["rank 0 failed", 10]


def test_a_torchrun_depth_run_fills_and_reads_a_scene_cache(tmp_path):
    cache = tmp_path / "cache"
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "pixtok",
                          "train", "depth1-scenes", "--out", str(tmp_path / "run"),
                          "image_size=12x16", "n_train=64", "n_test=16", "threads=1",
                          "batch_size=16", "max_steps=2", f"cache_dir={cache}"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == ["scenes-test-seed0-12x16.npz",
                                                       "scenes-train-seed0-12x16.npz"]
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["images"] == 16
