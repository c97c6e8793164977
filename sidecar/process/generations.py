"""The generations of the app (wrapper mode): the runs of its command, one serving, two at once during a hot restart.

Without hot restart there is one, generation 1. With it (the sidecar's listening socket handed to every
generation as fd 3) the lifecycle starts the next one beside the current one (``start_next``), makes it
the current one once it is ready (``promote``) and stops the one it replaced (``stop_generation``),
each without touching the other's processes. Which generation a process belongs to, whether one holds
the socket and is seen accepting on it, come from /proc and sock_diag. The reaper reports each
generation's exit (``collect``); what the app as a whole does then is ChildApp's (child.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..clock import Clock
from ..config import KILL_REAP_TIMEOUT
from ..exit_codes import by_signal
from . import accept_proof, proctree
from .accept_proof import AcceptProof
from .app_control import StopResult
from .launcher import Launcher, check_executable


class GenState(enum.StrEnum):
    STARTING = "starting"  # spawned by a hot restart, not ready yet
    SERVING = "serving"  # the current generation
    STOPPING = "stopping"  # signalled: a replaced generation, or a failed new one
    EXITED = "exited"


@dataclass
class Generation:
    """One run of the app's command (hot restart runs two at once for a while)."""

    number: int
    pid: int
    exited: asyncio.Future[int]
    state: GenState = GenState.STARTING
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    status_text: str | None = None  # its last STATUS= message
    signalled: bool = False
    started: int | None = None  # its start time (proctree.start_time), where /proc tells


