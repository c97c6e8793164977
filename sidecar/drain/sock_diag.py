"""sock_diag's wire format for TCP sockets, as bytes and plain records: no sockets, no meaning.

Requests (:func:`dump_request`) and replies (:func:`parse`) of Linux's NETLINK_SOCK_DIAG as ``ss``
uses them (``inet_diag_req_v2`` / ``inet_diag_msg``, with ``struct tcp_info`` as the
``INET_DIAG_INFO`` attribute), and the classic BPF program (:func:`destroy_filter`) that keeps,
of the TCP destroy multicast, only one port's connections. What a port's sockets *mean*
(snapshots, activity) is traffic.py's business; the socket I/O is traffic.py's and tcp_events.py's.
Layouts are those of linux/inet_diag.h, linux/netlink.h, linux/sock_diag.h and linux/tcp.h.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = [
    "ALL_BUT_TIME_WAIT",
    "DecodeError",
    "DiagSocket",
    "End",
    "Ended",
    "NETLINK_SOCK_DIAG",
    "SOCK_DIAG_BY_FAMILY",
    "TCP_LISTEN",
    "TCP_TIME_WAIT",
    "address",
    "destroy_filter",
    "dump_request",
    "ended",
    "normal_address",
    "parse",
]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_INFO = 2
_INET_DIAG_SKMEMINFO = 7  # u32[SK_MEMINFO_VARS]; SK_MEMINFO_DROPS is index 8
_SK_MEMINFO_DROPS_AT = 8 * 4
_INET_DIAG_BC_S_GE, _INET_DIAG_BC_S_LE = 2, 3
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
TCP_TIME_WAIT, TCP_LISTEN = 6, 10
# Every state from ESTABLISHED (1) to NEW_SYN_RECV (12) but TIME_WAIT.
ALL_BUT_TIME_WAIT = sum(1 << s for s in range(1, 13) if s != TCP_TIME_WAIT)

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid: sport, dport (big-endian),
# src[16], dst[16], if, cookie[2]. The kernel also filters dumps by a non-zero id.idiag_sport.
_REQ_HEAD = struct.Struct("=BBBBI")
_REQ_PORTS = struct.Struct("!HH")
_REQ_TAIL = struct.Struct("=32xIII")
# inet_diag_msg: family, state, timer, retrans, sport, dport (big-endian), src[16], dst[16], if,
# cookie[2], expires (ms left on the socket's timer), rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BB2x2s2s16s16s4xIIIIIII")
_BC_OP = struct.Struct("=BBH")  # code, yes, no
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked,
# lost, retrans, fackets, last_data_sent, last_ack_sent, last_data_recv (offset 52: ms since the
# socket last received data; set at the handshake for a new socket); ... then, from Linux 4.1,
# u64 bytes_received at offset 128.
_TCPI_LAST_DATA_RECV_AT = 52
_TCPI_BYTES_RECEIVED_AT = 128
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


class DecodeError(ValueError):
    """A reply that is not what the format says."""


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """One ``inet_diag_msg``. Addresses as text, IPv4-mapped IPv6 given as IPv4; ``cookie`` is the kernel's
    socket cookie (unique since boot). From ``tcp_info``, when asked for and present: ``last_data_recv_ms``
    (None without tcp_info: a request socket in the handshake) and ``bytes_received`` (None: a kernel
    before 4.1, whose tcp_info ends earlier)."""

    family: int
    state: int
    src: str
    sport: int
    dst: str
    dport: int
    cookie: int
    expires_ms: int
    rqueue: int
    wqueue: int
    inode: int
    has_info: bool = False
    last_data_recv_ms: int | None = None
    bytes_received: int | None = None
    drops: int | None = None  # sk_drops, with meminfo: for a listener, SYNs and handshakes it dropped


@dataclass(frozen=True, slots=True)
class End:
    """The end of a dump: ``error`` 0 (NLMSG_DONE) or a positive errno (NLMSG_ERROR)."""

    error: int


def normal_address(text: str) -> tuple[int, str]:
    """(family, canonical text) of an IP address; an IPv4-mapped IPv6 address is IPv4. ValueError if not an IP."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, socket.inet_ntop(family, ip.packed)


