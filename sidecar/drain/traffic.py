"""A cheap kernel view of one TCP port: is it listening, who is connected, when data last came in.

After deregistration the drain looks at a :class:`PortWatcher` to learn when the app's port
last saw activity: a :class:`PortSnapshot` dates the newest inbound data of every open
connection (``tcpi_last_data_recv``), so an idle pooled keep-alive connection does not count
and a busy one is dated exactly, however seldom the port is looked at. Between two snapshots,
:func:`activity_between` says what changed (new connections, inbound bytes).

The data comes from Linux's NETLINK_SOCK_DIAG, as for ``ss``; the wire format (requests,
replies as plain records) is sock_diag.py's, this module owns the socket and what the records
mean. One dump per address family (AF_INET, AF_INET6), in which the kernel already drops
TIME_WAIT sockets and sockets of other local ports. Standard library only; Linux only:
:func:`available` says whether it works here, and every failure is a :class:`TrafficWatchError`.

Cost: the filters spare copying sockets out, not the kernel's walk over its whole established
hash (every network namespace, TIME_WAIT included): about 0.5 ms of CPU per family on an idle
2-core VM, 4 ms with 28,000 TIME_WAIT sockets on the host. ``snapshot(narrow=True)`` first asks
for the port's listeners (the listening hash only: ~0.05 ms) and then walks the established
hash only for the families that listen on the port: one walk instead of two for most apps.

Blind spot: a connection that opens and closes between two snapshots leaves no trace here
(it is in TIME_WAIT or gone); the destroy events (tcp_events.py) see those.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import NamedTuple

from .sock_diag import (
    ALL_BUT_TIME_WAIT,
    TCP_LISTEN,
    TCP_TIME_WAIT,
    DecodeError,
    DiagSocket,
    End,
    dump_request,
    normal_address,
    parse,
)

__all__ = [
    "Activity",
    "ConnKey",
    "Listener",
    "PortSnapshot",
    "PortWatcher",
    "TrafficWatchError",
    "activity_between",
    "available",
    "listeners",
]

_TCP_TIME_WAIT, _TCP_LISTEN = TCP_TIME_WAIT, TCP_LISTEN
_STATES = ALL_BUT_TIME_WAIT
# Linux keeps a TIME_WAIT socket for TCP_TIMEWAIT_LEN, a compile-time 60 s.
TIME_WAIT_SECONDS = 60.0
_BUFSIZE = 65536


class TrafficWatchError(Exception):
    """The kernel view is not to be had: not Linux, netlink refused (EPERM...), or a reply made no sense."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


class ConnKey(NamedTuple):
    """One connection: local (app side) address and port, peer address and port, and the kernel's
    socket cookie, unique per socket since boot, so a new connection on a reused 4-tuple is new.
    IPv4-mapped IPv6 addresses are given as IPv4."""

    src: str
    sport: int
    dst: str
    dport: int
    cookie: int


class Listener(NamedTuple):
    """A listening socket: its local address and port, and its inode (as in /proc/<pid>/fd's socket:[inode])."""

    address: str
    port: int
    inode: int


