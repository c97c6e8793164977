"""The typed contracts between the parts: the App protocol every mode fulfils, the exit statuses
and the drain's end reasons as docs/operations.md and docs/events.md document them (pure checks,
and one real process)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import exit_codes
from sidecar.clock import SystemClock
from sidecar.process.alongside import ExternalApp, PidApp, UrlApp
from sidecar.process.app_control import NO_PID, App, app_processes
from sidecar.process.child import ChildApp
from sidecar.process.launcher import PosixLauncher
from sidecar.state import DrainEnd

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"  # signals, exit statuses, modes
EVENTS = ROOT / "docs" / "events.md"  # the log events and their fields


def _protocol_members() -> set[str]:
    declared = {name for name in vars(App) if not name.startswith("_")}
    return declared | set(App.__annotations__)


def _every_mode() -> list[App]:
    clock = SystemClock()
    return [
        ChildApp(["true"], PosixLauncher(), clock),
        PidApp(1, None, clock),
        UrlApp("http://127.0.0.1:1/shutdown", "http://127.0.0.1:1/healthz", clock),
        ExternalApp(),
    ]


@pytest.mark.asyncio
async def test_every_app_mode_provides_every_member_of_the_protocol() -> None:
    """Each App implementation (wrapper: ChildApp; alongside: PidApp, UrlApp, ExternalApp) has every
    member the lifecycle uses (start, followed, orphans_reaped, leftovers_*...), and before the app has
    done anything they hold the neutral values: nothing followed, reaped or left over."""
    members = _protocol_members()
    assert {"start", "followed", "orphans_reaped", "leftovers_signalled", "leftovers_killed", "exited"} <= members
    for app in _every_mode():
        missing = sorted(m for m in members if not hasattr(app, m))
        assert missing == [], f"{type(app).__name__} lacks {missing}"
        assert app.followed == frozenset(), type(app).__name__
        assert (app.orphans_reaped, app.leftovers_signalled, app.leftovers_killed) == (0, 0, 0), type(app).__name__


@pytest.mark.asyncio
async def test_app_processes_asks_each_mode_for_its_own(tmp_path: Path) -> None:
    """app_processes (the port-owner check's tree) in every mode: the PID's tree for PidApp, nothing
    to go by (and why) for a child not started yet, a missing PID file, a shutdown URL, the orchestrator."""
    clock = SystemClock()
    me = os.getpid()
    tree, why = app_processes(PidApp(me, None, clock))
    assert tree is not None and me in tree and why == ""
    assert app_processes(ChildApp(["true"], PosixLauncher(), clock)) == (None, NO_PID)
    tree, why = app_processes(PidApp(None, tmp_path / "missing.pid", clock))
    assert tree is None and why.startswith("the app's PID is not known") and "missing.pid" in why, why
    for app in (UrlApp("http://127.0.0.1:1/s", "http://127.0.0.1:1/h", clock), ExternalApp()):
        assert app_processes(app) == (None, NO_PID), type(app).__name__


@pytest.mark.integration
@pytest.mark.asyncio
async def test_alongside_start_watches_the_app_until_it_exits() -> None:
    """PidApp.start (the protocol's start: alongside mode watches, it does not spawn) on a real
    process: ``exited`` resolves once the process has ended, and not before."""
    proc = subprocess.Popen(["sleep", "0.5"])
    try:
        app = PidApp(proc.pid, None, SystemClock())
        app.start()
        await asyncio.sleep(0.1)
        assert not app.exited.done()
        assert await asyncio.wait_for(app.exited, 10) == 0
        # The stoppers for apps that are not our children: start() does nothing and does not fail.
        for other in (UrlApp("http://127.0.0.1:1/s", "http://127.0.0.1:1/h", SystemClock()), ExternalApp()):
            other.start()
            assert not other.exited.done()
    finally:
        proc.kill()
        proc.wait()


def _doc_section(doc: Path, title: str) -> str:
    text = doc.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_exit_codes_are_the_documented_table() -> None:
    """Every status in docs/operations.md's "Exit status" table that the sidecar decides itself (all but
    the app's own, and alongside mode's 0 / 1 / 137) is a constant in sidecar.exit_codes, and every
    constant there is in the table: the two cannot drift apart."""
    documented: set[int] = set()
    for row in _doc_section(OPERATIONS, "Exit status").splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if not row.startswith("|") or not re.fullmatch(r"[\d / ]+", cells[0]) or "alongside mode" in cells[1]:
            continue
        documented |= {int(n) for n in re.findall(r"\d+", cells[0])}
    defined = {v for k, v in vars(exit_codes).items() if k.startswith("EX_")}
    assert documented == defined == {2, 67, 69, 70, 75, 77, 78, 126, 127, 130, 143}
    assert (
        exit_codes.by_signal(9) == 137 and exit_codes.by_signal(34 + 3) == 165
    )  # a real-time signal has no Signals member


def test_drain_end_reasons_are_documented() -> None:
    """Each reason ``sidecar.drain.delay_done`` can log is listed, verbatim, in docs/events.md."""
    text = " ".join(EVENTS.read_text(encoding="utf-8").split())  # a line break in Markdown is a space
    assert [r.value for r in DrainEnd if f"`{r.value}`" not in text] == []


@pytest.mark.integration
def test_command_line_error_exits_2_without_traceback() -> None:
    """A command after '--' for a command that takes none: exit 2 (bad command line), one message."""
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "-c", "/nonexistent.toml", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "takes no command after '--'" in r.stderr and "Traceback" not in r.stderr, r
