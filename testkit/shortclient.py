"""A client that keeps sending to one cached address after the instance left Consul, in one of the ways
real clients do (a new connection per request, HTTP/1.0, Connection: close, a pooled keep-alive
connection): the consumer the traffic drain must see. tests/test_drain_evidence.py and bench/drain.py."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from testkit.procs import Sidecar

RATE = 3.0  # requests per second


AFTER = 5.0  # seconds the client keeps sending after the deregistration


@dataclass
class CachedClient:
    """Sends one GET every 1/RATE s to a fixed address, each as ``mode`` says, until ``stop`` is set:

    - ``close``: HTTP/1.1 keep-alive request, the client closes right after the response
    - ``http10``: HTTP/1.0 (the app closes)
    - ``connection_close``: HTTP/1.1 with ``Connection: close`` (the app closes)
    - ``pooled``: one keep-alive connection, reused (reopened if the app closes it)
    """

    address: str
    port: int
    mode: str
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    last_ok: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def request(self) -> bytes:
        if self.mode == "http10":
            return b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
        if self.mode == "connection_close":
            return b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    def _connect(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.settimeout(3)
            s.connect((self.address, self.port))
        except OSError:
            s.close()
            raise
        return s

    @staticmethod
    def _response(s: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before a response")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
        )
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            body += chunk
        return head

    def run(self) -> None:
        pooled: socket.socket | None = None
        t0 = time.monotonic()
        i = 0
        while not self.stop.is_set():
            s: socket.socket | None = None
            try:
                if self.mode == "pooled":
                    if pooled is None:
                        pooled = self._connect()
                    s = pooled
                else:
                    s = self._connect()
                s.sendall(self.request())
                head = self._response(s)
                if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
                    raise ConnectionError(head[:40].decode(errors="replace"))
                if self.mode != "pooled":
                    s.close()  # right after the response: the client closes first (or second, for http10 / close)
                self.ok += 1
                self.last_ok = time.monotonic()
            except OSError as e:
                self.failed.append(f"{type(e).__name__}: {e}")
                if pooled is not None:
                    pooled.close()
                    pooled = None
                elif s is not None:
                    s.close()
            i += 1
            self.stop.wait(max(0.0, t0 + i / RATE - time.monotonic()))
        if pooled is not None:
            pooled.close()


@contextlib.contextmanager
def client(address: str, port: int, mode: str) -> Iterator[CachedClient]:
    c = CachedClient(address, port, mode)
    th = threading.Thread(target=c.run, daemon=True)
    th.start()
    try:
        yield c
    finally:
        c.stop.set()
        th.join(10)


def drain_with_client(sc: Sidecar, address: str, port: int, mode: str) -> tuple[CachedClient, dict[str, Any], float]:
    """Client running; SIGTERM; the client goes on for AFTER s after the deregistration.
    Returns the client, the delay_done event and how long after the deregistration the client stopped."""
    sc.wait_event("sidecar.consul.registered", 40)  # a loaded machine can take seconds to start the app
    with client(address, port, mode) as c:
        time.sleep(1.0)
        sc.send(signal.SIGTERM)
        sc.wait_event("sidecar.consul.deregistered")
        t_dereg = time.monotonic()
        time.sleep(AFTER)  # whether the app is still there or not: the client does not know
        stopped_after = time.monotonic() - t_dereg
    assert sc.wait(40) == 0
    ev = sc.event("sidecar.drain.delay_done")
    assert ev is not None, sc.output()[-2000:]
    return c, ev, stopped_after