class Generations:
    """The app's generations, oldest first: the live ones and those not yet collected (``forget_exited``).

    ``listener``: hot restart: the sidecar's listening socket, handed to every generation
    (LISTEN_FDS=1, LISTEN_FDNAMES=``fd_name``, NOTIFY_SOCKET=``notify_socket`` once set).
    ``collect_now``: collects the children that have ended (the reaper's), run after each spawn in
    case the new generation ended before its SIGCHLD was handled.
    """

    POLL = 0.1  # while a generation stops: how often its family is looked at again

    def __init__(
        self,
        argv: Sequence[str],
        launcher: Launcher,
        clock: Clock,
        env: Mapping[str, str] | None = None,
        listener: socket.socket | None = None,
        fd_name: str = "http",
        collect_now: Callable[[], None] = lambda: None,
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.listener = listener
        self._listener_inode = os.fstat(listener.fileno()).st_ino if listener is not None else None
        self._fd_name = fd_name
        self.notify_socket: str | None = None  # NOTIFY_SOCKET for the generations (hot restart)
        self.generations: list[Generation] = []  # the live ones and those not yet collected, oldest first
        self._numbered = 0
        self._current: Generation | None = None
        self._launcher = launcher
        self._clock = clock
        self._collect_now = collect_now

    @property
    def current(self) -> Generation | None:
        """The serving generation: its exit is the app's."""
        return self._current

    def start_first(self) -> Generation:
        """Spawn generation 1, the current one; raises OSError (FileNotFoundError, PermissionError) if it cannot."""
        if self.listener is not None:
            check_executable(self.argv[0], self.env)
        gen = self._spawn(1)
        gen.state = GenState.SERVING
        self._current = gen
        return gen

    def _spawn(self, number: int) -> Generation:
        env = dict(os.environ if self.env is None else self.env)
        listen_fd = None
        if self.listener is not None:
            listen_fd = self.listener.fileno()
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES=self._fd_name)
            env.pop("LISTEN_PID", None)  # the trampoline sets it to the app's own PID
            if self.notify_socket is not None:
                env["NOTIFY_SOCKET"] = self.notify_socket
        pid = self._launcher.spawn(self.argv, env if self.listener is not None else self.env, listen_fd)
        gen = Generation(number, pid, asyncio.get_running_loop().create_future())
        gen.started = proctree.start_time(pid) if proctree.usable() else None
        self._numbered = number  # a failed generation keeps its number: the next one gets a new one
        self.generations.append(gen)
        return gen

    def start_next(self) -> Generation:
        """Hot restart: spawn the next generation beside the current one (same socket); raises OSError."""
        assert self.listener is not None and self._current is not None
        if self.listener.fileno() < 0:
            raise OSError("the listening socket is closed: the sidecar is stopping")
        gen = self._spawn(self._numbered + 1)
        self._collect_now()
        return gen

    def promote(self, gen: Generation) -> Generation | None:
        """``gen`` becomes the current generation (its exit is now the app's); the previous one is returned."""
        old = self._current
        gen.state = GenState.SERVING
        self._current = gen
        if old is not None and old is not gen and old.state is GenState.SERVING:
            old.state = GenState.STOPPING
        return old

    def collect(self, pid: int, status: int) -> Generation | None:
        """The reaper collected ``pid`` with exit ``status``: the generation it was, now exited, or None."""
        gen = next((g for g in self.generations if g.pid == pid), None)
        if gen is None:
            return None
        self._launcher.mark_reaped(pid, status)
        if not gen.exited.done():
            gen.exited.set_result(status)
        gen.state = GenState.EXITED
        return gen

    def others(self) -> list[Generation]:
        """The live generations other than the current one (a replaced one still draining, a new one)."""
        return [g for g in self.generations if g is not self._current and not g.exited.done()]

    def forget_exited(self) -> None:
        """Drop collected generations other than the current one from the list /status shows."""
        self.generations = [g for g in self.generations if g is self._current or not g.exited.done()]

    def generation_of(self, pid: int) -> Generation | None:
        """The live generation ``pid`` belongs to: its own process or one of its descendants."""
        live = {g.pid: g for g in self.generations if not g.exited.done()}
        seen = 0
        while pid > 1 and seen < 64:
            if pid in live:
                return live[pid]
            if pid == os.getpid():
                return None
            parent = proctree.parent(pid)
            if parent is None:
                return None
            pid, seen = parent, seen + 1
        return None

    def name_process(self, pid: int) -> str:
        """'generation N (pid P)' for a process of a live generation, else 'pid P'."""
        gen = self.generation_of(pid)
        if gen is None:
            return f"pid {pid}"
        return f"generation {gen.number} (pid {pid})" if gen.pid == pid else f"generation {gen.number} (its pid {pid})"

    # --- the listening socket ---------------------------------------------------------

    def release_listener(self) -> None:
        """Close the sidecar's copy of the listening socket (no generation is started after this): it
        then closes with the app's last copy, and a late client is refused at once, as without hot
        restart, rather than queued where nobody accepts any more until the sidecar exits."""
        if self.listener is not None:
            self.listener.close()

    def holds_listener(self, gen: Generation) -> bool | None:
        """Whether ``gen`` or one of its descendants holds the listening socket; None where /proc cannot
        tell (no usable /proc, a process of another user whose descriptors we may not read)."""
        if self._listener_inode is None or not proctree.usable():
            return None
        unknown = False
        for pid in proctree.tree(gen.pid):
            held = proctree.socket_inodes(pid)
            if held is None:
                unknown = True
            elif self._listener_inode in held:
                return True
        return None if unknown else False

    async def seen_accepting(self, gen: Generation, deadline: float) -> AcceptProof:
        """Whether ``gen`` (or a descendant, e.g. a gunicorn worker) is seen accepting a connection on
        the listening socket by ``deadline`` (see accept_proof.py): probes the other generation
        accepts are closed and retried."""
        assert self.listener is not None
        me = os.getpid()
        return await accept_proof.seen_accepting(
            self.listener,
            lambda: proctree.tree(gen.pid),
            lambda: proctree.descendants(me),
            gen.exited.done,
            self._clock,
            deadline,
        )

    # --- stopping one generation ------------------------------------------------------

    async def stop_generation(self, gen: Generation, sig: signal.Signals, timeout: float) -> StopResult:
        """Stop one generation (not the app): ``sig``, ``timeout`` to exit, then SIGKILL to it and its
        descendants. The other generation and its processes are untouched."""
        gen.state = GenState.STOPPING
        usable = proctree.usable()
        if gen.exited.done():
            # It exited before it was stopped (a new generation that failed): what it started may
            # still run, holding the listening socket beside the current generation.
            left = self._left_by(gen) if usable else set()
            if left:
                await self._end_left(left, sig)
            return StopResult(gen.exited.result(), False, "had already exited")
        # Its processes, watched while it stops: once it has exited, what it leaves is re-parented
        # to the sidecar and no longer tells which generation it came from.
        family = proctree.tree(gen.pid) if usable else {gen.pid}
        self.signal_once(gen, sig)
        deadline = self._clock.monotonic() + timeout
        while not gen.exited.done() and self._clock.monotonic() < deadline:
            if usable:
                family |= proctree.tree(gen.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(gen.exited), min(self.POLL, max(0.0, deadline - self._clock.monotonic()))
                )
        if gen.exited.done():
            left = ({p for p in family - {gen.pid} if proctree.alive(p)} | self._left_by(gen)) if usable else set()
            if left:  # leftovers of a clean exit: the same signal, then SIGKILL (as the app's at the end)
                await self._end_left(left, sig)
            return StopResult(gen.exited.result(), False, f"exited after {sig.name}")
        if usable:
            family |= proctree.tree(gen.pid)
        _signal_all({p for p in family if proctree.alive(p)} if usable else family, signal.SIGKILL)
        try:
            status = await asyncio.wait_for(asyncio.shield(gen.exited), KILL_REAP_TIMEOUT)
        except TimeoutError:
            status = by_signal(signal.SIGKILL)
        return StopResult(status, True, f"did not exit within {timeout:g}s of {sig.name}; sent SIGKILL")

    @staticmethod
    def signal_once(gen: Generation, sig: signal.Signals) -> None:
        """``sig`` to ``gen`` unless it already had it: a generation's stop clock starts once."""
        if gen.signalled:
            return
        gen.signalled = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(gen.pid, sig)

    def _left_by(self, gen: Generation) -> set[int]:
        """What ``gen``, which has exited, left running that its tree no longer shows (re-parented to
        the sidecar): the members of its process group (each generation leads its own), whatever holds
        the listening socket outside every live generation's tree and started after ``gen`` (a process
        in a session of its own), and what those started."""
        everyone = proctree.descendants(os.getpid())
        kept: set[int] = set()
        for g in self.generations:
            if g is not gen and not g.exited.done():
                kept |= proctree.tree(g.pid)
        found = {p for p in everyone - kept if proctree.group(p) == gen.pid}
        if self._listener_inode is not None and gen.started is not None:
            later = {p for p in everyone - kept if (proctree.start_time(p) or 0) >= gen.started}
            found |= proctree.holders(later, {self._listener_inode})
        for p in list(found):
            found |= proctree.descendants(p)
        return found - kept

    async def _end_left(self, left: set[int], sig: signal.Signals) -> None:
        """The same signal, then SIGKILL after KILL_REAP_TIMEOUT (as the app's leftovers at the end)."""
        _signal_all(left, sig)
        end = self._clock.monotonic() + KILL_REAP_TIMEOUT
        while any(proctree.alive(p) for p in left) and self._clock.monotonic() < end:
            await self._clock.sleep(0.02)
        _signal_all({p for p in left if proctree.alive(p)}, signal.SIGKILL)


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


__all__ = ["GenState", "Generation", "Generations"]
