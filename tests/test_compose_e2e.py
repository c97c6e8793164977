"""End to end with real containers: scripts/compose-demo, the one command a user runs.

It installs Docker and a compose when missing, starts dockerd when none runs, builds (or
pulls) the images, brings docker-compose.yml up under its own project name, and rolls the
"web" replicas and the alongside pair v1 -> v2 under open-loop load through nginx: once
with the sidecar's drain, once naive (the apps stopped without it) as the control. It
stops everything it started, the daemon included.

Marked ``compose``: the main pytest run leaves it out (pyproject addopts), and .ci/run
runs it afterwards on its own. If Docker cannot start here the test FAILS with the demo's
own explanation; it is never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "compose-demo"


def _docker_state() -> tuple[bool, str]:
    """Whether a Docker daemon answers, and the iptables chains that exist (to compare after)."""
    answers = (
        subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0 if _has("docker") else False
    )
    chains = subprocess.run(
        ["sh", "-c", "iptables -S 2>/dev/null; iptables -t nat -S 2>/dev/null; ip -o link show type bridge"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return answers, chains


def _has(cmd: str) -> bool:
    return any(os.access(Path(d) / cmd, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep) if d)


@pytest.mark.compose
def test_compose_rollout_loses_nothing_with_the_sidecar_and_the_naive_control_fails(tmp_path: Path) -> None:
    """1. scripts/compose-demo: a fresh stack per mode; 3 "web" replicas and the alongside pair
          rolled v1 -> v2 with scripts/compose-rollout at 60 requests/s on each of / and /alongside/.
       Expected: with the sidecar 0 failed requests, both versions served on both paths, and
       `compose up -d --dry-run` afterwards has nothing to create, recreate or start.
    2. The same rollout naive. Expected: failed requests (the harness sees failures).
    3. Afterwards: a daemon that was not running before is gone again, with its iptables
       chains and bridges.
    """
    daemon_before, net_before = _docker_state()
    result_file = tmp_path / "result.json"
    t = time.monotonic()
    proc = subprocess.run(
        [str(DEMO), "--rate", "60", "--json", str(result_file), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    took = time.monotonic() - t
    tail = proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-4000:]
    assert result_file.exists(), (
        f"scripts/compose-demo exited {proc.returncode} after {took:.0f}s without results:\n{tail}"
    )
    runs = {r["mode"]: r for r in json.loads(result_file.read_text())["runs"]}
    assert set(runs) == {"sidecar", "naive"}, runs.keys()

    sidecar, naive = runs["sidecar"], runs["naive"]
    for path, target in sidecar["targets"].items():
        assert target["requests"] > 500, f"{path}: too few requests to tell: {target}"
        assert target["by_version"].get("v1", 0) > 50 and target["by_version"].get("v2", 0) > 50, f"{path}: {target}"
    assert sidecar["failed"] == 0, f"{sidecar['failed']} requests failed with the sidecar: {sidecar['targets']}\n{tail}"
    assert sidecar["end_state_ok"], f"after the rollout a plain `up -d` would change things:\n{sidecar['end_state']}"
    assert len(sidecar["steps"]) == 3 + 2, f"3 web steps and 2 pair handovers expected: {sidecar['steps']}"
    assert naive["failed"] > 0, f"the naive rollout lost no request: the harness cannot see failures\n{tail}"
    assert proc.returncode == 0, f"scripts/compose-demo exited {proc.returncode}:\n{tail}"
    assert (tmp_path / "out" / "compose-rollout.png").stat().st_size > 10_000

    daemon_after, net_after = _docker_state()
    if not daemon_before:
        assert not daemon_after, "the demo started dockerd and left it running"
        assert net_after == net_before, (
            f"iptables or bridges differ after the demo:\nbefore:\n{net_before}\nafter:\n{net_after}"
        )
    print(
        f"compose e2e took {took:.0f}s: sidecar {sidecar['failed']} failed of {sidecar['requests']}, "
        f"naive {naive['failed']} failed of {naive['requests']}"
    )
