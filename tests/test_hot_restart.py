"""Hot restart (issue 11) with real processes: a real Consul agent, the example app, real signals.

The sidecar holds the listening socket and hands it to each app generation by socket activation;
``hot_restart.signal`` starts the next generation, the old one is stopped once the new one is
ready, and the registration is never touched. The load proof (gunicorn, uvicorn, open-loop load)
is in tests/test_hot_restart_load.py.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import testkit
from testkit import Consul, http_get, pid_alive, wait_for

from .conftest import RegisteredSidecar

HOT = {"enabled": True, "timeout": "20s"}


def status(sc: testkit.Sidecar) -> dict[str, Any]:
    code, body = http_get(sc.status_url() + "/status")
    assert code == 200
    return json.loads(body)  # type: ignore[no-any-return]


def serving_pid(port: int) -> int:
    """The PID of the generation that answered (the example app's X-Backend carries the instance name,
    so the tests name each instance by its PID: --instance is not given, so ask /proc)."""
    code, body = http_get(f"http://127.0.0.1:{port}/")
    assert code == 200, body
    return int(body.split()[-1].decode()) if body.split()[-1].isdigit() else 0


def listeners_of(port: int) -> set[int]:
    """PIDs of the sidecar's descendants and itself that hold the socket listening on ``port``."""
    from sidecar import proctree

    return proctree.listeners(set(proctree.all_pids()), port)


def agent_service(agent: Consul, name: str) -> list[dict[str, Any]]:
    return agent.get(f"/v1/health/service/{name}")  # type: ignore[no-any-return]


def passing(agent: Consul, name: str, sid: str) -> bool:
    for entry in agent_service(agent, name):
        if entry["Service"]["ID"] == sid:
            return all(c["Status"] == "passing" for c in entry["Checks"])
    return False


def generations(sc: testkit.Sidecar) -> list[dict[str, Any]]:
    return status(sc)["app"]["generations"]  # type: ignore[no-any-return]


def live_app_pids(sc: testkit.Sidecar) -> set[int]:
    """The sidecar's direct children that are alive (each generation is one)."""
    from sidecar import proctree

    return {p for p in proctree.descendants(sc.pid) if proctree.parent(p) == sc.pid}


def app_pid_from_answer(port: int) -> int:
    code, body = http_get(f"http://127.0.0.1:{port}/pid")
    assert code == 200
    return int(body)


def test_hot_restart_changes_the_serving_process_and_keeps_the_registration(
    registered_sidecar: RegisteredSidecar, consul: Consul, service_name: str
) -> None:
    """1. A sidecar with hot_restart.enabled runs the example app (socket activation, READY=1).
    2. SIGUSR2: a second generation starts on the same socket, says READY=1, the first gets SIGTERM.
    Expected: one generation left with another PID, serving on the same port; the socket was the
    sidecar's all along; the agent kept the same instance passing the whole time (a watcher saw it
    passing at every look, never gone); /status counts one restart."""
    sc, port = registered_sidecar(hot_restart=HOT)
    sid = f"{service_name}-1"
    wait_for(lambda: passing(consul, service_name, sid), 15, what="check passing")
    first = sc.app_pid()
    assert sc.pid in listeners_of(port) and first in listeners_of(port)
    index = consul.get(f"/v1/agent/service/{sid}")["ContentHash"]

    seen: list[bool] = []
    sc.send(signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while sc.event("sidecar.hot_restart.done") is None and time.monotonic() < deadline:
        seen.append(passing(consul, service_name, sid))
        code, _ = http_get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200
        time.sleep(0.05)
    done = sc.wait_event("sidecar.hot_restart.done", timeout=1)
    assert seen and all(seen), "the instance was not passing at some point of the restart"
    second = done["pid"]
    assert second != first and not pid_alive(first)
    assert live_app_pids(sc) == {second}
    assert listeners_of(port) == {sc.pid, second}
    assert consul.get(f"/v1/agent/service/{sid}")["ContentHash"] == index
    assert sc.event("sidecar.consul.deregistered") is None and sc.event("sidecar.consul.reregistered") is None
    st = status(sc)
    assert [(g["generation"], g["pid"], g["state"]) for g in st["app"]["generations"]] == [(2, second, "serving")]
    assert st["hot_restart"] == {"state": "idle", "restarts": 1, "last_error": None}
    ready = sc.event("sidecar.hot_restart.ready")
    assert ready is not None and ready["how"] == "READY=1"

    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    assert not pid_alive(second)
