"""Run a server, or fail to start it the way a broken new generation would.

    python testkit/faultwrap.py [--crash-if FILE] [--no-ready-if FILE] -- COMMAND...

The hot-restart tests start every generation with the same command; this wrapper lets a test
break only the next one by creating a file before it triggers the restart:

- ``--crash-if FILE``: FILE exists: exit 3 at once, before the server starts (a bad release).
- ``--no-ready-if FILE``: FILE exists: start the server without ``NOTIFY_SOCKET``, so it serves
  but never says ``READY=1`` (a server that hangs in its start-up, as far as the sidecar can tell).

Otherwise it replaces itself with COMMAND (``execvp``): same PID, so ``LISTEN_PID`` stays true,
and the inherited listening socket (fd 3) and environment pass through untouched. Standard
library only, run as a script (no import of the project).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="faultwrap.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--crash-if", metavar="FILE", help="exit 3 at once when FILE exists")
    ap.add_argument("--no-ready-if", metavar="FILE", help="drop NOTIFY_SOCKET when FILE exists")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given (after --)")
    if args.crash_if and os.path.exists(args.crash_if):
        sys.stderr.write(f"faultwrap: {args.crash_if} exists: crashing at start (exit 3)\n")
        return 3
    if args.no_ready_if and os.path.exists(args.no_ready_if):
        sys.stderr.write(f"faultwrap: {args.no_ready_if} exists: this generation will never say READY=1\n")
        os.environ.pop("NOTIFY_SOCKET", None)
    sys.stderr.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
