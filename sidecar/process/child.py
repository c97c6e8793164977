"""Wrapper mode: the app as the sidecar's child, started, watched, signalled and stopped with its descendants.

``ChildApp`` is the lifecycle's handle (the ``App`` protocol). It is made of three parts: its
``Generations`` (generations.py: the runs of the app's command, one, or two during a hot restart), a
``Reaper`` (reaper.py: every child that ends is collected; a generation's exit goes to the
generations, and the current one's is the app's) and, with the service port known, a
``DaemonFollower`` (reaper.py: an app that daemonized is followed as the app). What remains here is
the app as one process tree: starting it, passing signals on, and on every exit path ending every
descendant, whatever its session or process group (see ``proctree``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..clock import Clock
from ..config import KILL_REAP_TIMEOUT
from ..exit_codes import by_signal
from . import proctree
from .app_control import NO_PID, StopResult
from .generations import Generations, GenState
from .launcher import Launcher
from .reaper import DaemonFollower, Reaper

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


class ChildApp:
    """The app as the sidecar's child (wrapper mode).

    "The app" is the direct child and, as the sidecar is a child subreaper, everything it
    starts: on every exit path every descendant is ended, whatever its session or process
    group (see ``proctree``). A direct child that exits 0 while descendants listen on the
    service port has daemonized (as for systemd's ``Type=forking``): those descendants are
    then followed as the app, and ``exited`` resolves only when they are gone.
    """

    def __init__(
        self,
        argv: Sequence[str],
        launcher: Launcher,
        clock: Clock,
        env: Mapping[str, str] | None = None,
        follow_port: int | None = None,
        log: FilteringBoundLogger | None = None,
        listener: socket.socket | None = None,
        fd_name: str = "http",
    ) -> None:
        """``listener``: hot restart: the sidecar's listening socket, handed to every generation
        (LISTEN_FDS=1, LISTEN_FDNAMES=``fd_name``); the app's exit is then never taken for a daemon's."""
        self.argv = list(argv)
        self._clock = clock
        self._follow_port = follow_port
        self._log = log
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reaper = Reaper(self._claim)
        self.gens = Generations(argv, launcher, clock, env, listener, fd_name, collect_now=self._reaper.reap)
        self._daemon = DaemonFollower(follow_port, self._reaper, clock, log) if follow_port is not None else None
        self.leftovers_signalled = 0  # descendants still alive once the app had exited
        self.leftovers_killed = 0  # ... of which SIGKILL ended
        self.killed_on_request = False
        self._follow_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._listener_check: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The current generation's PID (the direct child), once started."""
        cur = self.gens.current
        return cur.pid if cur is not None else None

    @property
    def listener(self) -> socket.socket | None:
        """Hot restart: the sidecar's listening socket, handed to every generation."""
        return self.gens.listener

    @property
    def description(self) -> str:
        cur = self.gens.current
        if cur is None:
            return f"child {self.argv[0]}"
        if self.followed:
            assert self._daemon is not None
            roots = ",".join(map(str, self._daemon.roots))
            return f"daemon pid {roots} (forked by pid {cur.pid}, {self.argv[0]})"
        return (
            f"pid {cur.pid} ({self.argv[0]})"
            if cur.number == 1
            else f"pid {cur.pid} ({self.argv[0]}, generation {cur.number})"
        )

    @property
    def followed(self) -> frozenset[int]:
        """The daemon's processes, once the direct child has left them."""
        return self._daemon.followed if self._daemon is not None else frozenset()

    @property
    def orphans_reaped(self) -> int:
        return self._reaper.orphans_reaped

    def start(self) -> None:
        """Spawn the app; raises OSError (FileNotFoundError, PermissionError) if it cannot."""
        # Reaping runs in the event loop (not in the signal context): asyncio's
        # signal handler only wakes the loop; the callback then collects every
        # child that has ended - the app, and any orphan re-parented to us.
        self._reaper.install()
        self.gens.start_first()
        self._reaper.reap()  # in case it ended before the handler saw a SIGCHLD
        if self._follow_port is not None and self._log is not None and proctree.usable():
            loop = asyncio.get_running_loop()
            self._listener_check = loop.create_task(self._check_listener(self._follow_port, self._log))

    def processes(self) -> tuple[set[int] | None, str]:
        """Everything the sidecar started: the app, its descendants, orphans reaped into ours; the sidecar
        itself under hot restart, whose socket it shares with the app (see app_control.app_processes)."""
        if self.pid is None:
            return None, NO_PID
        tree = proctree.tree(os.getpid(), False)
        if self.gens.listener is not None:
            tree.add(os.getpid())
        return tree, ""

    # --- an exit ------------------------------------------------------------------------

    def _claim(self, pid: int, status: int) -> bool:
        """The reaper collected ``pid``: True if it was a generation; the current one's exit is the app's,
        unless it daemonized."""
        gen = self.gens.collect(pid, status)
        if gen is None:
            return False
        if gen is self.gens.current and not self.exited.done() and not (status == 0 and self._daemonized(pid)):
            self.gens.release_listener()
            self.exited.set_result(status)
        return True

    def _daemonized(self, parent: int) -> bool:
        """The direct child exited 0: if descendants listen on the service port, it daemonized.

        Deregistering then would take a live server out of discovery and leave it running
        unsupervised; follow it instead. Not while stopping: an app asked to stop that
        leaves listeners behind gets the leftovers' treatment (app_signal, then SIGKILL).
        With hot restart every generation holds the sidecar's socket: no exit is a daemon's.
        """
        if self._daemon is None or self._stopping or self.gens.listener is not None:
            return False
        if not self._daemon.follow(parent):
            return False
        self._follow_task = asyncio.get_running_loop().create_task(self._until_daemon_gone(self._daemon))
        return True

    async def _until_daemon_gone(self, daemon: DaemonFollower) -> None:
        status = await daemon.until_gone()
        if not self.exited.done():
            self.exited.set_result(status)

    LISTENER_POLL = 0.5
    LISTENER_WATCH = 120.0  # past any sane start-up: stop looking

    async def _check_listener(self, port: int, log: FilteringBoundLogger) -> None:
        """Warn once if the server on the service port is not the direct child (an entrypoint
        script without ``exec``): only the direct child dies with a SIGKILLed sidecar."""
        seen = 0
        deadline = self._clock.monotonic() + self.LISTENER_WATCH
        while self.running and not self.followed and self._clock.monotonic() < deadline:
            held = proctree.listeners(proctree.descendants(os.getpid()), port)
            if held:
                if self.pid in held:
                    return
                seen += 1
                if seen >= 2:  # twice in a row: not a daemon's parent about to exit
                    log.warning(
                        "sidecar.app.listener_not_direct_child",
                        app_pid=self.pid,
                        listener_pids=sorted(held),
                        port=port,
                        hint="the server is a grandchild (an entrypoint script without exec?): "
                        "if the sidecar is SIGKILLed only its direct child dies, "
                        "outside a container or a systemd cgroup. Start the server with exec",
                    )
                    return
            else:
                seen = 0
            await self._clock.sleep(self.LISTENER_POLL)

    # --- signals ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.pid is not None and not self.exited.done()

    def _targets(self) -> list[int]:
        if self._daemon is not None and self._daemon.followed:
            return self._daemon.roots  # a daemon's top processes (a master), not each of its workers
        return [self.pid] if self.pid is not None else []

    def forward(self, sig: signal.Signals) -> None:
        if self.running:
            for pid in self._targets():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        self.killed_on_request = True
        self.kill_descendants()

    def _descendants(self) -> set[int] | None:
        """Live descendants of the sidecar (the app's whole world), or None where /proc cannot tell."""
        return proctree.descendants(os.getpid()) if proctree.usable() else None

    def kill_descendants(self) -> bool:
        """SIGKILL every descendant (the app's process group where /proc cannot tell); False if none was left.

        Repeats until a pass finds nobody new: a process forking while we kill has its
        children found in the next pass, and a process with SIGKILL pending forks no more.
        """
        if self.pid is None:
            return False
        if not proctree.usable():
            return self._killpg(signal.SIGKILL)
        killed: set[int] = set()
        for _ in range(100):
            new = proctree.descendants(os.getpid()) - killed
            if not new:
                break
            for pid in new:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed |= new
        return bool(killed)

    def _killpg(self, sig: signal.Signals) -> bool:
        assert self.pid is not None
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    # --- stop -------------------------------------------------------------------------

    async def stop(self, sig: signal.Signals, timeout: float) -> StopResult:
        """Stop the app: every generation (hot restart), the current one's status is the result."""
        self._stopping = True
        self.gens.release_listener()
        others = self.gens.others()
        for gen in others:  # a replaced one already signalled keeps its clock; the others hear sig now
            gen.state = GenState.STOPPING
            self.gens.signal_once(gen, sig)
        if self.exited.done():
            if others:  # not leftovers: a replaced generation still draining keeps its timeout
                await asyncio.wait([asyncio.ensure_future(asyncio.shield(g.exited)) for g in others], timeout=timeout)
            await self._end_leftovers(sig)
            return StopResult(self.exited.result(), False, "had already exited")
        self.forward(sig)
        if (cur := self.gens.current) is not None:
            cur.state, cur.signalled = GenState.STOPPING, True
        deadline = self._clock.monotonic() + timeout
        try:
            status = await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            if others:  # the rest of the same timeout for the other generation
                rest = max(0.0, deadline - self._clock.monotonic())
                await asyncio.wait([asyncio.ensure_future(asyncio.shield(g.exited)) for g in others], timeout=rest)
                if any(not g.exited.done() for g in others):
                    raise TimeoutError
            await self._end_leftovers(sig)
            if self.killed_on_request:
                return StopResult(status, True, "SIGKILLed on request (third SIGINT)")
            return StopResult(status, False, f"exited after {sig.name}")
        except TimeoutError:
            pass
        self.kill_descendants()
        try:
            status = await asyncio.wait_for(asyncio.shield(self.exited), KILL_REAP_TIMEOUT)
        except TimeoutError:
            status = by_signal(signal.SIGKILL)
        await self._until_none_left()
        return StopResult(status, True, f"did not exit within {timeout:g}s of {sig.name}; sent SIGKILL")

    async def _end_leftovers(self, sig: signal.Signals) -> None:
        """The app has exited: every descendant it left (workers, helpers, a worker in its own
        session, a daemon) gets the same signal, then SIGKILL after KILL_REAP_TIMEOUT (as tini -g,
        dumb-init, systemd's KillMode=mixed)."""
        if self.pid is None:
            return
        left = self._descendants()
        if left is None:  # no usable /proc: the app's process group is all we can reach
            if not self._group_alive():
                return
            self.leftovers_signalled += 1
            self._killpg(sig)
            deadline = self._clock.monotonic() + KILL_REAP_TIMEOUT
            while self._group_alive() and self._clock.monotonic() < deadline:
                await self._clock.sleep(0.02)
            self._killpg(signal.SIGKILL)
            return
        signalled: set[int] = set()
        deadline = self._clock.monotonic() + KILL_REAP_TIMEOUT
        while left and self._clock.monotonic() < deadline:
            for pid in left - signalled:  # also those forked since the last pass
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            signalled |= left
            await self._clock.sleep(0.02)
            left = proctree.descendants(os.getpid())
        self.leftovers_signalled += len(signalled)
        if left:
            self.leftovers_killed += len(left)
            self.kill_descendants()
            await self._until_none_left()

    async def _until_none_left(self) -> None:
        """After SIGKILL: wait (bounded) until the kernel has ended them all, killing late forks too."""
        deadline = self._clock.monotonic() + KILL_REAP_TIMEOUT
        while proctree.usable() and self.kill_descendants() and self._clock.monotonic() < deadline:
            await self._clock.sleep(0.02)

    def _group_alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


__all__ = ["ChildApp"]
