"""End to end: a rolling update behind real nginx, real Consul DNS and real load.

Failures are counted from the load client's own per-request records (nginx
retries are off), and the same harness runs the naive rollout as the control:
if it saw no failures there, a zero for the sidecar would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.rollout.rollout import Cluster, counted_rollout


async def one_rollout(workdir: Path, naive: bool) -> tuple[int, int, dict[str, int]]:
    return await counted_rollout(Cluster(workdir, propagation_delay="3s", log=lambda _: None), naive)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_rollout_with_sidecar_loses_nothing_and_naive_control_fails(tmp_path: Path) -> None:
    """1. Two v1 instances behind nginx at 200 requests/s; surge-roll them to v2 with the sidecar's drain.
       Expected: zero failed requests, and both versions served traffic.
    2. The identical rollout, SIGTERM straight to the old apps. Expected: failed requests (the control).
    """
    requests, failed, by_version = await one_rollout(tmp_path / "sidecar", naive=False)
    assert requests > 1000
    assert by_version.get("v1", 0) > 100 and by_version.get("v2", 0) > 100
    assert failed == 0, f"{failed} of {requests} requests failed with the sidecar"

    requests_n, failed_n, _ = await one_rollout(tmp_path / "naive", naive=True)
    assert requests_n > 500
    assert failed_n > 0, "the naive rollout lost no request: the harness cannot see failures"
