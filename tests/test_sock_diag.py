"""sidecar.drain.sock_diag on canned bytes: the requests it writes, the replies it reads, the destroy filter it builds.

No sockets here: the layouts are those of linux/inet_diag.h and linux/tcp.h, written out by hand.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from sidecar.drain.sock_diag import (
    ALL_BUT_TIME_WAIT,
    DecodeError,
    DiagSocket,
    End,
    destroy_filter,
    dump_request,
    parse,
)

NLMSG = struct.Struct("=IHHII")


def nlmsg(kind: int, seq: int, payload: bytes) -> bytes:
    raw = NLMSG.pack(NLMSG.size + len(payload), kind, 2, seq, 0) + payload
    return raw + bytes(-len(raw) % 4)


def diag_msg(
    family: int,
    state: int,
    src: str,
    sport: int,
    dst: str,
    dport: int,
    *,
    cookie: int = 7,
    expires: int = 0,
    rqueue: int = 0,
    wqueue: int = 0,
    inode: int = 0,
    info: bytes | None = None,
) -> bytes:
    def raw(a: str) -> bytes:
        packed = socket.inet_pton(family, a)
        return packed + bytes(16 - len(packed))

    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", sport, dport) + raw(src) + raw(dst)
    body += struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
    body += struct.pack("=IIIII", expires, rqueue, wqueue, 0, inode)
    if info is not None:
        body += struct.pack("=HH", 4 + len(info), 2) + info + bytes(-len(info) % 4)
    return body


def tcp_info(last_data_recv: int, bytes_received: int | None) -> bytes:
    head = bytes(52) + struct.pack("=I", last_data_recv) + bytes(128 - 56)
    return head + struct.pack("=Q", bytes_received) + bytes(64) if bytes_received is not None else head[:104]


def test_dump_request_layout() -> None:
    """A request for port 8080, AF_INET6, all states but TIME_WAIT, with tcp_info: header, inet_diag_req_v2 and the
    port bytecode, byte for byte."""
    req = dump_request(42, socket.AF_INET6, ALL_BUT_TIME_WAIT, 8080)
    length, kind, flags, seq, pid = NLMSG.unpack_from(req)
    assert (length, kind, flags, seq, pid) == (len(req), 20, 0x301, 42, 0)
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (family, proto, ext, pad, states) == (socket.AF_INET6, socket.IPPROTO_TCP, 2, 0, 0x1FFF & ~(1 << 6) & ~1)
    assert struct.unpack_from("!HH", req, 24) == (8080, 0)
    assert struct.unpack_from("=III", req, 60) == (0, 0xFFFFFFFF, 0xFFFFFFFF)
    assert struct.unpack_from("=HH", req, 72) == (20, 1)  # INET_DIAG_REQ_BYTECODE, 16 bytes of program
    assert req[76:] == struct.pack("=BBHBBH", 2, 8, 20, 0, 0, 8080) + struct.pack("=BBHBBH", 3, 8, 12, 0, 0, 8080)
    bare = dump_request(1, socket.AF_INET, 1 << 10, None, with_info=False)
    assert len(bare) == 16 + 56 and bare[18] == 0 and struct.unpack_from("!H", bare, 24)[0] == 0


def test_parse_reply_into_records() -> None:
    """A reply of three sockets (IPv4 with full tcp_info, IPv4-mapped IPv6 with a pre-4.1 tcp_info, a request socket
    without tcp_info), one of another sequence number, then NLMSG_DONE."""
    reply = b"".join(
        [
            nlmsg(
                20,
                5,
                diag_msg(
                    socket.AF_INET,
                    1,
                    "127.0.0.2",
                    8080,
                    "127.0.0.1",
                    40000,
                    cookie=(3 << 32) | 9,
                    expires=1500,
                    rqueue=1,
                    wqueue=2,
                    inode=777,
                    info=tcp_info(250, 4242),
                ),
            ),
            nlmsg(20, 4, diag_msg(socket.AF_INET, 1, "10.0.0.1", 1, "10.0.0.2", 2)),
            nlmsg(20, 5, diag_msg(socket.AF_INET6, 1, "::ffff:127.0.0.1", 8080, "::1", 40001, info=tcp_info(9, None))),
            nlmsg(20, 5, diag_msg(socket.AF_INET6, 12, "::1", 8080, "::1", 40002)),
            nlmsg(3, 5, struct.pack("=i", 0)),
            nlmsg(20, 5, diag_msg(socket.AF_INET, 1, "1.1.1.1", 1, "1.1.1.1", 1)),  # after the end: not read
        ]
    )
    records = list(parse(reply, 5))
    assert records == [
        DiagSocket(
            socket.AF_INET, 1, "127.0.0.2", 8080, "127.0.0.1", 40000, (3 << 32) | 9, 1500, 1, 2, 777, True, 250, 4242
        ),
        DiagSocket(socket.AF_INET6, 1, "127.0.0.1", 8080, "::1", 40001, 7, 0, 0, 0, 0, True, 9, None),
        DiagSocket(socket.AF_INET6, 12, "::1", 8080, "::1", 40002, 7, 0, 0, 0, 0, False, None, None),
        End(0),
    ]
    assert len(list(parse(reply))) == 5, "without a sequence number (multicast), every message counts"


def test_parse_error_and_garbage() -> None:
    """NLMSG_ERROR is an End with the errno; a length that overruns, a short inet_diag_msg and a broken
    attribute are DecodeErrors."""
    assert list(parse(nlmsg(2, 1, struct.pack("=i", -errno.EPERM) + bytes(16)), 1)) == [End(errno.EPERM)]
    ok = diag_msg(socket.AF_INET, 1, "127.0.0.1", 80, "127.0.0.1", 1)
    for bad in (
        NLMSG.pack(400, 20, 2, 1, 0) + bytes(8),
        nlmsg(20, 1, bytes(30)),
        nlmsg(20, 1, ok + struct.pack("=HH", 2, 2)),
        nlmsg(20, 1, ok + struct.pack("=HH", 200, 2) + bytes(8)),
    ):
        with pytest.raises(DecodeError):
            list(parse(bad, 1))


def run_bpf(program: bytes, packet: bytes) -> int:
    """A classic BPF interpreter for what destroy_filter uses (ld w/h/b abs, jeq k, ja, ret k)."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code in (0x20, 0x28, 0x30):
            size = {0x20: 4, 0x28: 2, 0x30: 1}[code]
            if k + size > len(packet):
                return 0
            acc = int.from_bytes(packet[k : k + size], "big")
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x05:
            pc += k
        elif code == 0x06:
            return int(k)
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def event(family: int, state: int, src: str, sport: int, dport: int) -> bytes:
    dst = "127.0.0.9" if family == socket.AF_INET else "::9"
    return nlmsg(20, 0, diag_msg(family, state, src, sport, dst, dport))


