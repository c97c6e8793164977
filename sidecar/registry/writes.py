"""Registration writes as the promise needs them: the ledger of what may be registered.

A registration write counts as applied from the moment it is sent until its answer proves otherwise,
and is never cancelled mid-flight: cancelling a request does not unsend it (the agent may apply it and
answer nobody, a stalled hop may deliver it later). So each write runs in a task of its own; cancelling
its sender (SIGTERM, the app's exit) only stops waiting for it. Before a deregistration the lifecycle
fences the ledger: no new write may start, and those in flight are waited for (within a deadline).

A write that ended without an answer (a timeout, a 5xx, one the fence gave up on) may still land until
its window has passed: its own deadline (the request timeout it was sent with) plus
``LATE_WRITE_WINDOW``. The ledger keeps those moments; the lifecycle reads the agent until they have
passed (``may_land``, ``settle_by``).

Nothing here talks to a registry or logs: the lifecycle decides what to do with what the ledger knows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from ..clock import Clock
from .base import RegistryError, RegistryUnavailable

# How long after its own deadline (send + consul.timeout) a registration write that got no answer is
# still taken to be able to reach the agent. The client closes the connection at its deadline, but
# a hop that has already read the request (a proxy, a tunnel) may forward it later, and an agent
# that was stalled applies what sits in its socket buffer once it runs again. The second case is
# covered whatever its length (only a read the agent *answered* after this window settles a write);
# the first is a policy, not a proof: see docs/decisions.md.
LATE_WRITE_WINDOW = 5.0


@dataclass(frozen=True)
class Fenced:
    """What a fence found: how many writes were in flight, and whether all of them were answered."""

    in_flight: int
    settled: bool


class WriteLedger:
    def __init__(
        self,
        clock: Clock,
        request_timeout: float,
        late_window: float = LATE_WRITE_WINDOW,
        fenced_error: type[RegistryUnavailable] | None = None,
    ) -> None:
        """``fenced_error``: what a write refused once fenced raises, the registry's own "unavailable"
        (None: Consul's, the default registry; imported only then, so an etcd sidecar never loads it)."""
        if fenced_error is None:
            from .consul import ConsulUnavailable

            fenced_error = ConsulUnavailable
        self._fenced_error = fenced_error
        self._clock = clock
        self._window = request_timeout + late_window
        # True from the moment a registration write is sent (or one with our ID is found) until an
        # answer proves it was not applied: a drain then has something to deregister.
        self.attempted = False
        self._in_flight: dict[asyncio.Future[None], float] = {}  # not answered yet -> when it can no longer land
        self._fenced = False
        self._unsettled: dict[asyncio.Future[None], float] = {}  # ended unanswered -> when it can no longer land

    # --- an entry found, not written ------------------------------------------------------------------

    def holds_entry(self) -> None:
        """An entry with our ID is registered (left by a sidecar that died): a drain must remove it."""
        self.attempted = True

    def entry_gone(self) -> None:
        """That entry is proven gone (before anything of ours was written)."""
        self.attempted = False

    # --- writes ---------------------------------------------------------------------------------------

    async def write(self, request: Coroutine[Any, Any, None]) -> None:
        """Send ``request`` (a registration write) in a task no cancellation of the caller can cut off.

        Raises ``fenced_error`` (a RegistryUnavailable, not applied) once the ledger is fenced; else what
        the request raises."""
        if self._fenced:
            request.close()
            raise self._fenced_error("the sidecar is draining: no new registration", maybe_applied=False)
        before = self.attempted
        self.attempted = True  # maybe applied from now on
        task = asyncio.ensure_future(request)
        self._in_flight[task] = self._clock.monotonic() + self._window
        task.add_done_callback(lambda t: self._done(t, before))
        await asyncio.shield(task)

    def _done(self, task: asyncio.Future[None], before: bool) -> None:
        settle_by = self._in_flight.pop(task)
        e = None if task.cancelled() else task.exception()
        if task.cancelled() or (e is not None and not isinstance(e, RegistryError)):
            self._unsettled[task] = settle_by
        elif isinstance(e, RegistryUnavailable):
            if e.maybe_applied:
                self._unsettled[task] = settle_by  # a timeout or a 5xx: it may be applied, now or later
            else:
                self.attempted = before  # never left this host
        elif isinstance(e, RegistryError):
            self.attempted = before  # the agent answered: refused, not applied

    @property
    def fenced(self) -> bool:
        return self._fenced

    async def fence(self, deadline: float) -> Fenced | None:
        """Allow no new write; wait (until the monotonic ``deadline``) for those in flight. None when
        none was in flight. One still running at the deadline is unsettled: it may land later."""
        self._fenced = True
        pending = [w for w in self._in_flight if not w.done()]
        if not pending:
            return None
        _, left = await asyncio.wait(pending, timeout=max(0.0, deadline - self._clock.monotonic()))
        for write in left:  # may land later, whatever answer it gets after the deregistration
            self._unsettled[write] = self._in_flight[write]
        return Fenced(len(pending), not left)

    async def abandon(self) -> None:
        """At exit: stop waiting for the writes still in flight (only one a fence gave up on)."""
        writes = list(self._in_flight)
        for write in writes:
            write.cancel()
        await asyncio.gather(*writes, return_exceptions=True)

    # --- what may still land --------------------------------------------------------------------------

    @property
    def may_land(self) -> bool:
        """A write ended without an answer and its window has not been waited out."""
        return bool(self._unsettled)

    @property
    def settle_by(self) -> float:
        """The monotonic moment after which no unanswered write can land (only when ``may_land``)."""
        return max(self._unsettled.values())

    def landed(self) -> None:
        """The instance was seen back: if one write alone could land, it has landed and cannot again."""
        if len(self._unsettled) == 1:
            self._unsettled.clear()

    def settled(self) -> None:
        """A read that began after ``settle_by`` found the instance gone: no write can land any more."""
        self._unsettled.clear()
