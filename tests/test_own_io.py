"""The sidecar's own I/O never blocks or breaks the drain (issue 8, defects 2 and 4, and the status.listen default).

Real sidecars, a real Consul dev agent, real apps and real signals: a stderr pipe nobody reads
while the app fills it, a descriptor limit of 256 with more idle connections to the status port
than that, two sidecars on one host with the default status address.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import testkit
from sidecar.clock import SystemClock
from sidecar.http.server import StatusServer, bind
from sidecar.log import QueueSink
from sidecar.state import Status
from testkit import PY, ROOT, Consul, app_command, free_port, http_get, read_signal_log, wait_for
from testkit.suite import StartSidecar, base_config

F_SETPIPE_SZ = 1031

CHATTY_APP = r"""
import http.server, os, signal, sys, threading, time
port, sigfile, errfile = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers(); self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Healthz)
threading.Thread(target=server.serve_forever, daemon=True).start()

def chatter():
    line = b"app: a chatty line " + b"x" * 100 + b"\n"
    while True:
        try:
            os.write(2, line)  # blocking, as an app's logging is: it waits while the pipe is full
        except OSError as e:  # EAGAIN here would mean someone made our stderr non-blocking
            with open(errfile, "a") as f:
                f.write(repr(e) + "\n")
            time.sleep(0.1)
        time.sleep(0.0005)

threading.Thread(target=chatter, daemon=True).start()

def on_signal(sig, frame):
    with open(sigfile, "a") as f:
        f.write(f"{signal.Signals(sig).name} {time.monotonic():.6f}\n")
    threading.Timer(3.0, lambda: os._exit(0)).start()  # keeps serving 3 s, as a draining app does

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGUSR1, lambda *a: None)
while True:
    time.sleep(1)
