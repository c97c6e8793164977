#!/usr/bin/env python3
"""A small aiohttp HTTP service used by the consul-sidecar tests and demos.

Endpoints:
  GET /healthz           200 "ok", or 503 (see --healthy-after / --unhealthy)
  GET /                  200 "<instance> <version>\\n"
  GET /slow?seconds=S    sleeps S seconds (default 2), then 200 like /
Every response carries the headers ``X-Backend: <instance> <version>`` and ``X-Pid: <pid>``.

Socket activation (systemd's protocol, as consul-sidecar's hot restart uses it): when LISTEN_PID is
this process's PID and LISTEN_FDS >= 1, it serves the listening socket on fd 3 instead of binding
--host/--port. With NOTIFY_SOCKET set it sends READY=1 once serving and STOPPING=1 when its graceful
stop begins.

On SIGTERM or SIGINT the app shuts down gracefully, like Go's
http.Server.Shutdown: it closes the listening socket at once (after the
optional --drain-seconds), lets in-flight requests finish (bounded by 30 s),
closes idle keep-alive connections and exits with --exit-code.

Only aiohttp and the standard library are used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from aiohttp import web

# Upper bound on how long in-flight requests may take to finish on shutdown.
SHUTDOWN_TIMEOUT_SECONDS: float = 30.0
# After the listener is closed: how long a connection accepted just before may take to send its request.
FIRST_REQUEST_GRACE_SECONDS: float = 1.0

# Signals that are written to --signal-log.
RECORDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)

# Signals that start a graceful shutdown.
SHUTDOWN_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def log(message: str) -> None:
    """Write one line to stderr; a log nobody reads any more (a closed pipe) is not a reason to fail."""
    try:
        # One write for the whole line: print() writes the text and the newline separately, and the
        # sidecar (which shares this stderr) could write its own line in between.
        sys.stderr.write(f"app: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Small HTTP service used by consul-sidecar tests and demos.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="listen port (default 8080; 0 = any free port)")
    parser.add_argument("--version", default="v1", help='version string reported by the app (default "v1")')
    parser.add_argument("--instance", default=None, help='instance name (default "<host>:<port>")')
    parser.add_argument(
        "--healthy-after",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="/healthz answers 503 until SECONDS after start (default 0)",
    )
    parser.add_argument("--pid-file", default=None, help="write the process ID to this file once listening")
    parser.add_argument("--unhealthy", action="store_true", help="/healthz always answers 503")
    parser.add_argument(
        "--exit-code", type=int, default=0, metavar="N", help="exit status after a graceful shutdown (default 0)"
    )
    parser.add_argument(
        "--ignore-sigterm", action="store_true", help="ignore SIGTERM entirely (it is still recorded in --signal-log)"
    )
    parser.add_argument(
        "--crash-after",
        type=non_negative_float,
        default=None,
        metavar="SECONDS",
        help="exit on its own after SECONDS with --crash-code (via os._exit)",
    )
    parser.add_argument(
        "--crash-code", type=int, default=3, metavar="N", help="exit status used by --crash-after (default 3)"
    )
    parser.add_argument(
        "--signal-log",
        default=None,
        metavar="PATH",
        help="append 'NAME MONOTONIC' for every signal received (fsynced)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="after SIGTERM/SIGINT keep serving this long before closing the listener (default 0)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port out of range: {args.port}")
    return args


class SignalLog:
    """Appends one fsynced line per received signal to a file."""

    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115  # open for the app's life; close() ends it

    def record(self, sig: signal.Signals, when: float) -> None:
        self._file.write(f"{sig.name} {when:.6f}\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class AppState:
    """Mutable runtime state shared by the handlers and the main coroutine."""

    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args = args
        self.started: float = started
        self.unhealthy: bool = bool(args.unhealthy)
        self.healthy_after: float = float(args.healthy_after)
        self.stop_requested: asyncio.Event = asyncio.Event()
        self.stop_signal: signal.Signals | None = None
        self.stop_via: str = "?"
        self.health_status: int | None = None  # forced /healthz status (POST /health)
        self.health_delay: float = 0.0
        # "<instance> <version>"; set once the listening port is known.
        self.backend: str = ""

    def healthy(self) -> bool:
        if self.unhealthy:
            return False
        return time.monotonic() - self.started >= self.healthy_after


STATE_KEY: web.AppKey[AppState] = web.AppKey("state", AppState)


async def handle_healthz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.health_delay > 0:
        await asyncio.sleep(state.health_delay)
    if state.health_status is not None:
        return web.Response(status=state.health_status, text=f"forced {state.health_status}")
    if state.healthy():
        return web.Response(text="ok")
    return web.Response(status=503, text="unhealthy")


async def handle_root(request: web.Request) -> web.Response:
    return web.Response(text=f"{request.app[STATE_KEY].backend}\n")


async def handle_slow(request: web.Request) -> web.Response:
    raw = request.query.get("seconds", "2")
    try:
        seconds = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"invalid seconds: {raw!r}\n") from None
    if not seconds >= 0.0:
        raise web.HTTPBadRequest(text=f"invalid seconds: {raw!r}\n")
    await asyncio.sleep(seconds)
    return web.Response(text=f"{request.app[STATE_KEY].backend} slept {seconds:g}s\n")


async def handle_set_health(request: web.Request) -> web.Response:
    """POST /health?status=500&delay=2: from now on /healthz answers that status after that delay
    (status=auto returns to the normal behaviour). For fault tests."""
    state = request.app[STATE_KEY]
    status = request.query.get("status", "auto")
    try:
        state.health_status = None if status == "auto" else int(status)
        state.health_delay = float(request.query.get("delay", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="status must be a number or auto, delay a number\n") from None
    return web.Response(text=f"health: status={status} delay={state.health_delay:g}s\n")


async def handle_shutdown(request: web.Request) -> web.Response:
    """POST /shutdown: the same graceful shutdown as SIGTERM (for alongside mode's shutdown_url)."""
    state = request.app[STATE_KEY]
    if state.stop_signal is None:
        state.stop_via = "POST /shutdown"
    state.stop_requested.set()
    return web.Response(status=202, text="shutting down\n")


async def add_backend_header(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare also runs for HTTP errors raised by handlers and
    # for aiohttp's own 404/405 answers, so every response carries the header.
    response.headers["X-Backend"] = request.app[STATE_KEY].backend
    response.headers["X-Pid"] = str(os.getpid())  # which generation answered (hot restart)


def make_app(state: AppState) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/", handle_root)
    app.router.add_get("/slow", handle_slow)
    app.router.add_post("/shutdown", handle_shutdown)
    app.router.add_post("/health", handle_set_health)
    app.on_response_prepare.append(add_backend_header)
    return app


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    state: AppState,
    signal_log: SignalLog | None,
) -> None:
    ignore_sigterm: bool = state.args.ignore_sigterm

    def on_signal(sig: signal.Signals) -> None:
        now = time.monotonic()
        if signal_log is not None:
            try:
                signal_log.record(sig, now)
            except OSError as exc:
                log(f"cannot write signal log: {exc}")
        if sig in SHUTDOWN_SIGNALS and not (sig == signal.SIGTERM and ignore_sigterm):
            if state.stop_signal is None:
                state.stop_signal = sig
            state.stop_requested.set()

    for sig in RECORDED_SIGNALS:
        if sig == signal.SIGTERM and ignore_sigterm and signal_log is None:
            # Nothing to record: let the kernel drop it.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            continue
        loop.add_signal_handler(sig, on_signal, sig)


def backend_label(args: argparse.Namespace, port: int) -> str:
    """The "<instance> <version>" string used in bodies and X-Backend."""
    instance: str = args.instance if args.instance is not None else f"{args.host}:{port}"
    return f"{instance} {args.version}"


LISTEN_FDS_START = 3


def activated_socket() -> socket.socket | None:
    """The listening socket passed by socket activation, or None (then --host/--port are bound)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for our own children
        os.environ.pop(name, None)
    sock = socket.socket(fileno=LISTEN_FDS_START)
    os.set_inheritable(LISTEN_FDS_START, False)
    return sock


def sd_notify(message: str) -> None:
    """One datagram to NOTIFY_SOCKET if set (a path, or @name for an abstract one); never fails the app."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), target)
    except OSError as exc:
        log(f"cannot notify {address}: {exc}")


def crash(code: int, after: float) -> None:
    log(f"crashing after {after:g}s with status {code}")
    os._exit(code)


def _awaiting_first_request(conn: Any) -> bool:
    """An accepted connection that has not delivered a request yet (aiohttp's RequestHandler)."""
    return (
        getattr(conn, "_request_count", 1) == 0
        and not getattr(conn, "_messages", True)
        and not getattr(conn, "_request_in_progress", True)
    )


async def shutdown(runner: web.AppRunner) -> None:
    """Graceful shutdown, like Go's http.Server.Shutdown.

    The listening socket closes at once; once connections accepted just
    before have sent their request (at most FIRST_REQUEST_GRACE_SECONDS),
    runner.cleanup() closes idle
    keep-alive connections, marks busy ones to close after their current
    response and waits for in-flight handlers.  aiohttp may wait up to twice
    its shutdown_timeout (once for the handler, once more for the connection
    task) and does not cancel a handler that overruns, so the overall
    SHUTDOWN_TIMEOUT_SECONDS bound is enforced here; connections still open
    after it are closed forcibly and leftover handlers are cancelled when
    asyncio.run() finishes.
    """
    server = runner.server
    # Stop accepting first, then let connections that have sent no request yet deliver it:
    # runner.cleanup() closes them as idle, unanswered. Under load some were accepted in the instant
    # before the signal, and with a listening socket shared with the next generation (hot restart)
    # they are ours, not queued for it. Bounded: a client that never sends costs at most the grace.
    for site in list(runner.sites):
        await site.stop()
    deadline = time.monotonic() + FIRST_REQUEST_GRACE_SECONDS
    # asyncio accepts a batch in one callback and makes each one's protocol a few loop turns later:
    # let those join server.connections before it is looked at.
    await asyncio.sleep(0.05)
    while server is not None and any(_awaiting_first_request(c) for c in server.connections):
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.01)
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT_SECONDS):
            await runner.cleanup()
    except TimeoutError:
        log(f"in-flight requests still running after {SHUTDOWN_TIMEOUT_SECONDS:g}s; closing them")
        if server is not None:
            for conn in server.connections:
                conn.force_close()


