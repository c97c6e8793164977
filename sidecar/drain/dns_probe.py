"""A minimal DNS lookup, to ask a resolver whether it still hands out our addresses (A and AAAA).

Only what the drain needs: one question per query, A and AAAA records, compression pointers.
NXDOMAIN and an empty answer both mean "not handed out". A truncated UDP answer (TC bit) is
asked again over TCP; if that fails too, the answer is unknown (an error), never "gone".
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
NXDOMAIN = 3
_TC = 0x0200


class DnsError(Exception):
    pass


class Truncated(DnsError):
    pass


def build_query(name: str, qid: int, qtype: int = TYPE_A) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return _HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, CLASS_IN)


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


def parse_answers(msg: bytes, qid: int) -> set[str]:
    """The IPv4 and IPv6 addresses in the answer section; empty for NXDOMAIN. Raises DnsError on
    garbage, :class:`Truncated` when the TC bit is set (the answer may lack records)."""
    if len(msg) < _HEADER.size:
        raise DnsError("short reply")
    rid, flags, qd, an, _, _ = _HEADER.unpack_from(msg)
    if rid != qid:
        raise DnsError("reply for another query")
    if flags & _TC:
        raise Truncated("truncated answer (TC bit)")
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
        if pos + rdlen > len(msg):
            raise DnsError("truncated record")
        if rclass == CLASS_IN and rtype == TYPE_A and rdlen == 4:
            found.add(socket.inet_ntop(socket.AF_INET, msg[pos : pos + 4]))
        elif rclass == CLASS_IN and rtype == TYPE_AAAA and rdlen == 16:
            found.add(socket.inet_ntop(socket.AF_INET6, msg[pos : pos + 16]))
        pos += rdlen
    return found


async def _udp(server: tuple[str, int], query: bytes, qid: int) -> set[str]:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(server)
        await loop.sock_sendall(sock, query)
        while True:
            reply = await loop.sock_recv(sock, 65535)
            try:
                return parse_answers(reply, qid)
            except DnsError as e:
                if "another query" not in str(e):
                    raise


async def _tcp(server: tuple[str, int], query: bytes, qid: int) -> set[str]:
    reader, writer = await asyncio.open_connection(server[0], server[1])
    try:
        writer.write(struct.pack("!H", len(query)) + query)
        await writer.drain()
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        return parse_answers(await reader.readexactly(size), qid)
    finally:
        writer.close()


async def _ask(server: tuple[str, int], name: str, qtype: int) -> set[str]:
    qid = random.randrange(1 << 16)
    query = build_query(name, qid, qtype)
    try:
        return await _udp(server, query, qid)
    except Truncated:
        try:
            return await _tcp(server, query, qid)
        except (OSError, asyncio.IncompleteReadError, DnsError) as e:
            raise DnsError(f"truncated over UDP and no answer over TCP: {e}") from None


async def resolve_addresses(server: tuple[str, int], name: str, timeout: float = 1.0) -> set[str]:
    """Ask ``server`` (host, port) for the A and AAAA records of ``name``: every address handed out."""
    try:
        async with asyncio.timeout(timeout):
            v4, v6 = await asyncio.gather(_ask(server, name, TYPE_A), _ask(server, name, TYPE_AAAA))
    except TimeoutError:
        raise DnsError(f"no answer from {server[0]}:{server[1]} within {timeout:g}s") from None
    except OSError as e:
        raise DnsError(f"{server[0]}:{server[1]}: {e.strerror or e}") from None
    return v4 | v6
