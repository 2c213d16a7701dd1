"""What training adds to the checkpoint folder (pixtok/checkpoint.py): train_state.pt for an exact
resume, and init_from, which starts a later phase from another run's weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from pixtok.checkpoint import CheckpointError, atomic_write, read_config
from pixtok.errors import UserError


def save_train_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch_save(state, tmp))


class _NotedWrites:
    """A binary file whose failed write is kept: torch.save turns an OSError of the file it
    writes (a full disk) into a RuntimeError about stream positions."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj, path) -> None:
    """torch.save(obj, path); a write that fails raises its own OSError."""
    with open(path, "wb") as f:
        noted = _NotedWrites(f)
        try:
            torch.save(obj, noted)
        except RuntimeError:
            if noted.error is not None:
                raise noted.error from None
            raise


def load_train_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def publish_folder(final: Path, write) -> None:
    """Write a whole checkpoint folder: write(FINAL.partial) fills it (its config.json last),
    then it is swapped in for FINAL. A kill at any point leaves FINAL, or a complete copy that
    settle_folder() puts back, never half of one."""
    partial, old = final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def settle_folder(final: Path) -> Path | None:
    """FINAL after a kill inside publish_folder(): the complete copy put back in place (the new
    one when its config.json was written, else the old), or None when there is none."""
    partial, old = final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")
    if not (final / "config.json").is_file():
        for candidate in (partial, old):
            if (candidate / "config.json").is_file():
                shutil.rmtree(final, ignore_errors=True)
                candidate.rename(final)
                break
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return final if (final / "config.json").is_file() else None


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
