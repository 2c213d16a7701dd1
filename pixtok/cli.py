"""The `pixtok` command: train, eval, study, analyze, sample, export, serve, bench.

This module is the top of the house: it composes training/, export/ and serving/ (`pixtok serve`
has export build the archives that are missing and training write the page's example images, then
starts serving), and with tools/ (the `pixtok bench` suites, which it alone imports) it is the
only code that imports those parts together. Each subcommand's code is imported only when it
runs, so `pixtok --help` is instant. A user's mistake (UserError) ends in
one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from pixtok import __version__
from pixtok.errors import UserError
from pixtok.sampling import SAMPLERS

# subcommand -> "module:function"; the function takes the parsed args and returns an exit code
COMMANDS = {
    "train": "training.train:run_cli",
    "eval": "training.evaluate:run_cli",
    "study": "training.study:run_cli",
    "analyze": "training.analyze:run_cli",
    "sample": "training.sample:run_cli",
    "export": "pixtok.cli:export",
    "serve": "pixtok.cli:serve",
    "bench": "pixtok.cli:bench",
}
# `pixtok bench SUITE`: the suites are tools (tools/), which may import every part
BENCH_SUITES = {"infer": "tools.bench_infer:bench_infer",
                "sample": "tools.bench_sample:bench_sample",
                "serve": "tools.bench_serve:bench_serve",
                "load": "tools.bench_load:bench_load",
                "drill": "tools.bench_drill:bench_drill"}


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe; writes a checkpoint folder")
    p.add_argument("recipe", help="a recipe name from training/recipes, or a .toml file")
    p.add_argument("--out", help="checkpoint folder (default: runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the folder's last state")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint; prints one JSON object")
    p.add_argument("ckpt")
    p.add_argument("--data", help="data path (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test",
                   help="test (default), val (a run trained with val_size=N) or train")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("-n", "--num-samples", type=int, help="generators: how many samples")
    p.add_argument("--out", help="where to write an image (MAE grid)")
    p.add_argument("--classifier", help="generators: classifier checkpoint for fid_proxy")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="generators: sampler (default: the shared sampling defaults)")
    p.add_argument("--steps", type=int, help="generators: sampling steps")
    p.add_argument("--guidance", type=float, help="generators: classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="generators: sampling seed")


def add_study(sub) -> None:
    p = sub.add_parser("study", help="run a study (arms x seeds of real runs), resumably")
    p.add_argument("study", metavar="FILE|NAME",
                   help="a study name from training/studies, or a .toml file")
    p.add_argument("--out", help="study folder (default: runs/studies/<study>)")
    p.add_argument("--resume", action="store_true", help="continue the folder's study")
    p.add_argument("--records", metavar="DIR", help="where finished runs are recorded and "
                   "read back (default: docs/studies/<study>/records for a shipped study, "
                   "else <out>/records); a run with a record is never run again")
    p.add_argument("--shard", metavar="i/n", help="run only the i-th (0-based) of n slices of "
                   "the (arm, seed) list")
    p.add_argument("--report", nargs="*", metavar="DIR", help="run nothing: gather the finished "
                   "runs of --out (and of these folders) into results.json and report.md")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides for every arm; scale=NAME picks a [scales.NAME] set")


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="attention distances and offset maps of a ViT checkpoint")
    p.add_argument("ckpt")
    p.add_argument("--out", help="folder for analysis.json and the plots (default: CKPT/analysis)")
    p.add_argument("-n", "--num-images", type=int, default=64,
                   help="held-out images to average over (default 64)")
    p.add_argument("--split", help="split to take them from (default: val if the run has "
                   "one, else test)")
    p.add_argument("--data", help="data path (default: the one the checkpoint was trained on)")


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw class-conditional samples from a generator")
    p.add_argument("ckpt")
    p.add_argument("--label", required=True, help="class name or index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--guidance", type=float)
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--out", required=True, help="PNG file for the grid")


def add_export(sub) -> None:
    p = sub.add_parser("export", help="checkpoint -> TorchServe archive (and ONNX)")
    p.add_argument("ckpt")
    p.add_argument("--out", default="model_store")
    p.add_argument("--name", help="model name (default: the checkpoint folder's name)")
    onnx = p.add_mutually_exclusive_group()
    onnx.add_argument("--onnx", action="store_true",
                      help="also write NAME.onnx beside the archive (it always carries one)")
    onnx.add_argument("--no-onnx", action="store_true",
                      help="leave the ONNX file out: the archive runs PyTorch")
    p.add_argument("--quantize", choices=["int8"],
                   help="add an int8 ONNX file, kept only if it passes its check on the "
                        "checkpoint's test split (classifier: >= 99.5%% top-1 agreement; "
                        "depth: RMSE within 1%%)")



def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="start TorchServe or KServe (+ Gradio) on the model store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--server", choices=["torchserve", "kserve"], default="torchserve",
                   help="TorchServe (REST) or KServe's ModelServer (v2 protocol and the same "
                        "REST routes); default torchserve")
    p.add_argument("--no-auth", action="store_true",
                   help="kserve only: no bearer key, for a cluster whose gateway authenticates")
    p.add_argument("--batch-size", type=int, default=None,
                   help="kserve only: most requests per batch (default per task)")
    p.add_argument("--max-batch-delay", type=float, default=None,
                   help="kserve only: ms a batch waits for more requests (default per task)")
    p.add_argument("--model-store", default=None)
    p.add_argument("--no-ui", action="store_true", help="do not start the Gradio front end")
    p.add_argument("--stop", action="store_true", help="stop a running server")
    p.add_argument("--foreground", action="store_true",
                   help="stay until SIGTERM/Ctrl-C, then stop everything (containers)")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks; results as JSON")
    p.add_argument("suite", choices=list(BENCH_SUITES))
    p.add_argument("--json", dest="json_out", help="write the results to this file too")
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes (smoke run)")
    load = p.add_argument_group("load and drill (against the running `pixtok serve`; "
                                "docs/reliability.md)")
    load.add_argument("--users", type=int,
                      help="concurrent users (load: 16, drill: 6 threads)")
    load.add_argument("--seconds", type=float,
                      help="load: duration or each ramp stage (60); drill: between kills (20)")
    load.add_argument("--mix", default="classify=0.7,depth=0.2,generate=0.1",
                      help="shares of the routes classify, depth, generate")
    load.add_argument("--ramp", action="store_true",
                      help="raise the rate until the classify p99 passes 2 s")
    load.add_argument("--soak", type=float, metavar="MINUTES",
                      help="a long flat load; reports the workers' memory slope (MB/h)")
    load.add_argument("--plot", help="write a PNG of latency and worker memory over time")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixtok", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pixtok {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_train, add_eval, add_study, add_analyze, add_sample, add_export, add_serve,
                add_bench):
        add(sub)
    return parser


def export(args) -> int:
    """`pixtok export`: export with training's held-out data for the int8 check."""
    from export.cli import run_cli
    from training.held_out import held_out_sample

    return run_cli(args, held_out=held_out_sample)


def serve(args) -> int:
    """`pixtok serve`: archives built where missing (export), the page's examples written
    (training), then TorchServe and the page started (serving)."""
    from serving.serve_cli import run_cli

    if args.stop:
        return run_cli(args)
    from functools import partial

    from export.archive import build_missing_archives
    from training.data.examples import write_examples
    from training.held_out import held_out_sample

    build = partial(build_missing_archives, held_out=held_out_sample)   # int8 checked again
    return run_cli(args, build=build, examples=write_examples)


def bench(args) -> int:
    """`pixtok bench SUITE`: the suite's function (tools/), its JSON printed and, with --json,
    written."""
    module, func = BENCH_SUITES[args.suite].split(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        raise UserError(f"benchmark suite {args.suite!r} is not installed") from None
    extra = {"args": args} if args.suite in ("load", "drill") else {}    # their own options
    text = json.dumps(fn(quick=args.quick, **extra), indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options such as --out
    overrides_ok = all("=" in e and not e.startswith("-") for e in extra)
    if args.command in ("train", "study") and overrides_ok:
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    module, func = COMMANDS[args.command].split(":")
    try:
        return getattr(importlib.import_module(module), func)(args) or 0
    except UserError as e:
        print(f"pixtok {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pixtok {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