def address(family: int, raw: bytes) -> str:
    """The text of an ``idiag_src``/``idiag_dst`` field (16 bytes) of a socket of ``family``."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def dump_request(
    seq: int, family: int, states: int, port: int | None = None, with_info: bool = True, with_meminfo: bool = False
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request for TCP sockets of ``family`` in ``states`` (a bit mask of TCP
    states), with ``tcp_info`` if ``with_info`` and the socket's memory counters (``drops``) if
    ``with_meminfo``. With ``port``, the kernel itself drops the sockets of other local ports
    (``id.idiag_sport`` and a bytecode ``local port >= port and <= port``)."""
    ext = (1 << (_INET_DIAG_INFO - 1) if with_info else 0) | (1 << (_INET_DIAG_SKMEMINFO - 1) if with_meminfo else 0)
    body = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, ext, 0, states)
    body += _REQ_PORTS.pack(port or 0, 0) + _REQ_TAIL.pack(0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE)
    if port is not None:
        # A failed test jumps 4 bytes past the end of the program: the socket is dropped.
        bytecode = b"".join(
            (
                _BC_OP.pack(_INET_DIAG_BC_S_GE, 8, 20),
                _BC_OP.pack(0, 0, port),
                _BC_OP.pack(_INET_DIAG_BC_S_LE, 8, 12),
                _BC_OP.pack(0, 0, port),
            )
        )
        body += _NLATTR.pack(_NLATTR.size + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body


def parse(buf: bytes | bytearray | memoryview, seq: int | None = None) -> Iterator[DiagSocket | End]:
    """The records of one datagram of a reply (messages of another ``seq`` skipped, unless ``seq`` is None,
    as for multicast events). Raises :class:`DecodeError` on a malformed message or attribute."""
    view = memoryview(buf)
    n, off = len(view), 0
    while off + NLMSGHDR.size <= n:
        length, kind, _, mseq, _ = NLMSGHDR.unpack_from(view, off)
        if length < NLMSGHDR.size or off + length > n:
            raise DecodeError(f"bad netlink message length {length}")
        start, end, off = off + NLMSGHDR.size, off + length, off + ((length + 3) & ~3)
        if seq is not None and mseq != seq:
            continue
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            yield End(-_ERRNO.unpack_from(view, start)[0] if end - start >= 4 else 0)
            return
        if kind != SOCK_DIAG_BY_FAMILY:
            continue
        if end - start < _MSG.size:
            raise DecodeError(f"short inet_diag_msg ({end - start} bytes)")
        fam, state, sport, dport, src, dst, c0, c1, expires, rq, wq, _, inode = _MSG.unpack_from(view, start)
        info: memoryview | None = None
        drops: int | None = None
        a = start + _MSG.size
        while a + _NLATTR.size <= end:
            alen, atype = _NLATTR.unpack_from(view, a)
            if alen < _NLATTR.size or a + alen > end:
                raise DecodeError(f"bad netlink attribute length {alen}")
            if atype & 0x3FFF == _INET_DIAG_INFO:
                info = view[a + _NLATTR.size : a + alen]
            elif atype & 0x3FFF == _INET_DIAG_SKMEMINFO and alen >= _NLATTR.size + _SK_MEMINFO_DROPS_AT + 4:
                drops = _U32.unpack_from(view, a + _NLATTR.size + _SK_MEMINFO_DROPS_AT)[0]
            a += (alen + 3) & ~3
        last = received = None
        if info is not None:
            if len(info) >= _TCPI_LAST_DATA_RECV_AT + 4:
                last = _U32.unpack_from(info, _TCPI_LAST_DATA_RECV_AT)[0]
            if len(info) >= _TCPI_BYTES_RECEIVED_AT + 8:
                received = _U64.unpack_from(info, _TCPI_BYTES_RECEIVED_AT)[0]
        yield DiagSocket(
            fam,
            state,
            address(fam, src),
            int.from_bytes(sport, "big"),
            address(fam, dst),
            int.from_bytes(dport, "big"),
            c0 | c1 << 32,
            expires,
            rq,
            wq,
            inode,
            info is not None,
            last,
            received,
            drops,
        )


class Ended(NamedTuple):
    """What the horizon needs of one destroy event: the socket's cookie, its peer address, and
    ``tcpi_last_data_recv`` at its end (None without tcp_info)."""

    cookie: int
    peer: str
    idle_ms: int | None


_HEAD = struct.Struct("=IHHIIBB2x2s2s16s16s4xII")  # nlmsghdr, then inet_diag_msg up to its cookie
_ATTRS_AT = NLMSGHDR.size + _MSG.size


def ended(datagram: bytes | bytearray | memoryview, port: int) -> Ended | None | Literal[False]:
    """One destroy-event datagram, decoded only as far as the horizon needs (a few µs, where
    :func:`parse` takes ~10): an :class:`Ended` for a connection of local port ``port`` with a peer;
    None for another socket (a listener, another port); False when the datagram is not the single
    message this expects (the caller then uses :func:`parse`)."""
    n = len(datagram)
    if n < _ATTRS_AT:
        return False
    length, kind, _, _, _, fam, state, sport, dport, _, dst, c0, c1 = _HEAD.unpack_from(datagram, 0)
    if length != n or kind != SOCK_DIAG_BY_FAMILY:
        return False
    if state == TCP_LISTEN or dport == b"\0\0" or int.from_bytes(sport, "big") != port:
        return None
    idle: int | None = None
    a = _ATTRS_AT
    while a + _NLATTR.size <= n:
        alen, atype = _NLATTR.unpack_from(datagram, a)
        if alen < _NLATTR.size or a + alen > n:
            return False
        if atype & 0x3FFF == _INET_DIAG_INFO:
            if alen >= _NLATTR.size + _TCPI_LAST_DATA_RECV_AT + 4:
                idle = _U32.unpack_from(datagram, a + _NLATTR.size + _TCPI_LAST_DATA_RECV_AT)[0]
            break
        a += (alen + 3) & ~3
    return Ended(c0 | c1 << 32, address(fam, dst), idle)


# --- the destroy multicast's filter ---------------------------------------------------------------

_LD_W, _LD_H, _LD_B = 0x20, 0x28, 0x30  # BPF_LD | BPF_W/H/B | BPF_ABS (network byte order)
_JEQ, _JA, _RET = 0x15, 0x05, 0x06  # BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JA, BPF_RET|BPF_K
_FAMILY_AT, _SPORT_AT, _DPORT_AT, _SRC_AT = 16, 20, 22, 24  # in a datagram: nlmsghdr, then inet_diag_msg
_INSN = struct.Struct("=HBBI")


def destroy_filter(port: int, addresses: Iterable[str] | None = None) -> bytes:
    """A classic BPF program (``struct sock_filter[]``) for a socket joined to the TCP destroy groups: it
    keeps the messages of sockets with local port ``port`` and a peer (a listener has peer port 0), and, with
    ``addresses``, a local address among them (an IPv4 one also as IPv4-mapped IPv6); it drops the rest."""
    v4: list[bytes] = []
    v6: list[bytes] = []
    for a in addresses if addresses is not None else ():
        fam, text = normal_address(a)
        packed = socket.inet_pton(fam, text)
        (v4 if fam == socket.AF_INET else v6).append(packed)
        if fam == socket.AF_INET:
            v6.append(_V4_MAPPED + packed)
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to relative offsets below.
    prog: list[tuple[int, str | None, str | None, int]] = [
        (_LD_H, None, None, _SPORT_AT),
        (_JEQ, None, "drop", port),
        (_LD_H, None, None, _DPORT_AT),
        (_JEQ, "drop", None, 0),
    ]
    labels: dict[str, int] = {}
    if addresses is not None:
        prog += [(_LD_B, None, None, _FAMILY_AT), (_JEQ, None, "v6", socket.AF_INET)]
        for packed in v4:
            prog += [(_LD_W, None, None, _SRC_AT), (_JEQ, "keep", None, int.from_bytes(packed, "big"))]
        prog.append((_JA, None, None, -1))  # to drop, resolved below
        labels["v6"] = len(prog)
        for i, packed in enumerate(v6):
            nxt = f"next{i}"
            for w in range(4):
                word = int.from_bytes(packed[4 * w : 4 * w + 4], "big")
                prog += [(_LD_W, None, None, _SRC_AT + 4 * w), (_JEQ, None, nxt, word)]
            prog.append((_JA, None, None, -2))  # to keep, resolved below
            labels[nxt] = len(prog)
        prog.append((_JA, None, None, -1))
    labels["keep"] = len(prog)
    prog.append((_RET, None, None, 0xFFFF))
    labels["drop"] = len(prog)
    prog.append((_RET, None, None, 0))
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        if code == _JA:
            k = labels["drop" if k == -1 else "keep"] - i - 1
        jt_off = labels[jt] - i - 1 if jt is not None else 0
        jf_off = labels[jf] - i - 1 if jf is not None else 0
        if not (0 <= jt_off <= 255 and 0 <= jf_off <= 255):
            raise ValueError("too many addresses for one BPF filter")
        out.append(_INSN.pack(code, jt_off, jf_off, k))
    return b"".join(out)
