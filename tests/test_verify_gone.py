"""The final read after a deregistration, when a registration write went unanswered (pure logic).

A write that timed out may land after the deregistration. The drain reads the agent once more
before the app is signalled; these tests pin what happens when that read finds the instance back
and the second deregistration cannot be confirmed: the drain still ends within its bound, and the
last word is ``sidecar.consul.left_registered``, not silence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.registry.consul import ConsulUnavailable, DeregisterResult, Deregistration
from sidecar.state import State
from testkit.fakes import FakeAgent, FakeApp, make_config, make_sidecar, until


class LandsLate(FakeAgent):
    """The keeper's re-registration times out (unanswered) and lands after the first deregistration;
    from then on the agent never confirms a deregistration."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__(calls)
        self.time_out_next_register = False
        self.deregistrations = 0

    async def register(self, payload: dict[str, Any]) -> None:
        if self.time_out_next_register:
            self.time_out_next_register = False
            self.calls.append("register (times out)")
            raise ConsulUnavailable("PUT /v1/agent/service/register: no answer within 1s", maybe_applied=True)
        await super().register(payload)

    async def deregister_confirmed(self, name: str, service_id: str, deadline: float) -> DeregisterResult:
        self.deregistrations += 1
        self.calls.append("deregister")
        if self.deregistrations == 1:
            self.held = True  # the unanswered write lands right after this one was confirmed
            return DeregisterResult(Deregistration.CONFIRMED, 1, None)
        await asyncio.sleep(
            max(0.0, deadline - asyncio.get_running_loop().time())
        )  # never confirmed: uses its whole deadline
        return DeregisterResult(
            Deregistration.UNCONFIRMED, 3, "the agent still holds the service after deregistering it"
        )


class TimedApp(FakeApp):
    signalled_at = 0.0

    async def stop(self, sig: signal.Signals, timeout: float) -> Any:
        self.signalled_at = asyncio.get_running_loop().time()
        return await super().stop(sig, timeout)


@pytest.mark.asyncio
async def test_reappeared_instance_that_cannot_be_removed_is_reported_and_the_drain_stays_bounded(
    tmp_path: Path,
) -> None:
    """1. Registered; the agent forgets the service; the keeper's re-registration times out (it may
       land later). 2. SIGTERM: the first deregistration is confirmed, then the write lands; the
       final read finds the instance back; the second deregistration never confirms.
    Expected: the app is still stopped within the drain's bound (deregister_timeout +
    propagation_delay, plus a small margin), and the drain's last word is left_registered."""
    calls: list[str] = []
    agent = LandsLate(calls)
    config = make_config(tmp_path, propagation_delay="300ms", deregister_timeout="400ms", app_timeout="1s")
    config = dataclasses.replace(config, check=dataclasses.replace(config.check, interval=0.05))
    app = TimedApp(calls)
    sc, inbox = make_sidecar(config, agent, app)
    with structlog.testing.capture_logs() as logs:
        run = asyncio.create_task(sc.run())
        await until(lambda: sc.status.state is State.REGISTERED)
        agent.time_out_next_register = True
        agent.held = False  # the keeper notices within one interval and re-registers (timing out)
        await until(lambda: "register (times out)" in calls)
        t0 = asyncio.get_running_loop().time()
        inbox.queue.put_nowait(signal.SIGTERM)
        assert await run == 0
    stopped_after = calls.index("stop SIGTERM")
    assert calls[:stopped_after].count("deregister") == 2, calls  # the second one came before the app's signal
    signalled_after = app.signalled_at - t0
    assert signalled_after < 0.4 + 0.3 + 0.5, (
        f"the app was signalled {signalled_after:.2f}s after SIGTERM, past the drain's bound"
    )
    events = [e["event"] for e in logs]
    assert "sidecar.consul.reappeared" in events
    left = [e for e in logs if e["event"] == "sidecar.consul.left_registered"]
    assert len(left) == 1 and left[0]["reason"] == "unconfirmed", events
