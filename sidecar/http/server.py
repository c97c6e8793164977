"""The sidecar's own read-only HTTP endpoints: ``/healthz``, ``/ready``, ``/status`` and ``/metrics``.

Bound to loopback, on a port the kernel picks (``127.0.0.1:0``) by default: a
fixed default port collides when two sidecars share a host, and 8501, the old
default, is Consul's own HTTPS port. The bound address is in the
``sidecar.status.listening`` event and in ``/status``. It serves what the
lifecycle records in a ``Status`` and never the configuration or the token.

Its sockets must never starve the sidecar's own: 1,100 idle connections under
``ulimit -n 1024`` once took every descriptor, and the deregistration failed
with "Too many open files". So the server is a small accept loop of its own
rather than aiohttp's (which keeps an idle connection open with no deadline
for its first request, ~5 KB each, and logs a traceback per failed accept):

- At most ``connection_cap()`` connections at once (32, fewer under a tiny
  ``RLIMIT_NOFILE``), leaving the rest of the descriptors to the Consul
  client. A new connection beyond the cap evicts the oldest one, so a flood
  of idle connections cannot lock a probe out for long.
- A connection has ``HEADER_TIMEOUT`` to send its request head (at most
  ``MAX_HEAD`` bytes) and to take the answer; every answer closes it. Memory
  per connection is bounded by that buffer; at most the cap are open.
- The loop yields after every accept, so a connection flood cannot starve the
  drain; a failed accept (EMFILE) is one ``sidecar.status.accept_failed`` line
  per cause every ``PROBLEM_INTERVAL`` with the number suppressed, then a
  short pause.
- It counts what it accepts (:meth:`StatusServer.own_opens`): in a network
  namespace of the app's own, the drain subtracts these from the namespace's
  PassiveOpens, so a monitoring scrape of ``/status`` does not hold the drain.
- ``raise_nofile_limit`` raises the soft descriptor limit to the hard one at
  start (after the app is spawned, so the app keeps the platform's limits).
"""

from __future__ import annotations

import json
import resource
import socket
import struct
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..process.listener import bind_listener
from ..redact import read_secrets, scrub

if TYPE_CHECKING:
    # At run time the server's methods import asyncio: check-config imports this module for
    # listen_warnings alone and answers faster without it (tests/test_cli_imports.py).
    import asyncio

    from structlog.typing import FilteringBoundLogger

    from ..state import Status
    from .etcd_view import EtcdView
    from .readiness import Readiness

DEFAULT_LISTEN = "127.0.0.1:0"
MAX_CONNECTIONS = 32
RESERVED_FDS = 64  # descriptors kept for everything but the status server (Consul client, probes, the app's pipes)
HEADER_TIMEOUT = 5.0  # seconds a client has to send its request head and take the answer
MAX_HEAD = 8192  # bytes of request line and headers
PROBLEM_INTERVAL = 10.0  # seconds: one line per cause of trouble, at most
# Consul's conventional ports (server RPC, Serf LAN/WAN, HTTP, HTTPS, gRPC, gRPC TLS, DNS).
CONSUL_PORTS = {
    8300: "server RPC",
    8301: "Serf LAN",
    8302: "Serf WAN",
    8500: "HTTP API",
    8501: "HTTPS API",
    8502: "gRPC",
    8503: "gRPC TLS",
    8600: "DNS",
}


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a busy port fails before anything starts."""
    sock = bind_listener(host, port, backlog=64)
    sock.setblocking(False)
    return sock


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard != resource.RLIM_INFINITY and soft > hard):
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # RLIM_INFINITY above the kernel's nr_open: keep what we have
        return soft, soft
    return soft, hard


def connection_cap() -> int:
    """Connections the status server may hold at once: far below the descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, (soft - RESERVED_FDS) // 4))