"""


def sidecar_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def sidecar_argv(config_path: Path, command: list[str]) -> list[str]:
    return [
        PY,
        "-m",
        "sidecar",
        "run",
        "-c",
        str(config_path),
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--",
        *command,
    ]


class LimitedSidecar(testkit.Sidecar):
    """A harness Sidecar whose process runs under ``prlimit --nofile=N:N``."""

    def __init__(self, workdir: Path, config: dict[str, dict[str, Any]], command: list[str], nofile: int) -> None:
        self.workdir = workdir
        self.config_path = testkit.write_config(workdir / "limited-sidecar.toml", config)
        self.log = workdir / "limited-sidecar.log"
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *sidecar_argv(self.config_path, command)]
        self.proc = testkit.spawn(argv, self.log, sidecar_env())


def watch_drain(consul: Consul, name: str, sid: str, sigfile: Path, timeout: float) -> float:
    """Poll the agent, the catalog and the app's signal file until the app got SIGTERM; fail if the
    app was signalled while the instance was still registered. Returns when the instance was first seen gone."""
    gone_at: float | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        signalled = any(s == "SIGTERM" for s, _ in read_signal_log(sigfile))
        registered = consul.get(f"/v1/agent/service/{sid}") is not None or sid in consul.service_ids(name)
        if signalled:
            assert gone_at is not None and not registered, (
                "the app was signalled while its instance was still registered"
            )
            return gone_at
        if not registered and gone_at is None:
            gone_at = time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"within {timeout}s: instance gone={gone_at is not None}, app signalled=False")


def pipe_bytes(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


@pytest.mark.parametrize("reader_returns", [True, False], ids=["reader-returns", "reader-never-returns"])
def test_stalled_stderr_pipe_does_not_block_the_drain(
    consul: Consul, tmp_path: Path, service_name: str, reader_returns: bool
) -> None:
    """Defect 2. The sidecar's stdout and stderr are a pipe nobody reads; the app (sharing it) fills it.
    1. Registered and passing; the pipe is full. SIGUSR1s make the sidecar log (one debug line each)
       until /status reports dropped log lines.
    2. SIGTERM: the instance leaves the agent and the catalog, then the app gets SIGTERM (never before).
    3. reader-returns: only then the pipe is read. The sidecar exits 0 within its worst case (15 s),
       the output has sidecar.log.dropped lines whose counts add up, the drain's events survived the
       debug flood, and the app's own blocking writes never failed (its stderr was not made non-blocking).
       reader-never-returns: the sidecar exits 0 within its worst case all the same."""
    app_port, status_port = free_port(), free_port()
    sid = f"{service_name}-1"
    script = tmp_path / "chatty_app.py"
    script.write_text(CHATTY_APP)
    sigfile, errfile = tmp_path / "app-signals", tmp_path / "app-write-errors"
    cfg = base_config(
        consul,
        service_name,
        app_port,
        status={"listen": f"127.0.0.1:{status_port}"},
        shutdown={"propagation_delay": "1s", "app_timeout": "10s", "deregister_timeout": "3s"},
    )
    config_path = testkit.write_config(tmp_path / "sidecar.toml", cfg)
    worst_case = 3 + 1 + 10 + 1
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        sidecar_argv(config_path, [PY, str(script), str(app_port), str(sigfile), str(errfile)]),
        stdin=subprocess.DEVNULL,
        stdout=w,
        stderr=w,
        start_new_session=True,
        env=sidecar_env(),
    )
    testkit.track(proc)
    os.close(w)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: _read_to_eof(r, chunks), daemon=True)
    try:
        wait_for(lambda: consul.get(f"/v1/health/service/{service_name}?passing=1"), 20, 0.05, "registered and passing")
        wait_for(lambda: pipe_bytes(r) >= 4096 - 200, 10, 0.05, "the app to fill the pipe")
        status_url = f"http://127.0.0.1:{status_port}/status"

        def dropped() -> int:
            with contextlib.suppress(OSError, ValueError):
                return int(json.loads(http_get(status_url, timeout=1)[1]).get("log", {}).get("dropped_lines", 0))
            return 0

        flood_until = time.monotonic() + 10
        while time.monotonic() < flood_until:
            for _ in range(200):
                os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(0.0005)
            if dropped() > 0:
                break
        dropped_before_sigterm = dropped()
        assert pipe_bytes(r) >= 4096 - 200, "the test must keep the pipe full until after the drain"

        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        watch_drain(consul, service_name, sid, sigfile, timeout=3 + 1 + 5)
        assert dropped_before_sigterm > 0, "/status reported no dropped log lines although the pipe was full"
        if reader_returns:
            reader.start()  # the log shipper comes back
        code = proc.wait(timeout=worst_case + 5)
        elapsed = time.monotonic() - t_term
        if not reader_returns:
            assert pipe_bytes(r) >= 4096 - 200, "the pipe was read although nobody reads it"
            reader.start()
        reader.join(10)
    finally:
        if not reader.is_alive():
            with contextlib.suppress(OSError):
                os.close(r)
    assert code == 0
    assert elapsed <= worst_case, f"the sidecar took {elapsed:.1f}s, worst case {worst_case}s"
    assert consul.service_ids(service_name) == []
    assert not errfile.exists(), f"the app's own writes failed: {errfile.read_text()}"
    if not reader_returns:
        return
    events = [json.loads(line) for line in b"".join(chunks).splitlines() if line.startswith(b'{"')]
    names = [e["event"] for e in events]
    reports = [e for e in events if e["event"] == "sidecar.log.dropped"]
    assert reports, "no sidecar.log.dropped line once the pipe drained"
    assert all(e["dropped"] > 0 for e in reports) and reports[-1]["dropped_total"] == sum(e["dropped"] for e in reports)
    for name in ("sidecar.signal.received", "sidecar.consul.deregistered", "sidecar.app.stopped", "sidecar.stopped"):
        assert name in names, f"{name} was lost in the debug flood"


def _read_to_eof(fd: int, out: list[bytes]) -> None:
    """Drain the pipe; keep only the sidecar's JSON lines (the app writes MBs)."""
    rest = b""
    while True:
        data = os.read(fd, 65536)
        if not data:
            break
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        out.extend(line + b"\n" for line in lines if line.startswith(b'{"'))
    os.close(fd)


