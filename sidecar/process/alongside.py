"""Alongside mode: the app is not the sidecar's child; the sidecar watches and stops it from beside it.

``PidApp``: a PID or PID file in a shared PID namespace (verified as the app's before it is trusted).
``UrlApp``: an HTTP shutdown endpoint. ``ExternalApp``: the orchestrator stops the app itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from ..clock import Clock
from ..exit_codes import by_signal
from . import proctree
from .app_control import StopResult

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


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

    def processes(self) -> tuple[set[int] | None, str]:
        """The PID's tree (see app_control.app_processes); (None, why) while the PID is not known."""
        try:
            return proctree.tree(self.pid(), True), ""
        except (OSError, ValueError) as e:
            return None, f"the app's PID is not known: {e}"

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


__all__ = ["ExternalApp", "PidApp", "UrlApp"]
