"""How the sidecar reaches the app: start it, watch it, forward signals, stop it.

Wrapper mode: ``ChildApp`` (the app is our child). Alongside mode: ``PidApp``
(a PID or PID file in a shared PID namespace), ``UrlApp`` (an HTTP shutdown
endpoint) or ``ExternalApp`` (the orchestrator stops the app itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import aiohttp

from ..clock import Clock
from ..config import KILL_REAP_TIMEOUT
from ..exit_codes import by_signal
from . import accept_proof, proctree
from .accept_proof import AcceptProof

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


@dataclass(frozen=True)
class StopResult:
    status: int  # exit status to pass on (128 + N for signal N)
    killed: bool  # SIGKILL was needed
    how: str  # what happened, for the log


def exit_status(wait_status: int) -> int:
    """waitpid status -> shell-style exit status (128 + N when signal N ended it)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return by_signal(-code) if code < 0 else code


@runtime_checkable
class App(Protocol):
    """The lifecycle's handle on the app, whatever the mode.

    Every mode provides every member; where one does not apply it holds a neutral value
    (no process of ours: nothing reaped, nothing followed, no leftovers).
    """

    description: str
    exited: asyncio.Future[int]  # resolves when the app ends on its own or after stop()

    @property
    def followed(self) -> frozenset[int]:
        """The processes of a daemon followed as the app since its parent exited 0 (wrapper mode)."""
        ...

    @property
    def orphans_reaped(self) -> int:
        """Exited processes other than the app that the sidecar reaped (it is their subreaper)."""
        ...

    @property
    def leftovers_signalled(self) -> int:
        """Processes the app left behind once it had exited, signalled with ``stop``'s signal."""
        ...

    @property
    def leftovers_killed(self) -> int:
        """Of ``leftovers_signalled``, those that SIGKILL had to end."""
        ...

    def start(self) -> None:
        """Start the app, or begin watching it; raises OSError if the app cannot be started."""
        ...

    def forward(self, sig: signal.Signals) -> None: ...

    def kill(self) -> None: ...

    async def stop(self, sig: signal.Signals, timeout: float) -> StopResult: ...


# --- wrapper mode -------------------------------------------------------------

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _libc_prctl() -> Callable[..., int] | None:
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return fn
    except (OSError, AttributeError):
        return None  # not Linux: no parent-death signal, the finally in cli still kills the app


class Launcher(Protocol):
    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None, listen_fd: int | None = None) -> int:
        """Start ``argv``; with ``listen_fd``, hand it over as fd 3 by socket activation (LISTEN_PID = its PID)."""
        ...

    def mark_reaped(self, pid: int, status: int) -> None:
        """The sidecar's reaper collected ``pid``: a launcher that keeps a handle on it records the status."""
        ...


class PosixLauncher:
    """Starts the app in its own process group, tied to the sidecar's life.

    Own process group: a terminal's Ctrl-C reaches the sidecar only, which
    then drains before the app hears anything. Parent-death signal (Linux):
    if the sidecar is SIGKILLed, the kernel SIGKILLs the app, so it cannot
    outlive the sidecar and keep serving unsupervised.

    Call spawn before any thread exists (the lifecycle does): ``preexec_fn``
    runs between fork and exec.
    """

    def __init__(self) -> None:
        self._prctl = _libc_prctl()
        self._procs: list[subprocess.Popen[bytes]] = []
        # The platform's limit, before raise_nofile_limit: every generation of the app gets it.
        self._nofile = resource.getrlimit(resource.RLIMIT_NOFILE)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None, listen_fd: int | None = None) -> int:
        if listen_fd is not None:
            return self._spawn_activated(argv, env, listen_fd)
        parent = os.getpid()
        prctl = self._prctl

        def in_child() -> None:
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
                if os.getppid() != parent:  # the sidecar died before prctl took effect
                    os._exit(by_signal(signal.SIGKILL))

        proc = subprocess.Popen(list(argv), process_group=0, preexec_fn=in_child, close_fds=True, env=env)
        # Keep the Popen object: dropping it would let subprocess's own cleanup
        # waitpid() the app and steal its exit status from our reaper.
        self._procs.append(proc)
        return proc.pid

    def _spawn_activated(self, argv: Sequence[str], env: Mapping[str, str] | None, listen_fd: int) -> int:
        """Through ``TRAMPOLINE``: LISTEN_PID must be the app's own PID, known only after the fork.

        No ``preexec_fn``: later generations are spawned while the sidecar's log thread runs, and
        code between fork and exec in a threaded process may deadlock. The trampoline (a fresh
        interpreter, one thread) sets the parent-death signal, moves the socket to fd 3, restores
        the platform's descriptor limit and execs the app.
        """
        soft, hard = self._nofile
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(listen_fd), str(os.getpid()), f"{soft},{hard}", *argv],
            process_group=0,
            close_fds=True,
            pass_fds=(listen_fd,),
            env=env,
        )
        self._procs.append(proc)
        return proc.pid

    def mark_reaped(self, pid: int, status: int) -> None:
        for p in self._procs:
            if p.pid == pid:
                p.returncode = status
        self._procs = [p for p in self._procs if p.returncode is None]