@contextlib.contextmanager
def idle_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """n TCP connections to the port that never send a byte (non-blocking connects: none waits)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_status_connections_cannot_exhaust_descriptors(consul: Consul, tmp_path: Path, service_name: str) -> None:
    """Defect 4. The sidecar runs with RLIMIT_NOFILE 256:256 (nothing to raise to) and 600 idle
    connections are opened to its status port and kept open.
    1. The sidecar holds far fewer descriptors than its limit, and /healthz still answers.
    2. SIGTERM: the deregistration is confirmed, the instance leaves the agent and the catalog,
       the app gets SIGTERM only after that, the sidecar exits 0, nothing stays registered.
    3. The log has no traceback and no non-JSON line; status-server trouble is a few lines, not thousands."""
    assert os.sysconf("SC_OPEN_MAX") > 1000, "the test process itself needs the descriptors"
    port = free_port()
    sid = f"{service_name}-1"
    sigfile = tmp_path / "app-signals"
    cfg = base_config(
        consul,
        service_name,
        port,
        shutdown={"propagation_delay": "1s", "app_timeout": "10s", "deregister_timeout": "3s"},
        startup={"timeout": "60s"},
    )
    sc = LimitedSidecar(tmp_path, cfg, app_command(port, "127.0.0.1", "--signal-log", str(sigfile)), nofile=256)
    # A safety bound, not a timing claim: once, beside the 50-sidecar fleet test in the other test
    # worker, the app took over 20 s to start listening.
    sc.wait_event("sidecar.consul.registered", 60)
    status = sc.status_url()
    status_port = int(status.rsplit(":", 1)[1])
    with idle_connections(status_port, 600):
        time.sleep(2)  # let the server take what it will
        held = open_fds(sc.pid)
        try:
            healthz: int | str = http_get(status + "/healthz", timeout=3)[0]
        except OSError as e:
            healthz = str(e)
        sc.send(signal.SIGTERM)
        watch_drain(consul, service_name, sid, sigfile, timeout=3 + 1 + 5)
        assert sc.wait(20) == 0
    assert held <= 128, f"the sidecar held {held} descriptors of its 256"
    assert healthz == 200, f"/healthz under the flood: {healthz}"
    dereg = sc.event("sidecar.consul.deregistered")
    assert dereg is not None, sc.output()[-3000:]
    assert consul.service_ids(service_name) == [] and consul.get(f"/v1/agent/service/{sid}") is None
    out = sc.output()
    assert "Traceback" not in out and "Too many open files" not in out
    stray = [line for line in out.splitlines() if line and not line.startswith(("{", "app: "))]
    assert not stray, f"non-JSON lines: {stray[:5]}"
    trouble = [
        e
        for e in sc.events()
        if e["event"].startswith(("sidecar.status.", "sidecar.library.")) and e["level"] != "info"
    ]
    assert len(trouble) <= 5, [e["event"] for e in trouble]


def test_two_sidecars_on_one_host_with_the_default_status_address(consul: Consul, start_sidecar: StartSidecar) -> None:
    """No [status] section in either configuration: both sidecars start (the default port cannot
    collide), each logs its own bound address in sidecar.status.listening and /status shows it."""
    addresses = []
    for i in (1, 2):
        name = f"defaultstatus{i}"
        port = free_port()
        cfg = base_config(consul, name, port)
        del cfg["status"]
        sc = start_sidecar(cfg, app_command(port))
        sc.wait_event("sidecar.consul.registered", 20)
        url = sc.status_url()
        st = json.loads(http_get(url + "/status")[1])
        assert st["state"] == "registered" and "http://" + st["status_server"]["listen"] == url
        addresses.append(url)
    assert addresses[0] != addresses[1]


@pytest.mark.integration
def test_check_config_warns_when_status_listen_is_the_agents_address(tmp_path: Path) -> None:
    """status.listen = the agent's address (consul.address): check-config passes with one warning naming
    both; Consul's conventional port 8501 gets a warning of its own; the default gets neither and says
    the port is chosen at start."""

    def check(extra: str) -> subprocess.CompletedProcess[str]:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            '[consul]\naddress = "http://127.0.0.1:8500"\n[service]\nname = "web"\nport = 8080\n'
            'address = "127.0.0.1"\n' + extra
        )
        return subprocess.run(
            [PY, "-m", "sidecar", "check-config", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=sidecar_env(),
        )

    r = check('[status]\nlisten = "127.0.0.1:8500"\n')
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "127.0.0.1:8500" in warnings[0] and "Consul agent's address" in warnings[0], r.stderr
    r = check('[status]\nlisten = "0.0.0.0:8500"\n')
    assert "Consul agent's address" in r.stderr, r.stderr
    r = check('[status]\nlisten = "127.0.0.1:8501"\n')
    assert "HTTPS API port" in r.stderr, r.stderr
    r = check("")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["status"] == "127.0.0.1:0" and "free port chosen at start" in r.stderr


# --- the status server's bounds, in-process with real sockets -----------------------------------


async def _server(max_connections: int = 4, header_timeout: float = 0.5) -> StatusServer:
    server = StatusServer(
        Status(SystemClock(), "svc-1"),
        bind("127.0.0.1", 0),
        max_connections=max_connections,
        header_timeout=header_timeout,
    )
    await server.start()
    return server


async def _exchange(port: int, request: bytes, timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _port(server: StatusServer) -> int:
    return int(server.sock.getsockname()[1])


def test_status_server_closes_a_silent_connection_after_the_head_timeout() -> None:
    """A client connects and sends nothing: the server (default settings) closes it after its head
    timeout (5 s), instead of holding the descriptor for as long as the client likes."""

    async def go() -> float:
        server = StatusServer(Status(SystemClock(), "svc-1"), bind("127.0.0.1", 0))
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
            t = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 15) == b""
            writer.close()
            return time.monotonic() - t
        finally:
            await server.stop()

    took = asyncio.run(go())
    assert 4 <= took < 10, took


def test_status_server_bounds_the_request_head() -> None:
    """Headers without end: 431 once 8 KiB have arrived; a bad request line: 400; POST: 405; unknown path: 404."""

    async def go() -> list[bytes]:
        server = await _server()
        try:
            port = _port(server)
            return [
                await _exchange(port, b"GET /status HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20000),
                await _exchange(port, b"nonsense\r\n\r\n"),
                await _exchange(port, b"POST /status HTTP/1.1\r\n\r\n"),
                await _exchange(port, b"GET /nowhere HTTP/1.1\r\n\r\n"),
                await _exchange(port, b"GET /status HTTP/1.0\r\n\r\n"),
            ]
        finally:
            await server.stop()

    big, bad, post, missing, ok = asyncio.run(go())
    assert big.startswith(b"HTTP/1.1 431 ") and bad.startswith(b"HTTP/1.1 400 ") and post.startswith(b"HTTP/1.1 405 ")
    assert missing.startswith(b"HTTP/1.1 404 ") and ok.startswith(b"HTTP/1.1 200 ")
    doc = json.loads(ok.split(b"\r\n\r\n", 1)[1])
    assert (
        doc["service_id"] == "svc-1"
        and doc["log"]["dropped_lines"] == 0
        and doc["status_server"]["max_connections"] == 4
    )


def test_status_server_evicts_the_oldest_idle_connection_at_its_cap() -> None:
    """Default settings (cap 32 here): 40 idle connections are opened; the first ones are closed by the
    server, it holds at most 32, and a probe that sends its request at once still gets 200."""

    async def go() -> tuple[bool, int, bytes]:
        server = StatusServer(Status(SystemClock(), "svc-1"), bind("127.0.0.1", 0))
        await server.start()
        idle = []
        try:
            for _ in range(40):
                idle.append(await asyncio.open_connection("127.0.0.1", _port(server)))
            await asyncio.sleep(0.2)
            first_closed = await asyncio.wait_for(idle[0][0].read(), 3) == b""
            held = server.connections
            answer = await _exchange(_port(server), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return first_closed, held, answer
        finally:
            for _, w in idle:
                w.close()
            await server.stop()

    first_closed, held, answer = asyncio.run(go())
    assert first_closed and held <= 32
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")


# --- the log queue, in-process with a real pipe ---------------------------------------------------


def test_log_queue_drops_when_full_and_reports_the_gap_where_it_was() -> None:
    """A full pipe (nobody reads), a queue of 1,000 bytes: emit never blocks; lines beyond the budget
    are dropped (debug lines already at 750 bytes) and counted; once the pipe is read, the output is the
    queued lines in order, then one report with the count where the lines went missing, then later lines."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    os.write(w, b"x" * 4096)  # full
    sink = QueueSink(w, lambda n, total: f"GAP {n} {total}\n", budget=1000)
    sink.start()
    try:
        sink.emit(b"first\n")
        wait_for(lambda: sink.queued_bytes == 0, 5, what="the writer to take the first line and block")
        t = time.monotonic()
        for i in range(7):
            sink.emit(b"%03d" % i + b"-" * 96 + b"\n")  # 100 bytes each: 700 queued
        sink.emit(b"d" * 99 + b"\n", important=False)  # 800 > 750: dropped
        for i in range(7, 12):
            sink.emit(b"%03d" % i + b"-" * 96 + b"\n")  # 3 fit (1000), 2 dropped
        assert time.monotonic() - t < 0.5, "emit blocked"
        assert sink.dropped_total == 3
        out = b""
        while b"GAP" not in out or not out.endswith(b"\n"):
            out += os.read(r, 65536)
        sink.emit(b"later\n")
        while not out.endswith(b"later\n"):
            out += os.read(r, 65536)
    finally:
        sink.close(1)
        os.close(r)
        os.close(w)
    lines = [x[:7] for x in out[4096:].decode().splitlines()]
    assert lines == [
        "first",
        "000----",
        "001----",
        "002----",
        "003----",
        "004----",
        "005----",
        "006----",
        "GAP 1 1",
        "007----",
        "008----",
        "009----",
        "GAP 2 3",
        "later",
    ], lines


def test_log_queue_after_the_reader_is_gone() -> None:
    """The pipe's reader closes: the writer stops on EPIPE, later lines are counted as dropped, emit never raises."""
    r, w = os.pipe()
    sink = QueueSink(w, lambda n, total: f"GAP {n} {total}\n")
    sink.start()
    os.close(r)
    sink.emit(b"one\n")
    assert sink.close(5), "the writer thread did not end"
    sink.emit(b"two\n")
    os.close(w)
    assert sink.dropped_total >= 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
