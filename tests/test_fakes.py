"""The shared fakes (testkit/fakes.py) are what the lifecycle takes: checked at run time here, by mypy there."""

from __future__ import annotations

import pytest

from sidecar.lifecycle import Probe
from sidecar.process.app_control import App
from sidecar.process.signals import Inbox
from sidecar.registry.consul import Agent
from testkit.fakes import FakeAgent, FakeApp, FakeInbox, FakeProber


@pytest.mark.asyncio
async def test_each_fake_satisfies_its_protocol() -> None:
    calls: list[str] = []
    assert isinstance(FakeAgent(calls), Agent)
    assert isinstance(FakeApp(calls), App)
    assert isinstance(FakeProber(), Probe)
    assert isinstance(FakeInbox(), Inbox)


def test_a_fake_missing_a_member_is_seen() -> None:
    """The control: a fake without one of the protocol's methods is not an Agent."""

    class Drifted:
        address = "http://fake:8500"

        async def register(self, payload: dict[str, object]) -> None:
            pass

    assert not isinstance(Drifted(), Agent)
