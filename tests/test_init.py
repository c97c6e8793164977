"""Wrapper mode as an init: orphaned grandchildren are reaped, also as PID 1 of a new PID namespace."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from testkit import PY, Consul, app_command, free_port, spawn, wait_for, write_config
from testkit.suite import StartSidecar, base_config


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append((int(d.name), fields[0]))
    return out


def orphan_making_app(port: int) -> list[str]:
    # The subshell starts two short sleeps in the background and exits at once:
    # they are orphaned and re-parented to the nearest subreaper (the sidecar).
    app = " ".join(app_command(port))
    return ["sh", "-c", f"(sleep 0.3 & sleep 0.4 &); exec {app}"]


def test_orphans_are_reaped(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port), orphan_making_app(port))
    sc.wait_event("sidecar.consul.registered")
    wait_for(lambda: len(children(sc.pid)) == 1, 5, 0.05, "the orphans to be adopted and reaped")
    time.sleep(0.5)
    assert all(state != "Z" for _, state in children(sc.pid)), children(sc.pid)
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    stopped = sc.event("sidecar.app.stopped")
    assert stopped is not None and stopped["orphans_reaped"] == 2, stopped  # adopted (subreaper) and reaped


def test_as_pid1_in_a_new_pid_namespace(consul: Consul, tmp_path: Path, service_name: str) -> None:
    """1. The sidecar runs as PID 1 of a new PID namespace (as in a container), wrapping an app whose
       helper processes are orphaned at start.
    2. Expected: no zombie stays behind; SIGTERM from outside still drains and ends it with status 0.
    """
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", base_config(consul, service_name, port))
    log = tmp_path / "sidecar.log"
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        PY,
        "-m",
        "sidecar",
        "run",
        "-c",
        str(cfg),
        "--log-format",
        "json",
        "--",
        *orphan_making_app(port),
    ]
    outer = spawn(argv, log, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})

    def registered() -> bool:
        return any(
            json.loads(line).get("event") == "sidecar.consul.registered"
            for line in log.read_text().splitlines()
            if line.startswith("{")
        )

    wait_for(registered, 15, 0.05, "registration")
    [(pid1, _)] = children(outer.pid)  # unshare's child: PID 1 inside the namespace
    assert f"NSpid:\t{pid1}\t1" in Path(f"/proc/{pid1}/status").read_text()
    time.sleep(1.0)
    assert all(state != "Z" for _, state in children(pid1)), children(pid1)
    assert len(children(pid1)) == 1  # just the app
    os.kill(pid1, signal.SIGTERM)
    assert outer.wait(30) == 0
