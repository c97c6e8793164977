"""How the sidecar reaches the app, whatever the mode: the ``App`` protocol the lifecycle holds.

Wrapper mode: ``ChildApp`` (child.py; the app is our child), made of its generations (generations.py),
its reaper and daemon follower (reaper.py), started by a launcher (launcher.py). Alongside mode
(alongside.py): ``PidApp`` (a PID or PID file in a shared PID namespace), ``UrlApp`` (an HTTP shutdown
endpoint) or ``ExternalApp`` (the orchestrator stops the app itself).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..exit_codes import by_signal


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

    exited: asyncio.Future[int]  # resolves when the app ends on its own or after stop()

    @property
    def description(self) -> str:
        """What the app is, for the log and /status: its PID and command, a daemon, a URL."""
        ...

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


NO_PID = "no PID to check against (set app.pid or app.pid_file, or run the app after '--')"


@runtime_checkable
class HasProcesses(Protocol):
    """An app whose processes are known (wrapper mode, and alongside mode with a PID)."""

    def processes(self) -> tuple[set[int] | None, str]: ...


def app_processes(app: App) -> tuple[set[int] | None, str]:
    """The processes whose sockets count as the app's: in wrapper mode everything the sidecar started
    (the app, its descendants, orphans reaped into ours; the sidecar itself under hot restart, whose socket
    it shares with the app), in alongside mode the PID's tree. (None, why) when there is no PID to go by."""
    if isinstance(app, HasProcesses):
        return app.processes()
    return None, NO_PID


__all__ = ["NO_PID", "App", "HasProcesses", "StopResult", "app_processes", "exit_status"]
