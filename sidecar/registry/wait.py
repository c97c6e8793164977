"""``consul-sidecar wait``: block until the registry shows a condition, for deploy scripts.

Consul: it follows ``/v1/health/service/<name>`` with blocking queries, so it answers
within milliseconds of the change and costs nothing while it waits. One query at
a time, nothing concurrent: it runs on the Consul client's blocking transport,
without asyncio or aiohttp, whose import alone would be most of its run time.

etcd (``-c FILE`` with ``registry.kind = "etcd"``): ``EtcdHealth`` reads the keys under
``<prefix>/<service>/`` (skydns: ``/skydns/<reversed domain>/<service>/``) by a linearizable range over
etcd's JSON gateway with ``http.client`` (etcd_blocking.py, which ``horizon`` reads with too), every
``POLL`` seconds. A key exists only while its instance's
check passes, so each key is a passing instance. Same conditions, messages and exit statuses as Consul's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..durations import format_duration
from .base import RegistryPermissionDenied, RegistryRejected, RegistryUnavailable

if TYPE_CHECKING:
    from ..config import EtcdSettings
    from .etcd_blocking import BlockingEtcd

POLL = 0.1  # seconds between two reads of etcd's keys


class HealthSource(Protocol):
    """What the wait reads: consul.BlockingHealth, or EtcdHealth below."""

    def health_service(
        self, name: str, index: str | None = None, wait: str | None = None, *, cutoff: float | None = None
    ) -> tuple[str, list[dict[str, Any]]]: ...


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
        if not mine[0].get("Checks"):
            return f"{sid} is registered" + (f" (key {mine[0]['Key']})" if "Key" in mine[0] else "")
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
    agent: HealthSource, service: str, cond: Condition, timeout: float, clock: WaitClock, registry: str = "Consul"
) -> WaitResult:
    t0 = clock.monotonic()
    deadline = t0 + timeout
    index: str | None = None
    last_seen = f"no answer from {registry} yet"
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
        except (RegistryPermissionDenied, RegistryRejected) as e:
            return WaitResult(False, clock.monotonic() - t0, last_seen, str(e))
        except RegistryUnavailable as e:
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


# --- etcd ------------------------------------------------------------------------------------------------


def service_prefix(settings: EtcdSettings, service: str) -> str:
    """The prefix under which every instance of ``service`` has its key (registry/etcd.py's etcd_key, less
    the ID; tests/test_etcd_surface.py holds the two together)."""
    from ..config import EtcdFormat

    if settings.format is EtcdFormat.SKYDNS:
        labels = [label for label in reversed(settings.dns_domain.rstrip(".").split(".")) if label]
        return "/skydns/" + "/".join([*labels, service]) + "/"
    return f"{settings.prefix.rstrip('/')}/{service}/"


class EtcdHealth:
    """``wait``'s reads of etcd: each instance's key under the service's prefix, in the shape the conditions
    read (``{"Service": {"ID": ...}, "Key": ..., "Checks": []}``: no check fails, the key's existence is the
    check). The first read at once, then one every ``POLL``; the index is etcd's revision. The requests
    (failover, TLS, auth, etcd's header required) are etcd_blocking.BlockingEtcd's."""

    def __init__(self, etcd: BlockingEtcd, settings: EtcdSettings) -> None:
        self._etcd = etcd
        self._settings = settings

    @property
    def address(self) -> str:
        return self._etcd.address

    def health_service(
        self, name: str, index: str | None = None, wait: str | None = None, *, cutoff: float | None = None
    ) -> tuple[str, list[dict[str, Any]]]:
        """Raises TimeoutError when ``cutoff`` (monotonic) comes before an answer."""
        if index is not None:
            pause = POLL if cutoff is None else min(POLL, cutoff - time.monotonic())
            if pause > 0:
                time.sleep(pause)
        prefix = service_prefix(self._settings, name)
        revision, pairs = self._etcd.range_prefix(prefix, cutoff)
        # The prefix itself is no instance's key.
        ids = [key[len(prefix) :] for key, _ in pairs if len(key) > len(prefix)]
        return revision, [{"Service": {"ID": i}, "Key": prefix + i, "Checks": []} for i in ids]

    def close(self) -> None:
        self._etcd.close()
