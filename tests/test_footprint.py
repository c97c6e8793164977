"""What the sidecar loads: python-consul2's requests-based client must stay out (6 MB of RSS)."""

from __future__ import annotations

import subprocess

import pytest

from testkit import PY, ROOT


@pytest.mark.integration
def test_sidecar_does_not_import_requests() -> None:
    code = (
        "import sys, sidecar.cli, sidecar.registry.consul, sidecar.lifecycle; "
        "print(sorted(m for m in ('requests', 'urllib3', 'consul.std') if m in sys.modules))"
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"
