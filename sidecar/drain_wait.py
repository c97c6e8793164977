"""The wait between a confirmed deregistration and the app's signal.

``fixed``: wait ``propagation_delay``, a guess that must cover the slowest consumer.

``traffic``: wait for evidence, bounded on both sides (``min_delay`` .. ``propagation_delay``):

    1. catalog   a consistent read of /v1/health/service/<name> no longer lists the instance
    2. dns       each resolver in ``dns`` no longer returns the instance's address
    3. quiet     the kernel shows no new connection and no inbound byte on the app's port
                 for ``quiet_period`` (so pooled keep-alive connections that stay open but
                 carry no request do not hold the drain), and no connection closed by the
                 app in that time (its TIME_WAIT socket dates it, even if it lasted 1 ms)

Blind spot: a connection opened and closed by the *client* between two polls (100 ms)
leaves no trace in the kernel's per-socket view. HTTP/1.0 clients, ``Connection: close``
and nginx's default upstream connections are closed by the app and are seen; pooled
keep-alive connections are seen while open. ``min_delay`` bounds the rest.

Where the app's port cannot be seen (another network namespace, not Linux, netlink
refused), the traffic strategy says so once and falls back to the fixed delay: never
to a shorter wait.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .clock import Clock
from .config import Config
from .consul_client import ConsulError
from .dns_probe import DnsError, resolve_a
from .status import Status
from .traffic import PortSnapshot, PortWatcher, TrafficWatchError, activity_between

POLL = 0.1  # seconds between two looks at the catalog, the resolvers or the port


class Catalog(Protocol):
    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool: ...


Resolve = Callable[[tuple[str, int], str, float], Awaitable[set[str]]]
WatcherFactory = Callable[[int, list[str] | None], PortWatcher]


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
        log: Any,
        status: Status,
        watcher_factory: WatcherFactory = PortWatcher,
        resolve: Resolve = resolve_a,
    ) -> None:
        self.config = config
        self.sd = config.shutdown
        self.catalog = catalog
        self.clock = clock
        self.log = log
        self.status = status
        self._factory = watcher_factory
        self._resolve = resolve
        self._watcher: PortWatcher | None = None
        self.unavailable: str | None = None
        self.cpu_ms: float | None = None

    def prepare(self) -> None:
        """With the traffic strategy: check once, early, that the app's port is visible; say so if not."""
        if self.sd.strategy != "traffic" or self._watcher is not None:
            return
        svc = self.config.service
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
        self.log.info("sidecar.drain.traffic_view", port=svc.port, address=svc.address)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    async def wait(self, confirmed_at: float) -> str:
        """Wait as the strategy says, counting from ``confirmed_at`` (monotonic); return why it ended.

        ``cpu_ms`` afterwards: the process CPU time the wait used (the cost of polling).
        """
        cpu0 = time.process_time()
        try:
            return await self._wait(confirmed_at)
        finally:
            self.cpu_ms = round((time.process_time() - cpu0) * 1000, 1)

    async def _wait(self, confirmed_at: float) -> str:
        upper = confirmed_at + self.sd.propagation_delay
        if self.sd.strategy == "fixed" or self._watcher is None:
            self.status.drain = {"strategy": "fixed", "step": "delay"}
            await self.clock.sleep(upper - self.clock.monotonic())
            return "fixed delay" if self.sd.strategy == "fixed" else "fixed delay (traffic view unavailable)"
        for step in (self._catalog_clear, self._dns_clear):
            if not await step(upper):
                return "upper bound (propagation_delay)"
        return await self._quiet(confirmed_at + self.sd.min_delay, upper)

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
        name = f"{svc.name}.service.consul"
        self._progress("dns")
        t = self.clock.monotonic()
        pending = list(self.sd.dns)
        errors: dict[str, str] = {}
        while pending:
            for server in list(pending):
                try:
                    remaining = max(0.05, min(1.0, upper - self.clock.monotonic()))
                    if svc.address not in await self._resolve(server, name, remaining):
                        pending.remove(server)
                except DnsError as e:
                    errors[f"{server[0]}:{server[1]}"] = str(e)
            if pending and not await self._tick(upper):
                self.log.warning("sidecar.drain.dns_not_clear", resolvers=[f"{h}:{p}" for h, p in pending], errors=errors or None, elapsed_ms=self._ms(t))
                return False
        self.log.info("sidecar.drain.dns_clear", resolvers=[f"{h}:{p}" for h, p in self.sd.dns], elapsed_ms=self._ms(t))
        return True

    async def _quiet(self, earliest: float, upper: float) -> str:
        assert self._watcher is not None
        t = self.clock.monotonic()
        last_activity = t
        window = {"new_connections": 0, "bytes_in": 0}
        prev: PortSnapshot = self._watcher.snapshot()
        while True:
            now = self.clock.monotonic()
            quiet_for = now - last_activity
            self._progress("quiet", connections=prev.connections, quiet_for_s=round(quiet_for, 3), last_window=dict(window))
            if quiet_for >= self.sd.quiet_period and now >= earliest:
                # Snapshots miss connections shorter than a poll; the ones the app closed
                # left a dated TIME_WAIT socket behind. Confirm with the youngest of them.
                try:
                    age = self._watcher.youngest_time_wait_age()
                except TrafficWatchError:
                    age = None
                if age is not None and age + POLL < quiet_for:
                    last_activity = now - age  # a connection the app closed since: poll on
                    quiet_for = age
                if quiet_for >= self.sd.quiet_period:
                    self.log.info("sidecar.drain.quiet", quiet_period_s=self.sd.quiet_period, open_connections=prev.connections, elapsed_ms=self._ms(t))
                    return "traffic quiet"
            if not await self._tick(upper):
                self.log.warning("sidecar.drain.not_quiet", quiet_for_s=round(quiet_for, 3), open_connections=prev.connections, elapsed_ms=self._ms(t))
                return "upper bound (propagation_delay)"
            try:
                snap = self._watcher.snapshot()
            except TrafficWatchError as e:
                self.log.warning("sidecar.drain.traffic_unavailable", reason=str(e), fallback="wait until the upper bound")
                await self.clock.sleep(upper - self.clock.monotonic())
                return "upper bound (traffic view lost)"
            act = activity_between(prev, snap)
            window = {"new_connections": act.new_connections, "bytes_in": act.bytes_in}
            if not act.quiet:
                last_activity = self.clock.monotonic()
            prev = snap

    async def _tick(self, upper: float) -> bool:
        """Sleep one poll interval; False once the upper bound is reached."""
        remaining = upper - self.clock.monotonic()
        if remaining <= 0:
            return False
        await self.clock.sleep(min(POLL, remaining))
        return self.clock.monotonic() < upper

    def _progress(self, step: str, **fields: Any) -> None:
        self.status.drain = {"strategy": "traffic", "step": step, **fields}

    def _ms(self, since: float) -> int:
        return round((self.clock.monotonic() - since) * 1000)
