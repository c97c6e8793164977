"""A fault-injecting HTTP proxy between the sidecar (a real process) and a real Consul agent.

The proxy reads one request per connection and answers it, forwarded or forged, always with
``Connection: close``: the sidecar's kept-alive reads then also open a connection each. A test arms rules per endpoint
(method + path prefix); the first matching rule with uses left decides what happens:

    forward            pass it on (what happens without a rule)
    hold_request=N     keep the request N s, then forward it, even if the sidecar gave up
                       meanwhile (a request already in a frozen agent's socket buffer)
    hold_response=N    forward at once, keep the agent's answer N s (the write is applied)
    delay=N            both halves: hold_request and hold_response of N/2 s each
    reset              close the connection with RST, forwarding nothing
    status=500/429/404 answer that status itself, forwarding nothing
    latin1             answer a 502 HTML page in latin-1 (not UTF-8), forwarding nothing
    truncated          forward, then send the agent's headers and half its body, then close
    garbage            forward, then replace the body of a 200 by bytes that are not JSON
    echo               answer that status itself with the request's head (its headers, the token
                       among them) in the body, forwarding nothing: a server that echoes requests

``log`` records, per request, when it arrived, what was done and when it went upstream,
so a test can wait until a request is in flight before it sends a signal.
Use as a context manager: ``stop()`` ends every hold at once and closes the listener.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from testkit.procs import Consul

LATIN1_502 = (
    "<html><body><h1>502 Bad Gateway</h1><p>Passerelle défaillante — réessayez ¿más tarde?</p></body></html>".encode(
        "latin-1", errors="replace"
    )
)


@dataclass
class Rule:
    method: str
    prefix: str
    action: (
        str  # "forward", "hold_request", "hold_response", "delay", "reset", "status", "latin1", "truncated", "garbage",
        # "echo"
    )
    seconds: float = 0.0
    status: int = 500
    uses: int | None = None  # None: every matching request


@dataclass
class Seen:
    method: str
    path: str
    action: str
    arrived: float  # time.monotonic()
    forwarded: float | None = None  # when the request went to the agent
    applied: float | None = None  # when the agent's whole answer came back (a write is applied by then)
    answered: float | None = None  # when the sidecar got the answer (or the reset)


@dataclass
class FaultProxy:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    rules: list[Rule] = field(default_factory=list)
    log: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # every hold ends now
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(
        self, method: str, prefix: str, action: str, seconds: float = 0.0, status: int = 500, uses: int | None = None
    ) -> Rule:
        rule = Rule(method.upper(), prefix, action, seconds, status, uses)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def seen(self, method: str, prefix: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.log if s.method == method.upper() and s.path.startswith(prefix)]

    # --- one connection, one request ---------------------------------------------------

    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.method in (method, "*") and path.startswith(rule.prefix) and rule.uses != 0:
                    if rule.uses is not None:
                        rule.uses -= 1
                    return rule
        return None

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(30)
        try:
            head, body = _read_request(client)
        except (OSError, ValueError):
            return
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        rule = self._pick(method, target)
        action = rule.action if rule else "forward"
        seen = Seen(method, target, action, time.monotonic())
        with self._lock:
            self.log.append(seen)
        try:
            if action == "reset":
                # SO_LINGER 0: close() sends RST instead of FIN.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif action == "status":
                assert rule is not None
                _send(client, _response(rule.status, b'{"error":"injected by the fault proxy"}', "application/json"))
            elif action == "echo":
                assert rule is not None
                _send(client, _response(rule.status, b"rejected request:\n" + head, "text/plain"))
            elif action == "latin1":
                _send(client, _response(502, LATIN1_502, "text/html; charset=iso-8859-1"))
            else:
                seconds = rule.seconds if rule else 0.0
                before = seconds if action == "hold_request" else seconds / 2 if action == "delay" else 0.0
                after = seconds if action == "hold_response" else seconds / 2 if action == "delay" else 0.0
                self._stopping.wait(before)
                seen.forwarded = time.monotonic()
                answer = self._forward(head, body)
                seen.applied = time.monotonic()
                self._stopping.wait(after)
                if action == "truncated":
                    head_end = answer.index(b"\r\n\r\n") + 4
                    answer = answer[: head_end + max(1, (len(answer) - head_end) // 2)]
                elif action == "garbage" and answer.startswith(b"HTTP/1.1 200"):
                    answer = _response(200, b"\x00{not json", "application/json")
                _send(client, answer)
            seen.answered = time.monotonic()
        except OSError:
            pass  # the sidecar gave up on this request: nothing more to do
        finally:
            client.close()

    def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send the request upstream on a connection of its own and read the whole answer."""
        lines = [ln for ln in head.split(b"\r\n") if ln and not ln.lower().startswith(b"connection:")]
        request = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body
        with socket.create_connection((self.upstream_host, self.upstream_port), timeout=60) as up:
            up.sendall(request)
            chunks = []
            while chunk := up.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def _read_request(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed before a whole request")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed inside the body")
        body += chunk
    return head, body


def _response(status: int, body: bytes, content_type: str) -> bytes:
    reason = {
        200: "OK",
        403: "Forbidden",
        404: "Not Found",
        429: "Too Many Requests",
        500: "Internal Server Error",
        502: "Bad Gateway",
    }.get(status, "X")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _send(sock: socket.socket, data: Any) -> None:
    sock.sendall(data)


# The agent's endpoints the tests arm rules on, and a fault on the agent's side.
REGISTER = "/v1/agent/service/register"


DEREGISTER = "/v1/agent/service/deregister/"


def remove_behind_its_back(agent: Consul, sid: str) -> None:
    """What an agent restarted without its data does: it no longer holds the service."""
    req = urllib.request.Request(f"{agent.address}/v1/agent/service/deregister/{sid}", method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
