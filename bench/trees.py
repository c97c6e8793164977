"""Another commit's sidecar, for the benches that set this tree beside the code before a change.

``unpack`` puts ``git archive REF sidecar`` under a directory; ``base_python`` wraps it in a
``python`` that runs that code for ``-m sidecar`` (what ``testkit.procs.PY`` may be set to)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def unpack(ref: str, tree: Path) -> Path:
    """``ref``'s sidecar/ unpacked under ``tree`` (created): put ``tree`` first on PYTHONPATH to run it."""
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "sidecar"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def base_python(ref: str, work: Path) -> str:
    """A python that runs ``ref``'s sidecar/ (unpacked under ``work``) for ``-m sidecar``."""
    tree = unpack(ref, work / "base")
    wrapper = work / "base-python"
    wrapper.write_text(f'#!/bin/sh\ncd {tree} && PYTHONPATH={tree} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)