@pytest.mark.parametrize(
    "addresses, src, family, state, sport, dport, kept",
    [
        (None, "127.0.0.1", socket.AF_INET, 7, 8080, 40000, True),
        (None, "127.0.0.1", socket.AF_INET, 7, 8081, 40000, False),  # another port
        (None, "127.0.0.1", socket.AF_INET, 7, 8080, 0, False),  # a listener: no peer
        (["127.0.0.2"], "127.0.0.2", socket.AF_INET, 7, 8080, 40000, True),
        (["127.0.0.2"], "127.0.0.3", socket.AF_INET, 7, 8080, 40000, False),  # the instance beside us, same port
        (["127.0.0.2"], "::ffff:127.0.0.2", socket.AF_INET6, 7, 8080, 40000, True),  # through a dual-stack listener
        (["127.0.0.2"], "::ffff:127.0.0.3", socket.AF_INET6, 7, 8080, 40000, False),
        (["::1"], "::1", socket.AF_INET6, 7, 8080, 40000, True),
        (["::1"], "::2", socket.AF_INET6, 7, 8080, 40000, False),
        (["::1"], "0.0.0.1", socket.AF_INET, 7, 8080, 40000, False),
        (["::1", "127.0.0.1"], "127.0.0.1", socket.AF_INET, 7, 8080, 40000, True),
        (["::1", "fe80::1"], "fe80::1", socket.AF_INET6, 7, 8080, 40000, True),
    ],
)
def test_destroy_filter_keeps_only_the_ports_connections(
    addresses: list[str] | None, src: str, family: int, state: int, sport: int, dport: int, kept: bool
) -> None:
    """The BPF program, run on canned destroy events: the port, a peer, and the local address (also v4-mapped)."""
    verdict = run_bpf(destroy_filter(8080, addresses), event(family, state, src, sport, dport))
    assert (verdict != 0) is kept


def test_parse_meminfo_drops() -> None:
    """INET_DIAG_SKMEMINFO (attribute 7, u32[9]): ``drops`` is SK_MEMINFO_DROPS (index 8); asked for with ext bit 6."""
    meminfo = struct.pack("=9I", 1, 2, 3, 4, 5, 6, 7, 8, 31337)
    body = diag_msg(socket.AF_INET, 10, "127.0.0.1", 8080, "0.0.0.0", 0)
    body += struct.pack("=HH", 4 + len(meminfo), 7) + meminfo
    [rec, end] = list(parse(nlmsg(20, 9, body) + nlmsg(3, 9, struct.pack("=i", 0)), 9))
    assert isinstance(rec, DiagSocket) and rec.drops == 31337 and not rec.has_info and end == End(0)
    assert dump_request(1, socket.AF_INET, 1 << 10, 8080, with_info=False, with_meminfo=True)[18] == 1 << 6
