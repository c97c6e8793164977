"""What /proc says about the app's processes: the sidecar's descendants, and who listens on a port.

The sidecar is a child subreaper, so everything the app starts stays a descendant of the
sidecar whatever its session or process group: a worker that called ``setsid`` is still a
grandchild, and a daemon that double-forked is re-parented to the sidecar rather than to PID 1.
Walking the children from our own PID therefore finds everything the app left behind, which
``killpg`` on the app's process group does not.

Who holds the socket listening on a port (daemon following, the port-owner check before
registering) is one mechanism here: sock_diag's listeners (traffic.py), /proc/<pid>/fd's holders.

Only reads; Linux only. ``usable()`` says whether /proc describes our own PID namespace (a
``unshare --pid`` without ``--mount-proc`` shows another one's); callers fall back to the app's
process group when it does not.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

from ..drain import traffic
from ..drain.traffic import Listener, TrafficWatchError
from ..drain.traffic import socket_inodes as socket_inodes  # read here by generations and port_owner


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


def group(pid: int) -> int | None:
    """The process group of ``pid``; None if gone."""
    fields = _stat(pid)
    return int(fields[2]) if fields is not None else None


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (unchanged by exec); None if gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


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
        for child in _children(pid) if scan is None else scan.get(pid, []):
            if child not in found and alive(child):
                found.add(child)
                todo.append(child)
    return found


# --- who listens on a port ------------------------------------------------------
# One mechanism for every caller (daemon following in reaper.py, the port-owner check before
# registering): the listening sockets from sock_diag, filtered to the port by the kernel (~0.05 ms),
# their holders from /proc/<pid>/fd. Reading /proc/net/tcp{,6} instead costs a parse of every socket
# of the namespace, TIME_WAIT included: ~0.5 s with 28,000 of them on a busy host.


def listening_sockets(port: int) -> list[Listener]:
    """The TCP sockets listening on ``port`` (any address, IPv4 or IPv6) in our network namespace.
    Raises TrafficWatchError where sock_diag cannot be used."""
    return traffic.listeners(port)


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on ``port``; empty where they cannot be seen."""
    try:
        return {lst.inode for lst in listening_sockets(port)}
    except TrafficWatchError:
        return set()


def holders(pids: Iterable[int], inodes: set[int]) -> set[int]:
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


def tree(root: int, include_root: bool = True) -> set[int]:
    """``root`` and every live process below it, as /proc shows them now."""
    found = descendants(root)
    if include_root:
        found.add(root)
    return found


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]
