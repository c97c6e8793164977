"""The apt and dpkg locks, as apt itself takes them: fcntl(F_SETLK) on the lock files.

Run by scripts/lib/apt-wait.sh (standard library only: it runs before .venv exists):

    apt_locks.py wait TIMEOUT WHO PATH...   returns once no PATH is locked (exit 1 after TIMEOUT s)
    apt_locks.py held PATH...               exit 0 when a PATH is locked now

flock(1) and flock(2) do not see fcntl locks: F_GETLK names the holder's PID, a blocking F_SETLKW
wakes when it lets go (the lock is released again at once).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import sys
import time

FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit off_t)
NAMES = (
    ("lists/lock", "the apt lists lock"),
    ("lock-frontend", "the dpkg frontend lock"),
    ("dpkg/lock", "the dpkg lock"),
    ("archives/lock", "the apt archives lock"),
)


def label(path: str) -> str:
    for suffix, name in NAMES:
        if path.endswith(suffix):
            return f"{name} {path}"
    return f"the lock {path}"


def holder(fd: int) -> int:
    """The PID holding a lock on the whole file, 0 when none."""
    query = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    kind, _, _, _, pid = struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return 0 if kind == fcntl.F_UNLCK else pid


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    argv[0] = os.path.basename(argv[0])
    return " ".join(" ".join(argv).split())[:60]


def opened(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDWR)
    except OSError:
        return None  # no such lock on this machine, or not ours to take (not root): apt-get says


def held(paths: list[str]) -> bool:
    for path in paths:
        fd = opened(path)
        if fd is None:
            continue
        try:
            if holder(fd):
                return True
        finally:
            os.close(fd)
    return False


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError


def wait(timeout: float, who: str, paths: list[str]) -> int:
    deadline = time.monotonic() + timeout
    said: set[str] = set()
    signal.signal(signal.SIGALRM, _alarm)
    while True:
        busy = False
        for path in paths:
            fd = opened(path)
            if fd is None:
                continue
            try:
                pid = holder(fd)
                if not pid:
                    continue
                busy = True
                what = f"{label(path)} held by PID {pid} ({command(pid)})"
                if path not in said:
                    said.add(path)
                    print(f"{who}: waiting for {what}...", file=sys.stderr, flush=True)
                left = deadline - time.monotonic()
                if left <= 0:
                    print(f"{who}: gave up after {timeout:g} s waiting for {what}", file=sys.stderr)
                    return 1
                signal.setitimer(signal.ITIMER_REAL, left)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX)  # wakes when the holder lets go
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                except TimeoutError:
                    pass  # the next round says so
                except OSError as e:
                    if e.errno != errno.EINTR:
                        raise
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            finally:
                os.close(fd)
        if not busy:
            if said:
                print(f"{who}: the apt and dpkg locks are free, going on", file=sys.stderr, flush=True)
            return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["wait"] and len(argv) >= 3:
        return wait(float(argv[1]), argv[2], argv[3:])
    if argv[:1] == ["held"]:
        return 0 if held(argv[1:]) else 1
    print("usage: apt_locks.py wait TIMEOUT WHO PATH... | held PATH...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
