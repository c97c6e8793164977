"""A small WSGI app for gunicorn under the sidecar's hot restart (tests, bench, demo).

    python -m gunicorn --pythonpath examples/app --worker-class gthread --threads 8 wsgi_app:app

Under the sidecar with ``[hot_restart] enabled = true`` gunicorn takes the listening socket by its
built-in systemd socket activation (fd 3, ``LISTEN_FDS``, ``LISTEN_PID``) and says ``READY=1`` on
``NOTIFY_SOCKET`` once it holds it (gunicorn >= 20.0), so ``ready = "notify"`` applies.

Endpoints:
  GET /healthz       200 "ok"
  GET /              200 "pid <pid>\\n"
  GET /slow?ms=N     sleeps N milliseconds (default 1000), then 200 like /
Every response carries ``X-Pid``: the PID of the process the sidecar started, gunicorn's arbiter
(the worker's parent), so a client can tell which generation served it; ``X-Worker-Pid`` names the
worker that did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIEnvironment

MAX_SLOW_MS = 60_000


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    # gunicorn's workers are children of the arbiter: the arbiter is what the sidecar started.
    headers = [("Content-Type", "text/plain"), ("X-Pid", str(os.getppid())), ("X-Worker-Pid", str(os.getpid()))]
    if path == "/healthz":
        start_response("200 OK", headers)
        return [b"ok\n"]
    if path == "/slow":
        raw = parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["1000"])[0]
        try:
            ms = float(raw)
        except ValueError:
            ms = -1.0
        if not 0 <= ms <= MAX_SLOW_MS:
            start_response("400 Bad Request", headers)
            return [f"ms must be 0..{MAX_SLOW_MS}: {raw!r}\n".encode()]
        time.sleep(ms / 1000)
    elif path != "/":
        start_response("404 Not Found", headers)
        return [b"not found\n"]
    start_response("200 OK", headers)
    return [f"pid {os.getppid()}\n".encode()]
