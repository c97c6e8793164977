"""A host-wide claim on one service ID, held for the sidecar's whole life.

The agent cannot tell a registration left by a killed sidecar from one whose sidecar
is alive: both look the same. The claim can. It is an exclusive ``flock`` on a lock file
named after the service ID alone (not after the agent's address as written: ``localhost``
and ``127.0.0.1`` name one agent; a host normally has one), in a runtime directory that
only root or the sidecar's own user can write:

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
import json
import os
import stat
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


def lock_path(directory: Path, service_id: str) -> Path:
    digest = hashlib.sha256(service_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return directory / f"{digest}.lock"


def claim(owner: object, service_id: str, address: str) -> Claim:
    """Claim ``service_id`` on this host for as long as ``owner`` lives; ``address`` is what we register."""
    directory, why = runtime_dir()
    if directory is None:
        return Claim(None, None, why)
    path = lock_path(directory, service_id)
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
    note = json.dumps({"pid": os.getpid(), "service_id": service_id, "address": address}).encode()
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
