"""The sidecar as its app's reaper (wrapper mode): every child that ends is collected, and a daemon followed.

The sidecar is a child subreaper (``become_subreaper``): the orphans the app leaves are re-parented to
it, not to PID 1. ``Reaper`` collects every child that has ended, in the event loop (asyncio's SIGCHLD
handler only wakes the loop): each is offered to its owner first (``claim``: the app's generations),
the rest are orphans, counted. ``DaemonFollower``: a direct child that exits 0 while descendants listen
on the service port has daemonized (as for systemd's ``Type=forking``); those are followed as the app
until they are gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..clock import Clock
from . import proctree
from .app_control import exit_status
from .launcher import libc_prctl

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (as PID 1 does) so they can be reaped; Linux only."""
    prctl = libc_prctl()
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


class Reaper:
    """Collects every child of the sidecar that has ended.

    ``claim(pid, status)``: True when ``pid`` was one of the owner's (its exit status is the owner's
    to act on); every other child is an orphan re-parented to the sidecar, counted in ``orphans_reaped``
    (and its status kept when asked for with ``keep_statuses``).
    """

    def __init__(self, claim: Callable[[int, int], bool]) -> None:
        self._claim = claim
        self.orphans_reaped = 0
        self._wanted: set[int] = set()
        self.kept: dict[int, int] = {}  # the exit statuses of the wanted orphans, in the order reaped

    def install(self) -> None:
        """Reap on every SIGCHLD, in the event loop (not in the signal context)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self.reap)

    def keep_statuses(self, pids: Iterable[int]) -> None:
        self._wanted.update(pids)

    def reap(self) -> None:
        """Collect every child that has ended: the app's generations, and any orphan re-parented to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_status(status)
            if not self._claim(pid, code):
                self.orphans_reaped += 1
                if pid in self._wanted:
                    self.kept[pid] = code


class DaemonFollower:
    """The processes of an app that daemonized, followed as the app until they are gone.

    Deregistering when the direct child exits 0 would take a live server out of discovery and leave it
    running unsupervised; following it keeps it registered and supervised.
    """

    POLL = 0.1

    def __init__(self, port: int, reaper: Reaper, clock: Clock, log: FilteringBoundLogger | None = None) -> None:
        self._port = port
        self._reaper = reaper
        self._clock = clock
        self._log = log
        self.followed: frozenset[int] = frozenset()  # the daemon's processes, once the direct child has left them
        self.roots: list[int] = []  # its top processes (a master), which signals go to, not each of its workers

    def follow(self, parent: int) -> bool:
        """``parent``, the app's direct child, exited 0: True if descendants listen on the service port
        (it daemonized), and they are followed from now on."""
        if not proctree.usable():
            return False
        followed = proctree.listeners(proctree.descendants(os.getpid()), self._port)
        if not followed:
            return False
        self.followed = frozenset(followed)
        self.roots = sorted(p for p in followed if proctree.parent(p) not in followed)
        self._reaper.keep_statuses(followed)
        if self._log is not None:
            self._log.info(
                "sidecar.app.daemon_followed",
                parent_pid=parent,
                pids=sorted(followed),
                port=self._port,
                hint="the app's process exited 0 leaving these listening on the service port: they are the app now",
            )
        return True

    async def until_gone(self) -> int:
        """Once every followed process has ended: the status of the last one the sidecar reaped itself (a
        daemon re-parented to it, or its master), 0 if none was its child."""
        while True:
            self._reaper.reap()  # a daemon that is our child leaves its status here before it stops looking alive
            if not any(proctree.alive(p) for p in self.followed):
                break
            await self._clock.sleep(self.POLL)
        statuses = [code for pid, code in self._reaper.kept.items() if pid in self.followed]
        return statuses[-1] if statuses else 0


__all__ = ["DaemonFollower", "Reaper", "become_subreaper"]
