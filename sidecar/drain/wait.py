"""The wait between a confirmed deregistration and the app's signal.

``fixed``: wait ``propagation_delay``, a guess that must cover the slowest consumer.

``traffic``: wait for evidence, bounded on both sides (``min_delay`` .. ``propagation_delay``):

    1. catalog   a consistent read of /v1/health/service/<name> no longer lists the instance
    2. dns       each resolver in ``dns`` no longer returns the instance's addresses (A and AAAA)
    3. quiet     no connection to the app's port began or ended, no inbound byte arrived and no
                 SYN was dropped for ``quiet_period`` (so pooled keep-alive connections that stay
                 open but carry no request do not hold the drain)

The evidence for step 3 comes from the sources this host allows, chosen at start and logged
(``sidecar.drain.traffic_view``, ``sources=[...]``):

    destroy_events   sock_diag's TCP destroy multicast: every connection of the port when it ends,
                     however short, whichever side closed first (tcp_events.py)
    passive_opens    the namespace's PassiveOpens counter: every accepted connection, less those
                     the sidecar's status server accepted; only when the network namespace is the
                     app's own (netns_counters.py); needed only without destroy events
    listen_drops     SYNs dropped on a full accept queue of the app's port (their retransmit may
                     come after "quiet"): its listeners' sk_drops, or the namespace's
                     ListenOverflows + ListenDrops where the kernel does not give those
    poll             a look at the socket table: open connections, each dated by its last inbound
                     data (tcpi_last_data_recv); every 100 ms alone, beside a complete source only
                     when the quiet period is due (its dates need no frequent look)

Cost (measured with 28,000 TIME_WAIT sockets on the host): a look walks the kernel's whole
established hash, ~4 ms per address family; a wake-up of the event loop ~80 µs; a destroy event
read ~3 µs. So the events are read in batches (EVENT_HOLD) and the table is looked at about once
per quiet period, never per event.

A connection opened and closed by the *client* between two polls leaves no trace in the socket
table, so the poll alone is blind to the most common short client. With neither destroy events
nor the namespace's counters, the sidecar says so and waits the upper bound, unless the operator
set ``traffic_poll_only_accepts_misses = true``.

Where the app's port cannot be seen at all (another network namespace, not Linux, netlink
refused), the traffic strategy says so once and falls back to the fixed delay: never
to a shorter wait.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..clock import Clock
from ..config import Config, Strategy
from ..registry.base import RegistryError
from ..state import DrainEnd, DrainProgress, Status
from .dns_probe import DnsError, resolve_addresses
from .horizon import Horizon, HorizonRecorder
from .netns_counters import Counters, namespace_is_apps, read_counters
from .tcp_events import DestroyEvents
from .traffic import PortSnapshot, PortWatcher, TrafficWatchError, activity_between

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

POLL = 0.1  # seconds between two looks at the catalog, the resolvers or the port (poll alone)
RESOLVE_TIMEOUT = 5.0  # for service.address's host name at registration (the DNS step's addresses)
POLL_WITH_EVENTS = 1.0  # most time between two wake-ups (for /status) when a complete source sees short connections
EVENT_HOLD = 0.05  # the destroy events' reader stays off this long after each wake-up (see _EventReader)


class Catalog(Protocol):
    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool: ...


Resolve = Callable[[tuple[str, int], str, float], Awaitable[set[str]]]
WatcherFactory = Callable[[int, list[str] | None], PortWatcher]
EventsFactory = Callable[[int, list[str] | None], DestroyEvents]


def _ip_or_none(address: str) -> list[str] | None:
    try:
        ipaddress.ip_address(address)
        return [address]
    except ValueError:
        return None  # a host name: count the port on every local address


class _Seen:
    """The newest activity on the app's port, and which source saw it."""

    def __init__(self, start: float) -> None:
        self.last = start  # the drain assumes activity when it begins
        self.by = "start"
        self.ended = 0
        self.lost = 0

    def mark(self, when: float, by: str) -> None:
        if when > self.last:
            self.last, self.by = when, by


