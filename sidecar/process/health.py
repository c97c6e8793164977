"""Probing the app's check URL, the same URL the Consul agent will poll."""

from __future__ import annotations

import aiohttp


class Prober:
    """One aiohttp session for every probe of the check URL."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def probe(self) -> tuple[bool, str]:
        """(healthy, detail): healthy when the URL answers 2xx within the check timeout."""
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        try:
            async with self._session.get(
                self.url, timeout=aiohttp.ClientTimeout(total=self.timeout), allow_redirects=False
            ) as r:
                await r.read()
                return 200 <= r.status < 300, f"HTTP {r.status}"
        except TimeoutError:
            return False, f"no answer within {self.timeout:g}s"
        except (aiohttp.ClientError, OSError) as e:
            return False, f"{e.__class__.__name__}: {e}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
