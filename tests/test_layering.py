"""The one-way flow of docs/architecture.md, read from every module's imports (lazy ones in
functions included): the core `pixtok` imports none of the parts; training, export and serving
import only the core; nothing imports serving but the CLI; the Gradio page holds no model code."""
from __future__ import annotations

from pathlib import Path

import pytest

from export.archive import imported_modules

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pixtok", "training", "export", "serving")
TOP = {"pixtok.cli", "pixtok.__main__"}          # composes the parts; imports them lazily
ALLOWED = {"pixtok": {"pixtok"}, "training": {"pixtok", "training"},
           "export": {"pixtok", "export"}, "serving": {"pixtok", "serving"}}
NARROWER = {   # modules held to less than their part
    "serving.gradio_app": {"pixtok", "serving.client", "serving.launcher", "serving.gradio_app"},
    "serving.client": {"pixtok"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Names of the repository's modules that `path` imports (export's own import reader, the
    one that checks an archive's code)."""
    return {n for n in imported_modules(path, ROOT) if n.split(".")[0] in PARTS}


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
    assert allowed("serving.gradio_app", "pixtok.inference.validate")
    assert allowed("pixtok.cli", "serving.launcher")


def test_the_modules_are_all_seen():
    names = {module_name(p) for p in MODULES}
    assert {"pixtok.models.vit", "pixtok.inference.handler_base", "training.train",
            "export.archive", "serving.launcher", "serving.handlers.classifier"} <= names
