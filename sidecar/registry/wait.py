"""``consul-sidecar wait``: block until Consul shows a condition, for deploy scripts.

It follows ``/v1/health/service/<name>`` with blocking queries, so it answers
within milliseconds of the change and costs nothing while it waits. One query at
a time, nothing concurrent: it runs on the Consul client's blocking transport,
without asyncio or aiohttp, whose import alone would be most of its run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..durations import format_duration
from .consul import BlockingHealth, ConsulPermissionDenied, ConsulRejected, ConsulUnavailable


class WaitClock(Protocol):
    """The blocking counterpart of clock.Clock (which is asyncio's)."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemWaitClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _passing(entry: dict[str, Any]) -> bool:
    return all(c.get("Status") == "passing" for c in entry.get("Checks", []))


@dataclass(frozen=True)
class Condition:
    description: str
    holds: Callable[[list[dict[str, Any]]], bool]
    seen: Callable[[list[dict[str, Any]]], str]


def instance_passing(service: str, sid: str) -> Condition:
    def holds(entries: list[dict[str, Any]]) -> bool:
        return any(e["Service"]["ID"] == sid and _passing(e) for e in entries)

    def seen(entries: list[dict[str, Any]]) -> str:
        mine = [e for e in entries if e["Service"]["ID"] == sid]
        if not mine:
            return f"{sid} is not registered"
        return f"{sid} checks: " + ", ".join(f"{c.get('CheckID')}={c.get('Status')}" for c in mine[0].get("Checks", []))

    return Condition(f"{service} instance {sid} passing", holds, seen)


def min_passing(service: str, n: int) -> Condition:
    def count(entries: list[dict[str, Any]]) -> int:
        return sum(1 for e in entries if _passing(e))

    return Condition(
        f"at least {n} passing instance(s) of {service}",
        lambda entries: count(entries) >= n,
        lambda entries: f"{count(entries)} passing of {len(entries)} registered",
    )


def instance_gone(service: str, sid: str) -> Condition:
    def holds(entries: list[dict[str, Any]]) -> bool:
        return all(e["Service"]["ID"] != sid for e in entries)

    return Condition(
        f"{service} instance {sid} gone", holds, lambda entries: "still registered" if not holds(entries) else "gone"
    )


@dataclass(frozen=True)
class WaitResult:
    ok: bool
    elapsed: float
    last_seen: str
    error: str | None = None


def wait_for_condition(
    agent: BlockingHealth, service: str, cond: Condition, timeout: float, clock: WaitClock
) -> WaitResult:
    t0 = clock.monotonic()
    deadline = t0 + timeout
    index: str | None = None
    last_seen = "no answer from Consul yet"
    error: str | None = None
    while True:
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            return WaitResult(False, clock.monotonic() - t0, last_seen, error)
        # Blocking query: returns on the first change, or after `wait`. Consul
        # adds up to wait/16 of jitter, so ask for a little less than remains.
        wait = format_duration(max(0.1, min(30.0, remaining * 0.9)))
        try:
            # A frozen agent must not stretch --timeout.
            new_index, entries = agent.health_service(
                service, index=index, wait=wait, cutoff=clock.monotonic() + max(0.1, remaining)
            )
            error = None
        except TimeoutError:
            continue  # a blocking query still open at our deadline: the condition did not come true
        except (ConsulPermissionDenied, ConsulRejected) as e:
            return WaitResult(False, clock.monotonic() - t0, last_seen, str(e))
        except ConsulUnavailable as e:
            error = str(e)
            clock.sleep(min(0.5, max(0.0, deadline - clock.monotonic())))
            continue
        last_seen = cond.seen(entries)
        if cond.holds(entries):
            return WaitResult(True, clock.monotonic() - t0, last_seen)
        # An index that goes backwards (agent restarted) restarts the wait from scratch.
        index = new_index if index is None or int(new_index) >= int(index) else None
        if index == "0":
            index = None
            clock.sleep(0.05)
