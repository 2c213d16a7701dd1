"""`pixtok export CKPT [--out model_store] [--name N] [--onnx]` -> NAME.mar (+ NAME.onnx)."""
from __future__ import annotations

from pathlib import Path

from export.archive import ExportError, export_archive


def run_cli(args) -> int:
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: no such checkpoint folder")
    export_archive(ckpt, args.out, name=args.name, onnx=args.onnx)
    return 0
