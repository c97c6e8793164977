"""The sidecar's own exit statuses: the "Exit status" table of docs/operations.md, in one place.

sysexits.h (``os.EX_*``) where one fits, the shell's conventions for the rest. A bad command
line exits 2 as argparse (and every shell builtin) does, not sysexits' EX_USAGE (64): the
documented value stays. Wrapper mode otherwise passes the app's own status on, 128 + N when
signal N ended it (``by_signal``).

Imports nothing heavy: ``__main__`` uses it before anything else is loaded.
"""

from __future__ import annotations

import os
import signal

__all__ = [
    "EX_BAD_COMMAND_LINE",
    "EX_CANNOT_EXECUTE",
    "EX_CONFIG",
    "EX_INTERRUPTED",
    "EX_MAYBE_REGISTERED",
    "EX_NOPERM",
    "EX_NOT_FOUND",
    "EX_NOT_REGISTERED",
    "EX_SOFTWARE",
    "EX_UNAVAILABLE",
    "by_signal",
]

EX_BAD_COMMAND_LINE = 2  # argparse's status for a usage error; kept for the checks argparse cannot express
EX_UNAVAILABLE = os.EX_UNAVAILABLE  # 69: the app never became healthy, another process holds its port, or
# `maint` could not reach the agent or confirm the change
EX_SOFTWARE = os.EX_SOFTWARE  # 70: a bug in the sidecar
EX_NOT_REGISTERED = os.EX_NOUSER  # 67, "addressee unknown": `maint` found no such service ID in the agent
# 75, "temporary failure": the drain ended while a registration write that got no answer could still
# reach the agent (the app itself exited 0; a non-zero status of the app's is passed on instead)
EX_MAYBE_REGISTERED = os.EX_TEMPFAIL
EX_NOPERM = os.EX_NOPERM  # 77: Consul's ACLs refused the registration (or a maintenance request)
EX_CONFIG = os.EX_CONFIG  # 78: bad configuration, the agent rejected the registration, a duplicate live ID
EX_CANNOT_EXECUTE = 126  # the shell's: the app's command exists but cannot be executed
EX_NOT_FOUND = 127  # the shell's: the app's command was not found


def by_signal(signum: int) -> int:
    """The shell's status for a process that signal ``signum`` ended: 128 + N.

    An int, not only ``signal.Signals``: a real-time signal (SIGRTMIN + 3) has no member."""
    return 128 + int(signum)


EX_INTERRUPTED = by_signal(signal.SIGINT)  # 130: a Ctrl-C before the sidecar had its own signal handlers
EX_TERMINATED = by_signal(signal.SIGTERM)  # 143: a SIGTERM before the app was started
