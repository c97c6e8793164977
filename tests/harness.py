"""Real parts for the tests: a Consul dev agent on free ports, the sidecar and the example app as processes.

The process plumbing lives in ``examples/rollout/procs.py``, shared with the
demo and the benchmarks, so that all three start and stop things the same way.
"""

from examples.rollout.procs import (
    APP,
    PY,
    ROOT,
    Consul,
    ConsulCluster,
    Sidecar,
    _started,
    app_command,
    free_port,
    http_get,
    kill_all_started,
    kill_session,
    leftovers,
    leftovers_of_exited,
    merge,
    pid_alive,
    read_signal_log,
    spawn,
    stop_started,
    wait_for,
    write_config,
)

__all__ = [
    "APP", "PY", "ROOT", "Consul", "ConsulCluster", "Sidecar", "_started", "app_command", "free_port", "http_get",
    "kill_all_started", "kill_session", "leftovers", "leftovers_of_exited", "merge", "pid_alive", "read_signal_log", "spawn",
    "stop_started", "wait_for", "write_config",
]
