"""A host-wide claim on one service ID, held for the sidecar's whole life.

The agent cannot tell a registration left by a killed sidecar from one whose sidecar
is alive: both look the same. The claim can. It is an exclusive ``flock`` on a lock file
named after the service ID and the agent, the agent's address normalised (``agent_key``:
``localhost``, ``127.0.0.1``, ``[::1]`` and every address of this host name one local agent,
told apart by port only), in a runtime directory that only root or the sidecar's own user can write:

  - ``/run/consul-sidecar`` when it is (or, as root, can be made) a directory owned by root
    or by the sidecar's user and writable by no one else;
  - else ``$XDG_RUNTIME_DIR/consul-sidecar``, else ``/tmp/consul-sidecar-<uid>``, each owned by
    the sidecar's user and private to it (0700).

A directory another user owns or may write is never trusted. The lock file is 0600: no other
user can open it, so none can take or squat the claim (flock works on any descriptor, a
read-only one too). The kernel releases the lock when its holder dies, SIGKILL included,
with nothing to clean up; the descriptor is close-on-exec, so the app never inherits it.
The holder writes its PID and the address it registers into the file, for the message of a
sidecar that finds the claim taken, and removes the file when it exits normally (a SIGKILLed
holder leaves it, unlocked, for the next one); a claimant locks only a file still at the path.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import socket
import stat
import urllib.parse
import weakref
from dataclasses import dataclass
from pathlib import Path

SYSTEM_DIR = Path("/run/consul-sidecar")


@dataclass(frozen=True)
class Claim:
    """``held``: True (ours), False (a live process holds it), None (no trustworthy directory)."""

    held: bool | None
    path: Path | None
    detail: str | None = None  # why held is None

    def holder(self) -> dict[str, object] | None:
        """What the holder wrote into the lock file (``pid``, ``address``), or None if not (yet) readable."""
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read(4096) or b"null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def dir_problem(path: Path, uid: int) -> str | None:
    """Why ``path`` cannot be trusted to hold claims for ``uid`` (None: it can)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in (0, uid):
        return f"{path} is owned by uid {st.st_uid}, neither root nor uid {uid}"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by uid {uid}"
    return None


def _candidates(uid: int) -> list[tuple[Path, int]]:
    """Directories to try, each with the mode to create it with."""
    dirs = [(SYSTEM_DIR, 0o755)]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if uid != 0 and xdg and os.path.isabs(xdg):
        dirs.append((Path(xdg) / "consul-sidecar", 0o700))
    if uid != 0:
        dirs.append((Path(f"/tmp/consul-sidecar-{uid}"), 0o700))
    return dirs


def runtime_dir() -> tuple[Path | None, str | None]:
    """The directory the claims live in, or (None, why none is usable)."""
    uid = os.geteuid()
    problems = []
    for path, mode in _candidates(uid):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        except OSError as e:
            if path != SYSTEM_DIR or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                problems.append(f"{path}: {e.strerror}")
            continue
        problem = dir_problem(path, uid)
        if problem is None:
            return path, None
        if path != SYSTEM_DIR or uid == 0 or os.lstat(path).st_uid == uid:
            problems.append(problem)
    return None, "; ".join(problems) or "no runtime directory"


def _local(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal) is this host: loopback, or an address we can bind."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))  # succeeds only for an address of this host
        return True
    except OSError:
        return False


def agent_key(agent_address: str) -> str:
    """One spelling per agent: ``local:<port>`` for an agent on this host however it is written,
    ``unix:<real path>`` for a socket, else the host (IP normalised, names lower-cased) and port."""
    if agent_address.startswith("unix://"):
        return "unix:" + os.path.realpath(agent_address[len("unix://") :])
    u = urllib.parse.urlsplit(agent_address if "://" in agent_address else f"http://{agent_address}")
    host = (u.hostname or "").rstrip(".") or "localhost"
    try:
        port = u.port or (443 if u.scheme == "https" else 8500)
    except ValueError:
        port = 0
    if _local(host):
        return f"local:{port}"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return f"{host}:{port}"


def lock_path(directory: Path, agent_address: str, service_id: str) -> Path:
    key = f"{agent_key(agent_address)}\0{service_id}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return directory / f"{digest}.lock"


def claim(owner: object, agent_address: str, service_id: str, address: str) -> Claim:
    """Claim ``service_id`` at the agent for as long as ``owner`` lives; ``address`` is what we register."""
    directory, why = runtime_dir()
    if directory is None:
        return Claim(None, None, why)
    path = lock_path(directory, agent_address, service_id)
    if path in _held:
        return Claim(True, path)
    for _ in range(8):  # a holder that exits removes the file: lock only the file still at ``path``
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            return Claim(None, path, f"{path}: {e.strerror}")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                os.close(fd)
                return Claim(None, path, f"{path} is not a private regular file of uid {os.geteuid()}")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return Claim(False, path)
            return Claim(None, path, f"{path}: {e.strerror}")
        try:
            now = os.stat(path, follow_symlinks=False)
        except OSError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            break
        os.close(fd)  # removed (or replaced) by its last holder between our open and our lock: again
    else:
        return Claim(None, path, f"{path} keeps being replaced")
    note = json.dumps(
        {"pid": os.getpid(), "service_id": service_id, "agent": agent_key(agent_address), "address": address}
    ).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
    except OSError:
        pass  # the note only words another sidecar's message; the lock is what counts
    _held.add(path)

    def release() -> None:
        _held.discard(path)
        try:
            os.unlink(path)  # still locked by us: whoever opened it meanwhile sees it gone and opens anew
        except OSError:
            pass
        os.close(fd)

    weakref.finalize(owner, release)
    return Claim(True, path)


_held: set[Path] = set()
