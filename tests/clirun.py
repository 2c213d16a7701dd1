"""`pixtok` as a user runs it: a subprocess of this interpreter, from the repository root.

One thread (tests run beside each other and beside a server), unbuffered output, no Hugging Face
Hub: nothing a test runs may reach the network.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def pixtok(*args, check: bool = True, env: dict | None = None, timeout: float = 300,
           **kw) -> subprocess.CompletedProcess:
    """Run `python -m pixtok ARGS`; with check, a non-zero exit fails the test with its stderr."""
    kw.setdefault("cwd", ROOT)
    out = subprocess.run([sys.executable, "-m", "pixtok", *map(str, args)], capture_output=True,
                         text=True, env=ENV if env is None else env, timeout=timeout, **kw)
    if check and out.returncode:
        raise AssertionError(f"pixtok {' '.join(map(str, args))} -> {out.returncode}\n"
                             f"{out.stderr[-3000:]}")
    return out


PROGRESS_BAR = re.compile(r"\| *\d+/\d+ \[")      # a tqdm redraw: "... 40%|####  | 2/5 [00:01<..."


def message_lines(stderr: str) -> list[str]:
    """stderr's lines less the progress bars' redraws (tqdm separates those with \\r): what a
    command said in words, e.g. its one error line."""
    return [line for line in (x.strip() for x in stderr.splitlines())
            if line and not PROGRESS_BAR.search(line)]
