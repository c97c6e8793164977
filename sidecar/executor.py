"""The event loop's executor for blocking calls (getaddrinfo above all): daemon threads, never waited for.

asyncio resolves host names (aiohttp's default resolver, ``loop.getaddrinfo``) in the loop's
default executor. A resolver that does not answer keeps such a call in glibc for up to
``timeout x attempts`` of resolv.conf (tens of seconds), and on the way out ``asyncio.run``
and the interpreter wait for every worker thread of a ThreadPoolExecutor: a sidecar that had
finished its drain would then outlive its worst case. Here each call gets a daemon thread of
its own, which neither ``shutdown()`` nor the interpreter's exit waits for; the caller's own
deadline (a request timeout) decides how long the lifecycle waits for the answer.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_THREADS = 64  # hung look-ups at once; past that a call fails at once rather than pile up threads


class DaemonThreadExecutor(concurrent.futures.ThreadPoolExecutor):
    """One daemon thread per call, at most MAX_THREADS at once; ``shutdown`` waits for none of them.

    A ThreadPoolExecutor subclass only because ``loop.set_default_executor`` accepts no other kind.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self._slots = threading.BoundedSemaphore(MAX_THREADS)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self._slots.acquire(blocking=False):
            future.set_exception(OSError(f"{MAX_THREADS} blocking calls (name look-ups?) already hang"))
            return future

        def run() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller, as ThreadPoolExecutor does
                        future.set_exception(e)
            finally:
                self._slots.release()

        threading.Thread(target=run, name="sidecar-blocking-call", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)  # no worker of the base class ever starts
