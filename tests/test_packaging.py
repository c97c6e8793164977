"""The wheel holds the whole package: the Docker image and `pip install .` get what the editable install runs.

A package list written by hand once named only sidecar and sidecar.config; the rooms added later
(registry, drain, process, http) were missing from the wheel, so the compose demo's sidecars failed at
import while every local test, on the editable install, passed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from testkit import ROOT


@pytest.mark.integration
def test_the_wheel_holds_every_module_of_the_package(tmp_path: Path) -> None:
    """Built from a copy of what the project's source tree holds (a build/ folder left in the tree by an
    earlier build would hand its stale copies to setuptools and hide a missing package)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "sidecar", src / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "dist").glob("consul_sidecar-*.whl")
    inside = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("sidecar/")}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "sidecar").rglob("*.py")}
    assert sorted(modules - inside) == []
    assert "sidecar/py.typed" in inside