class _EventReader:
    """Destroy events, read in batches: the reader wakes the loop at once for the first event, then stays
    off for EVENT_HOLD, so a busy port costs at most 1/EVENT_HOLD wake-ups a second, and an event is
    dated at most EVENT_HOLD late (later only ever makes the drain longer)."""

    def __init__(self, events: DestroyEvents, seen: _Seen, clock: Clock, log: FilteringBoundLogger) -> None:
        self.events, self.seen, self.clock, self.log = events, seen, clock, log
        self.loop = asyncio.get_running_loop()
        self.fd = events.fileno()
        self.failed = False
        self._rearm: asyncio.TimerHandle | None = None
        self._reading = False
        self._closed = False
        self._arm()

    def _readable(self) -> None:
        self.loop.remove_reader(self.fd)
        self._reading = False
        self.take()
        if not self._closed:
            self._rearm = self.loop.call_later(EVENT_HOLD, self._arm)

    def _arm(self) -> None:
        self._rearm = None
        if not self._closed:
            self.loop.add_reader(self.fd, self._readable)  # fires at once if events came meanwhile
            self._reading = True

    def take(self) -> None:
        """Read what is queued; any ended connection (or a lost event) is activity, dated now."""
        if self.failed:
            self.seen.mark(self.clock.monotonic(), "destroy_events_lost")  # blind from now on: every look counts
            return
        ended = lost = 0
        try:
            while True:
                batch = self.events.read()
                ended += batch.ended
                lost += batch.lost
                if not batch.more:
                    break
        except TrafficWatchError as e:
            self.stop()
            self.failed = True
            self.seen.mark(self.clock.monotonic(), "destroy_events_lost")
            self.log.warning(
                "sidecar.drain.traffic_source_lost",
                source="destroy_events",
                reason=str(e),
                consequence="the drain waits the upper bound",
            )
            return
        if ended or lost:
            self.seen.mark(self.clock.monotonic(), "destroy_events")
            self.seen.ended += ended
            self.seen.lost += lost

    def stop(self) -> None:
        if self._rearm is not None:
            self._rearm.cancel()
            self._rearm = None
        if self._reading:  # never by number alone: a closed descriptor's number may be someone else's now
            self.loop.remove_reader(self.fd)
            self._reading = False
        if not self._closed:
            self._closed = True
            self.events.close()


