"""Fifty sidecars on one agent, started at once and drained at once."""

from __future__ import annotations

from pathlib import Path

from examples.rollout.fleet import run_fleet
from testkit import Consul


def test_fifty_sidecars_register_and_drain_together(consul: Consul, tmp_path: Path) -> None:
    """1. 50 wrapped apps start at once: all become registered and passing.
    2. All 50 sidecars get SIGTERM at once. Expected: none left in the catalog, every sidecar exits 0,
       and no app received its signal before a catalog watcher saw its own instance gone.
    """
    r = run_fleet(consul, tmp_path, n=50, name="fleet")
    assert r.left_in_catalog == []
    assert r.exit_codes == [0] * 50
    assert r.never_signalled == []
    assert r.signalled_before_gone == [], r.signalled_before_gone
