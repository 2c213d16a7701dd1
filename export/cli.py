"""`pixtok export CKPT [--out model_store] [--name N] [--onnx | --no-onnx] [--quantize int8]`
-> NAME.mar (an image model's carries model.onnx; --onnx also writes NAME.onnx beside it).

CKPT may also be a model store (a folder of checkpoint folders): every checkpoint in it that
has no archive, or an older one, is exported (what `pixtok serve` and the container build do).
"""
from __future__ import annotations

from pathlib import Path

from export.archive import ExportError, build_missing_archives, export_archive


def is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "model_index.json").is_file()


def run_cli(args, held_out=None) -> int:
    """held_out(config) -> (images, targets, description): the data the int8 check runs on."""
    try:
        return export(args, held_out)
    except OSError as e:     # a file it may not read, a disk it cannot write: one line
        raise ExportError(f"{e.filename or args.ckpt}: {e.strerror or e}") from None


def onnx_choice(args) -> bool | None:
    if getattr(args, "no_onnx", False):
        return False
    return True if args.onnx else None


def export(args, held_out=None) -> int:
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: no such checkpoint folder")
    if not is_checkpoint(ckpt) and any(is_checkpoint(p) for p in ckpt.iterdir() if p.is_dir()):
        if args.name or onnx_choice(args) is not None or getattr(args, "quantize", None) or \
                Path(args.out).resolve() != ckpt.resolve():
            raise ExportError(f"{ckpt} is a model store: it is exported in place, without "
                              "--name, --onnx, --no-onnx, --quantize or another --out")
        build_missing_archives(ckpt, held_out=held_out)
        return 0
    export_archive(ckpt, args.out, name=args.name, onnx=onnx_choice(args), progress=True,
                   quantize=getattr(args, "quantize", None), held_out=held_out)
    return 0
