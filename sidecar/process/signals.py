"""Signal handlers only record: each delivery goes into a queue the lifecycle reads."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol, runtime_checkable

# Ends the sidecar's life (drain first). SIGQUIT too: its default action (a core dump) would end the
# sidecar with the instance registered and the app unsignalled; a Ctrl-\ or an image's STOPSIGNAL
# SIGQUIT (nginx's graceful stop) asks for a stop, so it drains like SIGTERM.
SHUTDOWN = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
# Passed on to the app untouched, as a good init does.
FORWARDED = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH})


@runtime_checkable
class Inbox(Protocol):
    """Where the lifecycle receives signals: a queue that handlers only put into."""

    queue: asyncio.Queue[signal.Signals]

    def install(self) -> None: ...

    def uninstall(self) -> None: ...


class SignalInbox:
    def __init__(self, extra: frozenset[signal.Signals] = frozenset()) -> None:
        """``extra``: more signals to record (hot_restart.signal)."""
        self.queue: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._installed: list[signal.Signals] = []
        self._extra = extra

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in sorted(SHUTDOWN | FORWARDED | self._extra):
            loop.add_signal_handler(sig, self.queue.put_nowait, sig)
            self._installed.append(sig)

    def uninstall(self) -> None:
        """Done: later shutdown signals are ignored (the sidecar is exiting with the app's status)."""
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
            if sig in SHUTDOWN:
                signal.signal(sig, signal.SIG_IGN)
        self._installed.clear()
