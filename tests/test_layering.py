"""The one-way flow of docs/architecture.md, read from every module's imports (lazy ones in
functions included): the core `pixtok` imports none of the parts; training, export and serving
import only the core; tools may import every part, and nothing imports them but the CLI (by
name); nothing imports serving but the CLI and tools; the Gradio page holds no model code; and
no modules import each other in a circle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from export.archive import imported_modules
from pixtok.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pixtok", "training", "export", "serving", "tools")
TOP = {"pixtok.cli", "pixtok.__main__"}          # composes the parts; imports them lazily
ALLOWED = {"pixtok": {"pixtok"}, "training": {"pixtok", "training"},
           "export": {"pixtok", "export"}, "serving": {"pixtok", "serving"},
           "tools": set(PARTS)}      # what measures or describes the parts: like the CLI
# the Gradio page's modules: gradio_app.py and its parts, each held to the page
PAGE = ("serving.gradio_app", "serving.page_models", "serving.page_actions",
        "serving.page_layout")
NARROWER = {   # modules held to less than their part
    **{m: {"pixtok", "serving.client", "serving.page_settings", *PAGE} for m in PAGE},
    "serving.page_settings": {"pixtok", "serving.client"},
    "serving.client": {"pixtok"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# "module:name" references (resolved with importlib by whoever reads them) and
# importlib.import_module("module") calls with a literal name
REFERENCE = re.compile(r"^((?:pixtok|training|export|serving|tools)(?:\.\w+)+):\w+$")
# the task registry's references are resolved by the part each field belongs to, not by the
# core that holds them: field -> the module that imports what it names
REGISTRY_RESOLVERS = {"trainer": "training.tasks", "export_check": "export.archive",
                      "runner": "pixtok.inference.core"}


def string_imports(path: Path) -> set[str]:
    """The modules `path` names to be imported at run time: a literal argument of
    importlib.import_module / __import__, and "module:name" strings."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and getattr(node.func, "attr", getattr(node.func, "id", None))
                in ("import_module", "__import__")):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = REFERENCE.match(node.value)
            if match:
                found.add(match.group(1))
    return found


def imports_of(path: Path) -> set[str]:
    """Names of the repository's modules that `path` imports (export's own import reader, the
    one that checks an archive's code), and those it imports by name at run time (the task
    registry's are checked against the modules that resolve them instead)."""
    names = set(imported_modules(path, ROOT))
    if module_name(path) != "pixtok.tasks":
        names |= string_imports(path)
    return {n for n in names if n.split(".")[0] in PARTS}


MODULES = sorted(p for part in PARTS for p in (ROOT / part).rglob("*.py"))


def allowed(importer: str, imported: str) -> bool:
    if importer in TOP:
        return True
    rules = NARROWER.get(importer, ALLOWED[importer.split(".")[0]])
    return any(imported == r or imported.startswith(r + ".") for r in rules)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_one_way_flow(path):
    importer = module_name(path)
    wrong = sorted(n for n in imports_of(path) if not allowed(importer, n))
    assert not wrong, f"{importer} imports {wrong} against docs/architecture.md"


def test_the_rule_catches_a_crossing(tmp_path):
    """The checker itself: a serving module that imports training is refused."""
    assert not allowed("serving.launcher", "training.data.examples")
    assert not allowed("pixtok.models.vit", "training.train")
    assert not allowed("export.archive", "serving.launcher")
    assert not allowed("serving.gradio_app", "pixtok" + "x")     # a prefix is not a package
    assert not allowed("serving.gradio_app", "serving.launcher")    # the page starts nothing
    assert not allowed("serving.page_actions", "serving.kserve_models")     # nor holds a model
    assert allowed("serving.page_layout", "serving.page_actions")
    assert allowed("serving.gradio_app", "pixtok.inference.validate")
    assert allowed("pixtok.cli", "serving.launcher")
    # tools import every part; no part imports a tool, and only the CLI reaches them
    assert allowed("tools.bench_load", "training.data.scenes")
    assert allowed("tools.bench_serve", "export.archive")
    assert not allowed("serving.launcher", "tools.bench_load")
    assert not allowed("training.train", "tools.capacity")
    assert not allowed("pixtok.inference.core", "tools.bench_infer")
    assert allowed("pixtok.cli", "tools.bench_drill")


def registry_references() -> list[tuple[str, str]]:
    """(resolving module, referenced module) of every reference in the task registry."""
    pairs = []
    for task in TASKS.values():
        values = {"trainer": task.trainer, "export_check": task.export_check,
                  "runner": task.serving.runner if task.serving else None}
        pairs += [(REGISTRY_RESOLVERS[f], v.split(":")[0]) for f, v in values.items() if v]
    return pairs


def test_the_registry_references_follow_the_one_way_flow():
    wrong = [(r, m) for r, m in registry_references() if not allowed(r, m)]
    assert registry_references() and not wrong, wrong


def test_string_imports_are_seen(tmp_path):
    """A module that imports by name at run time is read as importing that module."""
    module = tmp_path / "lazy.py"
    module.write_text('import importlib\nCMD = "training.train:run_cli"\n'
                      'BENCH = "tools.bench_load:bench_load"\n'
                      'def f():\n    return importlib.import_module("export.cli")\n')
    assert string_imports(module) == {"training.train", "tools.bench_load", "export.cli"}
    assert not allowed("serving.launcher", "training.train")


def test_the_modules_are_all_seen():
    names = {module_name(p) for p in MODULES}
    assert {"pixtok.models.vit", "pixtok.inference.handler_base", "training.train",
            "export.archive", "serving.launcher", "serving.handlers.classifier",
            "tools.bench_load", "tools.capacity"} <= names


def module_imports(path: Path, names: set[str]) -> set[str]:
    """The repository modules `path` imports, lazy ones included; `from package import module`
    counts as importing the module (imports_of sees the package only)."""
    package = list(path.relative_to(ROOT).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = (".".join(package[:len(package) - node.level + 1]
                             + ([node.module] if node.module else []))
                    if node.level else node.module)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in names else base
                      for a in node.names}
    return (found & names) - {module_name(path)}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of two or more modules that import each other, directly or round a loop
    (the strongly connected components of the import graph)."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo += graph.get(m, ())
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def test_no_modules_import_each_other_in_a_circle():
    names = {module_name(p) for p in MODULES}
    graph = {module_name(p): module_imports(p, names) for p in MODULES}
    assert circles(graph) == []


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