class DrainWait:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        clock: Clock,
        log: FilteringBoundLogger,
        status: Status,
        watcher_factory: WatcherFactory = PortWatcher,
        resolve: Resolve = resolve_addresses,
        events_factory: EventsFactory = DestroyEvents,
        counters: Callable[[], Counters] = read_counters,
        own_namespace: Callable[[int], tuple[bool, str]] = namespace_is_apps,
        own_opens: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.sd = config.shutdown
        self.catalog = catalog
        self.clock = clock
        self.log = log
        self.status = status
        self._factory = watcher_factory
        self._resolve = resolve
        self._events_factory = events_factory
        self._counters = counters
        self._own_namespace = own_namespace
        # Connections the sidecar's own servers accepted so far (its status port): PassiveOpens counts them too.
        self._own_opens = own_opens
        self._watcher: PortWatcher | None = None
        self.unavailable: str | None = None
        self.sources: list[str] = []
        self.blind: str | None = None  # why the view misses short connections (poll alone), else None
        self.addresses: frozenset[str] | None = None  # the instance's addresses, for the DNS step
        self.cpu_ms: float | None = None
        # The horizon (horizon.py), whatever the strategy: why it cannot be measured here (None: it can),
        # the watcher it looks through, and the recorder of the drain in progress.
        self.horizon_unavailable: str | None = None
        self._horizon_watcher: PortWatcher | None = None
        self._recorder: HorizonRecorder | None = None
        self._horizon_prepared = False
        self._traffic_prepared = False
        self._prepared = False  # prepare() ran to its end
        self._measure_at: float | None = None  # measure_from's moment, kept when it came before prepare()

    @property
    def complete(self) -> bool:
        return "destroy_events" in self.sources or "passive_opens" in self.sources

    async def prepare(self) -> None:
        """Check once, early, that the app's port is visible: with the traffic strategy, choose the
        sources this host allows, and say which (and what a missing one costs); with any strategy, whether
        the drain's horizon can be measured (and say once if not)."""
        await self._prepare_traffic()
        self._prepare_horizon()
        self._prepared = True

    def _prepare_horizon(self) -> None:
        if self._horizon_prepared:
            return
        self._horizon_prepared = True
        svc = self.config.service
        why: str | None = None
        if self.sd.strategy is Strategy.TRAFFIC:
            if self._watcher is None:
                why = self.unavailable or "the app's port is not visible"
            elif "destroy_events" not in self.sources:
                why = "socket destruction events cannot be had here"
            else:
                self._horizon_watcher = self._watcher
        else:
            try:
                watcher = self._factory(svc.port, _ip_or_none(svc.address))
                if not watcher.snapshot(narrow=True).listening:
                    watcher.close()
                    raise TrafficWatchError(f"no listening socket on port {svc.port} in this network namespace")
                try:
                    self._events_factory(svc.port, _ip_or_none(svc.address)).close()
                except BaseException:
                    watcher.close()
                    raise
                self._horizon_watcher = watcher
            except (TrafficWatchError, OSError) as e:
                why = str(e)
        if why is not None:
            self.horizon_unavailable = why
            self.log.info(
                "sidecar.drain.horizon_unavailable",
                reason=why,
                consequence="drains record no horizon: sidecar.drain.done carries horizon_ms null",
                hint="the horizon needs sock_diag's TCP destroy events for the app's port: the sidecar in the "
                "app's network namespace, with CAP_NET_ADMIN where the runtime asks for it",
            )

    def measure_from(self, confirmed_at: float) -> None:
        """Start recording new connections on the app's port (the deregistration was just confirmed). Before
        prepare() has run (a SIGTERM cut the start-up short), ``wait`` prepares and starts it."""
        self._measure_at = confirmed_at
        if self._horizon_watcher is None or self._recorder is not None:
            return
        svc = self.config.service
        recorder = HorizonRecorder(
            self._horizon_watcher, self._events_factory, svc.port, _ip_or_none(svc.address), self.clock
        )
        try:
            recorder.start(confirmed_at)
        except (TrafficWatchError, OSError) as e:
            self.horizon_unavailable = f"at drain time: {e}"
            return
        self._recorder = recorder

    def measured(self) -> Horizon | None:
        """Stop recording; what this drain saw, or None when it recorded nothing (``horizon_unavailable``)."""
        recorder, self._recorder = self._recorder, None
        return recorder.stop() if recorder is not None else None

    async def _prepare_traffic(self) -> None:
        if self.sd.strategy is not Strategy.TRAFFIC or self._watcher is not None or self._traffic_prepared:
            return
        svc = self.config.service
        if self.sd.dns:
            self.addresses = await self._instance_addresses(svc.address, svc.port)
        self._traffic_prepared = True  # from here on nothing awaits: the look below is done once, whatever it finds
        try:
            watcher = self._factory(svc.port, _ip_or_none(svc.address))
            if not watcher.snapshot(narrow=True).listening:
                watcher.close()
                raise TrafficWatchError(f"no listening socket on port {svc.port} in this network namespace")
        except (TrafficWatchError, OSError) as e:
            self.unavailable = str(e)
            self.log.warning(
                "sidecar.drain.traffic_unavailable",
                reason=self.unavailable,
                fallback=f"fixed propagation_delay {self.sd.propagation_delay:g}s",
                hint="run the sidecar in the app's network namespace (wrapper mode, the same pod, "
                'or compose\'s network_mode: "service:<app>")',
            )
            return
        self._watcher = watcher
        missing: dict[str, str] = {}
        sources = []
        try:
            self._events_factory(svc.port, _ip_or_none(svc.address)).close()
            sources.append("destroy_events")
        except (TrafficWatchError, OSError) as e:
            missing["destroy_events"] = str(e)
        try:
            self._counters()
            own, why = self._own_namespace(svc.port)
            if own:
                sources.append("passive_opens")
            else:
                missing["passive_opens"] = why
            sources.append("listen_drops")
        except (TrafficWatchError, OSError) as e:
            missing["passive_opens"] = missing["listen_drops"] = str(e)
        sources.append("poll")
        self.sources = sources
        if not self.complete:
            self.blind = (
                "the poll of the socket table is the only view of new connections, and it misses those "
                "shorter than 100 ms that the client closes"
            )
        fields: dict[str, Any] = {
            "port": svc.port,
            "address": svc.address,
            "sources": sources,
            "missing": missing or None,
        }
        self.status.drain = DrainProgress("traffic", "not started", tuple(sources), self.complete)
        if self.blind is None:
            self.log.info("sidecar.drain.traffic_view", **fields)
        elif self.sd.traffic_poll_only_accepts_misses:
            self.log.warning(
                "sidecar.drain.traffic_view",
                **fields,
                blind=self.blind,
                consequence="shutdown.traffic_poll_only_accepts_misses = true: the drain may end while "
                "short connections still arrive",
            )
        else:
            self.log.warning(
                "sidecar.drain.traffic_view",
                **fields,
                blind=self.blind,
                consequence=f"the drain waits the upper bound, propagation_delay {self.sd.propagation_delay:g}s",
                hint="give the sidecar its own network namespace with the app (a pod, compose's "
                'network_mode: "service:<app>"), or set shutdown.traffic_poll_only_accepts_misses = true '
                "to end the drain on the poll alone",
            )

    async def _instance_addresses(self, address: str, port: int) -> frozenset[str]:
        """The addresses consumers resolve the instance to: the IP itself, or what a host name
        resolves to now, at registration (the DNS step looks for any of them).

        Off the event loop and with a deadline: a resolver that does not answer holds getaddrinfo
        for tens of seconds, and a loop blocked in it would not even see a SIGTERM."""
        try:
            return frozenset({str(ipaddress.ip_address(address))})
        except ValueError:
            pass
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(address, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as e:
            error = str(e) or f"no answer within {RESOLVE_TIMEOUT:g}s"
            self.log.warning(
                "sidecar.drain.address_unresolved",
                address=address,
                error=error,
                consequence="the DNS step cannot tell whether the instance is still handed out: it "
                "waits the upper bound",
            )
            return frozenset()
        found = frozenset(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos)
        self.log.info("sidecar.drain.address_resolved", address=address, addresses=sorted(found))
        return found

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        if self._horizon_watcher is not None and self._horizon_watcher is not self._watcher:
            self._horizon_watcher.close()
        self._horizon_watcher = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    async def wait(self, confirmed_at: float, delay: float | None = None) -> DrainEnd:
        """Wait as the strategy says, counting from ``confirmed_at`` (monotonic); return why it ended.
        ``delay``: the fixed strategy's wait when not ``propagation_delay`` (a learned delay).

        ``cpu_ms`` afterwards: the process CPU time the wait used (the cost of polling).
        """
        cpu0 = time.process_time()
        try:
            return await self._wait(confirmed_at, self.sd.propagation_delay if delay is None else delay)
        finally:
            self.cpu_ms = round((time.process_time() - cpu0) * 1000, 1)

    async def _wait(self, confirmed_at: float, delay: float) -> DrainEnd:
        upper = confirmed_at + delay
        if not self._prepared:
            # A SIGTERM that came between the registration and the end of the start-up cancelled its
            # prepare(): look at the port now, within the wait (its bound counts from confirmed_at), rather
            # than fall back to the fixed delay as if the port could not be seen.
            await self.prepare()
            if self._measure_at is not None:
                self.measure_from(self._measure_at)
        if self.sd.strategy is Strategy.FIXED or self._watcher is None:
            self.status.drain = DrainProgress("fixed", "delay")
            await self.clock.sleep(upper - self.clock.monotonic())
            return DrainEnd.FIXED if self.sd.strategy is Strategy.FIXED else DrainEnd.FIXED_VIEW_UNAVAILABLE
        if self.blind is not None and not self.sd.traffic_poll_only_accepts_misses:
            return await self._blind_wait(upper, self.blind)
        for step in (self._catalog_clear, self._dns_clear):
            if not await step(upper):
                return DrainEnd.UPPER_BOUND
        return await self._quiet(confirmed_at + self.sd.min_delay, upper)

    async def _blind_wait(self, upper: float, why: str) -> DrainEnd:
        self._progress("delay", blind=why)
        await self.clock.sleep(upper - self.clock.monotonic())
        return DrainEnd.UPPER_BOUND_BLIND

    async def _catalog_clear(self, upper: float) -> bool:
        svc = self.config.service
        self._progress("catalog")
        t = self.clock.monotonic()
        while True:
            try:
                async with asyncio.timeout(max(0.001, upper - self.clock.monotonic())):
                    listed = await self.catalog.catalog_lists(svc.name, svc.id, consistent=True)
                if not listed:
                    self.log.info("sidecar.drain.catalog_clear", elapsed_ms=self._ms(t))
                    return True
            except (RegistryError, TimeoutError):
                pass  # unknown: look again
            if not await self._tick(upper):
                self.log.warning("sidecar.drain.catalog_not_clear", elapsed_ms=self._ms(t))
                return False

    async def _dns_clear(self, upper: float) -> bool:
        if not self.sd.dns:
            return True
        name = self.config.dns_query_name
        self._progress("dns")
        t = self.clock.monotonic()
        pending = list(self.sd.dns)
        errors: dict[str, str] = {}
        while pending:
            for server in list(pending):
                try:
                    remaining = max(0.05, min(1.0, upper - self.clock.monotonic()))
                    answer = {str(ipaddress.ip_address(a)) for a in await self._resolve(server, name, remaining)}
                    if self.addresses and not answer & self.addresses:
                        pending.remove(server)
                except DnsError as e:
                    errors[f"{server[0]}:{server[1]}"] = str(e)
            if pending and not await self._tick(upper):
                self.log.warning(
                    "sidecar.drain.dns_not_clear",
                    resolvers=[f"{h}:{p}" for h, p in pending],
                    errors=errors or None,
                    elapsed_ms=self._ms(t),
                )
                return False
        self.log.info("sidecar.drain.dns_clear", resolvers=[f"{h}:{p}" for h, p in self.sd.dns], elapsed_ms=self._ms(t))
        return True

    async def _quiet(self, earliest: float, upper: float) -> DrainEnd:
        assert self._watcher is not None
        svc = self.config.service
        t = self.clock.monotonic()
        seen = _Seen(t)
        events: DestroyEvents | None = None
        if "destroy_events" in self.sources:
            try:
                events = self._events_factory(svc.port, _ip_or_none(svc.address))
            except (TrafficWatchError, OSError) as e:
                self.sources.remove("destroy_events")
                self.log.warning("sidecar.drain.traffic_source_lost", source="destroy_events", reason=str(e))
                if not self.complete and not self.sd.traffic_poll_only_accepts_misses:
                    return await self._blind_wait(upper, f"socket destruction events refused at drain time: {e}")
        reader = _EventReader(events, seen, self.clock, self.log) if events is not None else None
        try:
            return await self._quiet_loop(earliest, upper, t, seen, reader)
        finally:
            if reader is not None:
                reader.stop()

    async def _quiet_loop(
        self, earliest: float, upper: float, t: float, seen: _Seen, reader: _EventReader | None
    ) -> DrainEnd:
        """Sleep until the evidence says ``quiet_period`` has passed without activity, then look at the port
        (and the counters) to confirm; their activity is dated, so one look per quiet period suffices.

        With destroy events, they date every connection that ends; a look at the socket table dates the
        newest inbound data of those still open (``tcpi_last_data_recv``): an idle pooled connection does
        not count, a busy one counts when its data came, not when the sidecar looked. The PassiveOpens
        counter adds nothing to these two (an accepted connection is either still open or has ended), so
        it is read only when it is the complete source (no events), every POLL, and dated at the read.
        The poll alone (opt-in) looks every POLL and confirms with the TIME_WAIT sockets' age.
        """
        assert self._watcher is not None
        poll_only = not self.complete
        counters_complete = reader is None and "passive_opens" in self.sources
        # SYNs dropped: counted per listener of the app's port where the kernel says (sk_drops), so another
        # server's full queue in a shared namespace does not hold the drain; else the namespace's counters.
        try:
            port_drops = self._watcher.listen_drops() if "listen_drops" in self.sources else None
        except TrafficWatchError:
            port_drops = None
        read_counters = counters_complete or (port_drops is None and "listen_drops" in self.sources)
        counters = self._read_counters() if read_counters else None
        own_before = self._own_opens() if self._own_opens is not None else 0
        # No look now: the first one dates everything since (an idle connection from before counts for nothing).
        prev = PortSnapshot(True, taken_at=time.monotonic())
        window: dict[str, int] = {}
        looked = prev.taken_at
        while True:
            if reader is not None:
                reader.take()  # what the kernel queued since the loop last looked, before judging
            now = self.clock.monotonic()
            due_look = poll_only and now - looked >= POLL * 0.9
            quiet_for = now - seen.last
            if (quiet_for >= self.sd.quiet_period and now >= earliest) or due_look:
                try:
                    snap = self._watcher.snapshot(narrow=True)
                except TrafficWatchError as e:
                    self.log.warning(
                        "sidecar.drain.traffic_unavailable", reason=str(e), fallback="wait until the upper bound"
                    )
                    await self.clock.sleep(upper - self.clock.monotonic())
                    return DrainEnd.UPPER_BOUND_VIEW_LOST
                looked = snap.taken_at
                act = activity_between(prev, snap)
                window = {"new_connections": act.new_connections, "bytes_in": act.bytes_in}
                newest = snap.last_activity
                if newest is not None:
                    # the socket table's clock is time.monotonic(); the drain's may be another
                    seen.mark(self.clock.monotonic() - (snap.taken_at - newest), "open_connections")
                prev = snap
                if port_drops is not None and snap.listen_drops is not None:
                    if snap.listen_drops > port_drops:
                        seen.mark(self.clock.monotonic(), "listen_drops")
                        window["syns_dropped"] = snap.listen_drops - port_drops
                    port_drops = snap.listen_drops
                if counters is not None and not counters_complete:
                    counters, drops, own_before = self._counters_grew(seen, counters, own_before, False)
                    if drops:
                        window["syns_dropped"] = drops
                if reader is not None:
                    reader.take()  # a connection that began after the look and already ended
                now = self.clock.monotonic()
                quiet_for = now - seen.last
            if counters is not None and counters_complete:
                counters, grew, own_before = self._counters_grew(seen, counters, own_before, True)
                if grew:
                    window["accepted_or_dropped"] = grew
                else:
                    window.pop("accepted_or_dropped", None)
                now = self.clock.monotonic()
                quiet_for = now - seen.last
            self._progress(
                "quiet",
                connections=prev.connections,
                quiet_for_s=round(quiet_for, 3),
                ended_connections=seen.ended or None,
                last_window=dict(window),
            )
            if quiet_for >= self.sd.quiet_period and now >= earliest and not poll_only:
                return self._quiet_reached(prev.connections, seen, t)
            if poll_only and quiet_for >= self.sd.quiet_period and now >= earliest:
                # The poll alone misses short connections; the ones the app closed left a dated
                # TIME_WAIT socket behind. Confirm with the youngest of them.
                try:
                    age = self._watcher.youngest_time_wait_age()
                except TrafficWatchError:
                    age = None
                if age is not None and age + POLL < quiet_for:
                    seen.mark(now - age, "time_wait")  # a connection the app closed since: poll on
                else:
                    return self._quiet_reached(prev.connections, seen, t)
            # Beside the events, wake-ups before the deadline are only for /status: the evidence needs no look.
            interval = POLL if poll_only or counters_complete else POLL_WITH_EVENTS
            due = min(now + interval, max(seen.last + self.sd.quiet_period, earliest))
            if not await self._tick(upper, max(0.001, due - now)):
                self.log.warning(
                    "sidecar.drain.not_quiet",
                    quiet_for_s=round(quiet_for, 3),
                    open_connections=prev.connections,
                    ended_connections=seen.ended,
                    last_activity=seen.by,
                    elapsed_ms=self._ms(t),
                )
                return DrainEnd.UPPER_BOUND

    def _counters_grew(
        self, seen: _Seen, before: Counters, own_before: int, count_opens: bool
    ) -> tuple[Counters | None, int, int]:
        """Read the counters again and mark activity now if SYNs were dropped or, with ``count_opens``,
        connections were accepted that the sidecar's own servers did not accept (its status port: a
        monitoring scrape must not hold the drain). Returns (counters, growth, own accepts so far)."""
        latest = self._read_counters()
        own_now = self._own_opens() if self._own_opens is not None else 0
        if latest is None:
            seen.mark(self.clock.monotonic(), "counters_lost")  # unknown counts as traffic, once
            return None, 1, own_now
        grew = max(0, latest.listen_drops - before.listen_drops)
        if count_opens:
            grew += max(0, latest.passive_opens - before.passive_opens - (own_now - own_before))
        if grew:
            seen.mark(self.clock.monotonic(), "counters")
        return latest, grew, own_now

    def _read_counters(self) -> Counters | None:
        try:
            return self._counters()
        except (TrafficWatchError, OSError) as e:
            self.log.warning("sidecar.drain.traffic_source_lost", source="counters", reason=str(e))
            return None

    def _quiet_reached(self, open_connections: int, seen: _Seen, since: float) -> DrainEnd:
        """The one event that ends the quiet step, whichever source judged it."""
        self.log.info(
            "sidecar.drain.quiet",
            quiet_period_s=self.sd.quiet_period,
            open_connections=open_connections,
            ended_connections=seen.ended,
            last_activity=seen.by,
            last_activity_ms=round((seen.last - since) * 1000),
            sources=self.sources,
            elapsed_ms=self._ms(since),
        )
        return DrainEnd.TRAFFIC_QUIET

    async def _tick(self, upper: float, interval: float = POLL) -> bool:
        """Sleep one interval; False once the upper bound is reached."""
        remaining = upper - self.clock.monotonic()
        if remaining <= 0:
            return False
        await self.clock.sleep(min(interval, remaining))
        return self.clock.monotonic() < upper

    def _progress(self, step: str, **fields: Any) -> None:
        self.status.drain = DrainProgress("traffic", step, tuple(self.sources), seen=fields)

    def _ms(self, since: float) -> int:
        return round((self.clock.monotonic() - since) * 1000)
