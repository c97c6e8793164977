"""A host-wide claim on one service ID at one agent, held for the sidecar's whole life.

The agent cannot tell a registration left by a killed sidecar from one whose sidecar
is alive: both look the same. The claim can. It is a Linux abstract-namespace Unix
socket named after (agent address, service ID): binding it fails while any live
process in this network namespace holds it, and the kernel releases it when its
holder dies, SIGKILL included, with nothing to clean up on disk. The socket is
close-on-exec, so the app never inherits it and cannot keep it after the sidecar dies.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import weakref


def claim(owner: object, agent_address: str, service_id: str) -> bool | None:
    """Claim (agent_address, service_id) for as long as ``owner`` lives.

    True: claimed (or already held by this process). False: another live process holds it.
    None: this system cannot tell (no abstract sockets).
    """
    digest = hashlib.sha256(f"{agent_address}\0{service_id}".encode("utf-8", "surrogatepass")).hexdigest()[:40]
    name = f"\0consul-sidecar/{digest}"
    if name in _held:
        return True
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(name)
    except OSError as e:
        s.close()
        return False if e.errno == errno.EADDRINUSE else None
    fd = s.detach()  # a bare fd: released with its owner, never a ResourceWarning
    _held.add(name)

    def release() -> None:
        _held.discard(name)
        os.close(fd)

    weakref.finalize(owner, release)
    return True


_held: set[str] = set()
