"""The drain's horizon: how long after the confirmed deregistration new connections still reached the app.

From the confirmed deregistration until the app is signalled, whatever the strategy, the sidecar
records each *new* connection on the app's port, with the kernel view the traffic strategy uses:

    destroy_events   every connection of the port when it ends (tcp_events.py), decoded here: its
                     peer, its socket cookie, and its ``tcp_info`` as the kernel gave it then
    the socket table one look when the window opens (the connections already open: not new) and
                     one when it closes (new connections still open then), as traffic.py takes it

A connection is new when its socket cookie (unique since boot) was not open at the first look. Each
is dated by its last inbound data (``tcpi_last_data_recv``; a connection that never sent a byte, by
its handshake): for a connection per request that is its request, a few milliseconds after it
opened; for a new connection that keeps sending, its last request. So a date is never before the
connection opened: the horizon errs long, never short. A destroy event's date also carries how late
it was read: at most ``EVENT_HOLD`` (100 ms) under load, the first after a pause at once.

Without destroy events the view is not had: the socket table alone misses the short connections
(the common case), and the namespace's counters name no peer. The sidecar then says so once
(``sidecar.drain.horizon_unavailable``) and records nothing, rather than a horizon too short.

Cost: what costs is waking the event loop (~150 µs each on a busy 2-core VM, more than a batch of
events), so the reader rests ``EVENT_HOLD`` after each read: at most 10 wake-ups a second, at a
dating error of at most 100 ms. Each event is decoded only as far as needed (sock_diag.ended: ~5 µs).
The socket table is looked at twice per drain, outside the wait: the last look (its cost grows with every
socket on the host, ~6 ms with 15,000 in TIME_WAIT) comes right after the app is signalled, while it shuts
down, so that it does not lengthen the drain; it dates nothing after the signal. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..clock import Clock
from .sock_diag import Ended
from .tcp_events import DestroyEvents
from .traffic import PortSnapshot, PortWatcher, TrafficWatchError

__all__ = ["EVENT_HOLD", "Horizon", "HorizonRecorder", "NewConnections", "PeerHorizon"]

EVENT_HOLD = 0.1  # the reader rests this long after each read: at most 10 wake-ups a second (see the cost above)
PEERS_SHOWN = 5  # the slowest peers in sidecar.drain.done
PEERS_KEPT = 10_000  # distinct peers tracked in one drain; more are counted, not named

EventsFactory = Callable[[int, list[str] | None], DestroyEvents]


@dataclass(frozen=True)
class PeerHorizon:
    """One peer address: its new connections, and when (ms after the confirmation) its last one came."""

    peer: str
    last_ms: int
    connections: int

    def as_json(self) -> dict[str, object]:
        return {"peer": self.peer, "last_ms": self.last_ms, "connections": self.connections}


@dataclass(frozen=True)
class Horizon:
    """What one drain saw: ``horizon_ms`` (None without a new connection), how many new connections,
    the peers slowest first, how long the view watched, and whether it saw everything (``lost``: the
    kernel dropped events on a full queue, or the view failed midway; the figures are then a floor)."""

    horizon_ms: int | None
    new_connections: int
    peers: tuple[PeerHorizon, ...]
    window_ms: int
    lost: str | None = None
    peers_unnamed: int = 0  # new connections of peers beyond PEERS_KEPT

    def slowest(self, n: int = PEERS_SHOWN) -> list[dict[str, object]]:
        return [p.as_json() for p in self.peers[:n]]


class NewConnections:
    """The tally, pure logic: which connections are new, their dates, per peer.

    Times are seconds on the drain's clock; ``start`` is the confirmed deregistration."""

    def __init__(self, start: float, already_open: Iterable[int]) -> None:
        self.start = start
        self._old = set(already_open)  # open at the first look: their end is no new connection
        self._counted_open: set[int] = set()  # new, counted from a look while open: their end is counted already
        self.end: float | None = None  # the window's end (the app's signal): no date is later
        self.count = 0
        self.last: float | None = None
        self._peers: dict[str, list[float]] = {}  # peer -> [last, connections]
        self.unnamed = 0

    def ended(self, cookie: int, peer: str, when: float) -> None:
        """A connection of the port ended; ``when``: its last inbound data."""
        if cookie in self._old:
            self._old.discard(cookie)  # each socket ends once: the set only shrinks
            return
        if cookie in self._counted_open:
            self._counted_open.discard(cookie)
            return
        self._new(peer, when)

    def open_now(self, cookie: int, peer: str, when: float) -> None:
        """A connection seen open at a look; ``when``: its last inbound data (its handshake if none)."""
        if cookie in self._old or cookie in self._counted_open:
            return
        self._counted_open.add(cookie)
        self._new(peer, when)

    def _new(self, peer: str, when: float) -> None:
        if when < self.start:
            return  # its last inbound data came before the confirmation: it opened before, it is not new
        if self.end is not None and when > self.end:
            # Seen after the window closed (the last look comes after the app's signal): a new connection
            # still sending then, or opened since, shows consumers still came at the window's end.
            when = self.end
        self.count += 1
        if self.last is None or when > self.last:
            self.last = when
        entry = self._peers.get(peer)
        if entry is None:
            if len(self._peers) >= PEERS_KEPT:
                self.unnamed += 1
                return
            self._peers[peer] = [when, 1]
        else:
            entry[0] = max(entry[0], when)
            entry[1] += 1

    def result(self, end: float, lost: str | None = None) -> Horizon:
        def ms(t: float) -> int:
            return max(0, round((t - self.start) * 1000))

        peers = sorted(
            (PeerHorizon(p, ms(last), int(n)) for p, (last, n) in self._peers.items()),
            key=lambda p: (-p.last_ms, p.peer),
        )
        return Horizon(
            None if self.last is None else ms(self.last),
            self.count,
            tuple(peers),
            ms(end),
            lost,
            self.unnamed,
        )


