"""A UDP relay between a resolver's client (nginx) and a DNS server (Consul DNS) that writes down every
look-up: when the question came, what name, and which IPv4 addresses the answer carried.

Instrumentation, not a fake: every query goes to the real server and its answer back unchanged. It lets a
test see when nginx re-resolved a name (nginx caches an answer for ``resolver ... valid=``), so a drain can
be started right after a known look-up and its horizon compared with when nginx looked again.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_TYPE_A = 1
_ANSWER_TIMEOUT = 5.0  # a question the server never answers is forgotten after this long


@dataclass(frozen=True)
class Lookup:
    """One question and its answer. Times are ``time.time()`` (wall clock, as the sidecar's log stamps)."""

    asked: float
    answered: float | None
    name: str
    addresses: tuple[str, ...]  # the answer's A records, in its order; () for NXDOMAIN or no answer
    rcode: int | None


def question_name(packet: bytes) -> tuple[str, int]:
    """The first question's name (lower case, no trailing dot) and the offset just past its type and class."""
    labels = []
    i = 12
    while packet[i]:
        n = packet[i]
        labels.append(packet[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels).lower(), i + 1 + 4


def _skip_name(packet: bytes, i: int) -> int:
    while True:
        n = packet[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:  # a compression pointer ends the name
            return i + 2
        i += 1 + n


def answer_addresses(packet: bytes) -> tuple[tuple[str, ...], int]:
    """The A records of an answer's answer section, and its RCODE."""
    _, flags, qdcount, ancount = struct.unpack_from("!HHHH", packet)
    i = 12
    for _ in range(qdcount):
        i = _skip_name(packet, i) + 4
    found = []
    for _ in range(ancount):
        i = _skip_name(packet, i)
        rtype, _, _, rdlength = struct.unpack_from("!HHIH", packet, i)
        i += 10
        if rtype == _TYPE_A and rdlength == 4:
            found.append(socket.inet_ntoa(packet[i : i + 4]))
        i += rdlength
    return tuple(found), flags & 0x0F


class DnsRelay:
    """Listens on ``127.0.0.1:port`` (UDP) and relays to ``upstream``; ``lookups`` grows as answers come.

    One thread, one socket towards the server: questions are matched to answers by their ID (nginx picks
    them at random; a clash of two open questions would only lose a record, never an answer)."""

    def __init__(self, upstream: tuple[str, int], port: int = 0, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.bind((host, port))
        self.port: int = self._front.getsockname()[1]
        self._back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._back.connect(upstream)
        self._open: dict[int, tuple[tuple[str, int], float, str]] = {}  # id -> client, asked, name
        self.lookups: list[Lookup] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dns-relay", daemon=True)

    def __enter__(self) -> DnsRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._front.close()
        self._back.close()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._front, selectors.EVENT_READ)
            sel.register(self._back, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    with contextlib.suppress(OSError, IndexError, struct.error):
                        if key.fileobj is self._front:
                            self._question()
                        else:
                            self._answer()
                now = time.time()
                for qid in [q for q, (_, asked, _) in self._open.items() if now - asked > _ANSWER_TIMEOUT]:
                    _, asked, name = self._open.pop(qid)
                    self._record(Lookup(asked, None, name, (), None))

    def _question(self) -> None:
        packet, client = self._front.recvfrom(4096)
        asked = time.time()
        (qid,) = struct.unpack_from("!H", packet)
        self._open[qid] = (client, asked, question_name(packet)[0])
        self._back.send(packet)

    def _answer(self) -> None:
        packet = self._back.recv(4096)
        answered = time.time()
        (qid,) = struct.unpack_from("!H", packet)
        entry = self._open.pop(qid, None)
        if entry is None:
            return
        client, asked, name = entry
        self._front.sendto(packet, client)
        addresses, rcode = answer_addresses(packet)
        self._record(Lookup(asked, answered, name, addresses, rcode))

    def _record(self, lookup: Lookup) -> None:
        with self._changed:
            self.lookups.append(lookup)
            self._changed.notify_all()

    def of(self, name: str) -> list[Lookup]:
        """The look-ups of ``name`` so far, in the order they were answered."""
        with self._changed:
            return [x for x in self.lookups if x.name == name.lower().rstrip(".")]

    def wait(self, pred: Callable[[list[Lookup]], bool], timeout: float, what: str) -> list[Lookup]:
        """Block until ``pred(lookups)`` holds (checked at each new look-up), then return the look-ups."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not pred(self.lookups):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; look-ups: {self.lookups}")
                self._changed.wait(left)
            return list(self.lookups)