def listen_warnings(host: str, port: int, consul_address: str) -> list[str]:
    """Problems with a status.listen address that still binds: the agent's own address, Consul's ports."""
    out = []
    u = urllib.parse.urlsplit(consul_address)
    try:
        agent_port = u.port or (8501 if u.scheme == "https" else 8500)
    except ValueError:
        agent_port = None
    local = {"localhost": "127.0.0.1", "ip6-localhost": "::1"}
    agent_host = local.get((u.hostname or "").lower(), u.hostname or "")
    mine = local.get(host.lower(), host)
    if u.scheme in ("http", "https") and port == agent_port and (mine == agent_host or mine in ("0.0.0.0", "::", "")):
        out.append(
            f"status.listen {host}:{port} is the Consul agent's address (consul.address = {consul_address!r}): "
            "the sidecar cannot listen there while the agent runs, and takes the agent's port if it starts first"
        )
    elif port in CONSUL_PORTS:
        out.append(
            f"status.listen {host}:{port}: {port} is Consul's conventional {CONSUL_PORTS[port]} port; a local "
            f"Consul agent may need it (use port 0 for any free port, the default)"
        )
    return out


_TCPI_UNACKED = struct.Struct("=I")  # struct tcp_info at offset 24 (linux/tcp.h): a listener's accept queue length

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class StatusServer:
    """``GET /healthz``, ``/ready``, ``/status`` and ``/metrics`` over HTTP/1.1, one request per connection,
    bounded in every resource."""

    def __init__(
        self,
        status: Status,
        sock: socket.socket,
        log: FilteringBoundLogger | None = None,
        max_connections: int | None = None,
        header_timeout: float = HEADER_TIMEOUT,
        readiness: Readiness | None = None,
        request_errors: Mapping[str, int] | None = None,
        secrets: Callable[[], Iterable[str]] = lambda: (),
        etcd: EtcdView | None = None,
    ) -> None:
        """``readiness`` answers /ready (default: by the lifecycle's state alone); ``request_errors``
        is the Consul client's live count of failed requests by operation, for /metrics; ``secrets``
        (the token as the logs' scrubber has it): no error text /status shows may carry one; ``etcd``:
        the etcd adapter's view, with ``registry.kind = "etcd"`` (/status and /metrics show it instead
        of what is Consul's alone)."""
        self.status = status
        self.etcd = etcd
        self.secrets = secrets
        if readiness is None:
            from .readiness import Readiness

            readiness = Readiness(status, None)
        self.readiness = readiness
        self.request_errors = request_errors
        self.sock = sock
        if log is None:
            from .. import log as _log  # here, not at the top: check-config imports this module without structlog

            log = _log.get_logger()
        self.log = log
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._conns: dict[asyncio.Task[None], socket.socket] = {}  # in accept order: the first is the oldest
        self._accepting: asyncio.Task[None] | None = None
        self._evicted = 0
        self._accepted = 0
        self._problems: dict[str, tuple[float, int]] = {}  # cause -> (last logged, suppressed since)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def connections(self) -> int:
        return len(self._conns)

    def own_opens(self) -> int:
        """Connections the kernel has completed on this server's socket so far: those accepted, plus those
        waiting in its accept queue (``tcpi_unacked`` of a listener is its queue's length), as PassiveOpens
        counts them. Never raises: an unreadable queue counts as empty (the drain then only waits longer)."""
        queued = 0
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
            if len(info) >= 28:
                queued = _TCPI_UNACKED.unpack_from(info, 24)[0]
        except OSError:
            pass
        return self._accepted + queued

    async def start(self) -> None:
        import asyncio

        if self.max_connections is None:
            self.max_connections = connection_cap()  # after the limit was raised
        self._accepting = asyncio.create_task(self._accept_loop())

    async def stop(self) -> None:
        import asyncio

        tasks = [t for t in (self._accepting, *self._conns) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sock.close()

    # --- accepting ------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        assert self.max_connections is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
                self._accepted += 1
            except OSError as e:
                # EMFILE/ENFILE: the pending connection stays queued; pause so the loop does not spin on it.
                self._problem(
                    "accept_failed",
                    "sidecar.status.accept_failed",
                    error=f"{type(e).__name__}: {e}",
                    hint="out of descriptors or memory; the status server pauses 0.5s",
                )
                await asyncio.sleep(0.5)
                continue
            if len(self._conns) >= self.max_connections:
                oldest = next(iter(self._conns))
                self._close(oldest)
                self._evicted += 1
                self._problem(
                    "connection_limit",
                    "sidecar.status.connection_limit",
                    max_connections=self.max_connections,
                    evicted_total=self._evicted,
                    hint="clients keep connections open without a request; the oldest are closed",
                )
            conn.setblocking(False)
            task = asyncio.create_task(self._serve(conn))
            self._conns[task] = conn
            task.add_done_callback(self._forget)
            await asyncio.sleep(0)  # a flood of connections must not starve the lifecycle

    def _close(self, task: asyncio.Task[None]) -> None:
        conn = self._conns.pop(task, None)
        task.cancel()
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the peer sees the end now; the task closes the fd when it runs
            except OSError:
                pass

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._conns.pop(task, None)

    def _problem(self, cause: str, event: str, **fields: Any) -> None:
        now = self.status.clock.monotonic()
        last, suppressed = self._problems.get(cause, (float("-inf"), 0))
        if now - last < PROBLEM_INTERVAL:
            self._problems[cause] = (last, suppressed + 1)
            return
        self._problems[cause] = (now, 0)
        self.log.warning(event, suppressed=suppressed or None, **fields)

    # --- one connection -------------------------------------------------------------------

    async def _serve(self, conn: socket.socket) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.header_timeout):
                code, ctype, body, head_only = await self._answer(conn)
                head = (
                    f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    f"Cache-Control: no-store\r\nConnection: close\r\n"
                )
                if code == 405:
                    head += "Allow: GET, HEAD\r\n"
                await loop.sock_sendall(conn, head.encode() + b"\r\n" + (b"" if head_only else body))
                if code == 431:
                    # Unread request bytes would turn our close into a reset that discards the answer:
                    # end our side, then read (and drop) what the client still sends, within the timeout.
                    conn.shutdown(socket.SHUT_WR)
                    discarded = 0
                    while discarded < 16 * MAX_HEAD and (data := await loop.sock_recv(conn, 4096)):
                        discarded += len(data)
        except (TimeoutError, OSError):
            pass  # a slow or vanished client: nothing to answer
        finally:
            conn.close()

    async def _answer(self, conn: socket.socket) -> tuple[int, str, bytes, bool]:
        import asyncio

        loop = asyncio.get_running_loop()
        buf = b""
        while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
            if len(buf) > MAX_HEAD:
                return 431, "text/plain", b"request head too large\n", False
            data = await loop.sock_recv(conn, 4096)
            if not data:
                raise ConnectionResetError("closed before a complete request")
            buf += data
        parts = buf.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "text/plain", b"bad request\n", False
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", False
        head_only = method == b"HEAD"
        if target == b"/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n", head_only
        if target == b"/ready":
            verdict = await self.readiness.check()
            body = json.dumps(verdict.as_json()).encode()
            return (200 if verdict.ready else 503), "application/json; charset=utf-8", body, head_only
        if target == b"/metrics":
            from .. import log as _log
            from ..state import DrainEnd
            from . import metrics

            text = metrics.render(
                self.status,
                request_errors=self.request_errors,
                log_lines_dropped=_log.dropped_total(),
                drain_end_reasons=[e.value for e in DrainEnd],
                etcd=self.etcd.status_view() if self.etcd is not None else None,
            )
            return 200, metrics.CONTENT_TYPE, text, head_only
        if target == b"/status":
            doc = self.status.as_json()
            if self.etcd is not None:
                from .etcd_view import status_doc

                doc = status_doc(doc, self.status, self.etcd)
            secrets = read_secrets(self.secrets)
            if doc["last_error"] is not None:
                doc["last_error"] = scrub(doc["last_error"], secrets)
            if doc.get("hot_restart", {}).get("last_error") is not None:
                doc["hot_restart"]["last_error"] = scrub(doc["hot_restart"]["last_error"], secrets)
            doc["status_server"] = {
                "listen": self.address,
                "connections": len(self._conns),
                "max_connections": self.max_connections,
                "evicted_total": self._evicted,
            }
            from .. import log as _log

            doc["log"] = {"dropped_lines": _log.dropped_total()}
            return 200, "application/json; charset=utf-8", json.dumps(doc).encode(), head_only
        return 404, "text/plain", b"not found\n", head_only