@dataclass(frozen=True)
class PortSnapshot:
    """What the kernel shows of one local port at one moment (``taken_at``, monotonic seconds).

    ``conn_bytes`` maps each connection with that local port, in any state but LISTEN and
    TIME_WAIT, to its ``tcpi_bytes_received`` (0 for a connection still in the handshake).
    ``bytes_counted`` is False when the kernel gave no byte counter (older than 4.1).
    ``idle_ms`` maps each connection to ``tcpi_last_data_recv``, the milliseconds since it last
    received data (since its handshake if it never did), or None for a connection still in the
    handshake (no tcp_info yet: it counts as active at ``taken_at``).
    ``listen_drops`` (from ``snapshot(narrow=True)``) is the sum of the listeners' ``sk_drops``: what
    the namespace's ListenOverflows/ListenDrops count, for this port alone.
    """

    listening: bool
    conn_bytes: Mapping[ConnKey, int] = field(default_factory=dict, hash=False)
    bytes_counted: bool = True
    idle_ms: Mapping[ConnKey, int | None] = field(default_factory=dict, hash=False)
    taken_at: float = 0.0
    listen_drops: int | None = None  # with ``narrow``: SYNs and handshakes the port's listeners dropped, ever

    @property
    def connections(self) -> int:
        return len(self.conn_bytes)

    @property
    def conn_keys(self) -> frozenset[ConnKey]:
        return frozenset(self.conn_bytes)

    @property
    def bytes_received(self) -> int:
        return sum(self.conn_bytes.values())

    @property
    def last_activity(self) -> float | None:
        """When (monotonic) the newest activity of an open connection happened: its last inbound data, or
        its handshake; ``taken_at`` for one still in the handshake. None without open connections."""
        if not self.idle_ms:
            return None
        newest = min(0 if ms is None else ms for ms in self.idle_ms.values())
        return self.taken_at - newest / 1000


@dataclass(frozen=True)
class Activity:
    """What happened on the port between two snapshots (see :func:`activity_between`)."""

    new_connections: int
    closed_connections: int
    bytes_in: int

    @property
    def quiet(self) -> bool:
        """No new connection and no byte received."""
        return self.new_connections == 0 and self.bytes_in == 0


def activity_between(a: PortSnapshot, b: PortSnapshot) -> Activity:
    """Connections in ``b`` not in ``a``, connections of ``a`` gone in ``b``, and the bytes received in
    between: growth of the connections in both, plus all the bytes of the new ones."""
    new = b.conn_bytes.keys() - a.conn_bytes.keys()
    bytes_in = sum(max(0, n - a.conn_bytes.get(k, 0)) for k, n in b.conn_bytes.items())
    return Activity(len(new), len(a.conn_bytes.keys() - b.conn_bytes.keys()), bytes_in)


def _normal(address: str) -> tuple[int, str]:
    return normal_address(address)


def _key(rec: DiagSocket) -> ConnKey:
    return ConnKey(rec.src, rec.sport, rec.dst, rec.dport, rec.cookie)


