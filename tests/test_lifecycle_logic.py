"""The lifecycle's decisions with fakes for Consul, the app and signals (pure logic, milliseconds).

The real-process tests prove the same paths end to end; these pin the order of
calls and the meaning of each signal at each step, and run in milliseconds.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from sidecar.exit_codes import EX_CONFIG, EX_NOPERM, EX_UNAVAILABLE
from sidecar.lifecycle import Sidecar
from sidecar.registry.consul import (
    ConsulPermissionDenied,
    ConsulRejected,
    ConsulUnavailable,
)
from sidecar.state import State
from testkit.fakes import FakeAgent, FakeApp, FakeInbox, FakeProber, make_config, make_sidecar, until


@dataclass
class Rig:
    """The lifecycle's Sidecar on fakes; the agent and the app record what they are asked in ``calls``."""

    calls: list[str]
    agent: FakeAgent
    app: FakeApp
    sidecar: Sidecar
    inbox: FakeInbox

    def send(self, sig: signal.Signals) -> None:
        """What the signal handlers would record."""
        self.inbox.queue.put_nowait(sig)

    def start(self) -> asyncio.Task[int]:
        return asyncio.create_task(self.sidecar.run())

    async def start_registered(self, timeout: float = 2.0) -> asyncio.Task[int]:
        """Run the sidecar until its instance is registered; the task ends with its exit status."""
        run = self.start()
        await until(lambda: self.sidecar.status.state is State.REGISTERED, timeout)
        return run


MakeRig = Callable[..., Rig]


@pytest.fixture
def rig(tmp_path: Path) -> MakeRig:
    """rig(register_errors=None, healthy=True, exit_on_signal=True, **shutdown) -> a Rig whose config has
    the given [shutdown] keys. Call it inside the test's event loop (the fake app's future needs one)."""

    def make(
        *,
        register_errors: list[Exception] | None = None,
        healthy: bool = True,
        exit_on_signal: bool = True,
        **shutdown: str,
    ) -> Rig:
        calls: list[str] = []
        agent = FakeAgent(calls, register_errors)
        app = FakeApp(calls, exit_on_signal=exit_on_signal)
        sc, inbox = make_sidecar(make_config(tmp_path, **shutdown), agent, app, FakeProber(healthy=healthy))
        return Rig(calls, agent, app, sc, inbox)

    return make


@pytest.mark.asyncio
async def test_sigterm_order_deregister_delay_stop(rig: MakeRig) -> None:
    """SIGTERM: deregister, then (after the delay) stop the app; never the other way round."""
    r = rig(propagation_delay="200ms")
    run = await r.start_registered()
    loop = asyncio.get_running_loop()
    t = loop.time()
    r.send(signal.SIGTERM)
    assert await run == 0
    assert loop.time() - t >= 0.2 - 1e-9  # the loop's (virtual) clock, in floating point
    assert r.calls == ["start", "register passing=True", "deregister", "stop SIGTERM"]


@pytest.mark.asyncio
async def test_second_sigint_ends_the_delay_and_sigterms_change_nothing(rig: MakeRig) -> None:
    """SIGINT starts the drain (30 s delay); SIGTERMs during it change nothing; a second SIGINT ends the
    delay: one deregistration, then the app's stop."""
    r = rig(propagation_delay="30s")
    run = await r.start_registered()
    r.send(signal.SIGINT)
    await until(lambda: "deregister" in r.calls)
    for _ in range(5):
        r.send(signal.SIGTERM)
    await asyncio.sleep(0.1)
    assert "stop SIGTERM" not in r.calls
    r.send(signal.SIGINT)
    assert await asyncio.wait_for(run, 2) == 0
    assert r.calls.count("deregister") == 1 and r.calls[-1] == "stop SIGTERM"


@pytest.mark.asyncio
async def test_third_sigint_kills(rig: MakeRig) -> None:
    """An app that ignores its stop signal (app_timeout 30 s): the third SIGINT kills it, exit 137."""
    r = rig(exit_on_signal=False, propagation_delay="0s", app_timeout="30s")
    run = await r.start_registered()
    for _ in range(3):
        r.send(signal.SIGINT)
        await asyncio.sleep(0.05)
    assert await asyncio.wait_for(run, 2) == 137
    assert "kill" in r.calls


