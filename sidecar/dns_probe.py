"""A minimal DNS A-record lookup over UDP, to ask a resolver whether it still hands out our address.

Only what the drain needs (one question, A records, compression pointers);
NXDOMAIN and an empty answer both mean "not handed out".
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
TYPE_A = 1
CLASS_IN = 1
NXDOMAIN = 3


class DnsError(Exception):
    pass


def build_query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return _HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", TYPE_A, CLASS_IN)


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        if pos >= len(msg):
            raise DnsError("truncated name")
        n = msg[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + n


def parse_a_answers(msg: bytes, qid: int) -> set[str]:
    """The IPv4 addresses in the answer section; empty for NXDOMAIN. Raises DnsError on garbage."""
    if len(msg) < _HEADER.size:
        raise DnsError("short reply")
    rid, flags, qd, an, _, _ = _HEADER.unpack_from(msg)
    if rid != qid:
        raise DnsError("reply for another query")
    rcode = flags & 0xF
    if rcode == NXDOMAIN:
        return set()
    if rcode != 0:
        raise DnsError(f"resolver answered rcode {rcode}")
    pos = _HEADER.size
    for _ in range(qd):
        pos = _skip_name(msg, pos) + 4
    found = set()
    for _ in range(an):
        pos = _skip_name(msg, pos)
        if pos + _RR.size > len(msg):
            raise DnsError("truncated record")
        rtype, rclass, _ttl, rdlen = _RR.unpack_from(msg, pos)
        pos += _RR.size
        if rtype == TYPE_A and rclass == CLASS_IN and rdlen == 4:
            found.add(socket.inet_ntoa(msg[pos : pos + 4]))
        pos += rdlen
    return found


async def resolve_a(server: tuple[str, int], name: str, timeout: float = 1.0) -> set[str]:
    """Ask ``server`` (host, port) for the A records of ``name``."""
    loop = asyncio.get_running_loop()
    qid = random.randrange(1 << 16)
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(server)
            await loop.sock_sendall(sock, build_query(name, qid))
            async with asyncio.timeout(timeout):
                while True:
                    reply = await loop.sock_recv(sock, 4096)
                    try:
                        return parse_a_answers(reply, qid)
                    except DnsError as e:
                        if "another query" not in str(e):
                            raise
        except TimeoutError:
            raise DnsError(f"no answer from {server[0]}:{server[1]} within {timeout:g}s") from None
        except OSError as e:
            raise DnsError(f"{server[0]}:{server[1]}: {e.strerror or e}") from None