class PortWatcher:
    """Snapshots of the TCP sockets whose local port is ``port``, over IPv4 and IPv6.

    With ``addresses``, only sockets whose local address is one of them count (a listener on
    0.0.0.0 or :: counts for any of them). That is the address as this network namespace sees
    it: connections that reach the app through NAT or a port mapping have the inner address.
    One netlink socket is kept open until :meth:`close`.
    Not thread-safe. Raises :class:`TrafficWatchError` when netlink cannot be used.
    """

    def __init__(self, port: int, addresses: Iterable[str] | None = None, *, any_port: bool = False) -> None:
        if not 1 <= port <= 65535 and not (any_port and port == 0):
            raise ValueError(f"port out of range: {port}")
        self.port = port
        self._wanted = None if addresses is None else frozenset(_normal(a)[1] for a in addresses)
        self._families: list[int] = [socket.AF_INET, socket.AF_INET6]
        self._seq = 0
        self._buf = bytearray(_BUFSIZE)
        self._sock: socket.socket | None = None
        self._closed = False
        self._any_port = any_port
        self._connect()

    def _connect(self) -> socket.socket:
        if self._closed:
            raise TrafficWatchError("PortWatcher is closed")
        if self._sock is None:
            if not sys.platform.startswith("linux") or not hasattr(socket, "AF_NETLINK"):
                raise TrafficWatchError(f"NETLINK_SOCK_DIAG needs Linux, this is {sys.platform}")
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)  # NETLINK_SOCK_DIAG
            except OSError as e:
                raise TrafficWatchError(f"cannot open a NETLINK_SOCK_DIAG socket: {e}", e.errno) from e
            try:
                # A kernel receive timeout (struct timeval, native longs) keeps the socket blocking,
                # so no poll() per recv, yet a dump never hangs.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 2, 0))
            except OSError as e:
                sock.close()
                raise TrafficWatchError(f"cannot set up the NETLINK_SOCK_DIAG socket: {e}", e.errno) from e
            self._sock = sock
        return self._sock

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> PortWatcher:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _serves_wanted(self, address: str) -> bool:
        wanted = self._wanted
        return (
            wanted is None
            or address in wanted
            or address == "::"
            or (address == "0.0.0.0" and any(":" not in w for w in wanted))
        )

    def snapshot(self, narrow: bool = False) -> PortSnapshot:
        """One dump per family (AF_INET, then AF_INET6); see the module's docstring for the cost.

        ``narrow``: first list the port's listeners (cheap), then dump the other states only for the
        families that have one (a connection has its listener's family); both if none listens.
        """
        listening, counted = False, True
        conns: dict[ConnKey, int] = {}
        idle: dict[ConnKey, int | None] = {}
        wanted = self._wanted
        states = _STATES
        families = list(self._families)
        drops: int | None = None
        try:
            if narrow:
                mine = [
                    rec
                    for fam in families
                    for rec in self._dump(fam, 1 << _TCP_LISTEN, False, True)
                    if rec.sport == self.port and self._serves_wanted(rec.src)
                ]
                found = {rec.family for rec in mine}
                listening = bool(found)
                if all(rec.drops is not None for rec in mine):
                    drops = sum(rec.drops or 0 for rec in mine)
                families = [f for f in families if f in found] or families
                states &= ~(1 << _TCP_LISTEN)
            taken_at = time.monotonic()
            for family in families:
                for rec in self._dump(family, states):
                    if rec.sport != self.port:
                        continue
                    if rec.state == _TCP_LISTEN:
                        if self._serves_wanted(rec.src):
                            listening = True
                        continue
                    if wanted is not None and rec.src not in wanted:
                        continue
                    key = _key(rec)
                    if rec.has_info and rec.bytes_received is None:
                        counted = False
                    conns[key] = rec.bytes_received or 0
                    idle[key] = rec.last_data_recv_ms
        except BaseException:
            self._reset()  # whatever is left of the dump must not be read as the next one's
            raise
        return PortSnapshot(listening, MappingProxyType(conns), counted, MappingProxyType(idle), taken_at, drops)

    def listen_drops(self) -> int | None:
        """What the port's listeners (serving the watched addresses) dropped so far (``sk_drops``: SYNs
        and handshakes refused on a full accept queue); None where the kernel does not say. Cheap: the
        listening hash only."""
        total = 0
        try:
            for family in list(self._families):
                for rec in self._dump(family, 1 << _TCP_LISTEN, False, True):
                    if rec.sport == self.port and self._serves_wanted(rec.src):
                        if rec.drops is None:
                            return None
                        total += rec.drops
        except BaseException:
            self._reset()
            raise
        return total

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def youngest_time_wait_age(self) -> float | None:
        """Seconds since the newest TIME_WAIT socket on the port was created, or None if there is none.

        A connection that the *app* closed first (HTTP/1.0, ``Connection: close``, nginx's default
        upstream connections) leaves a TIME_WAIT socket on the app's port for 60 s, whose timer
        dates its close. This catches connections too short for any snapshot to see. It costs a
        copy of every TIME_WAIT socket of this port (tens of ms for 20,000), so call it only to
        confirm a quiet period, not on every poll.
        """
        wanted = self._wanted
        newest: int | None = None
        try:
            for family in list(self._families):
                for rec in self._dump(family, 1 << _TCP_TIME_WAIT, with_info=False):
                    if rec.sport != self.port or (wanted is not None and rec.src not in wanted):
                        continue
                    newest = rec.expires_ms if newest is None else max(newest, rec.expires_ms)
        except BaseException:
            self._reset()
            raise
        return None if newest is None else max(0.0, TIME_WAIT_SECONDS - newest / 1000)

    def listeners(self) -> list[Listener]:
        """The listening sockets on this watcher's port (every port with ``any_port``), IPv4 and IPv6,
        whatever their local address (a wildcard bind shows as 0.0.0.0 or ::)."""
        found: list[Listener] = []
        try:
            for family in list(self._families):
                for rec in self._dump(family, 1 << _TCP_LISTEN, with_info=False):
                    if self._any_port or rec.sport == self.port:
                        found.append(Listener(rec.src, rec.sport, rec.inode))
        except BaseException:
            self._reset()
            raise
        return found

    def connection_from(self, family: int, peer: str, peer_port: int) -> DiagSocket | None:
        """The port's socket whose peer is ``peer``:``peer_port`` (the server side of a connection made
        to the port from there), or None if there is none (yet, or any more). Its ``inode`` is 0 while it
        waits in the listener's accept queue: a socket gets its inode when a process accepts it (and
        loses it once every process has closed it). ``family``: the listener's (an IPv6 listener's
        connections from IPv4 peers are AF_INET6 sockets). One dump of that family, all of it read."""
        want = _normal(peer)[1]
        found = None
        try:
            for rec in self._dump(family, _STATES & ~(1 << _TCP_LISTEN), with_info=False):
                if rec.sport == self.port and rec.dport == peer_port and rec.dst == want:
                    found = rec
        except BaseException:
            self._reset()
            raise
        return found

    def _dump(
        self, family: int, states: int = _STATES, with_info: bool = True, with_meminfo: bool = False
    ) -> Iterator[DiagSocket]:
        """The sockets of one dump (sock_diag.py decodes); every failure a TrafficWatchError."""
        sock = self._connect()
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        request = dump_request(seq, family, states, None if self._any_port else self.port, with_info, with_meminfo)
        buf = memoryview(self._buf)
        try:
            sock.sendto(request, (0, 0))
            while True:
                n, _, flags, _ = sock.recvmsg_into([buf])
                if flags & socket.MSG_TRUNC or n < 16:
                    raise TrafficWatchError(f"sock_diag reply truncated ({n} bytes)")
                for rec in parse(buf[:n], seq):
                    if isinstance(rec, End):
                        if rec.error == 0:
                            return
                        if family == socket.AF_INET6 and rec.error in (errno.ENOENT, errno.EAFNOSUPPORT):
                            if family in self._families:
                                self._families.remove(family)  # no IPv6 in this kernel: nothing to see there
                            return
                        raise TrafficWatchError(f"sock_diag dump refused: {os.strerror(rec.error)}", rec.error)
                    yield rec
        except DecodeError as e:
            raise TrafficWatchError(f"malformed sock_diag reply: {e}") from e
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise TrafficWatchError("no sock_diag reply within 2 s", e.errno) from e
            raise TrafficWatchError(f"sock_diag dump failed: {e}", e.errno) from e


