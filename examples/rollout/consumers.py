"""Consumers of the `web` service that are not nginx, for the traffic-drain tests and benchmarks.

- ``HorizonConsumer``: routes each request by the Consul answer it saw ``horizon`` seconds ago
  (a known, fixed propagation horizon, like a DNS cache with a long TTL or a slow provider).
- ``PooledConsumer``: keeps persistent keep-alive connections to every instance and stops using
  an instance as soon as it leaves Consul, but keeps the connection open (like Envoy or HAProxy).

Both send an open-loop request rate and record every request with the loadgen ``Record``.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import json
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp

from testkit import APP, PY, Consul, Sidecar, free_port, terminate_all

from .loadgen import Record, summarize


def _passing_addresses(consul_address: str, name: str) -> list[str]:
    with urllib.request.urlopen(f"{consul_address}/v1/health/service/{name}?passing=1", timeout=2) as r:
        return sorted(e["Service"]["Address"] for e in json.loads(r.read()))


@dataclass
class _History:
    times: list[float] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)

    def add(self, t: float, answer: list[str]) -> None:
        self.times.append(t)
        self.answers.append(answer)

    def as_of(self, t: float) -> list[str]:
        i = bisect.bisect_right(self.times, t) - 1
        return self.answers[max(0, i)] if self.answers else []


async def _follow(consul_address: str, name: str, history: _History, stop: asyncio.Event, every: float = 0.05) -> None:
    while not stop.is_set():
        try:
            answer = await asyncio.to_thread(_passing_addresses, consul_address, name)
            history.add(time.monotonic(), answer)
        except OSError:
            pass
        await asyncio.sleep(every)


async def _get(
    session: aiohttp.ClientSession,
    addr: str,
    port: int,
    t0: float,
    records: list[Record],
    headers: dict[str, str] | None = None,
) -> None:
    """One GET to an instance, recorded whatever happens."""
    began = time.monotonic()
    status, error, backend = None, None, None
    try:
        async with session.get(f"http://{addr}:{port}/", headers=headers) as r:
            await r.read()
            status, backend = r.status, r.headers.get("X-Backend")
    except Exception as e:  # noqa: BLE001 - every failure counts
        error = f"{type(e).__name__}: {addr}"
    records.append(Record(began - t0, time.monotonic() - began, status, error, backend))


async def _open_loop(rate: float, stop: asyncio.Event, one: object) -> None:
    t0 = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    for i in count():
        if stop.is_set():
            break
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one())  # type: ignore[operator]
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=5)


class _Consumer(abc.ABC):
    """Follows Consul's answer for ``name`` and sends ``rate`` requests/s, open loop, to the
    instance that ``pick`` chooses; every request is recorded."""

    headers: dict[str, str] | None = None

    def __init__(self, consul_address: str, name: str, port: int, rate: float = 50.0) -> None:
        self.consul_address, self.name, self.port, self.rate = consul_address, name, port, rate
        self.records: list[Record] = []
        self.t0 = time.monotonic()
        self.history = _History()

    @abc.abstractmethod
    def connector(self) -> aiohttp.TCPConnector:
        """How this consumer holds connections."""

    def answer(self, history: _History) -> list[str]:
        return history.as_of(time.monotonic())

    def routes_to(self) -> list[str]:
        """The addresses a request started now would choose from."""
        return self.answer(self.history)

    async def run(self, stop: asyncio.Event) -> list[Record]:
        history = self.history
        follower = asyncio.create_task(_follow(self.consul_address, self.name, history, stop))
        rr = count()
        async with aiohttp.ClientSession(connector=self.connector(), timeout=aiohttp.ClientTimeout(total=5)) as session:
            session._retry_connection = False  # count every failure (see loadgen.run_load)

            async def one() -> None:
                answer = self.answer(history)
                if answer:
                    await _get(session, answer[next(rr) % len(answer)], self.port, self.t0, self.records, self.headers)

            await _open_loop(self.rate, stop, one)
        await follower
        return self.records


class HorizonConsumer(_Consumer):
    """Routes by the answer Consul gave ``horizon`` seconds ago; a new connection per request,
    with ``Connection: close`` (the app closes it, as with nginx's default upstream connections)."""

    headers = {"Connection": "close"}

    def __init__(self, consul_address: str, name: str, port: int, horizon: float, rate: float = 50.0) -> None:
        super().__init__(consul_address, name, port, rate)
        self.horizon = horizon

    def connector(self) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(force_close=True, limit=0)

    def answer(self, history: _History) -> list[str]:
        return history.as_of(time.monotonic() - self.horizon)


class PooledConsumer(_Consumer):
    """Persistent connections to every instance; an instance that leaves Consul gets no more requests,
    but its connection stays open until the instance closes it."""

    def connector(self) -> aiohttp.TCPConnector:
        # Keep-alive: one connection per instance, reused for every request to it.
        return aiohttp.TCPConnector(limit_per_host=1, keepalive_timeout=300)


async def end_drain(stop: asyncio.Event, load: asyncio.Task[Any] | None, sidecars: list[Sidecar]) -> None:
    """A drain's teardown under load: stop the load (and wait for it), then every sidecar still running."""
    stop.set()
    if load is not None:
        await asyncio.gather(load, return_exceptions=True)
    await asyncio.to_thread(terminate_all, sidecars)


async def horizon_drain(
    consul: Consul,
    workdir: Path,
    shutdown: dict[str, Any],
    horizon: float = 5.0,
    rate: float = 100.0,
    name: str = "horizon",
) -> tuple[int, int, dict[str, Any]]:
    """Two instances; a HorizonConsumer (``horizon`` s); SIGTERM the first instance's sidecar.

    Returns (requests, failed, the first sidecar's ``sidecar.drain.delay_done`` event).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sidecars = []
    for i, addr in enumerate(("127.0.0.21", "127.0.0.22")):
        config: dict[str, dict[str, Any]] = {
            "consul": {"address": consul.address},
            "service": {"name": name, "id": f"{name}-{i}", "address": addr, "port": port},
            "shutdown": {"app_timeout": "10s", **shutdown},
            "status": {"listen": ""},
        }
        command = [PY, str(APP), "--host", addr, "--port", str(port)]
        sidecars.append(Sidecar(workdir, config, command))
    try:
        for sc in sidecars:
            sc.wait_event("sidecar.consul.registered")
        consumer = HorizonConsumer(consul.address, name, port, horizon=horizon, rate=rate)
        stop = asyncio.Event()
        load = asyncio.create_task(consumer.run(stop))
        await asyncio.sleep(horizon + 1.0)  # the consumer's history now covers its horizon
        sidecars[0].send(signal.SIGTERM)
        await asyncio.to_thread(sidecars[0].wait, 60)
        await asyncio.sleep(1.0)
        stop.set()
        records = await load
        event = sidecars[0].event("sidecar.drain.delay_done") or {}
    finally:
        await asyncio.to_thread(terminate_all, sidecars)
    s = summarize(records)
    return s.requests, s.failed, event
