"""What the archive builder (export/archive.py) and the generator's staging (export/generator.py)
share: the error they raise and the label index they write."""
from __future__ import annotations

import json
from pathlib import Path

from pixtok.errors import UserError


class ExportError(UserError):
    """A checkpoint that cannot be exported, or an archive that could not be built."""


def write_index_to_name(labels: list[str], files: Path) -> None:
    index_to_name = {str(i): label for i, label in enumerate(labels)}
    (files / "index_to_name.json").write_text(json.dumps(index_to_name, indent=1) + "\n")
