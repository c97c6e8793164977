"""A cheap kernel view of one TCP port: is it listening, who is connected, how many bytes came in.

After deregistration the sidecar can poll a :class:`PortWatcher` and end the drain
wait once no new connection arrives and no connection receives bytes any more
(:func:`activity_between`). The data comes from Linux's NETLINK_SOCK_DIAG, as for
``ss``: one dump per address family (AF_INET, AF_INET6), in which the kernel
already drops TIME_WAIT sockets (``idiag_states``) and sockets of other local ports
(``INET_DIAG_REQ_BYTECODE``), with ``struct tcp_info`` (``INET_DIAG_INFO``) for
``tcpi_bytes_received``. Standard library only; Linux only: :func:`available` says
whether it works here, and every failure is a :class:`TrafficWatchError`.

Cost: the filters spare copying sockets out, not the kernel's walk over its whole
established hash (every network namespace, TIME_WAIT included): about 0.5 ms of CPU per
snapshot on an idle 2-core VM with 262,144 buckets, plus about 0.1 ms per 1,000 sockets there.

Blind spot: a connection that opens and closes between two snapshots leaves no trace
here (it is in TIME_WAIT or gone), and neither do the bytes that a connection received
after the earlier snapshot if it closed before the later one. A connection still in the
handshake (SYN_RECV, a request socket) has a cookie of its own, so it is "new" once more
when it is established.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import NamedTuple

__all__ = [
    "Activity", "ConnKey", "Listener", "PortSnapshot", "PortWatcher", "TrafficWatchError", "activity_between", "available",
    "listeners",
]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_INFO = 2
_INET_DIAG_BC_S_GE, _INET_DIAG_BC_S_LE = 2, 3
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_TCP_TIME_WAIT, _TCP_LISTEN = 6, 10
# Every state from ESTABLISHED (1) to NEW_SYN_RECV (12) but TIME_WAIT.
_STATES = sum(1 << s for s in range(1, 13) if s != _TCP_TIME_WAIT)
# offsetof(struct tcp_info, tcpi_bytes_received) in linux/tcp.h: 8 bytes of u8 fields, 24 u32,
# then u64 pacing_rate, max_pacing_rate, bytes_acked. Kernels before 4.1 end the struct earlier.
_TCPI_BYTES_RECEIVED = struct.Struct("=Q")
_TCPI_BYTES_RECEIVED_AT = 128

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid: sport, dport (big-endian),
# src[16], dst[16], if, cookie[2]. The kernel also filters dumps by a non-zero id.idiag_sport.
_REQ_HEAD = struct.Struct("=BBBBI")
_REQ_PORTS = struct.Struct("!HH")
_REQ_TAIL = struct.Struct("=32xIII")
# inet_diag_msg: family, state, timer, retrans, sport, dport (big-endian, swapped below), src[16], dst[16],
# if, cookie[2], expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BB2xHH16s16s4xII20x")
_INODE = struct.Struct("=I")  # inet_diag_msg.idiag_inode
_INODE_AT = 68
_EXPIRES = struct.Struct("=I")  # inet_diag_msg.idiag_expires: milliseconds left on the socket's timer
_EXPIRES_AT = 52
# Linux keeps a TIME_WAIT socket for TCP_TIMEWAIT_LEN, a compile-time 60 s.
TIME_WAIT_SECONDS = 60.0
_BC_OP = struct.Struct("=BBH")  # code, yes, no
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
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
    """What the kernel shows of one local port at one moment.

    ``conn_bytes`` maps each connection with that local port, in any state but LISTEN and
    TIME_WAIT, to its ``tcpi_bytes_received`` (0 for a connection still in the handshake).
    ``bytes_counted`` is False when the kernel gave no byte counter (older than 4.1).
    """

    listening: bool
    conn_bytes: Mapping[ConnKey, int] = field(default_factory=dict, hash=False)
    bytes_counted: bool = True

    @property
    def connections(self) -> int:
        return len(self.conn_bytes)

    @property
    def conn_keys(self) -> frozenset[ConnKey]:
        return frozenset(self.conn_bytes)

    @property
    def bytes_received(self) -> int:
        return sum(self.conn_bytes.values())


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
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, socket.inet_ntop(family, ip.packed)


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


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
        # Bytecode "local port >= port and local port <= port"; a failed test jumps 4 bytes past the end.
        bytecode = b"".join((
            _BC_OP.pack(_INET_DIAG_BC_S_GE, 8, 20), _BC_OP.pack(0, 0, port),
            _BC_OP.pack(_INET_DIAG_BC_S_LE, 8, 12), _BC_OP.pack(0, 0, port),
        ))
        self._tail = _REQ_PORTS.pack(port, 0) + _REQ_TAIL.pack(0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE)
        if not any_port:
            self._tail += _NLATTR.pack(_NLATTR.size + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
        self._any_port = any_port
        self._connect()

    def _connect(self) -> socket.socket:
        if self._closed:
            raise TrafficWatchError("PortWatcher is closed")
        if self._sock is None:
            if not sys.platform.startswith("linux") or not hasattr(socket, "AF_NETLINK"):
                raise TrafficWatchError(f"NETLINK_SOCK_DIAG needs Linux, this is {sys.platform}")
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
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

    def snapshot(self) -> PortSnapshot:
        """One dump per family (AF_INET, then AF_INET6); see the module's docstring for the cost."""
        listening, counted = False, True
        conns: dict[ConnKey, int] = {}
        wanted = self._wanted
        try:
            for family in list(self._families):
                for state, key, info, _, _ in self._dump(family):
                    if key.sport != self.port:
                        continue
                    if state == _TCP_LISTEN:
                        if wanted is None or key.src in wanted or key.src == "::" or (
                            key.src == "0.0.0.0" and any(":" not in w for w in wanted)
                        ):
                            listening = True
                        continue
                    if wanted is not None and key.src not in wanted:
                        continue
                    received = 0
                    if info is not None:
                        if len(info) >= _TCPI_BYTES_RECEIVED_AT + 8:
                            received = _TCPI_BYTES_RECEIVED.unpack_from(info, _TCPI_BYTES_RECEIVED_AT)[0]
                        else:
                            counted = False
                    conns[key] = received
        except (struct.error, ValueError, IndexError) as e:
            self._reset()
            raise TrafficWatchError(f"malformed sock_diag reply: {e}") from e
        except BaseException:
            self._reset()  # whatever is left of the dump must not be read as the next one's
            raise
        return PortSnapshot(listening, MappingProxyType(conns), counted)

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
                for _, key, _, expires, _ in self._dump(family, 1 << _TCP_TIME_WAIT, with_info=False):
                    if key.sport != self.port or (wanted is not None and key.src not in wanted):
                        continue
                    newest = expires if newest is None else max(newest, expires)
        except (struct.error, ValueError, IndexError) as e:
            self._reset()
            raise TrafficWatchError(f"malformed sock_diag reply: {e}") from e
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
                for _, key, _, _, inode in self._dump(family, 1 << _TCP_LISTEN, with_info=False):
                    if self._any_port or key.sport == self.port:
                        found.append(Listener(key.src, key.sport, inode))
        except (struct.error, ValueError, IndexError) as e:
            self._reset()
            raise TrafficWatchError(f"malformed sock_diag reply: {e}") from e
        except BaseException:
            self._reset()
            raise
        return found

    def _dump(
        self, family: int, states: int = _STATES, with_info: bool = True
    ) -> Iterator[tuple[int, ConnKey, memoryview | None, int, int]]:
        sock = self._connect()
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        ext = 1 << (_INET_DIAG_INFO - 1) if with_info else 0
        body = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, ext, 0, states) + self._tail
        request = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
        buf = memoryview(self._buf)
        try:
            sock.sendto(request + body, (0, 0))
            while True:
                n, _, flags, _ = sock.recvmsg_into([buf])
                if flags & socket.MSG_TRUNC or n < _NLMSGHDR.size:
                    raise TrafficWatchError(f"sock_diag reply truncated ({n} bytes)")
                off = 0
                while off + _NLMSGHDR.size <= n:
                    length, kind, _, mseq, _ = _NLMSGHDR.unpack_from(buf, off)
                    if length < _NLMSGHDR.size or off + length > n:
                        raise TrafficWatchError(f"bad netlink message length {length}")
                    start, end, off = off + _NLMSGHDR.size, off + length, off + ((length + 3) & ~3)
                    if mseq != seq:
                        continue
                    if kind == _NLMSG_DONE or kind == _NLMSG_ERROR:
                        err = -_ERRNO.unpack_from(buf, start)[0] if end - start >= 4 else 0
                        if err == 0 and kind == _NLMSG_DONE:
                            return
                        if family == socket.AF_INET6 and err in (errno.ENOENT, errno.EAFNOSUPPORT):
                            self._families.remove(family)  # no IPv6 in this kernel: nothing to see there
                            return
                        raise TrafficWatchError(f"sock_diag dump refused: {os.strerror(err)}", err)
                    if kind != _SOCK_DIAG_BY_FAMILY:
                        continue
                    if end - start < _MSG.size:
                        raise TrafficWatchError(f"short inet_diag_msg ({end - start} bytes)")
                    fam, state, sport, dport, src, dst, c0, c1 = _MSG.unpack_from(buf, start)
                    key = ConnKey(_address(fam, src), socket.ntohs(sport), _address(fam, dst), socket.ntohs(dport),
                                  c0 | c1 << 32)
                    info = None
                    a = start + _MSG.size
                    while a + _NLATTR.size <= end:
                        alen, atype = _NLATTR.unpack_from(buf, a)
                        if alen < _NLATTR.size or a + alen > end:
                            raise TrafficWatchError(f"bad netlink attribute length {alen}")
                        if atype & 0x3FFF == _INET_DIAG_INFO:
                            info = buf[a + _NLATTR.size:a + alen]
                        a += (alen + 3) & ~3
                    yield (state, key, info, _EXPIRES.unpack_from(buf, start + _EXPIRES_AT)[0],
                           _INODE.unpack_from(buf, start + _INODE_AT)[0])
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
