"""What /proc says about the app's processes: the sidecar's descendants, and who listens on a port.

The sidecar is a child subreaper, so everything the app starts stays a descendant of the
sidecar whatever its session or process group: a worker that called ``setsid`` is still a
grandchild, and a daemon that double-forked is re-parented to the sidecar rather than to PID 1.
Walking the children from our own PID therefore finds everything the app left behind, which
``killpg`` on the app's process group does not.

Only reads; Linux only. ``usable()`` says whether /proc describes our own PID namespace (a
``unshare --pid`` without ``--mount-proc`` shows another one's); callers fall back to the app's
process group when it does not.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def usable() -> bool:
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


@functools.cache
def _children_files() -> bool:
    # /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN (on in common distribution kernels).
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat after the command name (state first, then ppid); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Exists and has not exited (a zombie has exited: only its status is left to collect)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != b"Z"


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields is not None else None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:  # each thread has its own list: a child belongs to the thread that forked it
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def _children_by_scan() -> dict[int, list[int]]:
    by_parent: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = parent(int(name))
            if ppid is not None:
                by_parent.setdefault(ppid, []).append(int(name))
    return by_parent


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (zombies excluded). A snapshot: processes fork while
    it is taken, so callers that must end them all repeat until it comes back empty."""
    scan = None if _children_files() else _children_by_scan()
    found: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in (_children(pid) if scan is None else scan.get(pid, [])):
            if child not in found and alive(child):
                found.add(child)
                todo.append(child)
    return found


# --- who listens on a port ------------------------------------------------------

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on ``port`` (any address, IPv4 or IPv6) in our network namespace."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(int(fields[9]))
        except (OSError, ValueError):
            continue
    return inodes


def holders(pids: set[int], inodes: set[int]) -> set[int]:
    """Those of ``pids`` that hold one of the sockets ``inodes`` open."""
    if not inodes:
        return set()
    wanted = {f"socket:[{i}]" for i in inodes}
    out: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's process
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    out.add(pid)
                    break
            except OSError:
                continue
    return out


def listeners(pids: set[int], port: int) -> set[int]:
    """Those of ``pids`` that listen on ``port``."""
    return holders(pids, listening_inodes(port))
