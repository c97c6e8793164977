"""Open-loop HTTP load client that counts failed requests exactly.

Request ``i`` is started at ``t0 + i / rate`` whatever happened to the
earlier ones (each request is its own task), so a stall on the server side
shows up as failed or slow requests instead of as fewer requests sent, as it
would with a closed loop.  If the client itself falls behind, the late
requests are started at once and still count; ``Record.scheduled`` and the
``lag_*`` fields of ``Summary`` tell how late they were.

Every request uses a new TCP connection (``force_close``), like nginx's
default towards its upstreams: keep-alive would hide connection-level
failures such as a refused connect.

CLI::

    python -m examples.rollout.loadgen URL --rate R --duration S [--csv FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import errno
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

# Longest single sleep of the scheduler, so that `stop` is noticed quickly
# even at low rates.
_MAX_SLEEP = 0.1
# Extra time, beyond the request timeout, to wait for in-flight requests
# after `stop` (the client timeout already bounds each request).
_DRAIN_GRACE = 1.0
# Longest exception message kept in Record.error.
_MAX_MESSAGE = 160

# Start lag above which the CLI warns that the run is not a clean open loop
# (Python's full garbage collections alone make the odd start 10-20 ms late).
LAG_WARNING_MS = 100.0

CSV_FIELDS: tuple[str, ...] = ("start", "latency", "status", "error", "backend", "scheduled")


@dataclass(frozen=True)
class Record:
    """One request."""

    # Seconds since the load began (time.monotonic() based) when the request
    # was actually started.
    start: float
    # Seconds from start until the response body was read or the error happened.
    latency: float
    # HTTP status, or None when an exception happened.
    status: int | None
    # "ExceptionClass: short message" (or just the class name), None on a response.
    error: str | None
    # The X-Backend response header, e.g. "127.0.0.2:8080 v1".
    backend: str | None
    # When the request was due by the schedule, seconds since the load began
    # (NaN when unknown, e.g. for records made elsewhere); start - scheduled
    # is the client's own lag.
    scheduled: float = math.nan

    @property
    def failed(self) -> bool:
        """An exception or a 5xx response."""
        return self.error is not None or self.status is None or self.status >= 500

    @property
    def failure_kind(self) -> str | None:
        """None for a completed request, else "HTTP 502", "ClientConnectorError", ..."""
        if self.error is not None:
            return self.error.split(":", 1)[0]
        if self.status is None:
            return "no status"
        if self.status >= 500:
            return f"HTTP {self.status}"
        return None

    @property
    def version(self) -> str | None:
        """The last word of X-Backend ("v1"), or None without the header."""
        if not self.backend:
            return None
        words = self.backend.split()
        return words[-1] if words else None


# Record's fields as a tuple.
_Row = tuple[float, float, int | None, str | None, str | None, float]


@dataclass(frozen=True)
class Summary:
    requests: int
    failed: int
    failure_rate: float
    # Latency percentiles over all requests (failed ones too), nearest rank;
    # NaN without requests.
    p50_ms: float
    p99_ms: float
    # Completed (not failed) requests by version, the last word of X-Backend;
    # "?" for completed responses without the header.
    by_version: dict[str, int] = field(default_factory=dict)
    # Failed requests by kind: "HTTP 502", "ClientConnectorError", ...
    errors: dict[str, int] = field(default_factory=dict)
    # How late requests were started compared to the schedule (client lag);
    # NaN when unknown.
    lag_p50_ms: float = math.nan
    lag_max_ms: float = math.nan


def _describe(exc: BaseException) -> str:
    """The exception as "Class: message", the message led by the errno name if
    any: "ClientConnectorError: ECONNREFUSED Cannot connect to host ..."."""
    name = type(exc).__name__
    message = " ".join(str(exc).split())
    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(code, int) and code in errno.errorcode:
        message = f"{errno.errorcode[code]} {message}".strip()
    if not message:
        return name
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return f"{name}: {message}"


async def run_load(
    url: str,
    rate: float,
    stop: asyncio.Event,
    timeout: float = 5.0,
    on_record: Callable[[Record], None] | None = None,
    *,
    t0: float | None = None,
) -> list[Record]:
    """GET ``url`` ``rate`` times per second on a fixed schedule until ``stop`` is set.

    Request i is started at ``t0 + i / rate``; late ones (the client fell
    behind) are started at once, none is skipped.  After ``stop`` no new
    request is started; the ones in flight get up to ``timeout`` (plus a
    second) to finish, and any still running then are cancelled and recorded
    as "CancelledError".  ``on_record`` is called as each request ends.

    ``t0`` is the ``time.monotonic()`` value the schedule and all ``start``
    times are relative to (default: when this coroutine begins); pass it to
    line up the records with marks taken on the same clock.

    Returns every record, sorted by start.
    """
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number: {rate!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive: {timeout!r}")

    clock = time.monotonic
    origin = clock() if t0 is None else t0
    # Results are kept as tuples of plain values, not as Records: the garbage
    # collector stops tracking such tuples, whereas every Record would make
    # each full collection slower (at 1000 req/s a 90 s run grew those pauses,
    # and so the start lag, to over 80 ms).
    results: list[_Row] = []
    in_flight: set[asyncio.Task[None]] = set()

    def finish(record: Record) -> None:
        results.append((record.start, record.latency, record.status, record.error, record.backend, record.scheduled))
        if on_record is not None:
            on_record(record)

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as session:
        # aiohttp silently retries an idempotent request once on a new
        # connection when the first one is reset or closed without a response
        # (ClientOSError, ServerDisconnectedError), even with force_close.
        # Such a retry would hide exactly the failures counted here, e.g. the
        # requests in flight when a backend dies.  No public switch exists;
        # aiohttp's own test client turns it off the same way.
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False

        async def one(scheduled: float) -> None:
            began = clock()
            start = began - origin
            status: int | None = None
            error: str | None = None
            backend: str | None = None
            try:
                async with session.get(url, allow_redirects=False) as response:
                    await response.read()
                    status = response.status
                    backend = response.headers.get("X-Backend")
            except asyncio.CancelledError:
                finish(
                    Record(
                        start,
                        clock() - began,
                        None,
                        "CancelledError: still running when the load stopped",
                        None,
                        scheduled,
                    )
                )
                raise
            except Exception as exc:  # every failure counts, whatever its kind
                error = _describe(exc)
                status = None
            finish(Record(start, clock() - began, status, error, backend, scheduled))

        try:
            i = 0
            while not stop.is_set():
                due = origin + i / rate
                delay = due - clock()
                if delay > 0:
                    # Sleep in short steps so that `stop` is seen at low rates too.
                    await asyncio.sleep(min(delay, _MAX_SLEEP))
                    continue
                task = asyncio.create_task(one(due - origin))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                i += 1
            if in_flight:
                _, pending = await asyncio.wait(set(in_flight), timeout=timeout + _DRAIN_GRACE)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            # Also when run_load itself is cancelled: leave no request behind.
            leftover = set(in_flight)
            for task in leftover:
                task.cancel()
            if leftover:
                await asyncio.gather(*leftover, return_exceptions=True)

    results.sort(key=lambda row: row[0])
    return [Record(*row) for row in results]


def _nearest_rank(sorted_values: Sequence[float], percent: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(percent / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(records: Iterable[Record], window: tuple[float, float] | None = None) -> Summary:
    """Counts, latency percentiles, versions and failure kinds.

    ``window=(a, b)`` keeps only the records whose start is in [a, b).
    """
    selected = [r for r in records if window is None or window[0] <= r.start < window[1]]
    latencies = sorted(r.latency * 1000.0 for r in selected)
    lags = sorted((r.start - r.scheduled) * 1000.0 for r in selected if not math.isnan(r.scheduled))
    by_version: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in selected:
        kind = r.failure_kind
        if kind is None:
            by_version[r.version or "?"] += 1
        else:
            errors[kind] += 1
    failed = sum(errors.values())
    n = len(selected)
    return Summary(
        requests=n,
        failed=failed,
        failure_rate=failed / n if n else 0.0,
        p50_ms=_nearest_rank(latencies, 50),
        p99_ms=_nearest_rank(latencies, 99),
        by_version=dict(sorted(by_version.items())),
        errors=dict(errors.most_common()),
        lag_p50_ms=_nearest_rank(lags, 50),
        lag_max_ms=lags[-1] if lags else math.nan,
    )


def write_csv(records: Iterable[Record], path: str | Path) -> None:
    """One row per request: start, latency, status, error, backend, scheduled (empty for None)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in records:
            writer.writerow(
                [
                    f"{r.start:.6f}",
                    f"{r.latency:.6f}",
                    "" if r.status is None else r.status,
                    r.error or "",
                    r.backend or "",
                    "" if math.isnan(r.scheduled) else f"{r.scheduled:.6f}",
                ]
            )


