"""A small ASGI app for uvicorn under the sidecar's hot restart (tests, bench, demo).

    python examples/app/uvicorn_serve.py --app-dir examples/app --fd 3 asgi_app:app

(``uvicorn_serve.py`` is uvicorn with a shutdown that does not drop connections accepted just
before it; ``python -m uvicorn`` takes the same options.)

Under the sidecar with ``[hot_restart] enabled = true`` uvicorn takes the listening socket with
``--fd 3`` (it does not read ``LISTEN_FDS``). It never writes to ``NOTIFY_SOCKET``, so the sidecar
cannot know when it accepts: use ``ready = "warmup"`` with a ``warmup`` longer than its start-up
(about a second here). Connections that arrive before it accepts wait in the shared socket's
backlog: slower, never refused.

Endpoints:
  GET /healthz       200 "ok"
  GET /              200 "pid <pid>\\n"
  GET /slow?ms=N     sleeps N milliseconds (default 1000), then 200 like /
Every response carries ``X-Pid``, the PID of the uvicorn process that served it. Only the
standard library: no framework.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_SLOW_MS = 60_000


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"x-pid", str(os.getpid()).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/healthz":
        await _answer(send, 200, b"ok\n")
        return
    if path == "/slow":
        raw = parse_qs(scope.get("query_string", b"").decode()).get("ms", ["1000"])[0]
        try:
            ms = float(raw)
        except ValueError:
            ms = -1.0
        if not 0 <= ms <= MAX_SLOW_MS:
            await _answer(send, 400, f"ms must be 0..{MAX_SLOW_MS}: {raw!r}\n".encode())
            return
        await asyncio.sleep(ms / 1000)
    elif path != "/":
        await _answer(send, 404, b"not found\n")
        return
    await _answer(send, 200, f"pid {os.getpid()}\n".encode())
