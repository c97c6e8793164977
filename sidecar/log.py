"""Structured logs: JSON lines for machines, readable lines on a terminal; writing them never blocks.

Every lifecycle step logs one event with a stable dotted name
(``sidecar.consul.deregistered``), the service ID and ``elapsed_ms``. A last
processor removes the ACL token from anything about to be written, as a
safety net behind the rule that no code path logs it.

Why a writer thread. stderr is usually a pipe the app shares (in wrapper mode
the child inherits fd 2), read by a log shipper that may stall. A plain
``write`` then blocks the event loop for as long as the reader stalls, and a
sidecar blocked there never deregisters. So the event loop only appends the
rendered line to a bounded in-memory queue (``emit``: a lock and a deque
append, ~10 us here) and one daemon thread does the blocking writes:

- Lines that do not fit in the queue (``BUDGET`` bytes; debug lines may use
  only three quarters of it, so a debug flood cannot push out the drain's own
  events) are dropped and counted. The queue keeps a marker where the gap is;
  when the writer reaches it, the pipe has accepted data again, and it writes
  one ``sidecar.log.dropped`` line there with the count. ``/status`` shows the
  total (``dropped_total()``).
- The file description is left as it is. ``O_NONBLOCK`` is a flag of the open
  file description, which a ``dup`` and the app's inherited fd 2 share:
  setting it would make the app's own writes fail with EAGAIN. The
  alternatives measured on this machine (Linux 6.18) each fail one common
  case: reopening ``/proc/self/fd/2`` gives a separate description for a pipe
  but ENXIO for a socket (journald's stdout stream is one), and for a file
  opened without O_APPEND a description of its own starting at offset 0 that
  overwrites earlier output; ``pwritev2(RWF_NOWAIT)`` returns EAGAIN on a
  full pipe here but EOPNOTSUPP on older kernels and on terminals. A thread
  works for every kind of fd and kernel. If something else (a Node.js app
  does this) sets O_NONBLOCK on the shared description, the thread waits for
  writability with poll instead of losing lines.
- Writes are cut at line boundaries into chunks of at most PIPE_BUF bytes, so
  on a pipe no line of ours is interleaved with the app's output.
- The thread starts after the app is spawned (``start``): the launcher's
  ``preexec_fn`` runs between fork and exec, which is only safe in a process
  with a single thread. Lines logged before that wait in the queue.
- ``close`` gives the queue a bounded time to drain at exit (``CLOSE_TIMEOUT``,
  inside the one second the worst case keeps for the end); a stalled reader
  loses what is left, never the sidecar's exit.

Libraries log through the standard ``logging`` module (asyncio's "socket.accept()
out of system resource", aiohttp's errors): those records go through the same
queue as one line each, at most one per cause every ``LIBRARY_INTERVAL`` seconds
with the number suppressed, instead of multi-line tracebacks written
synchronously to stderr by logging's last-resort handler.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

from .redact import read_secrets, scrub

BUDGET = 256 * 1024  # bytes of log lines held while the reader stalls
DEBUG_SHARE = 0.75  # debug lines may fill only this share of BUDGET
CHUNK = 4096  # PIPE_BUF on Linux: a write up to this size is not interleaved with other writers'
CLOSE_TIMEOUT = 0.5  # seconds the queue may take to drain at exit
LIBRARY_INTERVAL = 10.0  # seconds: one line per library log cause, at most


def _scrubber(
    secrets: Callable[[], Iterable[str]],
) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    def scrub_event(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        found = read_secrets(secrets)  # an unreadable token file must not stop logging
        if found:
            for key, value in list(event.items()):
                if isinstance(value, str):
                    event[key] = scrub(value, found)
        return event

    return scrub_event


def _drop_none(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Fields that do not apply to this event (None) are left out of the line."""
    for key in [k for k, v in event.items() if v is None]:
        del event[key]
    return event


# --- the queue and its writer ---------------------------------------------------------


