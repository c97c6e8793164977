"""Open-loop load straight at one instance, and a catalog watcher, across hot and plain restarts.

No balancer in front: every request opens a new TCP connection to the instance's own address
(HTTP/1.0, so the server closes it after the answer), as ``examples/rollout/loadgen.py`` does
through nginx. Request ``i`` is sent at ``t0 + i / rate`` whatever happened to the earlier ones.
A refused connection (nothing listening: the port is closed) is counted apart from every other
failure (a reset, a connection closed without an answer, a timeout, a 5xx), so a result says
which of the two a restart caused. Each answer's ``X-Pid`` header (the example app, and
``examples/app/wsgi_app.py`` and ``asgi_app.py``, send it) tells which generation served it.

``slow(n, ms)`` sends ``n`` requests to ``/slow?ms=`` at once, so a restart can be started with
requests in flight in the old generation.

The watcher asks the agent's ``/v1/health/service/<name>`` with blocking queries (``?index=``),
which return as soon as anything about the service changes, and records each answer: the
instance's aggregate check state, or ``missing``. A restart that touched the registration (a
deregistration, a check gone critical) shows up there.

The load runs on an event loop in a thread of its own, so a test can send signals and poll in
the meantime. All times are ``time.monotonic()`` values (CLOCK_MONOTONIC: the same clock in
every process on the host), so they line up with the marks a test takes itself.

This module imports nothing from ``examples`` (the demos depend on ``testkit``, never the
reverse), which is why it has its own small HTTP client instead of ``loadgen``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

# Longest single sleep of the scheduler, so that `stop` is noticed quickly at low rates too.
_MAX_SLEEP = 0.05
# Most bytes read of one answer (the test apps answer a few dozen; Consul's health list a few KB).
_MAX_ANSWER = 4 << 20
# How long a blocking query may wait on the agent before it answers unchanged.
WATCH_WAIT = "2s"


@dataclass(frozen=True)
class Hit:
    """One request."""

    kind: str  # "load" or "slow"
    start: float  # time.monotonic() when its connection was opened
    end: float  # when the answer was read or the error happened
    status: int | None  # the HTTP status; None when there was no answer
    error: str | None  # "ConnectionRefusedError: ECONNREFUSED ...", "TimeoutError", ...; None on an answer
    pid: int | None  # the X-Pid header: the generation that served it
    scheduled: float = math.nan  # load requests: when the schedule said to send it

    @property
    def refused(self) -> bool:
        """The connection was refused: nothing listened on the port."""
        return self.error is not None and "ECONNREFUSED" in self.error

    @property
    def failed(self) -> bool:
        """Any other failure: reset, closed without an answer, timed out, or a 5xx."""
        if self.refused:
            return False
        return self.error is not None or self.status is None or self.status >= 500

    @property
    def ok(self) -> bool:
        return not self.refused and not self.failed

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000.0


@dataclass(frozen=True)
class Sample:
    """One answer of the catalog watcher."""

    t: float  # time.monotonic() when the answer came
    state: str  # "passing", "warning", "critical", "missing" or "error: ..." (the agent did not answer)


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    message = " ".join(str(exc).split())
    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(code, int) and code in errno.errorcode:
        message = f"{errno.errorcode[code]} {message}".strip()
    return f"{name}: {message[:160]}" if message else name


async def http_get(
    host: str, port: int, target: str, timeout: float, sent: asyncio.Event | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET over a new connection (HTTP/1.0: the server closes it after the answer, and never
    chunks it); ``sent`` is set once the request is written. Raises on a refused or reset
    connection, a timeout or an answer without a status line."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {target} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: testkit-hotload\r\n\r\n".encode()
            )
            await writer.drain()
            if sent is not None:
                sent.set()
            raw = b""
            while len(raw) < _MAX_ANSWER and (chunk := await reader.read(65536)):
                raw += chunk
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectionError(f"no HTTP answer ({len(raw)} bytes: {raw[:60]!r})")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, body


def _pid(headers: dict[str, str]) -> int | None:
    value = headers.get("x-pid", "")
    return int(value) if value.isdigit() else None


@dataclass
class LoadResult:
    hits: list[Hit]
    samples: list[Sample]
    began: float
    ended: float
    service_id: str | None = None
    marks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def load(self) -> list[Hit]:
        return [h for h in self.hits if h.kind == "load"]

    @property
    def slow(self) -> list[Hit]:
        return [h for h in self.hits if h.kind == "slow"]

    @property
    def refused(self) -> list[Hit]:
        return [h for h in self.hits if h.refused]

    @property
    def failed(self) -> list[Hit]:
        return [h for h in self.hits if h.failed]

    def pids(self, hits: Iterable[Hit] | None = None) -> Counter[int]:
        """How many completed requests each PID served."""
        return Counter(h.pid for h in (self.hits if hits is None else hits) if h.ok and h.pid is not None)

    def window(self, a: float, b: float, kind: str = "load") -> list[Hit]:
        """The requests of ``kind`` started in [a, b)."""
        return [h for h in self.hits if h.kind == kind and a <= h.start < b]

    def p99_ms(self, a: float = -math.inf, b: float = math.inf) -> float:
        """99th percentile latency (nearest rank) of the load requests started in [a, b); NaN without any."""
        values = sorted(h.latency_ms for h in self.window(a, b))
        if not values:
            return math.nan
        return values[max(1, math.ceil(0.99 * len(values))) - 1]

    @property
    def lag_max_ms(self) -> float:
        """How late the client itself sent a request at worst (a busy machine); NaN without load."""
        lags = [(h.start - h.scheduled) * 1000.0 for h in self.load if not math.isnan(h.scheduled)]
        return max(lags) if lags else math.nan

    @property
    def not_passing(self) -> list[Sample]:
        """Watcher answers in which the instance was anything but passing (missing, critical, no answer)."""
        return [s for s in self.samples if s.state != "passing"]

    def describe(self) -> str:
        """A few lines for an assertion message: counts, failures by kind, PIDs, the watcher."""
        kinds = Counter((h.error or f"HTTP {h.status}").split(":")[0] for h in self.hits if not h.ok)
        lines = [
            f"{len(self.load)} load + {len(self.slow)} slow requests over {self.ended - self.began:.1f}s: "
            f"{len(self.refused)} refused, {len(self.failed)} failed ({dict(kinds)}); "
            f"client lag max {self.lag_max_ms:.0f} ms",
            f"served by PID: {dict(self.pids())}",
            f"watcher: {len(self.samples)} answers, not passing: "
            + (", ".join(f"{s.state} at +{s.t - self.began:.2f}s" for s in self.not_passing[:10]) or "none"),
        ]
        for h in [h for h in self.hits if not h.ok][:5]:
            lines.append(f"  {h.kind} at +{h.start - self.began:.3f}s: {h.error or h.status}")
        for t, what in self.marks:
            lines.append(f"  mark +{t - self.began:.3f}s {what}")
        return "\n".join(lines)


class HotLoad:
    """``rate`` requests per second at ``url`` (and the watcher, given ``consul``, ``service`` and
    ``service_id``) until ``stop()``; a context manager that stops on exit, also on failure."""

    def __init__(
        self,
        url: str,
        rate: float,
        *,
        consul: str | None = None,
        service: str | None = None,
        service_id: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number: {rate!r}")
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"need http://host:port/path: {url!r}")
        self.host, self.port = parts.hostname, parts.port
        self.path = parts.path or "/"
        self.rate = rate
        self.timeout = timeout
        self.consul = urlsplit(consul) if consul else None
        self.service = service
        self.service_id = service_id
        self._hits: list[Hit] = []
        self._samples: list[Sample] = []
        self._marks: list[tuple[float, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._crash: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.began = math.nan

    # -- the test's side --------------------------------------------------------------------

    def start(self) -> HotLoad:
        self._thread = threading.Thread(target=self._run, name="hotload", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the load's event loop did not start")
        return self

    def mark(self, what: str) -> float:
        """Note a moment (shown by ``describe()``); returns it."""
        t = time.monotonic()
        self._marks.append((t, what))
        return t

    def slow(self, n: int, ms: int, settle: float = 0.3) -> float:
        """Send ``n`` requests to ``/slow?ms=<ms>`` now; return once all are sent and ``settle``
        seconds passed (time for the server to accept them). Returns when they were sent."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self._send_slow(n, ms), self._loop)
        sent = fut.result(self.timeout)
        time.sleep(settle)
        return sent

    def counts(self) -> tuple[int, int, int]:
        """(completed, refused, failed) so far: a live view for demos."""
        hits = list(self._hits)
        return sum(h.ok for h in hits), sum(h.refused for h in hits), sum(h.failed for h in hits)

    def stop(self) -> LoadResult:
        """Stop sending; wait (bounded by the request timeout) for the requests in flight."""
        if self._thread is not None:
            if self._loop is not None and self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(self.timeout + 10)
            alive = self._thread.is_alive()
            self._thread = None
            if alive:
                raise RuntimeError("the load did not stop")
        if self._crash is not None:
            raise RuntimeError(f"the load crashed: {self._crash!r}") from self._crash
        return LoadResult(
            sorted(self._hits, key=lambda h: h.start),
            list(self._samples),
            self.began,
            time.monotonic(),
            self.service_id,
            list(self._marks),
        )

    def __enter__(self) -> HotLoad:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self.stop()

    # -- the event loop's side ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by stop()
            self._crash = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.began = time.monotonic()
        watcher = asyncio.create_task(self._watch()) if self.consul and self.service else None
        self._started.set()
        i = 0
        while not self._stop.is_set():
            due = self.began + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(delay, _MAX_SLEEP))
                continue
            self._spawn(self._one("load", self.path, due))
            i += 1
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.timeout + 1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            # One last look, not blocking: the state when the load stopped.
            self._samples.append(Sample(time.monotonic(), (await self._ask(0))[0]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(
        self, kind: str, target: str, scheduled: float = math.nan, sent: asyncio.Event | None = None
    ) -> None:
        start = time.monotonic()
        status: int | None = None
        error: str | None = None
        pid: int | None = None
        try:
            status, headers, _ = await http_get(self.host, self.port, target, self.timeout, sent)
            pid = _pid(headers)
        except Exception as exc:  # every failure counts, whatever its kind
            error = _describe(exc)
        finally:
            if sent is not None:
                sent.set()  # also when it failed: slow() must not wait for a request that never went
        self._hits.append(Hit(kind, start, time.monotonic(), status, error, pid, scheduled))

    async def _send_slow(self, n: int, ms: int) -> float:
        events = [asyncio.Event() for _ in range(n)]
        for ev in events:
            self._spawn(self._one("slow", f"/slow?ms={ms}&seconds={ms / 1000:g}", sent=ev))
        await asyncio.gather(*(ev.wait() for ev in events))
        return time.monotonic()

    async def _watch(self) -> None:
        index = 0
        while True:
            state, index = await self._ask(index)
            self._samples.append(Sample(time.monotonic(), state))

    async def _ask(self, index: int) -> tuple[str, int]:
        """One (blocking, if ``index``) query: the instance's state, and the index to wait on next."""
        assert self.consul is not None and self.consul.hostname and self.service
        host, port = self.consul.hostname, self.consul.port or 8500
        target = f"/v1/health/service/{quote(self.service)}?index={index}&wait={WATCH_WAIT}"
        try:
            status, headers, body = await http_get(host, port, target, 30)
            if status != 200:
                raise ConnectionError(f"HTTP {status}")
            state = self._state(json.loads(body))
            new = int(headers.get("x-consul-index", "0") or 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await asyncio.sleep(0.1)
            return f"error: {_describe(exc)}", index
        # Consul: an index that went backwards means start over.
        return state, new if new >= index else 0

    def _state(self, entries: list[dict[str, Any]]) -> str:
        for e in entries:
            if e["Service"]["ID"] == self.service_id:
                states = {c["Status"] for c in e.get("Checks", [])}
                for worst in ("critical", "warning", "maintenance"):
                    if worst in states:
                        return worst
                return "passing"
        return "missing"