def _check_executable(command: str, env: Mapping[str, str] | None) -> None:
    """Through the trampoline a failed exec happens in the child: raise now what Popen would raise."""
    import errno
    import shutil

    if "/" not in command:
        if shutil.which(command, path=(os.environ if env is None else env).get("PATH", os.defpath)) is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)
    elif not os.path.exists(command):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)
    elif os.path.isdir(command) or not os.access(command, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), command)


# Runs in the child, in place of the app, until it execs the app (see PosixLauncher._spawn_activated).
# argv: listen fd, the sidecar's PID, "soft,hard" RLIMIT_NOFILE, the app's argv.
TRAMPOLINE = """
import os, signal, sys
fd, parent, limits, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)
except Exception:
    pass
if os.getppid() != parent:
    os._exit(137)
try:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, tuple(int(x) for x in limits.split(",")))
except Exception:
    pass
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
for s in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(s, signal.SIG_DFL)
os.environ["LISTEN_PID"] = str(os.getpid())
try:
    os.execvp(argv[0], argv)
except OSError as e:
    sys.stderr.write(f"consul-sidecar: cannot start {argv[0]}: {e.strerror or e}\\n")
    os._exit(127 if isinstance(e, FileNotFoundError) else 126)
"""


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

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"generation": self.number, "pid": self.pid, "state": self.state.value}
        if self.status_text is not None:
            out["status"] = self.status_text
        if self.exited.done():
            out["exit_status"] = self.exited.result()
        return out


def become_subreaper() -> bool:
    """Adopt orphaned descendants (as PID 1 does) so they can be reaped; Linux only."""
    prctl = _libc_prctl()
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


