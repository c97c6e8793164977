"""Fifty sidecars on one agent, started at once and drained at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from examples.rollout.fleet import example_app, run_fleet
from testkit import PY, Consul


def test_fifty_sidecars_register_and_drain_together(consul: Consul, tmp_path: Path) -> None:
    """1. 50 wrapped apps start at once: all become registered and passing.
    2. All 50 sidecars get SIGTERM at once. Expected: none left in the catalog, every sidecar exits 0,
       and no app received its signal before a catalog watcher saw its own instance gone.
    The 100 processes run at niceness 10: the other tests on the machine get the CPU first.
    """
    r = run_fleet(consul, tmp_path, n=50, name="fleet", nice=10)
    assert r.left_in_catalog == []
    assert r.exit_codes == [0] * 50
    assert r.never_signalled == []
    assert r.signalled_before_gone == [], r.signalled_before_gone


def test_a_sidecar_that_exits_fails_the_fleet_at_once_with_its_log(consul: Consul, tmp_path: Path) -> None:
    """One app of three cannot start (as when an app loses its port): its sidecar exits within
    seconds. The fleet must fail then, naming that instance and showing its log's last lines, not
    wait for all to pass until its 180 s bound and then name nobody."""

    def app(address: str, port: int, signal_log: Path) -> list[str]:
        if address.endswith(".2"):
            return [PY, "-c", "import sys; print('app-cannot-start: port taken', flush=True); sys.exit(3)"]
        return example_app(address, port, signal_log)

    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        run_fleet(consul, tmp_path, n=3, name="fleet-exit", app=app, up_timeout=180)
    elapsed = time.monotonic() - started
    message = str(failed.value)
    assert message.startswith("fleet-exit-1: its sidecar exited (status "), message
    assert "app-cannot-start: port taken" in message, message
    assert elapsed < 120, f"the fleet failed only after {elapsed:.0f} s"  # generous: the sidecar exits in seconds
