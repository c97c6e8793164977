"""Reading the small files the configuration names: never blocking, never unbounded.

A path swapped for a FIFO with no writer, ``/dev/zero`` or a huge file must be a clear
error naming it, not a hang or a MemoryError.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# Size caps for the files the loader reads.
CONFIG_MAX_BYTES = 1 << 20
TOKEN_MAX_BYTES = 64 << 10
CA_MAX_BYTES = 1 << 20  # one file of a CA directory
CA_DIR_MAX_FILES = 1000


class FileProblem(Exception):
    """Why a file the configuration names cannot be used (a one-line reason)."""


def open_regular(p: Path) -> tuple[int, os.stat_result]:
    """An fd for a regular file, opened without blocking: a FIFO with no writer must not hang the loader."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise FileProblem(f"cannot read {p}: {e.strerror or e}") from None
    except ValueError as e:  # an embedded NUL in the path
        raise FileProblem(f"cannot read {p!r}: {e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise FileProblem(f"cannot read {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileProblem(f"{p} is {_file_kind(st.st_mode)}, not a regular file")
    return fd, st


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


def read_capped(p: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """The contents of a small regular file (at most ``limit`` bytes) and its status; FileProblem otherwise."""
    fd, st = open_regular(p)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            try:
                chunk = os.read(fd, limit + 1 - size)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                raise FileProblem(f"cannot read {p}: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise FileProblem(f"{p} is larger than {limit} bytes")
    return b"".join(chunks), st


def check_readable(p: Path) -> None:
    """FileProblem unless ``p`` is a regular file this process can open."""
    fd, _ = open_regular(p)
    os.close(fd)


def read_ca_dir(directory: Path) -> str:
    """Every CA certificate in ``directory`` and below, as one PEM text: what the consul CLI reads from
    CONSUL_CAPATH (Go's rootcerts.LoadCAPath: every file must hold PEM certificates).

    FileProblem names the first file that is not a readable regular file of PEM certificates.
    """
    import ssl  # only when a CA directory is configured

    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise FileProblem(f"{directory} is not a directory")
    except OSError as e:
        raise FileProblem(f"cannot read {directory}: {e.strerror or e}") from None
    except ValueError as e:  # an embedded NUL
        raise FileProblem(f"cannot read {directory!r}: {e}") from None
    texts: list[str] = []
    # sorted, like Go's filepath.Walk, so the first problem reported is always the same one
    for root, dirs, files in os.walk(directory, onerror=_raise_walk_error):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if len(texts) >= CA_DIR_MAX_FILES:
                raise FileProblem(f"{directory} holds more than {CA_DIR_MAX_FILES} files")
            data, _ = read_capped(p, CA_MAX_BYTES)
            text = data.decode("ascii", errors="replace")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
            except (ssl.SSLError, ValueError):
                raise FileProblem(f"{p} holds no PEM certificate (every file in a CA directory must)") from None
            texts.append(text)
    if not texts:
        raise FileProblem(f"{directory} holds no certificate file")
    return "\n".join(texts)


def _raise_walk_error(e: OSError) -> None:
    raise FileProblem(f"cannot read {e.filename}: {e.strerror or e}")
