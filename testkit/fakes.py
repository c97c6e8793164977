"""Fakes of the lifecycle's collaborators, for unit tests of its logic (no agent, no process).

One fake per protocol, shared by every test that needs one, and checked against the protocol twice:
by mypy (``_conforms`` below: a fake that drifts from ``Agent``, ``App``, ``Probe`` or ``Inbox`` is a
type error) and at run time (tests/test_fakes.py: ``isinstance`` against the runtime-checkable protocol).
The real-process tests prove the same paths against a real agent; these pin the order of calls.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from sidecar.config import Config, load_config
from sidecar.lifecycle import Probe, Sidecar
from sidecar.process.app_control import App, StopResult
from sidecar.process.signals import Inbox
from sidecar.registry.base import Agent, DeregisterResult, Deregistration
from sidecar.state import Status
from testkit.virtualtime import VirtualTime

__all__ = ["FakeAgent", "FakeApp", "FakeInbox", "FakeProber", "make_config", "make_sidecar", "until"]


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

    async def check_status(self, service_id: str) -> str | None:
        return "passing" if self.held else None

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
    clock = VirtualTime.install()
    sc = Sidecar(
        config,
        agent=agent,
        app=app,
        prober=prober or FakeProber(),
        clock=clock,
        status=Status(clock, config.service.id),
        log=structlog.get_logger(),
        inbox=inbox,
    )
    return sc, inbox


async def until(pred: Callable[[], object], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)


def _conforms(agent: FakeAgent, app: FakeApp, prober: FakeProber, inbox: FakeInbox) -> tuple[Agent, App, Probe, Inbox]:
    """Never called: mypy checks that each fake is what the lifecycle takes (Nomad's ``var _ AgentAPI = ...``)."""
    return agent, app, prober, inbox