def read_csv(path: str | Path) -> list[Record]:
    """The records written by ``write_csv`` (empty cells read as None)."""
    out: list[Record] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            scheduled = row.get("scheduled") or ""
            out.append(
                Record(
                    start=float(row["start"]),
                    latency=float(row["latency"]),
                    status=int(row["status"]) if row["status"] else None,
                    error=row["error"] or None,
                    backend=row["backend"] or None,
                    scheduled=float(scheduled) if scheduled else math.nan,
                )
            )
    return out


def format_summary(summary: Summary) -> str:
    """The summary as a small two-column table."""

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    rows = [
        ("requests", str(summary.requests)),
        ("failed", str(summary.failed)),
        ("failure rate", f"{summary.failure_rate * 100:.3f} %"),
        ("latency p50", f"{summary.p50_ms:.1f} ms"),
        ("latency p99", f"{summary.p99_ms:.1f} ms"),
        ("start lag", f"p50 {summary.lag_p50_ms:.1f} ms, max {summary.lag_max_ms:.1f} ms"),
        ("by version", counts(summary.by_version)),
        ("errors", counts(summary.errors)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.rollout.loadgen",
        description="Open-loop HTTP load (a new connection per request); prints a summary.",
    )
    parser.add_argument("url", help="URL to GET")
    parser.add_argument("--rate", type=_positive_float, required=True, help="requests per second")
    parser.add_argument("--duration", type=_positive_float, required=True, help="seconds to keep starting requests")
    parser.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="per-request timeout in seconds (default 5)"
    )
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE", help="write one row per request to FILE")
    return parser.parse_args(argv)


async def _cli(args: argparse.Namespace) -> list[Record]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.call_later(args.duration, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C ends the load early
    return await run_load(args.url, args.rate, stop, timeout=args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    records = asyncio.run(_cli(args))
    summary = summarize(records)
    print(format_summary(summary))
    if summary.lag_max_ms > LAG_WARNING_MS:
        print(
            f"warning: the client fell up to {summary.lag_max_ms:.0f} ms behind its schedule;"
            " slow or failed requests may be the client's own doing",
            file=sys.stderr,
        )
    if args.csv is not None:
        write_csv(records, args.csv)
        print(f"wrote {len(records)} rows to {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
