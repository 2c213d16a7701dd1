"""Writes that go wrong (issue 22; `make test-reliability`): `pixtok train` SIGKILLed inside a
checkpoint write, a checkpoint folder and a run folder on a full disk, a model folder that
cannot be read.

The full disk is a small tmpfs mounted for the test (root, as on the test machine); where mount
is refused the test is skipped and says why. The SIGKILL lands inside a write on purpose: the
`pixtok train` subprocess runs with its file writes wrapped so that the N-th write of one
checkpoint file puts half its bytes on disk and then SIGKILLs the process. With atomic writes
that half lands in a temp file; with a plain write it would be the checkpoint file itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from clirun import ENV, ROOT, message_lines, pixtok
from conftest import make_classifier
from datafiles import learnable_fashion
from safetensors.torch import load_file

from pixtok.checkpoint import load_model, read_config
from training.checkpoint import load_train_state

pytestmark = pytest.mark.reliability

ARGS = ["model=ViT-F/1", "image_size=14", "batch_size=32", "eval_batch_size=128", "threads=1",
        "amp=off", "epochs=1", "max_steps=8", "eval_every=0.25", "ckpt_minutes=0"]

# `pixtok train` with its writes wrapped: the KILL_AT_WRITE-th write of a file whose name holds
# KILL_FILE puts half its bytes on disk, then the process SIGKILLs itself
KILLING_TRAIN = """
import os, pathlib, runpy, signal, sys
target, nth, seen = os.environ["KILL_FILE"], int(os.environ["KILL_AT_WRITE"]), [0]

