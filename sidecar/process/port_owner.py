"""Whose port is it? Before registering, check that the socket listening on service.address:port
belongs to the app's process tree, not to some other server that happens to answer the health check.

The listening sockets come from sock_diag (with their inodes), their owners from /proc/<pid>/fd
(``socket:[inode]``): proctree.py's mechanism, the one daemon following uses too. The app's tree
is its PID and every descendant; in wrapper mode, every descendant of the sidecar (it is the
subreaper of the app's orphans, so a daemonised worker stays in the tree). Linux only; where the
port cannot be seen (another network namespace), the check says so and does not refuse.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..drain import traffic
from ..drain.traffic import Listener, TrafficWatchError
from . import proctree

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = ["OwnerCheck", "app_tree", "check_app_pid", "check_port_owner", "listen_hint"]


@dataclass(frozen=True)
class OwnerCheck:
    ok: bool  # False: a listener on the address and port is not the app's: do not register
    checked: bool  # False: nothing could be checked (no listener visible here, netlink refused)
    detail: str
    owner_pid: int | None = None
    owner_command: str | None = None


def app_tree(root: int, include_root: bool = True) -> set[int]:
    """``root`` and all its descendants, as /proc shows them now."""
    return proctree.tree(root, include_root)


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text[:200] or "?"


def _serves(listener: Listener, address: str) -> bool:
    """Whether a connection to ``address`` would reach this listener (a wildcard serves its family;
    an IPv6 wildcard also serves IPv4, unless IPV6_V6ONLY, which sock_diag does not show: counted)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True  # a host name: any listener on the port may be the one
    if listener.address == "::":
        return True
    if listener.address == "0.0.0.0":
        return ip.version == 4
    return ipaddress.ip_address(listener.address) == ip


def check_port_owner(address: str, port: int, tree: set[int]) -> OwnerCheck:
    """Whether every socket listening on ``address``:``port`` is held by a process in ``tree``."""
    try:
        found = [lst for lst in proctree.listening_sockets(port) if _serves(lst, address)]
    except TrafficWatchError as e:
        return OwnerCheck(True, False, f"the listening sockets cannot be read here: {e}")
    if not found:
        return OwnerCheck(True, False, f"no socket listens on port {port} in this network namespace")
    inodes = {lst.inode for lst in found}
    hidden: list[int] = []  # the app's processes whose descriptors we may not read
    for pid in tree:
        held = proctree.socket_inodes(pid)
        if held is None:
            hidden.append(pid)
            continue
        inodes -= held
        if not inodes:
            return OwnerCheck(True, True, "the app's process tree holds the listening socket")
    # Someone else's: find whom, to name it.
    if (owner := _listening_owner(inodes, tree)) is not None:
        cmd = _command(owner)
        return OwnerCheck(False, True, f"another process listens on {address}:{port}: PID {owner} ({cmd})", owner, cmd)
    if hidden:
        # An app that runs as another user (gosu, su-exec, setpriv, a server that drops privileges)
        # hides its descriptors from a sidecar without CAP_SYS_PTRACE, which Docker does not grant
        # by default: the socket is most likely its own. Not proven either way: say so, never refuse.
        return OwnerCheck(
            True,
            False,
            f"the descriptors of the app's PID {min(hidden)} cannot be read (it runs as "
            "another user and the sidecar lacks CAP_SYS_PTRACE?): the owner of the listening socket "
            "cannot be told",
        )
    return OwnerCheck(
        False,
        True,
        f"a process outside the app's tree listens on {address}:{port} (socket inode "
        f"{min(inodes)}, owner not visible from here: another PID namespace?)",
    )


def _listening_owner(inodes: set[int], tree: set[int]) -> int | None:
    """A process outside ``tree`` that holds one of the sockets ``inodes``, if one is visible."""
    for pid in proctree.all_pids():
        if pid not in tree and (proctree.socket_inodes(pid) or set()) & inodes:
            return pid
    return None


def check_app_pid(pid: int, what: str, address: str, port: int) -> tuple[Literal["yes", "no", "unknown"], str | None]:
    """Whether ``pid`` is the app (alongside mode): alive, and it or a descendant holds a socket
    listening on ``address``:``port``. ``what`` introduces the PID in the reason ("app.pid is").
    "unknown": alive, but whose socket it is cannot be told here (the reason says why)."""
    if not proctree.alive(pid):
        return "no", f"{what} PID {pid}, which is not running"
    try:
        found = [lst for lst in proctree.listening_sockets(port) if _serves(lst, address)]
    except TrafficWatchError as e:
        return "unknown", f"PID {pid} is running; the listening sockets cannot be read here: {e}"
    if not found:
        return "unknown", f"{what} PID {pid} ({_command(pid)}); nothing listens on {address}:{port} in this namespace"
    inodes = {lst.inode for lst in found}
    tree = app_tree(pid)
    hidden = False
    for p in tree:
        held = proctree.socket_inodes(p)
        if held is None:
            hidden = True
        elif held & inodes:
            return "yes", None
    if hidden:
        return "unknown", f"the descriptors of PID {pid} cannot be read (another user, no CAP_SYS_PTRACE?)"
    owner = _listening_owner(inodes, tree)
    who = f"PID {owner} ({_command(owner)}) does" if owner is not None else "its owner is not visible from here"
    return "no", f"{what} PID {pid} ({_command(pid)}) which does not listen on {address}:{port}; {who}"


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def listen_hint(tree: set[int] | None, address: str, port: int) -> str | None:
    """Where the app (the processes ``tree``, see app_control.app_processes) listens, when none of it serves
    ``address``:``port``: "the app listens on X:Y, not service.address:port A:B". None when it does, when it
    listens nowhere yet, or where it cannot be seen."""
    if not tree:
        return None
    held: set[int] = set()
    for pid in tree:
        held |= proctree.socket_inodes(pid) or set()
    try:
        mine = [lst for lst in traffic.listeners() if lst.inode in held]
    except TrafficWatchError:
        return None
    if not mine or any(lst.port == port and _serves(lst, address) for lst in mine):
        return None
    where = ", ".join(sorted({_host_port(lst.address, lst.port) for lst in mine}))
    return f"the app listens on {where}, not service.address:port {_host_port(address, port)}"


def verify_app_port(
    address: str, port: int, tree: set[int] | None, unknown: str, log: FilteringBoundLogger
) -> str | None:
    """The check as the lifecycle runs it before registering: one log event; the reason to refuse
    (naming the owner) or None. ``tree``: the app's processes (app_control.app_processes); None, with
    ``unknown`` saying why, when there is no PID to check against (shutdown_url, nothing): warns once."""
    if tree is None:
        log.warning("sidecar.startup.port_owner_unchecked", port=port, reason=unknown)
        return None
    result = check_port_owner(address, port, tree)
    if not result.checked:
        log.warning("sidecar.startup.port_owner_unchecked", port=port, reason=result.detail)
        return None
    if not result.ok:
        log.error(
            "sidecar.startup.port_not_the_apps",
            address=address,
            port=port,
            owner_pid=result.owner_pid,
            owner_command=result.owner_command,
            error=result.detail,
            hint="stop the other server or give the app another port; nothing was registered",
        )
        return result.detail
    log.info("sidecar.startup.port_owner", address=address, port=port, detail=result.detail)
    return None