def listeners(port: int | None = None) -> list[Listener]:
    """The listening TCP sockets of this network namespace (on ``port``, or all). Raises TrafficWatchError."""
    with PortWatcher(port or 0, any_port=port is None) as w:
        return w.listeners()


def available() -> tuple[bool, str]:
    """Whether :class:`PortWatcher` works here, and why not if it does not."""
    try:
        with PortWatcher(1) as w:
            snap = w.snapshot()
    except TrafficWatchError as e:
        return False, str(e)
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if not snap.bytes_counted or (release is not None and (int(release[1]), int(release[2])) < (4, 1)):
        return True, "NETLINK_SOCK_DIAG works, but this kernel has no tcpi_bytes_received (before 4.1): bytes read 0"
    return True, "NETLINK_SOCK_DIAG works"


def socket_inodes(pid: int | str = "self") -> set[int] | None:
    """Inodes of the sockets ``pid`` holds (its /proc/<pid>/fd links ``socket:[inode]``); None when its
    descriptors cannot be read (another user's process and no CAP_SYS_PTRACE: the kernel refuses
    readlink on /proc/<pid>/fd/N). A process that ends meanwhile holds nothing."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except PermissionError:
        return None
    except OSError:
        return set()
    found: set[int] = set()
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except PermissionError:
            return None
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found