class _Gap:
    """Where lines were dropped, and how many in a row."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0  # dropped since start, up to the end of this gap


class QueueSink:
    """A bounded queue of rendered lines and the thread that writes them to ``fd``."""

    def __init__(self, fd: int, report: Callable[[int, int], str], budget: int = BUDGET) -> None:
        self._fd = fd
        self._report = report  # (dropped in this gap, dropped up to its end) -> the rendered report line
        self._budget = budget
        self._debug_budget = int(budget * DEBUG_SHARE)
        # Reentrant: a Python-level signal handler that logs may run while this thread is inside emit.
        self._cond = threading.Condition(threading.RLock())
        self._items: collections.deque[bytes | _Gap] = collections.deque()
        self._bytes = 0
        self._dropped = 0
        self._broken = False  # the reader is gone for good (EPIPE, EBADF): nothing can be written any more
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def dropped_total(self) -> int:
        return self._dropped

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def emit(self, data: bytes, important: bool = True) -> None:
        """Queue one line; never blocks (only for the lock, which no write holds)."""
        with self._cond:
            limit = self._budget if important else self._debug_budget
            if self._broken or self._bytes + len(data) > limit:
                self._dropped += 1
                if not self._broken:
                    last = self._items[-1] if self._items else None
                    if not isinstance(last, _Gap):
                        last = _Gap()
                        self._items.append(last)
                    last.count += 1
                    last.total = self._dropped
                return
            self._items.append(data)
            self._bytes += len(data)
            self._cond.notify()

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="sidecar-log-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Let the writer finish what is queued, for at most ``timeout``; True if everything was written."""
        self.start()
        with self._cond:
            self._closing = True
            self._cond.notify()
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _take(self) -> bytes | None:
        """The next chunk: whole lines up to CHUNK bytes (a longer line alone); None once closed and empty."""
        with self._cond:
            while not self._items:
                if self._closing or self._broken:
                    return None
                self._cond.wait()
            parts: list[bytes] = []
            size = 0
            while self._items:
                item = self._items[0]
                data = item if isinstance(item, bytes) else None
                if data is None:
                    assert isinstance(item, _Gap)
                    data = self._report(item.count, item.total).encode("utf-8", "backslashreplace")
                if parts and size + len(data) > CHUNK:
                    break
                self._items.popleft()
                if isinstance(item, bytes):
                    self._bytes -= len(data)
                parts.append(data)
                size += len(data)
            return b"".join(parts)

    def _run(self) -> None:
        while True:
            chunk = self._take()
            if chunk is None:
                return
            try:
                self._write_all(chunk)
            except OSError:
                with self._cond:
                    self._broken = True
                    self._dropped += sum(1 for i in self._items if isinstance(i, bytes))
                    self._items.clear()
                    self._bytes = 0
                return

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                # Someone set O_NONBLOCK on the shared description: wait for room instead of spinning.
                poller = select.poll()
                poller.register(self._fd, select.POLLOUT)
                poller.poll(1000)
                continue
            view = view[n:]


class StreamSink:
    """Synchronous writes to a stream without a file descriptor (tests' StringIO); errors are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.dropped_total = 0

    def emit(self, data: bytes, important: bool = True) -> None:
        try:
            self._stream.write(data.decode("utf-8", "replace"))
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped_total += 1

    def start(self) -> None:
        pass

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        return True


_sink: QueueSink | StreamSink | None = None


class _QueueLogger:
    """structlog's final logger: hands the rendered line to the sink, tagging debug lines as expendable."""

    def __init__(self, sink: QueueSink | StreamSink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.emit((message + "\n").encode("utf-8", "backslashreplace"), True)

    def debug(self, message: str) -> None:
        self._sink.emit((message + "\n").encode("utf-8", "backslashreplace"), False)

    log = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _LibraryHandler(logging.Handler):
    """Records of the standard ``logging`` module (libraries) as one structured line each, rate-limited per cause."""

    def __init__(self, interval: float = LIBRARY_INTERVAL) -> None:
        super().__init__(logging.WARNING)
        self._interval = interval
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}  # cause -> (last written, suppressed since)

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        cause = (record.name, str(record.msg), type(exc).__name__ if exc is not None else "")
        now = time.monotonic()
        last, suppressed = self._last.get(cause, (float("-inf"), 0))
        if now - last < self._interval:
            self._last[cause] = (last, suppressed + 1)
            return
        if len(self._last) > 256:  # causes come from a bounded set of call sites; keep it so anyway
            self._last.clear()
        self._last[cause] = (now, 0)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's bad format string must not break logging
            message = str(record.msg)
        logger = get_logger()
        (logger.error if record.levelno >= logging.ERROR else logger.warning)(
            "sidecar.library.log",
            logger=record.name,
            message=message,
            error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
            where=f"{record.pathname}:{record.lineno}",
            suppressed=suppressed or None,
        )


def configure(
    stream: TextIO = sys.stderr,
    fmt: str = "auto",
    level: str = "info",
    secrets: Callable[[], Iterable[str]] = lambda: (),
) -> None:
    """Set up structlog (and the standard logging module) to write through a non-blocking queue.

    The writer thread starts with ``start()``; until then lines wait in the queue."""
    global _sink
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)

    def report(count: int, total: int) -> str:
        event: MutableMapping[str, Any] = {
            "event": "sidecar.log.dropped",
            "dropped": count,
            "dropped_total": total,
            "reason": "the log's reader stalled and the sidecar's log buffer was full",
        }
        return (
            str(
                renderer(
                    None, "warning", stamp(None, "warning", structlog.processors.add_log_level(None, "warning", event))
                )
            )
            + "\n"
        )

    try:
        fd = os.dup(stream.fileno())  # our own fd (close-on-exec): the app never inherits it
    except (AttributeError, OSError, ValueError):
        _sink = StreamSink(stream)
    else:
        _sink = QueueSink(fd, report)
    sink = _sink
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            _drop_none,
            _scrubber(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: _QueueLogger(sink),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_LibraryHandler())
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings go through the queue too, not straight to stderr


def start() -> None:
    """Start the writer thread (call it once the app has been spawned)."""
    if _sink is not None:
        _sink.start()


def close(timeout: float = CLOSE_TIMEOUT) -> bool:
    """At exit: give queued lines up to ``timeout`` to be written."""
    return _sink.close(timeout) if _sink is not None else True


def dropped_total() -> int:
    """Lines dropped so far because the log's reader did not keep up."""
    return _sink.dropped_total if _sink is not None else 0


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """The sidecar's logger: what ``configure`` set up (``make_filtering_bound_logger``), or
    structlog's default, also a filtering bound logger, before it."""
    logger: FilteringBoundLogger = structlog.get_logger(**bound)
    return logger
