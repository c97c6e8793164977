"""``GET /ready``: may consumers be sent to this instance now? For a readiness probe or a ``HEALTHCHECK``.

Ready when the lifecycle has registered the instance and the agent reports its checks passing.
The lifecycle's state answers at no cost while starting or draining; once registered, the agent is
read afresh (``/v1/agent/health/service/id/<id>``), because what only the agent knows decides:
maintenance mode (a critical check ``_service_maintenance:<id>``, set by ``consul maint`` or the API
behind the sidecar's back), a check that went critical, an agent that forgot the service or does not
answer. That read is bounded so probes cannot hurt the agent or the sidecar:

- one read at a time: concurrent probes share the one in flight;
- its verdict is kept ``CACHE_TTL`` (1 s): a probe storm costs the agent one read a second;
- it has ``READ_TIMEOUT`` to answer (at most consul.timeout): a frozen agent makes /ready answer
  503 "consul unreachable" within that, and each probe runs in its own connection task, so nothing
  else the status server or the lifecycle does waits for it.

With ``registry.kind = "etcd"`` the read is etcd's (sidecar/http/etcd_view.py): a linearizable read of
the instance's key, which exists only while the app's check passes; a check that fails (the key
withheld) answers "check critical" without a read, and the reasons say "etcd" where they say "consul".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..state import State, Status

CACHE_TTL = 1.0  # seconds a verdict of the agent is reused
READ_TIMEOUT = 1.0  # seconds the agent has to answer (at most consul.timeout)
MAINTENANCE_CHECK = "_service_maintenance:"  # + the service ID: Consul's check for maintenance mode

HealthReader = Callable[[str, float], Awaitable[tuple[str, list[dict[str, Any]]] | None]]


class Verdict:
    __slots__ = ("ready", "reason", "detail")

    def __init__(self, ready: bool, reason: str, detail: str | None = None) -> None:
        self.ready = ready
        self.reason = reason  # short and stable: what a probe's log or an alert matches on
        self.detail = detail  # the agent's words (an error, the maintenance reason, a check's output)

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ready": self.ready, "reason": self.reason}
        if self.detail:
            doc["detail"] = self.detail
        return doc


class Readiness:
    def __init__(
        self,
        status: Status,
        read_health: HealthReader | None,
        timeout: float = READ_TIMEOUT,
        ttl: float = CACHE_TTL,
        registry: str = "consul",
        missing: str = "the agent does not hold the service (the sidecar re-registers it)",
    ) -> None:
        """``read_health(service_id, timeout)``: the agent's (aggregated status, checks), None when it
        holds no such service; raises on failure. None: judge by the lifecycle's state alone.
        ``registry`` names what is read in the reasons ("consul unreachable", "etcd unreachable");
        ``missing`` is the detail of "not registered"."""
        self.status = status
        self.registry = registry
        self.missing = missing
        self._read_health = read_health
        self.timeout = timeout
        self.ttl = ttl
        self._cached: tuple[float, Verdict] | None = None
        self._inflight: asyncio.Future[Verdict] | None = None

    async def check(self) -> Verdict:
        state = self.status.state
        if state is not State.REGISTERED:
            return Verdict(False, state.value)
        if self._read_health is None:
            return Verdict(True, "registered")
        now = self.status.clock.monotonic()
        if self._cached is not None and now - self._cached[0] < self.ttl:
            return self._cached[1]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._read())
            self._inflight.add_done_callback(self._done)
        verdict = await asyncio.shield(self._inflight)  # a probe that gives up does not cancel the others' read
        state = self.status.state
        return verdict if state is State.REGISTERED else Verdict(False, state.value)

    def _done(self, fut: asyncio.Future[Verdict]) -> None:
        self._inflight = None
        if not fut.cancelled() and fut.exception() is None:
            self._cached = (self.status.clock.monotonic(), fut.result())

    async def _read(self) -> Verdict:
        assert self._read_health is not None
        sid = self.status.service_id
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._read_health(sid, self.timeout)
        except TimeoutError:
            source = "the agent" if self.registry == "consul" else self.registry
            return Verdict(False, f"{self.registry} unreachable", f"no answer from {source} within {self.timeout:g}s")
        except Exception as e:  # noqa: BLE001 - any failure to read the agent means: not known to be ready
            from ..registry.base import RegistryPermissionDenied

            denied = isinstance(e, RegistryPermissionDenied)
            reason = f"{self.registry} permission denied" if denied else f"{self.registry} unreachable"
            return Verdict(False, reason, str(e) or e.__class__.__name__)
        if answer is None:
            return Verdict(False, "not registered", self.missing)
        aggregated, checks = answer
        for c in checks:
            if c.get("CheckID") == MAINTENANCE_CHECK + sid:
                return Verdict(False, "maintenance", str(c.get("Notes") or "") or None)
        if aggregated == "passing":
            return Verdict(True, "registered")
        failing = next((c for c in checks if c.get("Status") != "passing"), None)
        output = " ".join(str((failing or {}).get("Output") or "").split())[:200]
        return Verdict(False, f"check {aggregated}", output or None)
