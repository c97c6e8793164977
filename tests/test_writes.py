"""The write ledger (sidecar/registry/writes.py) alone, on virtual time: what counts as maybe registered."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.registry.consul import ConsulRejected, ConsulUnavailable
from sidecar.registry.writes import LATE_WRITE_WINDOW, WriteLedger
from testkit.virtualtime import VirtualTime


async def answered_after(seconds: float, error: Exception | None = None) -> None:
    await asyncio.sleep(seconds)
    if error is not None:
        raise error


@pytest.mark.asyncio
async def test_a_write_whose_sender_is_cancelled_still_runs_and_the_fence_waits_for_it() -> None:
    """SIGTERM cancels the sender while the write is in flight: the write is not cut off, the ledger
    says something may be registered, and the fence waits for the answer."""
    clock = VirtualTime.install()
    ledger = WriteLedger(clock, request_timeout=1.0)
    landed: list[float] = []

    async def request() -> None:
        await asyncio.sleep(0.5)
        landed.append(clock.monotonic())

    t0 = clock.monotonic()
    sender = asyncio.create_task(ledger.write(request()))
    await asyncio.sleep(0.1)
    sender.cancel()
    assert ledger.attempted
    fenced = await ledger.fence(t0 + 3)
    assert fenced is not None and fenced.in_flight == 1 and fenced.settled
    assert landed and landed[0] - t0 == pytest.approx(0.5)
    assert not ledger.may_land


@pytest.mark.asyncio
async def test_no_write_starts_once_fenced() -> None:
    ledger = WriteLedger(VirtualTime.install(), request_timeout=1.0)
    assert await ledger.fence(0.0) is None
    request = answered_after(0.0)
    with pytest.raises(ConsulUnavailable) as e:
        await ledger.write(request)
    assert e.value.maybe_applied is False and not ledger.attempted


@pytest.mark.asyncio
async def test_an_answered_refusal_is_not_registered_an_unanswered_write_may_land_until_its_window() -> None:
    clock = VirtualTime.install()
    ledger = WriteLedger(clock, request_timeout=1.0)
    with pytest.raises(ConsulRejected):
        await ledger.write(answered_after(0.1, ConsulRejected("400")))
    assert not ledger.attempted and not ledger.may_land
    t = clock.monotonic()
    with pytest.raises(ConsulUnavailable):
        await ledger.write(answered_after(1.0, ConsulUnavailable("timeout", maybe_applied=True)))
    assert ledger.attempted and ledger.may_land
    assert ledger.settle_by == pytest.approx(t + 1.0 + LATE_WRITE_WINDOW)
    ledger.landed()  # it was seen back: the only write that could land has landed
    assert not ledger.may_land


@pytest.mark.asyncio
async def test_a_write_still_in_flight_at_the_fence_deadline_may_land() -> None:
    clock = VirtualTime.install()
    ledger = WriteLedger(clock, request_timeout=1.0)
    sender = asyncio.create_task(ledger.write(answered_after(10.0)))
    await asyncio.sleep(0)
    fenced = await ledger.fence(clock.monotonic() + 0.5)
    assert fenced is not None and not fenced.settled and ledger.may_land
    ledger.settled()
    assert not ledger.may_land
    await ledger.abandon()
    await asyncio.gather(sender, return_exceptions=True)
