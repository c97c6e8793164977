"""Hot restart: is the new generation accepting on the shared listening socket? Seen, not assumed.

``READY=1`` or a warm-up says a generation started; holding fd 3 says it could accept. Neither says
it does: a release whose socket activation broke may keep fd 3 open and serve on another port, and
once the old generation is stopped the registered port would queue connections nobody accepts.

Both generations take connections from one accept queue, so an answer on the port tells nothing
by itself. The kernel tells who accepted: the sidecar connects to its own listening socket (a
probe, sending nothing), and sock_diag shows the server side of that connection. Its inode is 0
while it waits in the queue and is set when a process accepts it; the process whose
``/proc/<pid>/fd`` holds that inode accepted it (for gunicorn a worker, a descendant of the
generation). A probe the old generation accepted is closed at once (the old one sees a client that
left without a request) and another one follows, with a growing pause, until one is accepted
by the new generation's process tree, or the deadline passes. No app header is trusted.

Standard library and the sidecar's own kernel views (traffic.py's sock_diag, proctree.py's /proc);
Linux only. Where these cannot tell (no sock_diag, /proc of another PID namespace), the result says so.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..clock import Clock
from ..drain.traffic import PortWatcher, TrafficWatchError
from . import proctree

# A connection not accepted yet: in the handshake (SYN_RECV, NEW_SYN_RECV) or in the accept queue (ESTABLISHED).
QUEUED = frozenset({1, 3, 12})
POLL = 0.003  # between two looks at a probe's server side (a look: one sock_diag dump, ~0.5 ms)
PAUSE_FIRST, PAUSE_MOST = 0.01, 0.1  # between probes the old generation took: growing, so a long wait costs few
HOLDER_GRACE = 0.5  # accepted (inode set) but no holder found in /proc: give up this probe after that


@dataclass(frozen=True)
class AcceptProof:
    """``seen``: True when a probe was accepted by the generation (``accepted_by``: the process),
    False when none was by the deadline, None when the kernel view is not to be had here (``detail``)."""

    seen: bool | None
    probes: int = 0  # probe connections made
    by_others: dict[int, int] | None = None  # accepting process -> probes it took (not the generation's)
    accepted_by: int | None = None
    detail: str = ""


def probe_address(listener: socket.socket) -> tuple[int, tuple[str, int]]:
    """(family, address) to connect to for reaching ``listener``: its own address, loopback for a wildcard."""
    host, port = listener.getsockname()[:2]
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return listener.family, (host, port)


async def seen_accepting(
    listener: socket.socket,
    generation: Callable[[], set[int]],
    everyone: Callable[[], set[int]],
    over: Callable[[], bool],
    clock: Clock,
    deadline: float,
) -> AcceptProof:
    """Probe ``listener`` until a connection is accepted by one of ``generation()``'s processes, ``over()``
    is true (the generation exited) or ``deadline`` (monotonic) passes. ``everyone()``: the processes
    that may accept (the sidecar's descendants), to name those that took a probe instead."""
    if not proctree.usable():
        return AcceptProof(None, detail="/proc does not show this PID namespace")
    try:
        family, address = probe_address(listener)
        watcher = PortWatcher(address[1])
    except (OSError, TrafficWatchError, ValueError) as e:
        return AcceptProof(None, detail=f"the kernel view of the port is not to be had: {e}")
    loop = asyncio.get_running_loop()
    probes, pause = 0, PAUSE_FIRST
    others: dict[int, int] = {}
    try:
        while not over() and clock.monotonic() < deadline:
            probe = socket.socket(family, socket.SOCK_STREAM)
            try:
                probe.setblocking(False)
                try:
                    async with asyncio.timeout(max(0.0, deadline - clock.monotonic())):
                        await loop.sock_connect(probe, address)
                except (OSError, TimeoutError):
                    pass  # refused (the sidecar is stopping), or the queue stayed full: the loop decides
                else:
                    probes += 1
                    peer = probe.getsockname()
                    who = await _acceptor(
                        watcher, family, peer[0], peer[1], generation, everyone, over, clock, deadline
                    )
                    if who is not None and who in generation():
                        return AcceptProof(True, probes, others, who)
                    if who is not None:
                        others[who] = others.get(who, 0) + 1
            finally:
                probe.close()
            await clock.sleep(min(pause, max(0.0, deadline - clock.monotonic())))
            pause = min(pause * 1.5, PAUSE_MOST)
    except TrafficWatchError as e:
        return AcceptProof(None, probes, others, detail=f"the kernel view of the port failed: {e}")
    finally:
        watcher.close()
    return AcceptProof(False, probes, others)


async def _acceptor(
    watcher: PortWatcher,
    family: int,
    peer: str,
    peer_port: int,
    generation: Callable[[], set[int]],
    everyone: Callable[[], set[int]],
    over: Callable[[], bool],
    clock: Clock,
    deadline: float,
) -> int | None:
    """The process that accepted the probe from ``peer``:``peer_port``; None if none did by the deadline,
    or the one that did cannot be found (it closed the connection at once, or passed it on elsewhere)."""
    accepted_at: float | None = None
    while not over() and clock.monotonic() < deadline:
        rec = watcher.connection_from(family, peer, peer_port)
        if rec is None:
            return None  # gone: closed and reset
        if rec.inode == 0:
            if rec.state not in QUEUED:
                return None  # accepted and closed at once, by whom we cannot tell
        else:
            wanted = {rec.inode}
            # The generation first: it may hold the socket while a copy is being passed on.
            held = proctree.holders(generation(), wanted) or proctree.holders(everyone() - {os.getpid()}, wanted)
            if held:
                return min(held)
            if accepted_at is None:
                accepted_at = clock.monotonic()
            elif clock.monotonic() - accepted_at > HOLDER_GRACE:
                return None
        await clock.sleep(POLL)
    return None


def describe_others(others: dict[int, int] | None, name: Callable[[int], str]) -> str:
    """'3 by generation 1 (pid 42), 1 by pid 77' for the probes others accepted; '' if none."""
    if not others:
        return ""
    return ", ".join(f"{n} by {name(pid)}" for pid, n in sorted(others.items(), key=lambda kv: -kv[1]))


__all__ = ["AcceptProof", "describe_others", "probe_address", "seen_accepting"]
