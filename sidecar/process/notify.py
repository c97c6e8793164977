"""The sd_notify protocol, both ways: what the app tells the sidecar, what the sidecar tells systemd.

``AppNotifySocket``: the ``NOTIFY_SOCKET`` the sidecar gives each app generation (hot restart). A unix
datagram socket under an abstract name (nothing to clean up on disk; the app shares the sidecar's
network namespace, which abstract names belong to). Each message is ``KEY=VALUE`` lines (``READY=1``,
``STATUS=...``, ``STOPPING=1``); the kernel attaches the sender's credentials (``SO_PASSCRED``), so a
message is attributed to a generation by PID, never by what it says. Reading never blocks the loop: the
socket is non-blocking and read from a loop reader until it is empty; an oversized datagram (truncated
by the kernel), one that is not UTF-8 ``KEY=VALUE`` text, or one without credentials is dropped.

``SystemdNotifier``: the sidecar's own messages to systemd when it runs under ``Type=notify``. A send
that would block or fails is dropped (logged at debug): systemd's socket must never hold the drain.
"""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

MAX_MESSAGE = 4096  # bytes; systemd's own limit is larger, but no state message we read needs more
MAX_PER_WAKEUP = 64  # datagrams read per wake-up, so a flood cannot starve the loop
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


def parse(data: bytes) -> dict[str, str] | None:
    """``KEY=VALUE`` lines -> dict; None for anything else (garbage is ignored, never guessed at)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum() or not key.isascii():
            return None
        out[key] = value
    return out or None


def _address(text: str) -> str | bytes:
    """NOTIFY_SOCKET's forms: a path, or ``@name`` for an abstract name."""
    return b"\0" + text[1:].encode() if text.startswith("@") else text


class AppNotifySocket:
    """The sidecar's end of the apps' ``NOTIFY_SOCKET``; ``on_message(pid, fields)`` for each valid one."""

    def __init__(self, log: FilteringBoundLogger) -> None:
        self._log = log
        self.name = f"@consul-sidecar/{os.getpid()}/{secrets.token_hex(8)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.bind(_address(self.name))
        except OSError:
            self._sock.close()
            raise
        self._on_message: Callable[[int, dict[str, str]], None] | None = None
        self.ignored = 0

    @property
    def env_value(self) -> str:
        return self.name

    def start(self, on_message: Callable[[int, dict[str, str]], None]) -> None:
        self._on_message = on_message
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._read)

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except RuntimeError:
                pass  # no running loop: nothing was added to one
            self._sock.close()

    def _read(self) -> None:
        for _ in range(MAX_PER_WAKEUP):
            try:
                data, anc, flags, _ = self._sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._log.debug("sidecar.hot_restart.notify_read_failed", error=str(e))
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack_from(payload)[0]
            fields = None if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) else parse(data)
            if pid is None or fields is None:
                self.ignored += 1
                self._log.debug(
                    "sidecar.hot_restart.notify_ignored",
                    sender_pid=pid,
                    bytes=len(data),
                    reason="no sender credentials" if pid is None else "not KEY=VALUE text, or too long",
                )
                continue
            if self._on_message is not None:
                self._on_message(pid, fields)


class SystemdNotifier:
    """sd_notify(3) for the sidecar itself; a no-op without systemd's ``NOTIFY_SOCKET``."""

    def __init__(self, address: str | None, log: FilteringBoundLogger | None = None) -> None:
        self._address = _address(address) if address else None
        self._log = log
        self._sock: socket.socket | None = None
        # What was sent: a count and the last few messages (bounded: a long life of restarts must not grow it).
        self.sent_total = 0
        self.last_sent: collections.deque[str] = collections.deque(maxlen=32)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(f"{k}={v.replace(chr(10), ' ')}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message.encode()[:MAX_MESSAGE], self._address)
            self.sent_total += 1
            self.last_sent.append(message)
        except OSError as e:  # systemd gone, its queue full: the drain goes on without it
            if self._log is not None:
                self._log.debug("sidecar.systemd.notify_failed", error=str(e), message=message)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
