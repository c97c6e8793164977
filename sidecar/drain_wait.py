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
    passive_opens    the namespace's PassiveOpens counter: every accepted connection; only when
                     the network namespace is the app's own (netns_counters.py)
    listen_drops     ListenOverflows + ListenDrops: SYNs dropped on a full accept queue (their
                     retransmit may come after "quiet")
    poll             a look at the socket table: open connections, new ones, inbound bytes;
                     every 100 ms alone, every POLL_WITH_EVENTS seconds beside a complete source

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
import enum
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .clock import Clock
from .config import Config, Strategy
from .consul_client import ConsulError
from .dns_probe import DnsError, resolve_addresses
from .netns_counters import Counters, namespace_is_apps, read_counters
from .status import Status
from .tcp_events import DestroyEvents
from .traffic import PortSnapshot, PortWatcher, TrafficWatchError, activity_between

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

POLL = 0.1  # seconds between two looks at the catalog, the resolvers or the port (poll alone)
RESOLVE_TIMEOUT = 5.0  # for service.address's host name at registration (the DNS step's addresses)
POLL_WITH_EVENTS = 1.0  # between two looks at the port when a complete source sees short connections (CPU: ~3 ms a look on a busy host)


class DrainEnd(enum.Enum):
    """Why the wait before the app's signal ended: ``reason`` in ``sidecar.drain.delay_done``.

    The values are logged as they stand and documented: operators match on them.
    """

    FIXED = "fixed delay"
    FIXED_VIEW_UNAVAILABLE = "fixed delay (traffic view unavailable)"
    TRAFFIC_QUIET = "traffic quiet"
    UPPER_BOUND = "upper bound (propagation_delay)"
    UPPER_BOUND_BLIND = "upper bound (traffic view blind to short connections)"
    UPPER_BOUND_VIEW_LOST = "upper bound (traffic view lost)"
    # Decided by the lifecycle, which cuts the wait short:
    SECOND_SIGINT = "second SIGINT"
    APP_EXITED = "the app exited"
    DRAIN_BOUND = "the drain's bound (deregister_timeout + propagation_delay)"


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
        self._watcher: PortWatcher | None = None
        self.unavailable: str | None = None
        self.sources: list[str] = []
        self.blind: str | None = None  # why the view misses short connections (poll alone), else None
        self.addresses: frozenset[str] | None = None  # the instance's addresses, for the DNS step
        self.cpu_ms: float | None = None

    @property
    def complete(self) -> bool:
        return "destroy_events" in self.sources or "passive_opens" in self.sources

    async def prepare(self) -> None:
        """With the traffic strategy: check once, early, that the app's port is visible, choose the
        sources this host allows, and say which (and what a missing one costs)."""
        if self.sd.strategy is not Strategy.TRAFFIC or self._watcher is not None:
            return
        svc = self.config.service
        if self.sd.dns:
            self.addresses = await self._instance_addresses(svc.address, svc.port)
        try:
            watcher = self._factory(svc.port, _ip_or_none(svc.address))
            if not watcher.snapshot().listening:
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
            self.blind = ("the poll of the socket table is the only view of new connections, and it misses those "
                          "shorter than 100 ms that the client closes")
        fields: dict[str, Any] = {"port": svc.port, "address": svc.address, "sources": sources, "missing": missing or None}
        self.status.drain = {"strategy": "traffic", "step": "not started", "sources": sources, "complete": self.complete}
        if self.blind is None:
            self.log.info("sidecar.drain.traffic_view", **fields)
        elif self.sd.traffic_poll_only_accepts_misses:
            self.log.warning("sidecar.drain.traffic_view", **fields, blind=self.blind,
                             consequence="shutdown.traffic_poll_only_accepts_misses = true: the drain may end while "
                             "short connections still arrive")
        else:
            self.log.warning("sidecar.drain.traffic_view", **fields, blind=self.blind,
                             consequence=f"the drain waits the upper bound, propagation_delay "
                             f"{self.sd.propagation_delay:g}s",
                             hint="give the sidecar its own network namespace with the app (a pod, compose's "
                             'network_mode: "service:<app>"), or set shutdown.traffic_poll_only_accepts_misses = true '
                             "to end the drain on the poll alone")

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
            self.log.warning("sidecar.drain.address_unresolved", address=address, error=error,
                             consequence="the DNS step cannot tell whether the instance is still handed out: it "
                             "waits the upper bound")
            return frozenset()
        found = frozenset(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos)
        self.log.info("sidecar.drain.address_resolved", address=address, addresses=sorted(found))
        return found

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    async def wait(self, confirmed_at: float) -> DrainEnd:
        """Wait as the strategy says, counting from ``confirmed_at`` (monotonic); return why it ended.

        ``cpu_ms`` afterwards: the process CPU time the wait used (the cost of polling).
        """
        cpu0 = time.process_time()
        try:
            return await self._wait(confirmed_at)
        finally:
            self.cpu_ms = round((time.process_time() - cpu0) * 1000, 1)

    async def _wait(self, confirmed_at: float) -> DrainEnd:
        upper = confirmed_at + self.sd.propagation_delay
        if self.sd.strategy is Strategy.FIXED or self._watcher is None:
            self.status.drain = {"strategy": "fixed", "step": "delay"}
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
            except (ConsulError, TimeoutError):
                pass  # unknown: look again
            if not await self._tick(upper):
                self.log.warning("sidecar.drain.catalog_not_clear", elapsed_ms=self._ms(t))
                return False

    async def _dns_clear(self, upper: float) -> bool:
        if not self.sd.dns:
            return True
        svc = self.config.service
        name = self.sd.dns_name or f"{svc.name}.service.consul"
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
                self.log.warning("sidecar.drain.dns_not_clear", resolvers=[f"{h}:{p}" for h, p in pending], errors=errors or None, elapsed_ms=self._ms(t))
                return False
        self.log.info("sidecar.drain.dns_clear", resolvers=[f"{h}:{p}" for h, p in self.sd.dns], elapsed_ms=self._ms(t))
        return True

    async def _quiet(self, earliest: float, upper: float) -> DrainEnd:
        assert self._watcher is not None
        svc = self.config.service
        t = self.clock.monotonic()
        state = {"last": t, "ended": 0, "lost": 0}
        loop = asyncio.get_running_loop()
        events: DestroyEvents | None = None
        if "destroy_events" in self.sources:
            try:
                events = self._events_factory(svc.port, _ip_or_none(svc.address))
            except (TrafficWatchError, OSError) as e:
                self.sources.remove("destroy_events")
                self.log.warning("sidecar.drain.traffic_source_lost", source="destroy_events", reason=str(e))
                if not self.complete and not self.sd.traffic_poll_only_accepts_misses:
                    return await self._blind_wait(upper, f"socket destruction events refused at drain time: {e}")

        def on_events() -> None:
            assert events is not None
            if state.get("failed"):
                state["last"] = self.clock.monotonic()  # blind from now on: every look counts as traffic
                return
            try:
                batch = events.read()
            except TrafficWatchError as e:
                loop.remove_reader(events.fileno())
                state["failed"] = 1
                state["last"] = self.clock.monotonic()
                self.log.warning("sidecar.drain.traffic_source_lost", source="destroy_events", reason=str(e),
                                 consequence="the drain waits the upper bound")
                return
            if batch.ended or batch.lost:
                state["last"] = self.clock.monotonic()
                state["ended"] += batch.ended
                state["lost"] += batch.lost

        if events is not None:
            loop.add_reader(events.fileno(), on_events)
        try:
            return await self._quiet_loop(earliest, upper, t, state, events, on_events if events is not None else None)
        finally:
            if events is not None:
                loop.remove_reader(events.fileno())
                events.close()

    async def _quiet_loop(self, earliest: float, upper: float, t: float, state: dict[str, Any],
                          events: DestroyEvents | None, take_events: Callable[[], None] | None) -> DrainEnd:
        assert self._watcher is not None
        interval = POLL_WITH_EVENTS if self.complete else POLL
        use_counters = "listen_drops" in self.sources
        window = {"new_connections": 0, "bytes_in": 0}
        counters = self._read_counters() if use_counters else None
        prev: PortSnapshot = self._watcher.snapshot()
        state["last"] = max(state["last"], t)
        while True:
            if take_events is not None:
                take_events()  # what the kernel queued since the loop last looked, before judging
            now = self.clock.monotonic()
            quiet_for = now - state["last"]
            self._progress("quiet", connections=prev.connections, quiet_for_s=round(quiet_for, 3),
                           ended_connections=state["ended"] or None, last_window=dict(window))
            if quiet_for >= self.sd.quiet_period and now >= earliest:
                if events is None and "passive_opens" not in self.sources:
                    # The poll alone misses short connections; the ones the app closed left a dated
                    # TIME_WAIT socket behind. Confirm with the youngest of them.
                    try:
                        age = self._watcher.youngest_time_wait_age()
                    except TrafficWatchError:
                        age = None
                    if age is not None and age + POLL < quiet_for:
                        state["last"] = now - age  # a connection the app closed since: poll on
                        quiet_for = age
                if quiet_for >= self.sd.quiet_period:
                    self.log.info("sidecar.drain.quiet", quiet_period_s=self.sd.quiet_period, open_connections=prev.connections,
                                  ended_connections=state["ended"], sources=self.sources, elapsed_ms=self._ms(t))
                    return DrainEnd.TRAFFIC_QUIET
            due = min(now + interval, max(state["last"] + self.sd.quiet_period, earliest))
            if not await self._tick(upper, max(0.001, due - now)):
                self.log.warning("sidecar.drain.not_quiet", quiet_for_s=round(quiet_for, 3), open_connections=prev.connections,
                                 ended_connections=state["ended"], elapsed_ms=self._ms(t))
                return DrainEnd.UPPER_BOUND
            try:
                snap = self._watcher.snapshot()
            except TrafficWatchError as e:
                self.log.warning("sidecar.drain.traffic_unavailable", reason=str(e), fallback="wait until the upper bound")
                await self.clock.sleep(upper - self.clock.monotonic())
                return DrainEnd.UPPER_BOUND_VIEW_LOST
            act = activity_between(prev, snap)
            window = {"new_connections": act.new_connections, "bytes_in": act.bytes_in}
            busy = not act.quiet
            if counters is not None:
                latest = self._read_counters()
                if latest is None:
                    counters = None
                    busy = True  # the counters stopped answering: unknown counts as traffic, once
                else:
                    if latest.listen_drops > counters.listen_drops:
                        busy = True
                        window["syns_dropped"] = latest.listen_drops - counters.listen_drops
                    if "passive_opens" in self.sources and latest.passive_opens > counters.passive_opens:
                        busy = True
                        window["accepted"] = latest.passive_opens - counters.passive_opens
                    counters = latest
            if busy:
                state["last"] = self.clock.monotonic()
            prev = snap

    def _read_counters(self) -> Counters | None:
        try:
            return self._counters()
        except (TrafficWatchError, OSError) as e:
            self.log.warning("sidecar.drain.traffic_source_lost", source="counters", reason=str(e))
            return None

    async def _tick(self, upper: float, interval: float = POLL) -> bool:
        """Sleep one interval; False once the upper bound is reached."""
        remaining = upper - self.clock.monotonic()
        if remaining <= 0:
            return False
        await self.clock.sleep(min(interval, remaining))
        return self.clock.monotonic() < upper

    def _progress(self, step: str, **fields: Any) -> None:
        self.status.drain = {"strategy": "traffic", "step": step, "sources": self.sources,
                             **{k: v for k, v in fields.items() if v is not None}}

    def _ms(self, since: float) -> int:
        return round((self.clock.monotonic() - since) * 1000)
