"""What training adds to the checkpoint folder (pixtok/checkpoint.py): train_state.pt for an exact
resume, and init_from, which starts a later phase from another run's weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

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
