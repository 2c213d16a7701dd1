"""The checkpoint folder contract: config.json, model.safetensors, metrics.jsonl (and, for
resuming training, train_state.pt, written by training/checkpoint.py).

Every file is written atomically (temp file in the same folder, fsync, rename), so a run killed at
any moment leaves either the previous complete checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from pixtok.errors import UserError

FORMAT = "pixtok-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint folder that is missing, incomplete or of another format."""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result onto path in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600; give the file normal modes
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # serialized here and written by Python, so a full disk is an OSError (ENOSPC) like any
    # other write, not safetensors' own error type
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(save(tensors)))


def git_commit() -> str | None:
    """The commit the code came from, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def read_config(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    path = ckpt / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a checkpoint folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_model(ckpt: Path, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint folder describes and load its weights -> (model, config)."""
    from pixtok.models import build_model

    config = read_config(ckpt)
    weights = Path(ckpt) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: no model.safetensors")
    try:
        model = build_model(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: not a model pixtok can build "
                              f"({first_line(e)})") from None
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: a damaged file
        raise CheckpointError(f"{weights}: cannot read the weights, the file is damaged or "
                              f"cut short ({first_line(e)})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: the weights do not fit the model config.json "
                              f"describes ({first_line(e)})") from None
    return model.to(device).eval(), config


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line (state_dict errors run over many)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."
