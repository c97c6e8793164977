"""Starting the app's processes (wrapper mode): ``Launcher``, and ``PosixLauncher`` for the real thing.

Each run of the app's command starts in its own process group, tied to the sidecar's life (a
parent-death signal). With hot restart the sidecar's listening socket is handed over as fd 3 by
socket activation, through ``TRAMPOLINE`` (LISTEN_PID is the app's own PID, known only after the fork).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ..exit_codes import by_signal

PR_SET_PDEATHSIG = 1


def libc_prctl() -> Callable[..., int] | None:
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
        self._prctl = libc_prctl()
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


def check_executable(command: str, env: Mapping[str, str] | None) -> None:
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
