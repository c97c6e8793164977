"""Time, passed in: the lifecycle measures every deadline on the monotonic clock.

A wall-clock jump (NTP, a VM resume, ``date -s``) cannot shorten or stretch a
drain, and tests can pass a clock of their own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
