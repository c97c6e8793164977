"""The ACL token as ``run`` uses it: read off the event loop, with a deadline, the last good one kept.

A token file is read again for each request to the agent, so a rotated token is used by the next
request without a restart. Read on the event loop, a file on a stalled mount (NFS, a FUSE secret
store that stopped answering) froze the whole sidecar: no drain on SIGTERM, no ``/healthz``. Here
each read runs in a daemon thread of its own; a request waits for it at most ``deadline`` seconds,
then goes on with the last token read successfully (``sidecar.consul.token_stalled``, once per
episode). While that read still hangs no other is started (at most one thread is ever stuck), and
requests use the last good token without waiting; when it returns, its result is taken as any other.

The log scrubber reads ``secrets()``: the tokens read so far, held in memory, never the file.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from ..config import TokenError, TokenSource

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

READ_DEADLINE = 1.0  # seconds a request waits for the token file at most (less with a short consul.timeout)
KEPT = 8  # tokens kept for the log scrubber (a rotated-out token is still a secret)


class TokenStalled(Exception):
    """No token was ever read and the token file does not answer. The message names the file only."""


class TokenCache:
    def __init__(self, source: TokenSource, deadline: float = READ_DEADLINE, log: FilteringBoundLogger | None = None):
        self.source = source
        self.deadline = deadline
        self._logger = log
        self._last: str | None = None
        self._read_once = False
        self._seen: list[str] = []
        self._problem: str | None = None  # why the last read failed (warned once per episode)
        self._stalled = False  # a read has been running for longer than the deadline (warned once)
        self._inflight: asyncio.Future[None] | None = None
        self._lock = threading.Lock()

    @property
    def _log(self) -> FilteringBoundLogger:
        if self._logger is None:
            from ..log import get_logger

            self._logger = get_logger()
        return self._logger

    def prime(self) -> None:
        """One read before the event loop runs (the loader has just read the same file): the first
        request and the first log line have a token without waiting. A failure is left to the first request."""
        try:
            self._accept(self.source.read(), quiet=True)
        except TokenError:
            pass

    def secrets(self) -> list[str]:
        """The tokens read so far, newest last: what the log scrubber removes. No I/O."""
        with self._lock:
            return list(self._seen)

    def cached(self) -> tuple[bool, str | None]:
        """(whether a token was ever read, the last one read): no I/O."""
        return self._read_once, self._last

    async def current(self) -> str | None:
        """The token for the next request: the source's now, or the last good one while the file
        fails or stalls. Raises TokenError (it fails, nothing ever read) or TokenStalled."""
        if self.source.file is None:
            return self._accept(self.source.read())  # from the configuration or the environment: no I/O
        fut = self._inflight
        if fut is None:
            fut = self._start_read()
        elif self._stalled:
            return self._fallback()  # the read still hangs: no waiting for it again
        if not fut.done():
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.deadline)
            except TimeoutError:
                if not self._stalled:
                    self._stalled = True
                    self._log.warning(
                        "sidecar.consul.token_stalled",
                        source=self.source.describe(),
                        waited_s=self.deadline,
                        action="using the last token read successfully; reading again once this read returns",
                    )
                return self._fallback()
        if self._problem is not None:
            return self._fallback()
        return self._last

    def _start_read(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._inflight = fut

        def read() -> None:
            token: str | None = None
            error: str | None = None
            try:
                token = self.source.read()
            except TokenError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - a bug must not leave the read in flight forever
                error = f"cannot use the ACL token file {self.source.file}: {e.__class__.__name__}"
            try:
                loop.call_soon_threadsafe(self._done, fut, token, error)
            except RuntimeError:  # the loop has closed: the sidecar is exiting
                pass

        threading.Thread(target=read, name="sidecar-token-read", daemon=True).start()
        return fut

    def _done(self, fut: asyncio.Future[None], token: str | None, error: str | None) -> None:
        self._inflight = None
        if error is None:
            self._accept(token)
        else:
            if self._problem is None:
                self._log.warning(
                    "sidecar.consul.token_unreadable",
                    error=error,
                    action="using the last token read successfully until the file is fixed",
                )
            self._problem = error
        if not fut.done():
            fut.set_result(None)

    def _accept(self, token: str | None, quiet: bool = False) -> str | None:
        if (self._problem is not None or self._stalled) and not quiet:
            self._log.info("sidecar.consul.token_readable", source=self.source.describe())
        self._problem = None
        self._stalled = False
        self._last = token
        self._read_once = True
        if token:
            with self._lock:
                if token not in self._seen:
                    self._seen.append(token)
                    del self._seen[:-KEPT]
        return token

    def _fallback(self) -> str | None:
        if self._read_once:
            return self._last
        if self._problem is not None:
            raise TokenError(self._problem)
        raise TokenStalled(f"the ACL token file {self.source.file} did not answer within {self.deadline:g}s")
