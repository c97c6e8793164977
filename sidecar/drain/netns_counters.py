"""The network namespace's own TCP counters: accepted connections and dropped SYNs, without privileges.

``/proc/net/snmp`` (``Tcp: PassiveOpens``) counts every connection accepted in this network
namespace, however short; ``/proc/net/netstat`` (``TcpExt: ListenOverflows ListenDrops``) counts
SYNs and handshakes dropped because an accept queue was full (their retransmit may arrive a second
later: traffic too). They are per namespace, so they speak for the app only when the namespace is
the app's own (a container, a pod): :func:`namespace_is_apps` checks that every listening socket
here is on the app's port or is the sidecar's own (its status server), which the sidecar's
connections to itself then only make more cautious.
"""

from __future__ import annotations

from dataclasses import dataclass

from .traffic import TrafficWatchError, listeners, socket_inodes

__all__ = ["Counters", "namespace_is_apps", "own_socket_inodes", "read_counters"]


@dataclass(frozen=True)
class Counters:
    passive_opens: int
    listen_drops: int  # ListenOverflows + ListenDrops (a full queue counts in both: only growth matters)


def _table(path: str, prefix: str) -> dict[str, int]:
    """The ``prefix:`` table of a /proc/net/{snmp,netstat} file: header line, then values line."""
    with open(path, encoding="ascii") as f:
        lines = [line.split() for line in f if line.startswith(prefix)]
    for head, values in zip(lines[::2], lines[1::2]):
        if len(head) == len(values):
            return {k: int(v) for k, v in zip(head[1:], values[1:])}
    return {}


def read_counters(proc: str = "/proc") -> Counters:
    """This network namespace's counters. Raises TrafficWatchError when they cannot be read."""
    try:
        tcp = _table(f"{proc}/net/snmp", "Tcp:")
        ext = _table(f"{proc}/net/netstat", "TcpExt:")
        return Counters(tcp["PassiveOpens"], ext.get("ListenOverflows", 0) + ext.get("ListenDrops", 0))
    except (OSError, ValueError, KeyError) as e:
        raise TrafficWatchError(f"cannot read the TCP counters in {proc}/net: {e}") from e


def own_socket_inodes(pid: int | str = "self") -> set[int]:
    """Inodes of the sockets a process holds (traffic.socket_inodes; unreadable counts as none)."""
    return socket_inodes(pid) or set()


def namespace_is_apps(port: int) -> tuple[bool, str]:
    """Whether every listening TCP socket of this network namespace is on ``port`` or the sidecar's
    own, so that the namespace's counters count the app's connections (and the sidecar's own)."""
    try:
        found = listeners()
    except TrafficWatchError as e:
        return False, str(e)
    mine = own_socket_inodes()
    others = sorted({f"{lst.address}:{lst.port}" for lst in found if lst.port != port and lst.inode not in mine})
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return False, f"the network namespace is shared: other listeners on {shown}"
    return True, "the network namespace is the app's own"
