"""Virtual time for the lifecycle's logic tests: a drain of 30 s takes microseconds, and no test waits on
the machine's clock (nor fails because a loaded machine was slow).

``VirtualTime.install()`` takes over the running event loop's clock: ``loop.time()`` reads a number that
moves only when every task is waiting on a timer; then it jumps to the earliest one. Everything built on
the loop's clock follows: ``asyncio.sleep``, ``asyncio.wait(timeout=...)``, ``asyncio.timeout``, and the
sidecar's own ``Clock`` (this object is one). A wait for real I/O (a thread handing back a result, a socket)
still blocks for real, without moving the clock.

The loop asks its selector how long it may block: that call (``select(timeout)``) is where an idle loop
shows, so that is the one place patched; it is a private attribute of asyncio's selector event loops,
which is why this lives in the test kit and nowhere in the sidecar.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from typing import Any


class VirtualTime:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._now = loop.time()
        self._wall_offset = time.time() - self._now
        self.jumped = 0.0  # seconds of waiting skipped so far
        selector: selectors.BaseSelector = loop._selector  # type: ignore[attr-defined]  # see the module doc
        real_select = selector.select

        def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is None:  # no timer at all: only real I/O can wake the loop
                return real_select(None)
            ready = real_select(0)
            if not ready and timeout > 0:
                # To the earliest timer exactly (adding ``timeout`` would drift by rounding).
                timers: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
                when = timers[0].when() if timers else self._now + timeout
                self.jumped += max(0.0, when - self._now)
                self._now = max(self._now, when)
            return ready

        selector.select = select  # type: ignore[method-assign]
        loop.time = lambda: self._now  # type: ignore[method-assign]

    @classmethod
    def install(cls) -> VirtualTime:
        """The running loop's virtual time (installed on first use; one per loop)."""
        loop = asyncio.get_running_loop()
        existing: Any = getattr(loop, "_virtual_time", None)
        if isinstance(existing, VirtualTime):
            return existing
        vt = cls(loop)
        loop._virtual_time = vt  # type: ignore[attr-defined]
        return vt

    # sidecar.clock.Clock
    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_offset + self._now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
