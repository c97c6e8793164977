#!/usr/bin/env python3
"""Apps that leave processes outside their process group, for tests/test_descendants.py.

family.py setsid-worker WORKER_PORT WORKER_PID_FILE -- APP_ARGV...
    starts the example app on WORKER_PORT in a session of its own (setsid), writes its PID,
    then execs APP_ARGV (so the worker is the app's child in another session and group).
family.py daemonize PID_FILE -- APP_ARGV...
    daemonizes as a classic Unix daemon, or a Type=forking service: fork, setsid, fork again;
    the grandchild execs APP_ARGV (which writes PID_FILE once it listens); the parent waits
    for PID_FILE, so that the daemon is ready, and exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

EXAMPLE_APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "app", "app.py")


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    sep = rest.index("--")
    args, app = rest[:sep], rest[sep + 1 :]
    if mode == "setsid-worker":
        worker_port, pid_file = args
        worker = subprocess.Popen([sys.executable, EXAMPLE_APP, "--port", worker_port], start_new_session=True)
        with open(pid_file, "w") as f:
            f.write(str(worker.pid))
        os.execv(app[0], app)
    if mode == "daemonize":
        [pid_file] = args
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(app[0], app)
            os._exit(0)
        os.wait()
        deadline = time.monotonic() + 20
        while not os.path.exists(pid_file) and time.monotonic() < deadline:
            time.sleep(0.02)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
