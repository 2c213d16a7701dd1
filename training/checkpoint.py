"""The checkpoint folder contract: config.json, model.safetensors, metrics.jsonl, train_state.pt.

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
from safetensors.torch import load_file, save_file

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
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def save_train_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


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


def read_init_config(path) -> dict:
    """config.json of an init_from folder; a missing or broken one is the user's error."""
    try:
        return read_config(path)
    except CheckpointError as e:
        raise UserError(f"init_from: {e}") from None


def check_fit(path, what: str, missing: list[str], unexpected: list[str]) -> None:
    """Raise UserError when loading `what` from init_from=`path` left keys unmatched."""
    if missing or unexpected:
        raise UserError(f"init_from={path}: {what} do not fit (missing "
                        f"{', '.join(missing) or 'none'}; unexpected "
                        f"{', '.join(unexpected) or 'none'})")


# Model args a later phase may set otherwise and still load every weight: statistics measured on
# its own training data (input normalisation, the depth head's starting depth, which the loaded
# head replaces) and stochastic depth, a training setting. As for an MAE encoder, the run keeps
# its own values, so `--resume`, which does not read init_from again, rebuilds the same model.
PHASE_FREE = frozenset({"mean", "std", "init_depth", "drop_path"})


def fixed_args(args: dict, prefix: str = "") -> dict:
    """Flatten a model's args to {"key" or "head.key": value}, leaving out PHASE_FREE keys."""
    out = {}
    for key, value in args.items():
        if isinstance(value, dict):
            out.update(fixed_args(value, f"{prefix}{key}."))
        elif key not in PHASE_FREE:
            out[prefix + key] = value
    return out


def load_same_task(path, task: str, spec: dict, model: torch.nn.Module) -> bool:
    """init_from for a later training phase: when the checkpoint folder `path` holds a `task`
    checkpoint, load all its weights into `model` (built from `spec`) and return True; return
    False for a checkpoint of another task (the caller may accept, e.g., an MAE encoder).

    The later phase may train on other data of the same shape (e.g. more scenes), whose
    measured statistics differ: only the PHASE_FREE args may differ, and they stay `spec`'s.
    Raises UserError when `path` is no checkpoint folder or holds another model than `spec`.
    """
    config = read_init_config(path)
    if config.get("task") != task:
        return False
    theirs, ours = config.get("model") or {}, json.loads(json.dumps(spec))
    differ = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in ("arch", "name")
              if theirs.get(k) != ours.get(k)]
    t_args, o_args = fixed_args(theirs.get("args") or {}), fixed_args(ours.get("args") or {})
    differ += [f"{k} {t_args.get(k)} vs {o_args.get(k)}"
               for k in sorted(set(t_args) | set(o_args)) if t_args.get(k) != o_args.get(k)]
    if differ:
        raise UserError(f"init_from={path}: this {task} checkpoint holds another model "
                        f"({'; '.join(differ)}); give a run of the same model, or an MAE "
                        f"checkpoint")
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"init_from={path}: no model.safetensors")
    result = model.load_state_dict(load_file(weights), strict=False)
    check_fit(path, "weights", result.missing_keys, result.unexpected_keys)
    return True


def load_model(ckpt: Path, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint folder describes and load its weights -> (model, config)."""
    from training.models import build_model

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