@pytest.mark.asyncio
async def test_forwarded_signals(rig: MakeRig) -> None:
    """SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH are forwarded to the app, in order; SIGTERM still drains."""
    r = rig(propagation_delay="0s")
    run = await r.start_registered()
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
        r.send(sig)
    await until(lambda: len([c for c in r.calls if c.startswith("forward")]) == 4)
    r.send(signal.SIGTERM)
    assert await run == 0
    assert [c for c in r.calls if c.startswith("forward")] == [
        "forward SIGHUP",
        "forward SIGUSR1",
        "forward SIGUSR2",
        "forward SIGWINCH",
    ]


@pytest.mark.asyncio
async def test_app_exit_deregisters_and_passes_status(rig: MakeRig) -> None:
    """The app exits with 3 on its own: the instance is deregistered and the sidecar exits 3."""
    r = rig()
    run = await r.start_registered()
    r.app.exited.set_result(3)
    assert await run == 3
    # Deregistered at once; then stop() only cleans up what the app left behind (it has exited).
    assert r.calls[-2:] == ["deregister", "stop SIGTERM"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [(ConsulPermissionDenied("403 Permission denied"), EX_NOPERM), (ConsulRejected("400 bad"), EX_CONFIG)],
    ids=["acl-denied", "rejected"],
)
@pytest.mark.asyncio
async def test_fatal_registration_errors_stop_the_app(rig: MakeRig, error: Exception, expected: int) -> None:
    """The agent refuses the registration for good: the app is stopped, the exit status names why."""
    r = rig(register_errors=[error])
    assert await asyncio.wait_for(r.sidecar.run(), 5) == expected
    # The agent refused the write: nothing to deregister; the app is stopped.
    assert r.calls == ["start", "register passing=True", "stop SIGTERM"]


@pytest.mark.asyncio
async def test_unhealthy_app_is_never_registered(rig: MakeRig) -> None:
    """An app that never passes its health check is never registered; the sidecar exits 69."""
    r = rig(healthy=False)
    assert await asyncio.wait_for(r.sidecar.run(), 5) == EX_UNAVAILABLE
    assert r.calls == ["start", "stop SIGTERM"]


@pytest.mark.asyncio
async def test_unreachable_agent_logs_state_changes_not_retries(rig: MakeRig) -> None:
    """Two failed attempts then success: one 'unreachable', one 'reachable' event."""
    r = rig(register_errors=[ConsulUnavailable("refused"), ConsulUnavailable("refused")], propagation_delay="0s")
    # Backoff starts at 0.5-1 s: two retries take about 1-3 s.
    with structlog.testing.capture_logs() as logs:
        run = await r.start_registered(timeout=10)
        r.send(signal.SIGTERM)
        assert await run == 0
    events = [e["event"] for e in logs]
    assert events.count("sidecar.consul.unreachable") == 1
    assert events.count("sidecar.consul.reachable") == 1
    assert r.calls.count("register passing=True") == 3


@pytest.mark.asyncio
async def test_shutdown_before_registration_skips_the_delay(rig: MakeRig) -> None:
    """SIGTERM while the app is still unhealthy: nothing was ever registered, so no propagation delay."""
    r = rig(healthy=False, propagation_delay="30s")
    run = r.start()
    await asyncio.sleep(0.05)
    r.send(signal.SIGTERM)
    assert await asyncio.wait_for(run, 2) == 0
    assert not any(c.startswith("register") for c in r.calls)


@pytest.mark.asyncio
async def test_cancelling_a_race_cancels_its_work(rig: MakeRig) -> None:
    """The wait on the start-up (``_race``, ``_first``) is cancelled (the sidecar's own task ends):
    the work it waited on is cancelled with it, not left running unwatched (a start-up that would
    register the instance after the sidecar had gone)."""
    r = rig()
    started, cancelled, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finished.set()
        return 0

    waiter = asyncio.create_task(r.sidecar._race(work()))
    await asyncio.wait_for(started.wait(), 2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0.7)
    assert cancelled.is_set() and not finished.is_set()