class ChildApp:
    """The app as the sidecar's child (wrapper mode).

    "The app" is the direct child and, as the sidecar is a child subreaper, everything it
    starts: on every exit path every descendant is ended, whatever its session or process
    group (see ``proctree``). A direct child that exits 0 while descendants listen on the
    service port has daemonized (as for systemd's ``Type=forking``): those descendants are
    then followed as the app, and ``exited`` resolves only when they are gone.
    """

    FOLLOW_POLL = 0.1

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
        self.env = env
        self.listener = listener
        self._listener_inode = os.fstat(listener.fileno()).st_ino if listener is not None else None
        self._fd_name = fd_name
        self.notify_socket: str | None = None  # NOTIFY_SOCKET for the generations (hot restart)
        self.generations: list[Generation] = []  # the live ones and those not yet collected, oldest first
        self._numbered = 0
        self.description = f"child {self.argv[0]}"
        self._launcher = launcher
        self._clock = clock
        self._follow_port = follow_port
        self._log = log
        self.pid: int | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.orphans_reaped = 0
        self.leftovers_signalled = 0  # descendants still alive once the app had exited
        self.leftovers_killed = 0  # ... of which SIGKILL ended
        self.killed_on_request = False
        self.followed: frozenset[int] = frozenset()  # the daemon's processes, once the direct child has left them
        self._followed_roots: list[int] = []
        self._followed_status: dict[int, int] = {}
        self._follow_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._listener_check: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Spawn the app; raises OSError (FileNotFoundError, PermissionError) if it cannot."""
        loop = asyncio.get_running_loop()
        # Reaping runs in the event loop (not in the signal context): asyncio's
        # signal handler only wakes the loop; the callback then collects every
        # child that has ended - the app, and any orphan re-parented to us.
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        if self.listener is not None:
            _check_executable(self.argv[0], self.env)
        gen = self._spawn(1)
        gen.state = GenState.SERVING
        self.pid = gen.pid
        self.description = f"pid {self.pid} ({self.argv[0]})"
        self.reap()  # in case it ended before the handler saw a SIGCHLD
        if self._follow_port is not None and self._log is not None and proctree.usable():
            self._listener_check = loop.create_task(self._check_listener(self._follow_port, self._log))

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

    @property
    def current(self) -> Generation | None:
        return next((g for g in self.generations if g.pid == self.pid), None)

    def start_next(self) -> Generation:
        """Hot restart: spawn the next generation beside the current one (same socket); raises OSError."""
        assert self.listener is not None and self.pid is not None
        if self.listener.fileno() < 0:
            raise OSError("the listening socket is closed: the sidecar is stopping")
        gen = self._spawn(self._numbered + 1)
        self.reap()
        return gen

    def promote(self, gen: Generation) -> Generation | None:
        """``gen`` becomes the current generation (its exit is now the app's); the previous one is returned."""
        old = self.current
        gen.state = GenState.SERVING
        self.pid = gen.pid
        self.description = f"pid {self.pid} ({self.argv[0]}, generation {gen.number})"
        if old is not None and old is not gen and old.state is GenState.SERVING:
            old.state = GenState.STOPPING
        return old

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

    def name_process(self, pid: int) -> str:
        """'generation N (pid P)' for a process of a live generation, else 'pid P'."""
        gen = self.generation_of(pid)
        if gen is None:
            return f"pid {pid}"
        return f"generation {gen.number} (pid {pid})" if gen.pid == pid else f"generation {gen.number} (its pid {pid})"

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
        self._signal_once(gen, sig)
        deadline = self._clock.monotonic() + timeout
        while not gen.exited.done() and self._clock.monotonic() < deadline:
            if usable:
                family |= proctree.tree(gen.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(gen.exited), min(self.FOLLOW_POLL, max(0.0, deadline - self._clock.monotonic()))
                )
        if gen.exited.done():
            left = ({p for p in family - {gen.pid} if proctree.alive(p)} | self._left_by(gen)) if usable else set()
            if left:  # leftovers of a clean exit: the same signal, then SIGKILL (as the app's at the end)
                await self._end_left(left, sig)
            return StopResult(gen.exited.result(), False, f"exited after {sig.name}")
        if usable:
            family |= proctree.tree(gen.pid)
        self._signal_all({p for p in family if proctree.alive(p)} if usable else family, signal.SIGKILL)
        try:
            status = await asyncio.wait_for(asyncio.shield(gen.exited), KILL_REAP_TIMEOUT)
        except TimeoutError:
            status = by_signal(signal.SIGKILL)
        return StopResult(status, True, f"did not exit within {timeout:g}s of {sig.name}; sent SIGKILL")

    @staticmethod
    def _signal_once(gen: Generation, sig: signal.Signals) -> None:
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
        self._signal_all(left, sig)
        end = self._clock.monotonic() + KILL_REAP_TIMEOUT
        while any(proctree.alive(p) for p in left) and self._clock.monotonic() < end:
            await self._clock.sleep(0.02)
        self._signal_all({p for p in left if proctree.alive(p)}, signal.SIGKILL)

    @staticmethod
    def _signal_all(pids: set[int], sig: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def forget_exited(self) -> None:
        """Drop collected generations other than the current one from the list /status shows."""
        self.generations = [g for g in self.generations if g.pid == self.pid or not g.exited.done()]

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

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            gen = next((g for g in self.generations if g.pid == pid), None)
            if gen is not None:
                code = exit_status(status)
                self._launcher.mark_reaped(pid, code)
                if not gen.exited.done():
                    gen.exited.set_result(code)
                gen.state = GenState.EXITED
                if pid == self.pid and not self.exited.done() and not (code == 0 and self._follow_daemon()):
                    self.release_listener()
                    self.exited.set_result(code)
            else:
                self.orphans_reaped += 1
                if pid in self.followed:
                    self._followed_status[pid] = exit_status(status)

    # --- a daemonizing app ----------------------------------------------------------

    def _follow_daemon(self) -> bool:
        """The direct child exited 0: if descendants listen on the service port, it daemonized.

        Deregistering then would take a live server out of discovery and leave it running
        unsupervised; follow it instead. Not while stopping: an app asked to stop that
        leaves listeners behind gets the leftovers' treatment (app_signal, then SIGKILL).
        """
        if self._follow_port is None or self._stopping or self.listener is not None or not proctree.usable():
            # With hot restart every generation holds the sidecar's socket: no exit is a daemon's.
            return False
        followed = proctree.listeners(proctree.descendants(os.getpid()), self._follow_port)
        if not followed:
            return False
        self.followed = frozenset(followed)
        # Signals go to the daemon's top processes (a master), not to each of its workers.
        self._followed_roots = sorted(p for p in followed if proctree.parent(p) not in followed)
        parent = self.pid
        self.description = (
            f"daemon pid {','.join(map(str, self._followed_roots))} (forked by pid {parent}, {self.argv[0]})"
        )
        if self._log is not None:
            self._log.info(
                "sidecar.app.daemon_followed",
                parent_pid=parent,
                pids=sorted(followed),
                port=self._follow_port,
                hint="the app's process exited 0 leaving these listening on the service port: they are the app now",
            )
        self._follow_task = asyncio.get_running_loop().create_task(self._watch_daemon())
        return True

    async def _watch_daemon(self) -> None:
        while True:
            self.reap()  # a daemon that is our child leaves its status here before it stops looking alive
            if not any(proctree.alive(p) for p in self.followed):
                break
            await self._clock.sleep(self.FOLLOW_POLL)
        # The status of the last one we reaped ourselves (a daemon re-parented to us, or its master);
        # 0 if none was ours.
        statuses = list(self._followed_status.values())
        if not self.exited.done():
            self.exited.set_result(statuses[-1] if statuses else 0)

    # --- signals ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.pid is not None and not self.exited.done()

    def _targets(self) -> list[int]:
        return self._followed_roots if self.followed else ([self.pid] if self.pid is not None else [])

    def _other_generations(self) -> list[Generation]:
        return [g for g in self.generations if g.pid != self.pid and not g.exited.done()]

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
        self.release_listener()
        others = self._other_generations()
        for gen in others:  # a replaced one already signalled keeps its clock; the others hear sig now
            gen.state = GenState.STOPPING
            self._signal_once(gen, sig)
        if self.exited.done():
            if others:  # not leftovers: a replaced generation still draining keeps its timeout
                await asyncio.wait([asyncio.ensure_future(asyncio.shield(g.exited)) for g in others], timeout=timeout)
            await self._end_leftovers(sig)
            return StopResult(self.exited.result(), False, "had already exited")
        self.forward(sig)
        if (cur := self.current) is not None:
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


# --- alongside mode -----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it has exited for our purpose.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class _NotOurChild:
    """Alongside mode: the app is not the sidecar's child, so nothing of it is reaped, followed or left over."""

    followed: frozenset[int] = frozenset()
    orphans_reaped = 0
    leftovers_signalled = 0
    leftovers_killed = 0


class PidApp(_NotOurChild):
    """An app in a shared PID namespace, known by PID or PID file (alongside mode).

    A PID is trusted only once it is the app's: alive and (with ``port``) holding, itself or through
    a descendant, a socket listening on ``address``:``port``. Until then the PID file is read again
    at every check (a stale file names a dead or an unrelated process until the app writes its own),
    nothing is followed and nothing is signalled. Once trusted, that PID is the app for good: when
    it ends, the app has exited, whatever the file says later.
    """

    POLL = 0.05
    RECHECK = 0.5  # at most this often a full check (it may scan /proc to name who listens instead)

    def __init__(
        self,
        pid: int | None,
        pid_file: Path | None,
        clock: Clock,
        address: str | None = None,
        port: int | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        """Without ``port`` (unit tests) any live PID is trusted."""
        self._pid = pid
        self._pid_file = pid_file
        self._clock = clock
        self._address = address or "127.0.0.1"
        self._port = port
        self._log = log
        self.description = f"pid {pid}" if pid is not None else f"pid file {pid_file}"
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._watch: asyncio.Task[None] | None = None
        self.trusted: int | None = None  # the app's PID once verified; followed and signalled from then on
        self._last: tuple[float, int | None, str, str | None] | None = None  # (when, *_check()) of the last check

    def candidate(self) -> int:
        """The PID as configured or as the PID file holds it now; raises OSError or ValueError with the reason."""
        if self._pid is not None:
            return self._pid
        assert self._pid_file is not None
        text = self._pid_file.read_text(encoding="utf-8").strip()
        try:
            pid = int(text)
        except ValueError:
            raise ValueError(f"{self._pid_file} does not hold a PID: {text[:40]!r}") from None
        if pid <= 0:
            raise ValueError(f"{self._pid_file} holds {pid}, not a PID")
        return pid

    def pid(self) -> int:
        """The trusted PID, or until there is one the candidate; raises OSError or ValueError if unknown."""
        return self.trusted if self.trusted is not None else self.candidate()

    def verify(self, healthy: bool) -> str | None:
        """Check the candidate PID now: None once it is trusted, else why it is not (yet).

        ``healthy``: the check URL answers 2xx. Where the listening socket's owner cannot be told
        (no sock_diag, another network namespace, descriptors of another user), a live PID is
        trusted once the app is healthy, as the port-owner check does.
        """
        if self.trusted is not None:
            return None
        now = self._clock.monotonic()
        if self._last is None or now - self._last[0] >= self.RECHECK:
            self._last = (now, *self._check())
        _, pid, verdict, why = self._last
        if pid is not None and (verdict == "yes" or (verdict == "unknown" and healthy)):
            self._trust(pid, why)
            return None
        return why or "?"

    def _check(self) -> tuple[int | None, str, str | None]:
        """(the candidate PID, "yes" / "no" / "unknown", the reason) as /proc and sock_diag show them now."""
        from . import port_owner

        try:
            pid = self.candidate()
        except FileNotFoundError:
            return None, "no", f"pid_file {self._pid_file} does not exist (yet)"
        except (OSError, ValueError) as e:
            return None, "no", f"pid_file: {e}"
        what = f"pid_file {self._pid_file} names" if self._pid is None else "app.pid is"
        if self._port is None:
            return (pid, "yes", None) if _alive(pid) else (pid, "no", f"{what} PID {pid}, which is not running")
        verdict, why = port_owner.check_app_pid(pid, what, self._address, self._port)
        return pid, verdict, why

    def _trust(self, pid: int, detail: str | None) -> None:
        self.trusted = pid
        source = f"pid file {self._pid_file}" if self._pid is None else "app.pid"
        self.description = f"pid {pid} (from {source})"
        if self._log is not None:
            self._log.info(
                "sidecar.app.pid_verified",
                pid=pid,
                source=source,
                detail=detail or f"it listens on {self._address}:{self._port}",
            )

    def start(self) -> None:
        """Watch the app: resolve ``exited`` when its process goes away (it runs already, or soon)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        # Until the PID is the app's (the app may write its PID file after we start; a stale file
        # names a dead or an unrelated process): the lifecycle checks while it waits for health, and so
        # do we, without health, so that a PID verified before the app is healthy is followed at once.
        while self.verify(healthy=False) is not None:
            await self._clock.sleep(self.RECHECK)
        pid = self.trusted
        assert pid is not None
        while _alive(pid):
            await self._clock.sleep(self.POLL)
        if not self.exited.done():
            self.exited.set_result(0)

    def _target(self) -> int | None:
        """The PID to signal: the trusted one; before any is, one last check (never an unverified PID)."""
        self.verify(healthy=False)
        return self.trusted

    def forward(self, sig: signal.Signals) -> None:
        pid = self._target()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def kill(self) -> None:
        self.forward(signal.SIGKILL)

    async def stop(self, sig: signal.Signals, timeout: float) -> StopResult:
        if self.exited.done():
            return StopResult(0, False, "had already exited")  # do not signal a PID that may be reused
        self._last = None  # a fresh look, not one cached while waiting for health
        why = self.verify(healthy=False)
        pid = self.trusted
        if pid is None:
            return StopResult(1, False, f"not signalled: no PID was verified as the app's ({why})")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return StopResult(0, False, "was already gone")
        except OSError as e:
            return StopResult(1, False, f"could not be signalled: {e}")
        deadline = self._clock.monotonic() + timeout
        while _alive(pid):
            if self._clock.monotonic() >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
                return StopResult(
                    by_signal(signal.SIGKILL), True, f"did not exit within {timeout:g}s of {sig.name}; sent SIGKILL"
                )
            await self._clock.sleep(self.POLL)
        return StopResult(0, False, f"exited after {sig.name}")


class UrlApp(_NotOurChild):
    """An app that stops on ``POST shutdown_url`` (alongside mode, no shared PID namespace)."""

    POLL = 0.1

    def __init__(self, shutdown_url: str, check_url: str, clock: Clock) -> None:
        self._shutdown_url = shutdown_url
        self._check_url = check_url
        self._clock = clock
        self.description = f"POST {shutdown_url}"
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        pass  # the app runs elsewhere; without a PID its exit cannot be watched

    def forward(self, sig: signal.Signals) -> None:
        pass  # no process to signal

    def kill(self) -> None:
        pass

    async def _answers(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self._check_url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                await r.read()
                return True
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def stop(self, sig: signal.Signals, timeout: float) -> StopResult:
        deadline = self._clock.monotonic() + timeout
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            try:
                async with session.post(
                    self._shutdown_url, timeout=aiohttp.ClientTimeout(total=max(0.1, timeout))
                ) as r:
                    await r.read()
                    if r.status >= 400:
                        return StopResult(1, False, f"POST {self._shutdown_url} answered {r.status}")
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                # A server that closes the connection as it stops is fine:
                # whether the app is gone is decided below.
                if not await self._answers(session):
                    return StopResult(0, False, "stopped answering after the shutdown request")
                return StopResult(1, False, f"POST {self._shutdown_url} failed: {e.__class__.__name__}: {e}")
            while await self._answers(session):
                if self._clock.monotonic() >= deadline:
                    return StopResult(
                        1, False, f"still answering {self._check_url} {timeout:g}s after the shutdown request"
                    )
                await self._clock.sleep(self.POLL)
        return StopResult(0, False, "stopped answering after the shutdown request")


class ExternalApp(_NotOurChild):
    """Alongside mode with no way to reach the app: the orchestrator stops it."""

    description = "managed elsewhere"

    def __init__(self) -> None:
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        pass  # the orchestrator starts and stops it

    def forward(self, sig: signal.Signals) -> None:
        pass

    def kill(self) -> None:
        pass

    async def stop(self, sig: signal.Signals, timeout: float) -> StopResult:
        return StopResult(0, False, "left to the orchestrator (no [app] setting)")


__all__ = [
    "App",
    "ChildApp",
    "ExternalApp",
    "GenState",
    "Generation",
    "Launcher",
    "PidApp",
    "PosixLauncher",
    "StopResult",
    "UrlApp",
    "become_subreaper",
    "exit_status",
]


def app_processes(app: object) -> tuple[set[int] | None, str]:
    """The processes whose sockets count as the app's: in wrapper mode everything the sidecar started
    (the app, its descendants, orphans reaped into ours; the sidecar itself under hot restart, whose socket
    it shares with the app), in alongside mode the PID's tree. (None, why) when there is no PID to go by."""
    if isinstance(app, ChildApp) and app.pid is not None:
        tree = proctree.tree(os.getpid(), False)
        if app.listener is not None:
            tree.add(os.getpid())
        return tree, ""
    if isinstance(app, PidApp):
        try:
            return proctree.tree(app.pid(), True), ""
        except (OSError, ValueError) as e:
            return None, f"the app's PID is not known: {e}"
    return None, "no PID to check against (set app.pid or app.pid_file, or run the app after '--')"
