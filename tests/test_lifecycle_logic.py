"""The lifecycle's decisions with fakes for Consul, the app and signals (pure logic, milliseconds).

The real-process tests prove the same paths end to end; these pin the order of
calls and the meaning of each signal at each step, and run in milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.app_control import StopResult
from sidecar.clock import SystemClock
from sidecar.config import Config, load_config
from sidecar.consul_client import (
    ConsulPermissionDenied,
    ConsulRejected,
    ConsulUnavailable,
    DeregisterResult,
    Deregistration,
)
from sidecar.exit_codes import EX_CONFIG, EX_NOPERM, EX_UNAVAILABLE
from sidecar.lifecycle import Sidecar
from sidecar.status import State, Status

_fake_agents = itertools.count(1)


class FakeAgent:
    def __init__(self, calls: list[str], register_errors: list[Exception] | None = None) -> None:
        # An agent of its own: the sidecar claims its service ID per agent, host-wide, and another
        # test (another pytest worker) may run a sidecar with the same ID at the same moment.
        self.address = f"http://fake-{next(_fake_agents)}-{os.getpid()}:8500"
        self.calls = calls
        self.register_errors = list(register_errors or [])
        self.held = False
        self.entry: dict[str, Any] = {}  # what the last registration carried (its owner mark too)

    async def register(self, payload: dict[str, Any]) -> None:
        self.calls.append(f"register passing={payload['Check'].get('Status') == 'passing'}")
        if self.register_errors:
            raise self.register_errors.pop(0)
        self.held = True
        self.entry = {k: payload[k] for k in ("Address", "Port", "Meta")}

    def token_rotated(self) -> bool:
        return False

    async def registered(self, service_id: str) -> dict[str, Any] | None:
        return {"ID": service_id, **self.entry} if self.held else None

    async def maintenance(self, service_id: str) -> str | None:
        return None

    async def set_maintenance(self, service_id: str, enable: bool, reason: str | None) -> bool:
        self.calls.append(f"maintenance {enable}")
        return self.held

    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool:
        return self.held

    async def check_catalog_visibility(self, name: str, service_id: str) -> bool:
        return True

    async def deregister_confirmed(self, name: str, service_id: str, deadline: float) -> DeregisterResult:
        self.calls.append("deregister")
        self.held = False
        return DeregisterResult(Deregistration.CONFIRMED, 1, None)

    async def close(self) -> None:
        pass


class FakeApp:
    description = "fake app"
    followed: frozenset[int] = frozenset()
    orphans_reaped = 0
    leftovers_signalled = 0
    leftovers_killed = 0

    def __init__(self, calls: list[str], exit_on_signal: bool = True) -> None:
        self.calls = calls
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.exit_on_signal = exit_on_signal

    def start(self) -> None:
        self.calls.append("start")

    def forward(self, sig: signal.Signals) -> None:
        self.calls.append(f"forward {sig.name}")

    def kill(self) -> None:
        self.calls.append("kill")
        if not self.exited.done():
            self.exited.set_result(137)

    async def stop(self, sig: signal.Signals, timeout: float) -> StopResult:
        self.calls.append(f"stop {sig.name}")
        if self.exit_on_signal and not self.exited.done():
            self.exited.set_result(0)
        try:
            status = await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            return StopResult(status, status == 137, "stopped")
        except TimeoutError:
            self.kill()
            return StopResult(137, True, "killed")


class FakeProber:
    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy

    async def probe(self) -> tuple[bool, str]:
        return self.healthy, "HTTP 200" if self.healthy else "HTTP 503"


class FakeInbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[signal.Signals] = asyncio.Queue()

    def install(self) -> None:
        pass

    def uninstall(self) -> None:
        pass


def make_config(tmp_path: Path, **shutdown: str) -> Config:
    extra = "".join(f'{k} = "{v}"\n' for k, v in shutdown.items())
    p = tmp_path / "c.toml"
    p.write_text(
        '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.1"\n'
        f'[startup]\ntimeout = "300ms"\n[shutdown]\n{extra}'
    )
    return load_config(p, {})


def make_sidecar(
    config: Config, agent: FakeAgent, app: FakeApp, prober: FakeProber | None = None
) -> tuple[Sidecar, FakeInbox]:
    inbox = FakeInbox()
    sc = Sidecar(
        config,
        agent=agent,
        app=app,
        prober=prober or FakeProber(),
        clock=SystemClock(),
        status=Status(SystemClock(), config.service.id),
        log=structlog.get_logger(),
        inbox=inbox,  # type: ignore[arg-type]
    )
    return sc, inbox


async def until(pred: Any, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)


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
    assert loop.time() - t >= 0.2
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
