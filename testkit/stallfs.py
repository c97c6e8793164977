"""A real mount that can stop answering: one file served over FUSE (/dev/fuse, no library).

``StallFS(mountpoint)`` mounts a file system holding one regular file, ``token``, whose content
``set()`` changes. ``stall()`` makes the server stop answering every request from then on, as a
network file system whose server went away does: a process that opens or reads the file then
blocks in the kernel until ``close()`` unmounts it and answers what it held with EIO. A blocked
caller that gets a signal (the kernel sends INTERRUPT: a process exiting) is answered EINTR, as an
NFS mount's killable waits let a stuck process die; a stalled server that ignored it would leave the
process unkillable until the mount is aborted. Needs root (mount(2)) and /dev/fuse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
import time
from pathlib import Path

IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT = 1, 2, 3, 14, 15, 18, 25, 26
OPENDIR, RELEASEDIR, INTERRUPT, DESTROY, BATCH_FORGET = 27, 29, 36, 38, 42
NO_REPLY = {FORGET, INTERRUPT, BATCH_FORGET}
ROOT, FILE = 1, 2
FOPEN_DIRECT_IO = 1  # every read goes to the server, never the page cache
MNT_DETACH = 2
NAME = b"token"


class StallFS:
    def __init__(self, mountpoint: Path, content: bytes = b"") -> None:
        self.mountpoint = mountpoint
        self.path = mountpoint / NAME.decode()
        self._content = content
        self._stalled = threading.Event()
        self._closed = False
        self._held: list[int] = []  # requests left unanswered since stall()
        self._lock = threading.Lock()
        self._libc = ctypes.CDLL(None, use_errno=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if self._libc.mount(b"stallfs", str(mountpoint).encode(), b"fuse.stallfs", 0, opts) != 0:
            e = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(e, f"mount fuse on {mountpoint}: {os.strerror(e)}")
        self._thread = threading.Thread(target=self._serve, name="stallfs", daemon=True)
        self._thread.start()
        # FLUSH is answered ENOSYS, and one open and close here has the kernel learn it now: it then
        # sends nothing when a file is closed, as an NFS mount sends nothing when a file opened for
        # reading is closed. Otherwise a process that dies with the file open (its read still held)
        # would wait in the kernel for the FLUSH of its last close, in exit, for as long as the stall
        # lasts: seen as a sidecar that logged sidecar.stopped and did not exit.
        os.close(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC))

    def set(self, content: bytes) -> None:
        self._content = content

    def stall(self) -> None:
        self._stalled.set()

    def close(self) -> None:
        """Unmount (lazily: a process blocked in it must not keep it) and abort what is pending."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            held, self._held = self._held, []
        self._libc.umount2(str(self.mountpoint).encode(), MNT_DETACH)
        for unique in held:  # the blocked callers get EIO; the server thread ends with the connection
            self._reply(unique, errno.EIO)
        self._thread.join(5)
        os.close(self._fd)

    @property
    def held(self) -> int:
        """Requests left unanswered since ``stall()``."""
        return len(self._held)

    def _attr(self, node: int) -> bytes:
        now = int(time.time())
        if node == ROOT:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o600, len(self._content), 1
        return ATTR.pack(node, size, (size + 511) // 512, now, now, now, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, error: int = 0, body: bytes = b"") -> None:
        try:
            os.write(self._fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)
        except OSError:  # the request was interrupted, or the connection is going away
            pass

    def _serve(self) -> None:
        while True:
            try:
                msg = os.read(self._fd, 1 << 20)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: a request interrupted before it was read
                return  # ENODEV: unmounted; EBADF: closed
            if not msg:
                return
            _, opcode, unique, node, *_ = IN_HEADER.unpack_from(msg)
            body = msg[IN_HEADER.size :]
            if opcode == INTERRUPT:
                # Its caller got a signal (a fatal one: the process is exiting). Answer the held request
                # with EINTR, as a network file system's killable waits let a stuck process die.
                (target,) = struct.unpack_from("<Q", body)
                with self._lock:
                    found = target in self._held
                    if found:
                        self._held.remove(target)
                if found:
                    self._reply(target, errno.EINTR)
                continue
            if opcode in NO_REPLY:
                continue
            if self._stalled.is_set() and opcode != INIT:
                with self._lock:  # never answered: the caller blocks as on a dead server
                    if not self._closed:
                        self._held.append(unique)
                        continue
                self._reply(unique, errno.EIO)
                continue
            self._handle(opcode, unique, node, body)

    def _handle(self, opcode: int, unique: int, node: int, body: bytes) -> None:
        if opcode == INIT:
            major, minor, readahead, _flags = struct.unpack_from("<IIII", body)
            out = struct.pack("<IIIIHHIIHHI7I", 7, min(minor, 31), readahead, 0, 16, 12, 65536, 1, 0, 0, 0, *[0] * 7)
            self._reply(unique, body=out)
        elif opcode == LOOKUP:
            if node == ROOT and body.rstrip(b"\0") == NAME:
                self._reply(unique, body=struct.pack("<QQQQII", FILE, 0, 0, 0, 0, 0) + self._attr(FILE))
            else:
                self._reply(unique, errno.ENOENT)
        elif opcode == GETATTR:
            self._reply(unique, body=struct.pack("<QII", 0, 0, 0) + self._attr(node))
        elif opcode in (OPEN, OPENDIR):
            self._reply(unique, body=struct.pack("<QII", 0, FOPEN_DIRECT_IO if opcode == OPEN else 0, 0))
        elif opcode == READ:
            _fh, offset, size = struct.unpack_from("<QQI", body)
            self._reply(unique, body=self._content[offset : offset + size])
        elif opcode == FLUSH:
            self._reply(unique, errno.ENOSYS)  # never sent again: see __init__
        elif opcode in (RELEASE, RELEASEDIR, DESTROY):
            self._reply(unique)
        else:
            self._reply(unique, errno.ENOSYS)
