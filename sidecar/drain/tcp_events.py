"""Every TCP connection of one port, however short: the kernel's socket-destruction events.

The sock_diag netlink family multicasts an ``inet_diag_msg`` for every TCP socket it frees
(groups ``SKNLGRP_INET_TCP_DESTROY`` and ``SKNLGRP_INET6_TCP_DESTROY``), with its addresses
and ports, whichever side closed first: a connection that lived 1 ms between two polls of the
socket table is reported here when it ends. A socket the app closed first is reported when it
enters TIME_WAIT (its full socket is freed then), not 60 s later. Events are per network
namespace; joining the groups needs CAP_NET_ADMIN over the namespace (Docker does not grant it
by default): :func:`can_join` says whether this process may.

:class:`DestroyEvents` is non-blocking and bounded: its socket is for the event loop
(``loop.add_reader(events.fileno(), ...)``), each :meth:`DestroyEvents.read` takes at most
``max_messages`` and reports a receive-buffer overflow (events lost: the caller must count
that as traffic, not as silence).

Cost: the kernel filters the events (a classic BPF program on the netlink socket, from
sock_diag.py: the app's port and address, no listeners), so every datagram that reaches the
sidecar is one of the app's connections, counted without being parsed (~3 µs each). The
caller decides how often to wake up for them: once per event is what costs (~80 µs each).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from .sock_diag import TCP_LISTEN, DecodeError, DiagSocket, Ended, destroy_filter, ended, normal_address, parse
from .traffic import TrafficWatchError

__all__ = ["DestroyEvents", "EventBatch", "can_join"]

_NETLINK_SOCK_DIAG = 4
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
_GROUPS = (1, 3)  # SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY
_RCVBUF = 1 << 20  # ~1,300 queued events (each costs a whole skb); more between two reads is an overflow
_SO_ATTACH_FILTER = 26


@dataclass(frozen=True)
class EventBatch:
    """What one read found: connections of the port that ended, and whether events were lost."""

    ended: int
    lost: bool
    more: bool  # the read stopped at its bound with messages left


def _attach(sock: socket.socket, program: bytes) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, struct.pack("HP", len(program) // 8, ctypes.addressof(buf)))


def _open(port: int | None = None, addresses: Iterable[str] | None = None) -> tuple[socket.socket, bool]:
    """A socket joined to the destroy groups, and whether the kernel filters it (port and addresses)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "AF_NETLINK"):
        raise TrafficWatchError(f"socket destruction events need Linux, this is {sys.platform}")
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
        )
    except OSError as e:
        raise TrafficWatchError(f"cannot open a NETLINK_SOCK_DIAG socket: {e}", e.errno) from e
    try:
        sock.bind((0, 0))
        # The filter before the groups: once it is on, every datagram queued is one of ours.
        filtered = False
        if port is not None:
            try:
                _attach(sock, destroy_filter(port, addresses))
                filtered = True
            except (OSError, ValueError):
                pass  # filtered in Python instead (see _count): dearer, as complete
        joined = 0
        for group in _GROUPS:
            try:
                sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, group)
                joined += 1
            except OSError as e:
                if e.errno == errno.EPERM:
                    raise TrafficWatchError(
                        "joining sock_diag's TCP destroy groups needs CAP_NET_ADMIN in this network namespace", e.errno
                    ) from e
                if group == _GROUPS[0]:
                    raise TrafficWatchError(f"cannot join sock_diag's TCP destroy group: {e}", e.errno) from e
                # No IPv6 in this kernel: nothing to miss there.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        except OSError:
            pass  # the default buffer still works; an overflow is reported, never silent
    except BaseException:
        sock.close()
        raise
    return sock, filtered


def can_join() -> tuple[bool, str]:
    """Whether this process may subscribe to socket destruction events here, and why not if not."""
    try:
        _open()[0].close()
    except TrafficWatchError as e:
        return False, str(e)
    return True, "sock_diag TCP destroy events"


class DestroyEvents:
    """A subscription to the TCP socket destructions of this network namespace, filtered to the
    sockets whose local port is ``port`` (and local address one of ``addresses``, if given), with a peer
    (not a listener): each is one connection of the app's that ended.

    Raises :class:`TrafficWatchError` when the subscription is refused.
    """

    def __init__(self, port: int, addresses: Iterable[str] | None = None, max_messages: int = 512) -> None:
        self.port = port
        self._wanted = None if addresses is None else frozenset(normal_address(a)[1] for a in addresses)
        self._max = max_messages
        self._buf = bytearray(65536)
        self._sock: socket.socket | None
        self._sock, self.filtered = _open(port, None if addresses is None else list(addresses))

    def fileno(self) -> int:
        if self._sock is None:
            raise TrafficWatchError("DestroyEvents is closed")
        return self._sock.fileno()

    def read(self, records: list[Ended] | None = None) -> EventBatch:
        """Take what is queued, without blocking (at most ``max_messages`` datagrams).

        With ``records``, each ended connection's record is appended to it as well (decoded: its peer, its
        cookie and its ``tcp_info`` as the kernel gave it at the end), for who must know which connection
        ended, not only how many (the drain's horizon, horizon.py)."""
        if self._sock is None:
            raise TrafficWatchError("DestroyEvents is closed")
        count, lost, n = 0, False, 0
        buf = memoryview(self._buf)
        while n < self._max:
            try:
                size = self._sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return EventBatch(count, lost, False)
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped events: the queue overflowed
                    lost = True
                    continue
                raise TrafficWatchError(f"reading socket destruction events failed: {e}", e.errno) from e
            n += 1
            if records is None:
                count += 1 if self.filtered else self._count(buf[:size])
                continue
            # The kernel's filter already kept only the port's connections (and addresses): decode the
            # little the horizon needs. Otherwise, or for a datagram of another shape, the full parse.
            one = ended(buf[:size], self.port) if self.filtered else False
            if one is False:
                count += self._count(buf[:size], records)
            elif isinstance(one, Ended):
                records.append(one)
                count += 1
        return EventBatch(count, lost, True)

    def _count(self, datagram: memoryview, records: list[Ended] | None = None) -> int:
        found = 0
        try:
            for rec in parse(datagram):
                # A listener (freed in state CLOSE, after the app closed it) has no peer port.
                if not isinstance(rec, DiagSocket) or rec.state == TCP_LISTEN or rec.dport == 0:
                    continue
                if rec.sport != self.port:
                    continue
                if self._wanted is not None and rec.src not in self._wanted:
                    continue
                found += 1
                if records is not None:
                    records.append(Ended(rec.cookie, rec.dst, rec.last_data_recv_ms))
        except DecodeError:
            found += 1  # a message we cannot read may be ours: count it, never miss it
        return found

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> DestroyEvents:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