def tearing(write, path_at):
    def wrapped(*args, **kwargs):
        done = write(*args, **kwargs)
        path = args[path_at]
        if target in os.path.basename(str(path)):
            seen[0] += 1
            if seen[0] == nth:
                os.truncate(path, os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        return done
    return wrapped

pathlib.Path.write_bytes = tearing(pathlib.Path.write_bytes, 0)   # model.safetensors
pathlib.Path.write_text = tearing(pathlib.Path.write_text, 0)     # config.json
import training.checkpoint as ckpt
ckpt.torch_save = tearing(ckpt.torch_save, 1)                  # train_state.pt
sys.argv = ["pixtok", *sys.argv[1:]]
runpy.run_module("pixtok", run_name="__main__")
"""


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return learnable_fashion(tmp_path_factory.mktemp("data") / "fashion")


@pytest.fixture(scope="module")
def uninterrupted(fashion, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    pixtok("train", "vit1-fashion", "--out", out, f"data_dir={fashion}", *ARGS)
    return out


def train_killed_in_write(out: Path, file: str, nth: int, *args) -> subprocess.CompletedProcess:
    env = {**ENV, "KILL_FILE": file, "KILL_AT_WRITE": str(nth)}
    return subprocess.run([sys.executable, "-c", KILLING_TRAIN, "train", "vit1-fashion",
                           "--out", str(out), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def checkpoint_steps(out: Path) -> tuple[int, int]:
    """(step of config.json + model.safetensors, step of train_state.pt), once both load."""
    model, config = load_model(out)           # a torn file raises CheckpointError here
    assert model is not None
    return config["step"], load_train_state(out / "train_state.pt")["step"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_inside_each_checkpoint_file_write_keeps_a_loadable_resumable_checkpoint(
        fashion, uninterrupted, tmp_path):
    out = tmp_path / "run"
    last = -1
    for i, (file, nth) in enumerate([("model.safetensors", 3), ("config.json", 2),
                                     ("train_state.pt", 2)]):
        args = [f"data_dir={fashion}", *ARGS] if i == 0 else ["--resume"]
        done = train_killed_in_write(out, file, nth, *args)
        assert done.returncode == -9, done.stderr[-2000:]          # it died inside the write
        model_step, state_step = checkpoint_steps(out)
        torn = list(out.glob(f".{file}.*.tmp"))
        assert len(torn) == 1, sorted(p.name for p in out.iterdir())   # the half-written file
        # the write of train_state.pt comes last: weights one checkpoint ahead of it is fine
        assert model_step - state_step in (0, 1), (file, model_step, state_step)
        assert state_step > last, (file, state_step, last)          # the resume went on
        last = state_step
    pixtok("train", "vit1-fashion", "--out", out, "--resume")
    assert not list(out.glob(".*.tmp"))                       # the resume cleared the torn files
    assert read_config(out)["step"] == 8
    assert same_weights(out, uninterrupted)


@contextlib.contextmanager
def small_tmpfs(size: int):
    """A tmpfs of `size` bytes mounted on a new folder (skip if this machine refuses)."""
    where = Path(tempfile.mkdtemp(prefix="pixtok-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode:
        where.rmdir()
        pytest.skip("a full disk is simulated with a small tmpfs, and mount was refused "
                    f"({done.stderr.strip() or done.returncode}; needs root or CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def pages(n: int) -> int:
    return -(-n // 4096) * 4096


def test_a_full_disk_stops_training_in_one_line_and_resume_continues(fashion, uninterrupted):
    """Room for one checkpoint and half a model's weights more: the first checkpoint is
    written, the second runs out of space. One line, exit 2, the first checkpoint whole; with
    room again, --resume finishes the run as if nothing happened."""
    size = {p.name: pages(p.stat().st_size) for p in uninterrupted.iterdir()}
    room = sum(size.values()) + size["model.safetensors"] // 2
    with small_tmpfs(room) as disk:
        out = disk / "run"
        done = pixtok("train", "vit1-fashion", "--out", out, f"data_dir={fashion}", *ARGS,
                      check=False)
        assert done.returncode == 2, done.stderr[-2000:]
        error = message_lines(done.stderr)[-1]
        assert error.startswith(f"pixtok train: error: cannot write into {out} at step "), error
        assert "No space left on device" in error and "--resume" in error
        assert "Traceback" not in done.stderr
        model_step, state_step = checkpoint_steps(out)
        assert model_step == state_step >= 1
        assert not list(out.glob(".*.tmp"))                    # the failed write cleaned up
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        pixtok("train", "vit1-fashion", "--out", out, "--resume")
        assert read_config(out)["step"] == 8
        assert same_weights(out, uninterrupted)


def test_serve_refuses_a_full_run_folder_in_one_line(tmp_path):
    store = tmp_path / "store"
    make_classifier(store / "tiny-cls")
    with small_tmpfs(1 << 20) as disk:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:                      # fill the disk to the last page
                f.write(b"\0" * 65536)
        env = {**ENV, "PIXTOK_RUN_DIR": str(disk / "run")}
        done = pixtok("serve", "--no-ui", "--model-store", store, check=False, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = message_lines(done.stderr)
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"pixtok serve: error: the run folder {disk / 'run'} has ")
        assert "PIXTOK_RUN_DIR" in lines[0]
        assert not (disk / "run" / "tmp" / ".model_server.pid").exists()
    assert (store / "tiny-cls.mar").is_file()       # the archive was built in the store, not here


# root reads a mode-000 file through two capabilities; without them the kernel checks the
# modes as for anyone. (User nobody would do as well, but cannot reach this machine's Python,
# which lives under /root, mode 0700.)
WITHOUT_READ_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                         "--bounding-set=-dac_override,-dac_read_search"]
CHOOSE = """
import json, pathlib, sys
from export.archive import build_missing_archives
from serving.launcher import servable_models
served, broken = servable_models(pathlib.Path(sys.argv[1]), build_missing_archives,
                                 log=lambda *_: None)
print(json.dumps({"served": sorted(served), "broken": broken}))
"""


def test_an_unreadable_model_folder_and_archive_are_named_and_left_out(tmp_path):
    """A model folder and a .mar without read permission: `pixtok export` is a one-line error,
    and `pixtok serve`'s choice of models names both and keeps the readable one. Run as root
    without the capabilities that let root read anything (as root a mode-000 folder is still
    readable, so without dropping them this case cannot happen here)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH "
                    "(as another user the modes would apply anyway, but a mode-000 folder "
                    "made by root is then not this test's to make)")
    from export.archive import export_archive

    store = tmp_path / "store"
    make_classifier(store / "good")
    make_classifier(store / "locked")
    export_archive(make_classifier(tmp_path / "sealed"), store, name="sealed",
                   log=lambda *_: None)
    os.chmod(store / "locked", 0o000)
    os.chmod(store / "sealed.mar", 0o000)
    try:
        probe = subprocess.run([*WITHOUT_READ_OVERRIDE, "cat", str(store / "sealed.mar")],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            pytest.skip("dropping the capabilities did not take the right to read a mode-000 "
                        "file here")
        export = subprocess.run(
            [*WITHOUT_READ_OVERRIDE, sys.executable, "-m", "pixtok", "export",
             str(store / "locked"), "--out", str(tmp_path / "out")],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert export.returncode == 2, export.stderr[-2000:]
        assert len(message_lines(export.stderr)) == 1, export.stderr
        assert str(store / "locked") in export.stderr and "ermission denied" in export.stderr
        chosen = subprocess.run([*WITHOUT_READ_OVERRIDE, sys.executable, "-c", CHOOSE,
                                 str(store)], cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert chosen.returncode == 0, chosen.stderr[-2000:]
        result = json.loads(chosen.stdout.strip().splitlines()[-1])
        assert result["served"] == ["good"]
        assert sorted(result["broken"]) == ["locked", "sealed"]
        assert all("ermission denied" in why for why in result["broken"].values()), result
        lines = message_lines(chosen.stderr)
        assert len(lines) == 2 and all(
            line.startswith("pixtok serve: not serving a damaged model: ") for line in lines)
    finally:
        os.chmod(store / "locked", 0o755)
        os.chmod(store / "sealed.mar", 0o644)
