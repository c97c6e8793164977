"""Test support: real processes for the tests, the rollout demo and the benchmarks.

A Consul dev agent (or a small cluster) on free ports, the sidecar and the example app as processes,
and the bookkeeping that kills everything they started. The tests, ``examples/rollout`` and
``bench`` import from here; this package imports none of them, so the demo depends on the test
support and never the reverse.
"""

from testkit.procs import (
    APP,
    PY,
    ROOT,
    Consul,
    ConsulCluster,
    Sidecar,
    app_command,
    consul_binary,
    free_port,
    http_get,
    kill_all_started,
    kill_session,
    leftovers,
    leftovers_of_exited,
    merge,
    pid_alive,
    read_signal_log,
    session_members,
    spawn,
    started_count,
    stop_started,
    toml_value,
    track,
    wait_for,
    write_config,
)

__all__ = [
    "APP",
    "PY",
    "ROOT",
    "Consul",
    "ConsulCluster",
    "Sidecar",
    "app_command",
    "consul_binary",
    "free_port",
    "http_get",
    "kill_all_started",
    "kill_session",
    "leftovers",
    "leftovers_of_exited",
    "merge",
    "pid_alive",
    "read_signal_log",
    "session_members",
    "spawn",
    "started_count",
    "stop_started",
    "toml_value",
    "track",
    "wait_for",
    "write_config",
]
