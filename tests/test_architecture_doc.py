"""docs/architecture.md names nothing that does not exist: every repository file and folder,
every dotted module or name, every command and option of its CLI synopsis, and every
config.json key of its checkpoint contract are checked against the code."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from pixtok.cli import BENCH_SUITES, COMMANDS, build_parser
from pixtok.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
TICKED = re.findall(r"`([^`\n]+)`", DOC)
# files and folders the page names inside a checkpoint, an archive or the run folder, not in
# the repository
NOT_IN_THE_REPOSITORY = {"handler.py", "best/", "best.partial/", "best.old/", "transformer/",
                         "vae/", "scheduler/", "logs/", "tmp/",
                         # a generator folder's carried code (copies of pixtok/models/ files)
                         "transformer/pixel_dit.py", "transformer/pixel_layers.py"}
PATH = re.compile(r"^[a-z_][\w./-]*(\.py|\.yaml|\.properties|\.md|/)$")
DOTTED = re.compile(r"^(pixtok|training|export|serving|tools)(\.\w+)+")
PACKAGES = ("pixtok", "training", "export", "serving", "tools")


def repository_paths() -> list[str]:
    return sorted({t for t in TICKED if PATH.match(t) and t not in NOT_IN_THE_REPOSITORY})


def exists(name: str) -> bool:
    """A path with a folder is taken from the root (with a placeholder such as NAME.py, its
    folder); a bare file or folder name (the page's per-package tables) must exist in one of
    the packages."""
    if re.search(r"[A-Z]{3,}", name):
        return (ROOT / name).parent.is_dir()
    if (ROOT / name).exists():
        return True
    if "/" in name.rstrip("/"):
        return False
    return any(True for part in PACKAGES for _ in (ROOT / part).rglob(name.rstrip("/")))


@pytest.mark.parametrize("name", repository_paths())
def test_each_file_and_folder_it_names_exists(name):
    assert exists(name), f"docs/architecture.md names `{name}`, which is not in the repository"


def resolve(dotted: str):
    """The module or attribute a dotted name means (the longest importable module first)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            thing = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            thing = getattr(thing, attr)
        return thing
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("dotted", sorted({DOTTED.match(t).group(0) for t in TICKED
                                           if DOTTED.match(t)}))
def test_each_module_and_name_it_names_exists(dotted):
    resolve(dotted)


def synopsis() -> list[str]:
    block = DOC.split("### CLI\n```\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0] for line in block.splitlines() if line.startswith("pixtok ")]


def test_each_command_and_option_of_the_synopsis_exists():
    subparsers = next(a for a in build_parser()._actions if a.choices and "train" in a.choices)
    named = set()
    for line in synopsis():
        command = line.split()[1]
        named.add(command)
        assert command in COMMANDS, line
        options = subparsers.choices[command]._option_string_actions
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line):
            assert flag in options, f"`pixtok {command}` has no option {flag}"
    assert named == set(COMMANDS)
    bench = next(line for line in synopsis() if line.startswith("pixtok bench "))
    assert set(bench.split()[2].split("|")) == set(BENCH_SUITES)


def contract_bullet(name: str) -> str:
    return next(line for line in DOC.split("\n- ") if line.startswith(f"`{name}`:"))


def test_each_config_key_of_the_checkpoint_contract_is_written():
    """The keys the contract names are those of a config.json `pixtok train` wrote (the
    shipped classifier's); the tasks it names are registered."""
    bullet = " ".join(contract_bullet("config.json").split())
    top = re.sub(r"\([^()]*(\([^()]*\)[^()]*)*\)", "", bullet)       # nested parts left out
    keys = {k for k in re.findall(r"`\"?(\w+)\"?[`:]", top.split(":", 1)[1])}
    written = json.loads((ROOT / "model_store" / "fashion-vit1" / "config.json").read_text())
    assert {"format", "task", "model", "labels", "input", "recipe", "git_commit"} <= keys
    assert keys <= set(written), keys - set(written)
    inner = re.search(r"`input` \(([^)]*)\)", bullet).group(1)
    assert set(re.findall(r"`(\w+)`", inner)) <= set(written["input"])
    model = re.search(r"`model` \(`\{([^}]*)\}`", bullet).group(1)
    assert set(re.findall(r'"(\w+)"', model)) <= set(written["model"])
    tasks = re.search(r"`task` \(([^)]*)\)", bullet).group(1)
    assert set(re.findall(r"`(\w+)`", tasks)) <= set(TASKS)


def test_the_checker_catches_a_false_name():
    assert not exists("serving/no_such_file.py") and not exists("no_such_module.py")
    assert not exists("serving/nowhere/NAME.py") and exists("training/tasks/NAME.py")
    assert exists("process.py") and exists("serving/")
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        resolve("serving.launcher.no_such_function")
