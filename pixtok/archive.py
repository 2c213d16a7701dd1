"""The TorchServe archive (.mar) as the rest of pixtok reads it: a zip whose members include
MAR-INF/MANIFEST.json (model name and version), config.json (task, labels, input) and handler.py.
export/archive.py builds one; the server reads these members to register the model."""
from __future__ import annotations

import json
import zipfile


def read_archive_json(mar, member: str) -> dict | None:
    """A JSON object inside a .mar (config.json, MAR-INF/MANIFEST.json), or None when the archive
    cannot be read or the member is missing or not a JSON object."""
    try:
        with zipfile.ZipFile(mar) as z:
            found = json.loads(z.read(member))
    except (KeyError, OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return found if isinstance(found, dict) else None