class HorizonRecorder:
    """The kernel's side of :class:`NewConnections`: a subscription to the port's destroy events, read
    in batches on the event loop, and the two looks at the socket table. One per drain."""

    def __init__(
        self,
        watcher: PortWatcher,
        events_factory: EventsFactory,
        port: int,
        addresses: list[str] | None,
        clock: Clock,
    ) -> None:
        self._watcher = watcher
        self._events_factory = events_factory
        self._port, self._addresses = port, addresses
        self.clock = clock
        self._events: DestroyEvents | None = None
        self._tally: NewConnections | None = None
        self._lost: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rearm: asyncio.TimerHandle | None = None
        self._reading = False
        self._records: list[Ended] = []

    def start(self, at: float) -> None:
        """Subscribe, then look (a connection that ends between the two is dated before ``at`` or counts
        as new at ~0 ms: never later). Raises TrafficWatchError when the view cannot be had."""
        self._events = self._events_factory(self._port, self._addresses)
        try:
            snap = self._watcher.snapshot(narrow=True)
        except BaseException:
            self._events.close()
            self._events = None
            raise
        self._tally = NewConnections(at, (k.cookie for k in snap.conn_bytes))
        self._loop = asyncio.get_running_loop()
        self._arm()

    def _arm(self) -> None:
        self._rearm = None
        if self._events is not None and self._loop is not None:
            self._loop.add_reader(self._events.fileno(), self._readable)  # at once if events came meanwhile
            self._reading = True

    def _readable(self) -> None:
        self._unread()
        self._take()
        if self._events is not None and self._loop is not None:
            self._rearm = self._loop.call_later(EVENT_HOLD, self._arm)

    def _unread(self) -> None:
        if self._reading and self._events is not None and self._loop is not None:
            self._loop.remove_reader(self._events.fileno())  # by our open descriptor, never a reused number
        self._reading = False

    def _take(self) -> bool:
        """Everything queued, each ended connection dated by its last inbound data; whether any came."""
        if self._events is None or self._tally is None:
            return False
        records = self._records
        found = False
        try:
            while True:
                records.clear()
                batch = self._events.read(records)
                found = found or batch.ended > 0 or batch.lost
                now = self.clock.monotonic()
                for rec in records:
                    idle = rec.idle_ms
                    self._tally.ended(rec.cookie, rec.peer, now - (idle / 1000 if idle is not None else 0.0))
                if batch.lost and self._lost is None:
                    self._lost = "the kernel dropped socket destruction events (its queue was full)"
                if batch.ended > len(records) and self._lost is None:
                    self._lost = "a socket destruction event could not be decoded"
                if not batch.more:
                    break
        except TrafficWatchError as e:
            self._lost = f"socket destruction events failed: {e}"
            self._close_events()
        finally:
            records.clear()
        return found

    def _look(self) -> None:
        assert self._tally is not None
        try:
            snap: PortSnapshot = self._watcher.snapshot(narrow=True)
        except TrafficWatchError as e:
            self._lost = self._lost or f"the last look at the socket table failed: {e}"
            return
        # The socket table's clock is time.monotonic(); the drain's may be another.
        offset = self.clock.monotonic() - time.monotonic()
        for key in snap.conn_bytes:
            idle = snap.idle_ms.get(key)
            if idle is None:
                continue  # still in the handshake: its full socket (another cookie) is seen when it ends
            self._tally.open_now(key.cookie, key.dst, snap.taken_at - idle / 1000 + offset)

    def close_window(self, at: float) -> None:
        """The window ends at ``at`` (the app is signalled now): read what is queued. Cheap; the last look
        (``finish``) may come after the signal, off the drain's path, dating nothing later than ``at``."""
        if self._tally is not None and self._tally.end is None:
            self._take()
            self._tally.end = at

    def finish(self) -> Horizon | None:
        """Read what is queued, look once more (new connections still open), read again (those that ended
        meanwhile are not counted twice), and return what was seen up to the window's end."""
        if self._tally is None:
            return None
        self.close_window(self.clock.monotonic())
        self._take()
        self._look()
        self._take()
        self._close_events()
        tally, self._tally = self._tally, None
        assert tally.end is not None
        return tally.result(tally.end, self._lost)

    def _close_events(self) -> None:
        if self._rearm is not None:
            self._rearm.cancel()
            self._rearm = None
        self._unread()
        if self._events is not None:
            self._events.close()
            self._events = None

    def close(self) -> None:
        self._close_events()
        self._tally = None
