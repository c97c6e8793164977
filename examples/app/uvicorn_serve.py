"""uvicorn, with its shutdown made safe for hot restart: ``python examples/app/uvicorn_serve.py`` takes
the same options as ``python -m uvicorn`` (here: ``--app-dir examples/app --fd 3 asgi_app:app``).

Why: on SIGTERM uvicorn closes its listener and, in the same step, every connection that has no
request under way, including one it accepted a moment before whose request is still on the way. That
client gets the connection closed with no answer. With one server that is rare; under hot restart the
old generation keeps accepting from the shared socket until the very moment it is signalled, and
plain ``uvicorn --fd 3`` lost one request in six to twelve restarts at 200 requests/s here
(bench/hot_restart.py --server uvicorn-plain). Go's http.Server counts a new connection as idle only
after 5 s; this does the same in spirit: stop accepting, give the connections accepted just before
NEW_CONNECTION_GRACE_SECONDS to send their request, then uvicorn's own shutdown.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from uvicorn.server import Server

NEW_CONNECTION_GRACE_SECONDS = 0.25

_uvicorn_shutdown = Server.shutdown


async def _shutdown(self: Server, sockets: list[socket.socket] | None = None) -> None:
    for server in self.servers:
        server.close()
    await asyncio.sleep(NEW_CONNECTION_GRACE_SECONDS)
    await _uvicorn_shutdown(self, sockets)


# A subclass would need uvicorn's command line rebuilt around it; its CLI builds Server itself.
Server.shutdown = _shutdown  # type: ignore[method-assign]

if __name__ == "__main__":
    uvicorn.main()
