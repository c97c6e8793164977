"""Hot restart's listening socket: the sidecar binds service.address:service.port itself, once.

The socket outlives every app generation: each one gets it as fd 3 (socket activation), and a
connection queued while one generation exits is accepted by the next (one shared accept queue,
not ``SO_REUSEPORT``'s one queue per process). Only the standard library: ``check-config`` uses
``bind_problem`` and must stay light (tests/test_cli_imports.py).
"""

from __future__ import annotations

import errno
import socket


def bind_listener(host: str, port: int, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """Bind and listen on ``host``:``port`` (blocking mode: each app sets its own); raises OSError."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        # A restarted sidecar must bind although connections of the last one sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def bind_problem(host: str, port: int) -> tuple[str | None, str | None]:
    """``check-config``'s view: (error, warning). Binding now tells whether ``run`` could: an address
    that is not this host's, or a port below 1024 without the privilege, is an error; a port in
    use right now (by the running sidecar itself, or an app not yet moved to socket activation)
    is only a warning, as it may be free when ``run`` starts."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bind_listener(host, port).close()
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            return None, (
                f"{where} is in use right now (by this sidecar if it runs, or another server): `run` binds it "
                "before starting the app and exits 78 if it is still in use then"
            )
        # EACCES (a port below 1024), EADDRNOTAVAIL (not this host's address), an unresolvable name...
        return f"the sidecar cannot bind service.address:service.port {where}: {why}", None
    return None, None