async def serve(args: argparse.Namespace, started: float) -> int:
    loop = asyncio.get_running_loop()
    state = AppState(args, started)

    signal_log: SignalLog | None = None
    if args.signal_log is not None:
        try:
            signal_log = SignalLog(args.signal_log)
        except OSError as exc:
            log(f"cannot open signal log {args.signal_log!r}: {exc}")
            return 1

    # Install the handlers before binding, so that a signal sent as soon as
    # the port is open is never lost (or fatal, for SIGHUP/SIGUSR*).
    install_signal_handlers(loop, state, signal_log)

    if args.crash_after is not None:
        loop.call_later(args.crash_after, crash, args.crash_code, args.crash_after)

    app = make_app(state)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    state.backend = backend_label(args, args.port)
    inherited = activated_socket()
    tcp_site = web.TCPSite(runner, args.host, args.port)
    site: web.BaseSite = web.SockSite(runner, inherited) if inherited is not None else tcp_site
    try:
        await site.start()
    except OSError as exc:
        log(f"cannot listen on {args.host}:{args.port}: {exc}")
        await runner.cleanup()
        if signal_log is not None:
            signal_log.close()
        return 1

    port = inherited.getsockname()[1] if inherited is not None else tcp_site.port
    # With --port 0 the real port is only known now.
    state.backend = backend_label(args, port)

    if args.pid_file:
        with open(args.pid_file, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    how = " (socket activation, fd 3)" if inherited is not None else ""
    log(f"listening on {args.host}:{port}{how} version {args.version} backend {state.backend!r} pid {os.getpid()}")
    sd_notify(f"READY=1\nSTATUS=serving {state.backend}\nMAINPID={os.getpid()}")

    await state.stop_requested.wait()
    sig_name = state.stop_signal.name if state.stop_signal is not None else state.stop_via
    sd_notify("STOPPING=1")

    if args.drain_seconds > 0:
        # Keep serving (listener still open) while the app "drains" itself.
        await asyncio.sleep(args.drain_seconds)

    await shutdown(runner)

    if signal_log is not None:
        signal_log.close()
    log(f"exiting with status {args.exit_code} after {sig_name}")
    return int(args.exit_code)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    return asyncio.run(serve(args, started))


if __name__ == "__main__":
    sys.exit(main())
