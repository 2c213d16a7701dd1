"""Ship a trained checkpoint as a default model: copy it into the model store (without its
resume state) and write its card: recipe, exact commands, data, time and machine, the test
metrics `pixtok eval` measured, the learning curve, and for generators a sample grid.

    python -m tools.model_card runs/vit1-fashion --name fashion-vit1 --eval eval.json \
        --command "pixtok train vit1-fashion --out runs/vit1-fashion threads=1" ...
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from pixtok.tasks import TASKS  # noqa: E402

LEFT_OUT = {"train_state.pt", "reconstruction.png"}
COMPUTE = "one torch thread, niced and shared with other work"
MACHINE = f"the project's 2-core {platform.machine()} CPU machine (no GPU)"


def copy_checkpoint(src: Path, dst: Path) -> None:
    """The checkpoint minus what only resuming needs (optimizer and RNG state)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in LEFT_OUT])


def learning_curve(metrics: list[dict], keys: list[str], path: Path, title: str) -> None:
    """Epochs -> each of `keys` (a second y axis for the second key)."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    axes = [ax] + [ax.twinx() for _ in keys[1:2]]
    for key, axis, colour in zip(keys, axes, ("tab:blue", "tab:red")):
        points = [(m["epoch"], m[key]) for m in metrics if key in m]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour)
        axis.set_ylabel(f"test {key}", color=colour)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))       # a TOML basic string: JSON's escapes are TOML's


def recipe_toml(config: dict) -> str:
    """The recipe exactly as it ran (config.json's "recipe", every key, budget resolved into
    epochs), as a recipe file that `pixtok train` reads."""
    recipe = {k: v for k, v in config.get("recipe", {}).items() if v is not None}
    head = (f"# The recipe exactly as it ran, from config.json (git commit "
            f"{config.get('git_commit')}); it ran as {config.get('recipe_name')!r} with "
            "command-line overrides.\n")
    return head + "".join(f"{k} = {toml_value(v)}\n" for k, v in recipe.items())


def write_card(folder: Path, name: str, config: dict, evaluation: dict, commands: list[str],
               notes: str, samples: str | None, hours: float, compute: str = COMPUTE,
               machine: str = MACHINE, recipe_file: str | None = None) -> str:
    """README.md of a shipped model, and recipe.toml beside it: the last phase as it ran.
    recipe_file: the frozen recipe of training/recipes that equals that phase (default: the
    name it ran under)."""
    recipe = config.get("recipe", {})
    task = config.get("task", recipe.get("task", "?"))
    recipe_file = recipe_file or config.get("recipe_name", recipe.get("name", "?"))
    (folder / "recipe.toml").write_text(recipe_toml(config))
    lines = [
        f"# {name}",
        "",
        f"Task: **{task}**. Model: **{recipe.get('model', '?')}**, on "
        f"`{recipe.get('dataset', '?')}` (source: {recipe.get('source', '?')}). Its last phase "
        f"is the recipe `{recipe_file}` (training/recipes/{recipe_file}.toml, frozen: a test "
        "checks it against what ran); [recipe.toml](recipe.toml) is that phase exactly as it "
        "ran, from config.json.",
        "",
        f"Trained for {config.get('epoch', 0):.2f} epochs ({config.get('step', 0)} steps of "
        f"batch {recipe.get('batch_size', '?')}) in {hours:.2f} hours of wall time on "
        f"{machine}, {compute}; git commit "
        f"`{config.get('git_commit')}`.",
        "",
        "## Reproduce",
        "",
        "```sh",
        f"pixtok train model_store/{name}/recipe.toml --out runs/{name}   # the last phase "
        "exactly as it ran (its init_from: the previous phase's folder)",
        *commands,
        "```",
        "",
        "## Test metrics (`pixtok eval`)",
        "",
        "```json",
        json.dumps(evaluation, indent=2),
        "```",
        "",
        "## Learning curve",
        "",
        "![learning curve](curve.png)" if (folder / "curve.png").is_file() else
        "No evaluation during training yet (the run stopped before its first one).",
        "",
    ]
    if samples:
        lines += ["## Samples", "", f"![samples]({samples})", ""]
    lines += ["## Notes", "", notes.strip(), ""]
    text = "\n".join(lines)
    (folder / "README.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--eval", type=Path, required=True, help="JSON printed by pixtok eval")
    parser.add_argument("--command", action="append", default=[], help="a reproduce command")
    parser.add_argument("--notes", default="")
    parser.add_argument("--recipe", help="the frozen recipe that equals the last phase "
                        "(default: the recipe name it ran under)")
    parser.add_argument("--samples", type=Path, help="a PNG grid to put on the card")
    parser.add_argument("--hours", type=float, required=True, help="wall-clock training time")
    parser.add_argument("--compute", default=COMPUTE,
                        help=f"how the machine was used (default: {COMPUTE!r})")
    parser.add_argument("--machine", default=MACHINE,
                        help=f"what it trained on (default: {MACHINE!r})")
    parser.add_argument("--curve", type=Path, help="JSONL of evaluations with an 'epoch' each, "
                        "plotted instead of the run's metrics.jsonl")
    parser.add_argument("--key", action="append", default=[],
                        help="metric(s) to plot (at most 2); default: the task's")
    args = parser.parse_args(argv)
    dst = args.store / args.name
    copy_checkpoint(args.ckpt, dst)
    config = json.loads((dst / "config.json").read_text())
    log = args.curve or dst / "metrics.jsonl"
    metrics = [json.loads(x) for x in log.read_text().splitlines() if x] if log.is_file() else []
    if args.curve:
        shutil.copy(args.curve, dst / "curve.jsonl")
    task = config.get("task", config.get("recipe", {}).get("task"))
    keys = args.key[:2] or [TASKS[task].curve_key if task in TASKS else "loss"]
    if metrics:
        learning_curve(metrics, keys, dst / "curve.png", f"{args.name}: {' and '.join(keys)}")
    samples = None
    if args.samples:
        shutil.copy(args.samples, dst / "samples.png")
        samples = "samples.png"
    write_card(dst, args.name, config, json.loads(args.eval.read_text()), args.command,
               args.notes, samples, args.hours, args.compute, args.machine, args.recipe)
    print(dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
