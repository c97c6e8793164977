"""Signals that come before the event loop's handlers exist.

Python's start-up and the imports take a few hundred milliseconds before ``run`` installs its
handlers, and the default action of SIGHUP, SIGUSR1 and SIGUSR2 ends the process: a reload sent just
after a start (``systemctl reload``, a log rotation's HUP) would kill the sidecar without a word.
``hold()``, called first thing in ``run``, only records them; once the SignalInbox has taken over,
the lifecycle logs each as ignored (``sidecar.signal.ignored``): it came before there was an app to
pass it to or a generation to replace, and replaying it to an app that is just starting would hit
the app at its most fragile moment. Standard library only: it is
imported before anything heavy. Handlers caught in Python reset to the default at exec, so the app
starts with its usual dispositions.

``hold_shutdown()``, called just before ``asyncio.run``, records SIGINT and SIGTERM the same way until
the SignalInbox takes over. asyncio.run installs its own SIGINT handler only where SIGINT still has
Python's default one: without this, a Ctrl-C during the lazy imports of ``_run`` cancelled the main
task, the cancellation landed at the first ``await`` after the app had been spawned, and the app was
SIGKILLed with no drain and no log line. Held, the lifecycle sees it before spawning anything, logs
it and ends without starting the app.
"""

from __future__ import annotations

import signal
from types import FrameType

HELD = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
SHUTDOWN_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
_received: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def hold() -> None:
    for sig in HELD:
        signal.signal(sig, _record)


def hold_shutdown() -> None:
    """Record SIGINT, SIGTERM and SIGQUIT too (before the event loop starts; see the module's text)."""
    for sig in SHUTDOWN_HELD:
        signal.signal(sig, _record)


def take() -> list[signal.Signals]:
    """What came while held, in order; the list is emptied."""
    out = [signal.Signals(s) for s in _received]
    _received.clear()
    return out
