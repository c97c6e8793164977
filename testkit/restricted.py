"""The sidecar under a narrower world: argv prefixed (unshare, a network namespace of its own) and the child
optionally under a seccomp filter that refuses to join sock_diag's destroy groups, as a host without
CAP_NET_ADMIN over its namespace would; and whether a port answers."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

from testkit.procs import Sidecar


def deny_netlink_membership() -> None:
    """In the child, before exec: a seccomp filter that refuses setsockopt(SOL_NETLINK, ...) with EPERM,
    as a kernel or a container runtime that requires CAP_NET_ADMIN for the destroy groups does."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def stmt(code: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, 0, 0, k)

    def jump(code: int, k: int, jt: int, jf: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    prog = b"".join(
        [
            stmt(ld, 4),
            jump(jeq, 0xC000003E, 0, 4),  # arch == x86_64, else allow
            stmt(ld, 0),
            jump(jeq, 54, 0, 2),  # nr == setsockopt, else allow
            stmt(ld, 24),
            jump(jeq, 270, 1, 0),  # args[1] (level) == SOL_NETLINK: refuse
            stmt(ret, allow),
            stmt(ret, eperm),
        ]
    )
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HP", len(prog) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
        os._exit(99)


def start_restricted(
    workdir: Path, config: dict[str, dict[str, Any]], command: list[str], prefix: list[str], deny_events: bool
) -> Sidecar:
    """Like testkit.Sidecar, but argv prefixed and the child optionally under the seccomp filter."""
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if deny_events:
            kw["preexec_fn"] = deny_netlink_membership
        return real_popen([*prefix, *argv], **kw)

    subprocess.Popen = popen  # type: ignore[misc,assignment]  # testkit.spawn's, for this one start
    try:
        return Sidecar(workdir, config, command)
    finally:
        subprocess.Popen = real_popen  # type: ignore[misc]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
