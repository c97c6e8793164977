"""The connection to the agent (issue 13): reads share one kept-alive connection; a read that meets
a dropped pooled connection is sent once more on a fresh one; a write is never sent twice.

The first test runs a real sidecar against a real agent. The others need an agent that drops a
kept-alive connection at the moment it is reused, which a real agent does only by chance (a
restart racing a request): a scripted HTTP server in the test plays that part for the transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.clock import SystemClock
from sidecar.config import ConsulSettings, TokenSource
from sidecar.registry.consul import ConsulAgent, ConsulUnavailable
from testkit import Consul, app_command, free_port
from testkit.suite import StartSidecar, base_config


def _connections(pid: int, remote_port: int) -> set[int]:
    """Local ports of the process's established TCP connections to ``remote_port`` on loopback."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, state, inode = f[1], f[2], f[3], f[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == remote_port:
            ports.add(int(local.split(":")[1], 16))
    return ports


def test_registration_checks_reuse_one_connection(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """A registered sidecar checks its registration every second: over 5 s, sampled every 0.1 s,
    it holds one connection to the agent, always the same one, where one connection per request
    would be seen rarely and from a new local port each time."""
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    time.sleep(1.5)  # the first checks have run
    samples = []
    for _ in range(50):
        samples.append(_connections(sc.pid, consul.http_port))
        time.sleep(0.1)
    seen = set().union(*samples)
    held = sum(1 for s in samples if s)
    assert len(seen) == 1 and held >= 45, f"local ports seen: {sorted(seen)}; connection held in {held} of 50 samples"


Action = str  # "answer", "drop" (close the connection without answering), "drop and stop" (stop listening first)


class ScriptedAgent:
    """Answers ``200 {}`` with keep-alive, or drops the connection, as ``script(connection, request
    on it, method)`` decides (both counted from 1). Records (connection, method, path) per request."""

    def __init__(self, script: Callable[[int, int, str], Action]) -> None:
        self.script = script
        self.requests: list[tuple[int, str, str]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedAgent:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next(
                    (int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length"), 0
                )
                await reader.readexactly(length)
                n += 1
                self.requests.append((conn, method, path))
                action = self.script(conn, n, method)
                if action == "drop and stop":
                    assert self._server is not None
                    self._server.close()  # from now on a connect is refused
                if action != "answer":
                    break
                body = b"{}" if method == "GET" else b"true"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 1\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def agent_at(port: int) -> ConsulAgent:
    settings = ConsulSettings(
        scheme="http",
        host="127.0.0.1",
        port=port,
        token=TokenSource(),
        ca_file=None,
        cert_file=None,
        key_file=None,
        tls_verify=True,
        timeout=2.0,
    )
    return ConsulAgent(settings, SystemClock())


@pytest.mark.asyncio
async def test_read_on_a_dropped_pooled_connection_is_sent_once_more_on_a_fresh_one() -> None:
    """The agent answers the first read and drops the kept-alive connection when it is reused for
    the second: the second read still succeeds, sent once more on a connection of its own; the
    third goes on a new kept-alive connection (3 reads answered, 4 requests, 3 connections)."""
    async with ScriptedAgent(lambda conn, n, method: "drop" if (conn, n) == (1, 2) else "answer") as server:
        agent = agent_at(server.port)
        try:
            for _ in range(3):
                assert await agent.registered("web-1") == {}
        finally:
            await agent.close()
    assert [(c, m) for c, m, _ in server.requests] == [(1, "GET"), (1, "GET"), (2, "GET"), (3, "GET")]


@pytest.mark.asyncio
async def test_a_read_dropped_twice_is_an_outage_within_its_deadline() -> None:
    """Every connection is dropped at its first request: the read is sent twice (once more on a
    fresh connection, not more) and ends as ConsulUnavailable well within its 2 s deadline."""
    async with ScriptedAgent(lambda conn, n, method: "drop") as server:
        agent = agent_at(server.port)
        t = time.monotonic()
        try:
            with pytest.raises(ConsulUnavailable):
                await agent.registered("web-1")
        finally:
            await agent.close()
    assert time.monotonic() - t < 2
    assert [m for _, m, _ in server.requests] == ["GET", "GET"]


@pytest.mark.asyncio
async def test_a_write_on_a_dropped_connection_is_not_sent_again() -> None:
    """A read leaves a kept-alive connection; the agent then drops the connection that carries a
    registration without answering: it counts as maybe applied, is sent exactly once, and on its
    own connection (never one from the readers' pool)."""
    async with ScriptedAgent(lambda conn, n, method: "drop" if method == "PUT" else "answer") as server:
        agent = agent_at(server.port)
        try:
            assert await agent.registered("web-1") == {}
            with pytest.raises(ConsulUnavailable) as caught:
                await agent.register(
                    {
                        "Name": "web",
                        "ID": "web-1",
                        "Address": "127.0.0.1",
                        "Port": 1,
                        "Tags": [],
                        "Meta": {},
                        "Check": {"TTL": "30s"},
                    }
                )
            assert caught.value.maybe_applied
        finally:
            await agent.close()
    puts = [(c, m) for c, m, _ in server.requests if m == "PUT"]
    assert len(puts) == 1 and puts[0][0] != server.requests[0][0], server.requests


@pytest.mark.asyncio
async def test_a_dropped_write_stays_maybe_applied_when_the_agent_then_refuses_connections() -> None:
    """The agent takes a registration, drops the connection without answering and stops listening
    (it is going down): the write may have been applied, so it must be reported maybe_applied, never
    "refused, so not sent" (which a silent re-send of the PUT meeting the closed port would say)."""
    async with ScriptedAgent(lambda conn, n, method: "drop and stop" if method == "PUT" else "answer") as server:
        agent = agent_at(server.port)
        try:
            with pytest.raises(ConsulUnavailable) as caught:
                await agent.register(
                    {
                        "Name": "web",
                        "ID": "web-1",
                        "Address": "127.0.0.1",
                        "Port": 1,
                        "Tags": [],
                        "Meta": {},
                        "Check": {"TTL": "30s"},
                    }
                )
        finally:
            await agent.close()
    assert caught.value.maybe_applied, str(caught.value)
    assert [m for _, m, _ in server.requests] == ["PUT"]
