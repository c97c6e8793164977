"""The rolling-update demo's command line and table, as a new user meets them.

(a) ``scripts/demo --help`` (and ``--hot-restart --help``) prints the options without running
    scripts/setup first (setup always says "setup: Consul agent: ..." on stderr);
(b) the table shows p99 in steady state and during the rollout apart, as bench/rollout.py does:
    a single p99 over the whole run mixed the machine's stalls with the rollout's cost.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.rollout.__main__ import report
from examples.rollout.loadgen import Record
from examples.rollout.rollout import RolloutResult
from testkit import ROOT

# Runs scripts/demo as a real process: never a unit test.
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--hot-restart", "--help"]])
def test_demo_help_does_not_run_setup(args: list[str]) -> None:
    result = subprocess.run([str(ROOT / "scripts" / "demo"), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: "), result.stdout
    assert "setup:" not in result.stderr, result.stderr


@pytest.mark.parametrize("args", [["--help"], ["--hot-restart", "--help"]])
def test_demo_help_on_a_fresh_clone_needs_no_virtualenv(tmp_path: Path, args: list[str]) -> None:
    """A fresh clone has no .venv: --help prints the options with the interpreter the virtualenv was
    made from (no aiohttp, no structlog), without creating .venv or running scripts/setup."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for part in ("scripts", "examples", "testkit"):
        (clone / part).symlink_to(ROOT / part)
    base = getattr(sys, "_base_executable", sys.executable)
    result = subprocess.run(
        [str(clone / "scripts" / "demo"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], "PYTHON": base, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: scripts/demo"), result.stdout
    assert "setup:" not in result.stderr, result.stderr
    assert not (clone / ".venv").exists()


def test_demo_table_shows_p99_steady_and_during_the_rollout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 300 requests before the rollout (1 ms each), 100 during it (40 ms each).
    steady = [Record(i * 0.01, 0.001, 200, None, "127.0.0.2:8080 v1") for i in range(300)]
    during = [Record(3.0 + i * 0.01, 0.04, 200, None, "127.0.0.5:8080 v2") for i in range(100)]
    result = RolloutResult("sidecar", steady + during, [], rollout_start=3.0, rollout_end=4.0, load_end=4.5)
    report([result], tmp_path, plot=False)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("rollout "))
    assert header.split() == [
        "rollout", "requests", "failed", "fail", "rate", "p50", "ms", "p99", "steady", "p99", "rollout",
        "by", "v1", "by", "v2", "duration",
    ]  # fmt: skip
    row = next(line for line in lines if line.startswith("sidecar ")).split()
    assert row[:7] == ["sidecar", "400", "0", "0.00%", "1.0", "1.0", "40.0"], row
