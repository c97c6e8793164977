"""The sidecar's own read-only HTTP endpoints: ``/healthz`` and ``/status``.

Bound to loopback by default. It serves what the lifecycle records in a
``Status`` and never the configuration or the token.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .clock import Clock

if TYPE_CHECKING:
    from aiohttp import web


class State(enum.Enum):
    STARTING = "starting"
    REGISTERED = "registered"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Status:
    """What the lifecycle reports; the lifecycle is its only writer."""

    clock: Clock
    service_id: str
    state: State = State.STARTING
    since_wall: float = 0.0
    since_mono: float = 0.0
    consul_reachable: bool | None = None
    last_error: str | None = None
    app: dict[str, Any] = field(default_factory=dict)
    drain: dict[str, Any] | None = None  # the drain's progress (which step, traffic seen)

    def __post_init__(self) -> None:
        self.since_wall = self.clock.wall()
        self.since_mono = self.clock.monotonic()

    def enter(self, state: State) -> None:
        self.state = state
        self.since_wall = self.clock.wall()
        self.since_mono = self.clock.monotonic()

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "since": datetime.fromtimestamp(self.since_wall, timezone.utc).isoformat(),
            "seconds_in_state": round(self.clock.monotonic() - self.since_mono, 3),
            "service_id": self.service_id,
            "consul_reachable": self.consul_reachable,
            "last_error": self.last_error,
            "app": self.app,
            "drain": self.drain,
        }


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a busy port fails before anything starts."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class StatusServer:
    def __init__(self, status: Status, sock: socket.socket) -> None:
        # Imported here: aiohttp's server half costs ~13 ms of start-up and ~2 MB, which a
        # sidecar with `status.listen = ""` does not need.
        from aiohttp import web

        self._web = web
        self.status = status
        self.sock = sock
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    async def _healthz(self, _request: web.Request) -> web.Response:
        return self._web.Response(text="ok\n")

    async def _status(self, _request: web.Request) -> web.Response:
        return self._web.json_response(self.status.as_json())

    async def start(self) -> None:
        await self._runner.setup()
        await self._web.SockSite(self._runner, self.sock).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
