"""The `pixtok` command: train, eval, sample, export, serve, bench.

Each subcommand's code is imported only when it runs, so `pixtok serve` never loads training code
and `pixtok --help` is instant. A user's mistake (UserError) ends in one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pixtok import __version__
from pixtok.errors import UserError

# subcommand -> "module:function"; the function takes the parsed args and returns an exit code
COMMANDS = {
    "train": "training.train:run_cli",
    "eval": "training.evaluate:run_cli",
    "sample": "training.sample:run_cli",
    "export": "export.cli:run_cli",
    "serve": "serving.launcher:run_cli",
    "bench": "pixtok.bench:run_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixtok", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pixtok {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe; writes a checkpoint folder")
    p.add_argument("recipe", help="a recipe name from training/recipes, or a .toml file")
    p.add_argument("--out", help="checkpoint folder (default: runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the folder's last state")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")

    p = sub.add_parser("eval", help="evaluate a checkpoint; prints one JSON object")
    p.add_argument("ckpt")
    p.add_argument("--data", help="data path (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("-n", "--num-samples", type=int, help="generators: how many samples")
    p.add_argument("--out", help="where to write an image (MAE grid)")
    p.add_argument("--classifier", help="generators: classifier checkpoint for fid_proxy")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm", "euler"],
                   help="generators: sampler (default: the shared sampling defaults)")
    p.add_argument("--steps", type=int, help="generators: sampling steps")
    p.add_argument("--guidance", type=float, help="generators: classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="generators: sampling seed")

    p = sub.add_parser("sample", help="draw class-conditional samples from a generator")
    p.add_argument("ckpt")
    p.add_argument("--label", required=True, help="class name or index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm", "euler"])
    p.add_argument("--guidance", type=float)
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--out", required=True, help="PNG file for the grid")

    p = sub.add_parser("export", help="checkpoint -> TorchServe archive (and ONNX)")
    p.add_argument("ckpt")
    p.add_argument("--out", default="model_store")
    p.add_argument("--name", help="model name (default: the checkpoint folder's name)")
    p.add_argument("--onnx", action="store_true", help="also export an ONNX file")

    p = sub.add_parser("serve", help="start TorchServe (+ Gradio) on the model store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-store", default=None)
    p.add_argument("--no-ui", action="store_true", help="do not start the Gradio front end")
    p.add_argument("--stop", action="store_true", help="stop a running server")
    p.add_argument("--foreground", action="store_true",
                   help="stay until SIGTERM/Ctrl-C, then stop everything (containers)")

    p = sub.add_parser("bench", help="benchmarks; results as JSON")
    p.add_argument("suite", choices=["infer", "sample", "serve", "load", "drill"])
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options such as --out
    if args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
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
