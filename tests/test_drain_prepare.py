"""A SIGTERM between the registration and the end of the start-up: the drain still sees the app's port.

The lifecycle logs ``sidecar.consul.registered`` and then prepares the drain's view of the port; a SIGTERM
in between cancels the start-up before that look. Seen beside load: a traffic drain then fell back to the
fixed delay as "traffic view unavailable" although the port was plain to see.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.clock import SystemClock
from sidecar.config import load_config
from sidecar.drain.wait import DrainWait
from sidecar.state import DrainEnd, Status
from testkit import write_config
from testkit.procs import free_port

pytestmark = [pytest.mark.integration]


class NotListed:
    """The registry's answer to the catalog step: the instance is gone (the deregistration was confirmed)."""

    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool:
        return False


@pytest.mark.asyncio
async def test_a_drain_whose_view_was_never_prepared_looks_at_the_port_itself(tmp_path: Path) -> None:
    """The real kernel view of a listening port, strategy traffic, and a DrainWait whose prepare() never ran
    (the start-up was cancelled just after the registration). Expected: the wait looks at the port itself
    and ends "traffic quiet" well before propagation_delay, and the horizon is measured. Red when the wait
    took the missing look for a port it cannot see (fixed delay, "traffic view unavailable", no horizon)."""
    port = free_port()
    cfg: dict[str, dict[str, Any]] = {
        "service": {"name": "web", "id": "web-1", "address": "127.0.0.1", "port": port},
        "shutdown": {
            "strategy": "traffic",
            "propagation_delay": "10s",
            "min_delay": "100ms",
            "quiet_period": "300ms",
        },
    }
    config = load_config(write_config(tmp_path / "c.toml", cfg), {})
    clock = SystemClock()
    with socket.create_server(("127.0.0.1", port)):
        drain = DrainWait(config, NotListed(), clock, structlog.get_logger(), Status(clock, "web-1"))
        try:
            t0 = clock.monotonic()
            drain.measure_from(t0)  # what the lifecycle does once the deregistration is confirmed
            end = await drain.wait(t0)
            took = clock.monotonic() - t0
            assert end is DrainEnd.TRAFFIC_QUIET, (end, drain.unavailable)
            assert took < 8, took
            assert drain.measured() is not None, drain.horizon_unavailable
        finally:
            drain.close()
