"""Hot restart (issue 11) with real processes: a real Consul agent, the example app, real signals.

The sidecar holds the listening socket and hands it to each app generation by socket activation;
``hot_restart.signal`` starts the next generation, the old one is stopped once the new one is
ready, and the registration is never touched. The load proof (gunicorn, uvicorn, open-loop load)
is the load-proof tests' (gunicorn, uvicorn).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import testkit
from testkit import PY, ROOT, Consul, free_port, http_get, pid_alive, wait_for
from testkit.suite import RegisteredSidecar, StartSidecar, base_config

HOT = {"enabled": True, "timeout": "20s"}


def status(sc: testkit.Sidecar) -> dict[str, Any]:
    code, body = http_get(sc.status_url() + "/status")
    assert code == 200
    return json.loads(body)  # type: ignore[no-any-return]


def answering_pid(port: int) -> int:
    """The PID of the process that answered GET / (the example app's X-Pid); fails on anything but 200."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        assert r.status == 200
        return int(r.headers["X-Pid"])


def listeners_of(port: int) -> set[int]:
    """PIDs of the sidecar's descendants and itself that hold the socket listening on ``port``."""
    from sidecar.process import proctree

    return proctree.listeners(set(proctree.all_pids()), port)


def agent_service(agent: Consul, name: str) -> list[dict[str, Any]]:
    return agent.get(f"/v1/health/service/{name}")  # type: ignore[no-any-return]


def passing(agent: Consul, name: str, sid: str) -> bool:
    for entry in agent_service(agent, name):
        if entry["Service"]["ID"] == sid:
            return all(c["Status"] == "passing" for c in entry["Checks"])
    return False


def live_app_pids(sc: testkit.Sidecar) -> set[int]:
    """The sidecar's direct children that are alive (each generation is one)."""
    from sidecar.process import proctree

    return {p for p in proctree.descendants(sc.pid) if proctree.parent(p) == sc.pid}


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
    (entry,) = consul.get(f"/v1/catalog/service/{service_name}")

    seen: list[bool] = []
    answered = {answering_pid(port)}
    sc.send(signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while sc.event("sidecar.hot_restart.done") is None and time.monotonic() < deadline:
        seen.append(passing(consul, service_name, sid))
        answered.add(answering_pid(port))
        time.sleep(0.05)
    done = sc.wait_event("sidecar.hot_restart.done", timeout=1)
    assert seen and all(seen), "the instance was not passing at some point of the restart"
    second = done["pid"]
    assert second != first and not pid_alive(first)
    assert live_app_pids(sc) == {second}
    assert answering_pid(port) == second and answered <= {first, second} and first in answered
    assert listeners_of(port) == {sc.pid, second}
    assert consul.get(f"/v1/agent/service/{sid}")["ContentHash"] == index
    (after,) = consul.get(f"/v1/catalog/service/{service_name}")
    assert after["CreateIndex"] == entry["CreateIndex"], "the instance was removed from the catalog and added again"
    assert sc.event("sidecar.consul.deregistered") is None and sc.event("sidecar.consul.reregistered") is None
    assert sc.event("sidecar.app.exited") is None  # the replaced generation's exit is not the app's
    st = status(sc)
    assert [(g["generation"], g["pid"], g["state"]) for g in st["app"]["generations"]] == [(2, second, "serving")]
    assert st["hot_restart"] == {"state": "idle", "restarts": 1, "failures": 0, "last_error": None}
    ready = sc.event("sidecar.hot_restart.ready")
    assert ready is not None and ready["how"] == "READY=1"
    # Seen accepting on the shared socket: a probe connection's server side held by the new generation.
    assert ready["level"] == "info" and ready["accepted_by"] == second and ready["probes"] >= 1, ready

    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    assert not pid_alive(second)


# Runs the app unless a mode file says otherwise: "crash" exits at start, "silent" starts it without
# NOTIFY_SOCKET (it serves but never says READY=1). exec keeps the PID: LISTEN_PID stays right.
MODAL = '''mode=$(cat "$0" 2>/dev/null)
case "$mode" in
  crash) echo "app: crashing at start" >&2; exit 3;;
  silent) exec env -u NOTIFY_SOCKET "$@";;
  stubborn) sleep 300 & exec "$@" --ignore-sigterm;;
  parent) sleep 300 & exec "$@";;
  slow) exec "$@" --drain-seconds 4 --signal-log "$0.$$";;
esac
exec "$@"'''


def modal_command(mode_file: Path, port: int, *extra: str) -> list[str]:
    return ["/bin/sh", "-c", MODAL, str(mode_file), *testkit.app_command(port, "127.0.0.1", *extra)]


def start_modal(
    start_sidecar: StartSidecar,
    agent: Consul,
    name: str,
    mode_file: Path,
    env: dict[str, str] | None = None,
    **hot: Any,
) -> tuple[testkit.Sidecar, int]:
    port = free_port()
    cfg = base_config(agent, name, port, hot_restart={**HOT, **hot})
    sc = start_sidecar(cfg, modal_command(mode_file, port), env)
    sc.wait_event("sidecar.consul.registered")
    return sc, port


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("crash", "exited with status 3 before it was ready"), ("silent", "never sent READY=1")],
)
def test_a_failed_new_generation_leaves_the_old_one_serving(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path, mode: str, reason: str
) -> None:
    """1. The app runs under hot restart (timeout 3s).
    2. The next generation crashes at start (exit 3), or serves but never says READY=1.
    3. SIGUSR2.
    Expected: sidecar.hot_restart.failed with the reason; the new generation is gone (stopped), the old
    one is the only one left and still answers; the instance stayed registered and passing; /status
    says state failed with the reason. Once the app is fixed, the next SIGUSR2 succeeds."""
    mode_file = tmp_path / "mode"
    sc, port = start_modal(start_sidecar, consul, service_name, mode_file, timeout="3s")
    sid = f"{service_name}-1"
    wait_for(lambda: passing(consul, service_name, sid), 15, what="check passing")
    first = sc.app_pid()
    mode_file.write_text(mode)
    sc.send(signal.SIGUSR2)
    failed = sc.wait_event("sidecar.hot_restart.failed", timeout=20)
    assert reason in failed["reason"]
    stopped = sc.wait_event("sidecar.hot_restart.generation_stopped", timeout=20)
    assert stopped["why"] == "failed" and stopped["generation"] == 2
    assert not pid_alive(failed["pid"])
    assert live_app_pids(sc) == {first}
    assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    assert passing(consul, service_name, sid)
    assert sc.event("sidecar.consul.deregistered") is None
    st = status(sc)
    assert st["hot_restart"]["state"] == "failed" and reason in st["hot_restart"]["last_error"]
    assert st["hot_restart"]["restarts"] == 0 and st["hot_restart"]["failures"] == 1
    assert "hot restart failed" in (st["last_error"] or ""), st
    assert "consul_sidecar_app_restart_failures_total 1\n" in http_get(sc.status_url() + "/metrics")[1].decode()
    assert [(g["generation"], g["pid"], g["state"]) for g in st["app"]["generations"]] == [(1, first, "serving")]

    mode_file.write_text("")
    sc.send(signal.SIGUSR2)
    done = sc.wait_event("sidecar.hot_restart.done", timeout=30)
    assert done["generation"] == 3 and live_app_pids(sc) == {done["pid"]}
    st = status(sc)
    assert st["hot_restart"] == {"state": "idle", "restarts": 1, "failures": 1, "last_error": None}
    assert st["last_error"] is None, st  # the later success clears the failure's reason; the counter keeps it
    metrics = http_get(sc.status_url() + "/metrics")[1].decode()
    assert "consul_sidecar_app_restarts_total 1\n" in metrics, metrics
    assert "consul_sidecar_app_restart_failures_total 1\n" in metrics, metrics
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def test_a_second_trigger_during_a_restart_never_makes_a_third_process(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """1. The app runs under hot restart with ready = "warmup" (3s), so a restart lasts a while.
    2. SIGUSR2 three times in quick succession, while the process tree is sampled.
    Expected: the later triggers are refused with a log line; never more than two generations (the
    sidecar's direct children) at any sample; one restart completes, generation 2 is left alone."""
    sc, port = start_modal(start_sidecar, consul, service_name, tmp_path / "mode", ready="warmup", warmup="3s")
    sc.send(signal.SIGUSR2)
    sc.wait_event("sidecar.hot_restart.started", timeout=10)
    sc.send(signal.SIGUSR2)
    wait_for(lambda: sc.event("sidecar.hot_restart.refused") is not None, 10, what="the second trigger refused")
    sc.send(signal.SIGUSR2)
    most = 0
    deadline = time.monotonic() + 30
    while sc.event("sidecar.hot_restart.done") is None and time.monotonic() < deadline:
        most = max(most, len(live_app_pids(sc)))
        time.sleep(0.02)
    done = sc.wait_event("sidecar.hot_restart.done", timeout=1)
    refused = [e for e in sc.events() if e.get("event") == "sidecar.hot_restart.refused"]
    assert len(refused) == 2 and all("in progress" in e["reason"] for e in refused)
    assert most == 2
    assert live_app_pids(sc) == {done["pid"]}
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    # The whole log, now that the sidecar has ended: no refused trigger started a restart later on.
    assert [e["generation"] for e in sc.events() if e.get("event") == "sidecar.hot_restart.started"] == [2]


def test_sigterm_during_a_restart_deregisters_then_stops_both_generations(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """1. The next generation serves but never says READY=1 (timeout 20s): the restart is under way,
    two generations run.
    2. SIGTERM.
    Expected: the restart is interrupted; the instance leaves the agent while both generations still
    run (propagation_delay 1s); then both get SIGTERM and exit; the sidecar exits with the current
    (first) generation's status, 0; no process of either is left."""
    mode_file = tmp_path / "mode"
    sc, _ = start_modal(start_sidecar, consul, service_name, mode_file)
    sid = f"{service_name}-1"
    first = sc.app_pid()
    mode_file.write_text("silent")
    sc.send(signal.SIGUSR2)
    second = sc.wait_event("sidecar.hot_restart.started", timeout=10)["pid"]
    wait_for(lambda: len(live_app_pids(sc)) == 2, 10, what="two generations")
    sc.send(signal.SIGTERM)
    wait_for(lambda: sid not in consul.service_ids(service_name), 10, what="deregistered")
    assert pid_alive(first) and pid_alive(second), "an app generation stopped before the deregistration"
    assert sc.wait() == 0
    assert not pid_alive(first) and not pid_alive(second)
    names = [e.get("event") for e in sc.events()]
    assert names.index("sidecar.hot_restart.interrupted") < names.index("sidecar.consul.deregistered")
    assert names.index("sidecar.consul.deregistered") < names.index("sidecar.app.stopped")
    assert "sidecar.hot_restart.done" not in names


@pytest.mark.parametrize("mode", ["stubborn", "parent"])
def test_the_old_generation_and_what_it_started_are_ended(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path, mode: str
) -> None:
    """1. Generation 1 has started a child process (sleep 300); "stubborn": it also ignores SIGTERM.
    2. SIGUSR2 (app_timeout 2s); generation 2 is a plain app.
    Expected: generation 1 and its child are gone once the restart is done: "parent" exits on SIGTERM
    and its child gets the same signal; "stubborn" is SIGKILLed with its child after app_timeout
    (generation_stopped at error level). Generation 2 serves alone, the instance stayed passing."""
    mode_file = tmp_path / "mode"
    mode_file.write_text(mode)
    port = free_port()
    cfg = base_config(consul, service_name, port, hot_restart=HOT, shutdown={"app_timeout": "2s"})
    sc = start_sidecar(cfg, modal_command(mode_file, port))
    sc.wait_event("sidecar.consul.registered")
    first = sc.app_pid()
    from sidecar.process import proctree

    children = proctree.descendants(first)
    assert len(children) == 1
    mode_file.write_text("")
    sc.send(signal.SIGUSR2)
    done = sc.wait_event("sidecar.hot_restart.done", timeout=30)
    stopped = sc.event("sidecar.hot_restart.generation_stopped")
    assert stopped is not None and stopped["generation"] == 1
    assert (stopped["level"], "SIGKILL" in stopped["how"]) == (
        ("error", True) if mode == "stubborn" else ("info", False)
    )
    assert not pid_alive(first) and not any(pid_alive(p) for p in children)
    assert live_app_pids(sc) == {done["pid"]}
    assert passing(consul, service_name, f"{service_name}-1")
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def test_sigterm_while_the_old_generation_drains(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """1. Generation 1 keeps serving 4s after its SIGTERM (--drain-seconds 4).
    2. SIGUSR2: generation 2 takes over, generation 1 is signalled and drains.
    3. SIGTERM to the sidecar during that drain.
    Expected: deregistration first; generation 1 is not signalled again (it heard one SIGTERM), the
    current generation 2 gets SIGTERM; both end, the sidecar exits 0."""
    mode_file = tmp_path / "mode"
    mode_file.write_text("slow")
    sc, _ = start_modal(start_sidecar, consul, service_name, mode_file)
    first = sc.app_pid()
    mode_file.write_text("")
    sc.send(signal.SIGUSR2)
    second = sc.wait_event("sidecar.hot_restart.old_signalled", timeout=20)
    assert second["pid"] == first
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    names = [e.get("event") for e in sc.events()]
    assert names.index("sidecar.consul.deregistered") < names.index("sidecar.app.stopped")
    assert [name for name, _ in testkit.read_signal_log(Path(f"{mode_file}.{first}"))] == ["SIGTERM"]
    assert not live_app_pids(sc) and not pid_alive(first)


def test_the_current_generation_dying_mid_restart_ends_the_app(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """1. A restart is under way (the new generation never says READY=1).
    2. The current generation is SIGKILLed (out of memory, say).
    Expected: as without hot restart: sidecar.app.exited (137), the instance is deregistered, the
    starting generation is stopped too, the sidecar exits 137 and leaves no process."""
    mode_file = tmp_path / "mode"
    sc, _ = start_modal(start_sidecar, consul, service_name, mode_file)
    first = sc.app_pid()
    mode_file.write_text("silent")
    sc.send(signal.SIGUSR2)
    second = sc.wait_event("sidecar.hot_restart.started", timeout=10)["pid"]
    os.kill(first, signal.SIGKILL)
    assert sc.wait() == 137
    exited = sc.event("sidecar.app.exited")
    assert exited is not None and exited["exit_status"] == 137
    assert sc.event("sidecar.consul.deregistered") is not None
    assert f"{service_name}-1" not in consul.service_ids(service_name)
    assert not pid_alive(second)


def test_hot_restart_command_not_found_exits_127(
    start_sidecar: StartSidecar, consul: Consul, service_name: str
) -> None:
    """The app's command does not exist: with hot restart (the trampoline execs it) the sidecar says so
    and exits as without it (sidecar.app.start_failed, 127), nothing registered."""
    cfg = base_config(consul, service_name, free_port(), hot_restart=HOT)
    sc = start_sidecar(cfg, ["/nonexistent/app"])
    assert sc.wait() == 127
    failed = sc.event("sidecar.app.start_failed")
    assert failed is not None and "FileNotFoundError" in failed["error"]


def _receiver(path: Path) -> socket.socket:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(0.05)
    return rx


def _drained(rx: socket.socket, into: list[str]) -> bool:
    """Read every datagram waiting on ``rx`` into ``into`` (True: for use in a wait_for condition)."""
    while True:
        try:
            into.append(rx.recv(65536).decode())
        except TimeoutError:
            return True


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().partition("=")[::2] for x in raw if b"=" in x)


def test_systemd_notify_sequence(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """The sidecar runs with NOTIFY_SOCKET pointing at a datagram socket this test owns (as systemd
    with Type=notify would). Expected, in order: READY=1 once registered; RELOADING=1 (with
    MONOTONIC_USEC) then READY=1 around a hot restart; STOPPING=1 when the drain starts; STATUS= lines
    along the way. The app never sees the test's socket: its NOTIFY_SOCKET is the sidecar's own."""
    path = tmp_path / "notify.sock"
    rx = _receiver(path)
    try:
        sc, port = start_modal(start_sidecar, consul, service_name, tmp_path / "mode", env={"NOTIFY_SOCKET": str(path)})
        got: list[str] = []
        wait_for(lambda: _drained(rx, got) and any("READY=1" in m for m in got), 10, what="READY=1")
        app_pid = sc.app_pid()
        app_env = _environ(app_pid)
        assert app_env.get("NOTIFY_SOCKET", "").startswith("@consul-sidecar/")
        # Socket activation as systemd does it: LISTEN_PID is the app's own PID, not the trampoline's parent.
        assert (app_env["LISTEN_PID"], app_env["LISTEN_FDS"], app_env["LISTEN_FDNAMES"]) == (
            str(app_pid),
            "1",
            service_name,
        )
        assert os.readlink(f"/proc/{app_pid}/fd/3").startswith("socket:[")
        sc.send(signal.SIGUSR2)
        sc.wait_event("sidecar.hot_restart.done", timeout=30)
        sc.send(signal.SIGTERM)
        assert sc.wait() == 0
        _drained(rx, got)
    finally:
        rx.close()
    flags = [k for m in got for k in ("READY=1", "RELOADING=1", "STOPPING=1") if k in m.split("\n")]
    assert flags == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], got
    reloading = next(m for m in got if "RELOADING=1" in m)
    assert "MONOTONIC_USEC=" in reloading
    assert all(any(line.startswith("STATUS=") for line in m.split("\n")) for m in got)


def test_without_hot_restart_the_app_does_not_inherit_systemds_notify_socket(
    registered_sidecar: RegisteredSidecar, tmp_path: Path
) -> None:
    """A plain wrapper-mode sidecar under NOTIFY_SOCKET: the app's environment has no NOTIFY_SOCKET
    (systemd would reject its messages, or worse, take its READY=1 for the unit's)."""
    path = tmp_path / "notify.sock"
    rx = _receiver(path)
    try:
        sc, _ = registered_sidecar(env={"NOTIFY_SOCKET": str(path)})
        assert "NOTIFY_SOCKET" not in _environ(sc.app_pid())
        got: list[str] = []
        wait_for(lambda: _drained(rx, got) and any("READY=1" in m for m in got), 10, what="READY=1")
        sc.send(signal.SIGTERM)
        assert sc.wait() == 0
    finally:
        rx.close()


def test_notify_socket_ignores_strangers_garbage_and_oversized_messages(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """1. The next generation never says READY=1 (timeout 4s).
    2. During the restart this test (a PID of no generation) sends READY=1 to the apps' NOTIFY_SOCKET,
    then garbage bytes and a 64 KiB datagram.
    Expected: none counts: the restart fails for want of READY=1; the sidecar logs the stranger at
    debug and keeps serving; the old generation is left."""
    mode_file = tmp_path / "mode"
    sc, port = start_modal(start_sidecar, consul, service_name, mode_file, timeout="4s")
    first = sc.app_pid()
    name = _environ(first)["NOTIFY_SOCKET"]
    mode_file.write_text("silent")
    sc.send(signal.SIGUSR2)
    sc.wait_event("sidecar.hot_restart.started", timeout=10)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
        target = "\0" + name[1:]
        tx.sendto(b"READY=1", target)
        tx.sendto(b"\xff\xfe\x00garbage", target)
        tx.sendto(b"READY=1\n" + b"X" * 65000, target)
    stranger = sc.wait_event("sidecar.hot_restart.notify_unknown_sender", timeout=5)
    assert stranger["sender_pid"] == os.getpid()
    failed = sc.wait_event("sidecar.hot_restart.failed", timeout=20)
    assert "never sent READY=1" in failed["reason"]
    sc.wait_event("sidecar.hot_restart.generation_stopped", timeout=20)
    assert live_app_pids(sc) == {first}
    assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


# --- configuration ----------------------------------------------------------------------------------


def _config_file(tmp_path: Path, agent: Consul, name: str, port: int, **sections: dict[str, Any]) -> Path:
    return testkit.write_config(tmp_path / "c.toml", base_config(agent, name, port, **sections))


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([PY, "-m", "sidecar", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    ("hot", "fragment"),
    [
        ({"signal": "SIGTERM"}, "hot_restart.signal: SIGTERM starts the drain"),
        ({"signal": "INT"}, "hot_restart.signal: SIGINT starts the drain"),
        ({"signal": "SIGKILL"}, "hot_restart.signal: SIGKILL cannot be caught"),
        ({"signal": "SIGCHLD"}, "hot_restart.signal: SIGCHLD is how the sidecar learns"),
        ({"signal": "SIGFOO"}, "hot_restart.signal: 'SIGFOO' is not a signal name"),
        ({"ready": "soon"}, "hot_restart.ready: 'soon'"),
        ({"timeout": "0"}, "hot_restart.timeout"),
        ({"ready": "warmup", "warmup": "1m", "timeout": "1m"}, "hot_restart.warmup: is not shorter"),
        ({"ready": "warmup", "warmup": "0s"}, "hot_restart.warmup: must be more than 0s"),
    ],
)
def test_bad_hot_restart_settings_exit_78(
    tmp_path: Path, consul: Consul, service_name: str, hot: dict[str, Any], fragment: str
) -> None:
    """A bad [hot_restart] value: check-config and run exit 78 with one line naming the key."""
    path = _config_file(tmp_path, consul, service_name, free_port(), hot_restart={"enabled": True, **hot})
    for args in (("check-config", "-c", str(path)), ("run", "-c", str(path), "--", "true")):
        r = _cli(*args)
        assert r.returncode == 78, r.stderr
        assert fragment in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_hot_restart_in_alongside_mode_exits_78(tmp_path: Path, consul: Consul, service_name: str) -> None:
    """hot_restart.enabled without a command after '--' (alongside mode), or with [app]: exit 78 naming
    hot_restart.enabled, nothing registered."""
    path = _config_file(tmp_path, consul, service_name, free_port(), hot_restart={"enabled": True})
    r = _cli("run", "-c", str(path))
    assert r.returncode == 78 and "hot_restart.enabled: needs wrapper mode" in r.stderr, r.stderr
    path = _config_file(tmp_path, consul, service_name, free_port(), hot_restart={"enabled": True}, app={"pid": 12345})
    r = _cli("check-config", "-c", str(path))
    assert r.returncode == 78 and "hot_restart.enabled: needs wrapper mode" in r.stderr, r.stderr
    assert f"{service_name}-1" not in consul.service_ids(service_name)


def test_a_port_the_sidecar_cannot_bind(tmp_path: Path, consul: Consul, service_name: str) -> None:
    """service.address not on this host (192.0.2.1, TEST-NET-1): check-config and run exit 78 naming
    hot_restart.enabled and the address; run starts no app (its marker file never appears)."""
    port = free_port()
    path = _config_file(
        tmp_path,
        consul,
        service_name,
        port,
        hot_restart={"enabled": True},
        service={"address": "192.0.2.1"},
        check={"http": f"http://192.0.2.1:{port}/healthz", "allow_remote": True},
    )
    r = _cli("check-config", "-c", str(path))
    assert r.returncode == 78 and "hot_restart.enabled" in r.stderr and "192.0.2.1" in r.stderr, r.stderr
    marker = tmp_path / "started"
    r = _cli("run", "-c", str(path), "--", "touch", str(marker))
    assert r.returncode == 78, r.stderr
    assert "hot_restart.enabled" in r.stderr and "192.0.2.1" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_a_port_in_use(tmp_path: Path, consul: Consul, service_name: str) -> None:
    """Another socket listens on the port: check-config exits 0 with a warning (it may be the running
    sidecar itself), prints the hot-restart plan; run exits 78 before starting the app."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        path = _config_file(tmp_path, consul, service_name, port, hot_restart={"enabled": True, "timeout": "30s"})
        r = _cli("check-config", "-c", str(path))
        assert r.returncode == 0, r.stderr
        assert "is in use right now" in r.stderr
        plan = json.loads(r.stdout)["hot_restart"]
        assert plan["signal"] == "SIGUSR2" and plan["ready"] == "notify" and plan["timeout"] == "30s"
        assert plan["worst_case_restart"] == "41s"  # timeout 30s + app_timeout 10s + 1s
        assert "hot restart: SIGUSR2 starts the next generation" in r.stderr
        assert json.loads(r.stdout)["shutdown"]["worst_case"] == "15s"  # unchanged by hot restart
        marker = tmp_path / "started"
        r = _cli("run", "-c", str(path), "--", "touch", str(marker))
        assert r.returncode == 78 and "hot_restart.enabled" in r.stderr, r.stderr
        assert not marker.exists()
    finally:
        busy.close()


# --- the notify protocol's pieces -------------------------------------------------------------------


def test_notify_parse_takes_key_value_lines_only() -> None:
    """KEY=VALUE lines are read; anything else (not UTF-8, a line without '=', an odd key) is refused whole."""
    from sidecar.process.notify import parse

    assert parse(b"READY=1\nSTATUS=serving 3 workers\n") == {"READY": "1", "STATUS": "serving 3 workers"}
    assert parse(b"MAINPID=42") == {"MAINPID": "42"}
    for bad in (b"", b"\xff\xfeREADY=1", b"READY", b"=1", b"READY=1\nnonsense", b"RE ADY=1", b"\x00=1"):
        assert parse(bad) is None, bad


def test_systemd_notifier_never_blocks_on_a_full_socket(tmp_path: Path) -> None:
    """systemd's socket stops reading (its queue full): each notify() returns at once and is dropped;
    the sidecar's drain is never held by it. A missing socket is dropped the same way."""
    from sidecar.process.notify import SystemdNotifier

    path = tmp_path / "full.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    try:
        notifier = SystemdNotifier(str(path))
        t = time.monotonic()
        for i in range(5000):
            notifier.notify(STATUS=f"step {i}", READY="1")
        elapsed = time.monotonic() - t
        assert 0 < notifier.sent_total < 5000  # the queue filled: the rest were dropped, not waited for
        assert elapsed < 5.0
        gone = SystemdNotifier(str(tmp_path / "missing.sock"))
        gone.notify(STOPPING="1")
        assert gone.sent_total == 0
        gone.close()
        notifier.close()
    finally:
        rx.close()


# A new generation that starts a child holding the listening socket (fd 3), then exits 0 before it is
# ready: "orphan" in its process group, "session" in a session of its own (setsid).
FORKING = '''mode=$(cat "$0" 2>/dev/null)
case "$mode" in
  orphan) sleep 300 & echo $! > "$0.child"; exit 0;;
  session) setsid sleep 300 & echo $! > "$0.child"; sleep 0.2; exit 0;;
esac
exec "$@"'''


@pytest.mark.parametrize("mode", ["orphan", "session"])
def test_a_new_generation_that_exits_leaving_a_child_leaves_no_stray(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path, mode: str
) -> None:
    """1. The app runs under hot restart.
    2. The next generation starts a child that inherits the listening socket (fd 3) - in its process
    group, or in a session of its own - then exits 0 before it is ready.
    3. SIGUSR2.
    Expected: the restart fails (the generation exited); its child, re-parented to the sidecar and able
    to accept connections on the shared socket beside the current generation, is ended too: once the
    failed generation is reported stopped, the current generation is the only process under the sidecar."""
    mode_file = tmp_path / "mode"
    port = free_port()
    cfg = base_config(consul, service_name, port, hot_restart={**HOT, "timeout": "10s"})
    sc = start_sidecar(cfg, ["/bin/sh", "-c", FORKING, str(mode_file), *testkit.app_command(port, "127.0.0.1")])
    sc.wait_event("sidecar.consul.registered")
    first = sc.app_pid()
    mode_file.write_text(mode)
    sc.send(signal.SIGUSR2)
    failed = sc.wait_event("sidecar.hot_restart.failed", timeout=20)
    assert "exited with status 0" in failed["reason"]
    sc.wait_event("sidecar.hot_restart.generation_stopped", timeout=20)
    child = int(Path(f"{mode_file}.child").read_text())
    from sidecar.process import proctree

    wait_for(lambda: not pid_alive(child), 5, what="the failed generation's child ended")
    assert proctree.descendants(sc.pid) == {first}
    assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


# A new generation that closes the listening socket (fd 3) and stays alive: an app version that no longer
# takes it by socket activation (it would bind the port itself, and retries while the sidecar holds it).
# "notify" also says READY=1 first.
CLOSING = '''mode=$(cat "$0" 2>/dev/null)
case "$mode" in
  closed) exec 3>&-; exec sleep 300;;
  closed-ready) exec 3>&-; exec "$1" -c "import os,socket,time;s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM);\
a=os.environ['NOTIFY_SOCKET'];s.sendto(b'READY=1',b'\\0'+a[1:].encode());time.sleep(300)";;
esac
exec "$@"'''


@pytest.mark.parametrize(("mode", "ready"), [("closed", "warmup"), ("closed-ready", "notify")])
def test_a_new_generation_without_the_listening_socket_does_not_replace_the_old_one(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path, mode: str, ready: str
) -> None:
    """1. The app runs under hot restart (ready = "warmup" 1s, or "notify").
    2. The next generation closes fd 3 (the listening socket) and stays alive; with "notify" it says READY=1.
    3. SIGUSR2.
    Expected: the restart fails, naming the listening socket; the old generation is not signalled and
    still answers (else nobody would accept: connections would hang and the check go critical); the new
    generation is stopped; the instance stays passing."""
    mode_file = tmp_path / "mode"
    port = free_port()
    hot = {**HOT, "timeout": "10s", "ready": ready, "warmup": "1s"}
    cfg = base_config(consul, service_name, port, hot_restart=hot)
    sc = start_sidecar(cfg, ["/bin/sh", "-c", CLOSING, str(mode_file), *testkit.app_command(port, "127.0.0.1")])
    sc.wait_event("sidecar.consul.registered")
    sid = f"{service_name}-1"
    wait_for(lambda: passing(consul, service_name, sid), 15, what="check passing")
    first = sc.app_pid()
    mode_file.write_text(mode)
    sc.send(signal.SIGUSR2)
    failed = sc.wait_event("sidecar.hot_restart.failed", timeout=20)
    assert "listening socket" in failed["reason"]
    sc.wait_event("sidecar.hot_restart.generation_stopped", timeout=20)
    assert sc.event("sidecar.hot_restart.old_signalled") is None
    assert live_app_pids(sc) == {first}
    assert answering_pid(port) == first
    assert passing(consul, service_name, sid)
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


# A new generation that keeps the listening socket (fd 3) open but serves on another port ($1): a release
# whose socket activation broke (LISTEN_PID dropped, so the example app binds --port itself; the later
# --port wins). It says READY=1 once serving there, as a server that never accepts on fd 3 may.
ELSEWHERE = '''mode=$(cat "$0" 2>/dev/null)
other=$1; shift
case "$mode" in
  elsewhere) exec env -u LISTEN_PID "$@" --port "$other";;
esac
exec "$@"'''


@pytest.mark.parametrize("ready", ["warmup", "notify"])
def test_a_new_generation_that_holds_the_socket_but_never_accepts_does_not_replace_the_old_one(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path, ready: str
) -> None:
    """1. The app runs under hot restart (ready = "warmup" 1s, or "notify"; timeout 5s).
    2. The next generation keeps fd 3 (the listening socket) open but serves on another port; with
    "notify" it says READY=1 once serving there.
    3. SIGUSR2.
    Expected: it is never seen accepting on the shared socket, so the restart fails within the timeout
    naming that; the old generation is not signalled and still answers on the registered port; the new
    one is stopped; the instance stays passing; /status and /metrics count one failed restart."""
    mode_file = tmp_path / "mode"
    port, other = free_port(), free_port()
    hot = {**HOT, "timeout": "5s", "ready": ready, "warmup": "1s"}
    cfg = base_config(consul, service_name, port, hot_restart=hot)
    command = ["/bin/sh", "-c", ELSEWHERE, str(mode_file), str(other), *testkit.app_command(port, "127.0.0.1")]
    sc = start_sidecar(cfg, command)
    sc.wait_event("sidecar.consul.registered")
    sid = f"{service_name}-1"
    wait_for(lambda: passing(consul, service_name, sid), 15, what="check passing")
    first = sc.app_pid()
    assert answering_pid(port) == first
    mode_file.write_text("elsewhere")
    sc.send(signal.SIGUSR2)
    second = sc.wait_event("sidecar.hot_restart.started", timeout=10)["pid"]
    # The scenario holds: the new generation serves, elsewhere, and holds the shared socket.
    wait_for(lambda: _answers_at(other) == second, 10, 0.05, "the new generation serving on the other port")
    from sidecar.process import proctree

    assert proctree.holders({second}, proctree.listening_inodes(port)) == {second}
    failed = sc.wait_event("sidecar.hot_restart.failed", timeout=20)
    assert failed["pid"] == second and "not seen accepting" in failed["reason"], failed
    stopped = sc.wait_event("sidecar.hot_restart.generation_stopped", timeout=20)
    assert stopped["why"] == "failed" and stopped["pid"] == second
    assert sc.event("sidecar.hot_restart.old_signalled") is None
    assert sc.event("sidecar.hot_restart.ready") is None
    assert live_app_pids(sc) == {first} and not pid_alive(second)
    assert answering_pid(port) == first
    assert passing(consul, service_name, sid)
    st = status(sc)
    assert st["hot_restart"]["state"] == "failed" and "not seen accepting" in st["hot_restart"]["last_error"]
    assert st["hot_restart"]["restarts"] == 0 and st["hot_restart"]["failures"] == 1
    assert "consul_sidecar_app_restart_failures_total 1\n" in http_get(sc.status_url() + "/metrics")[1].decode()
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def _answers_at(port: int) -> int | None:
    """The X-Pid of the process answering GET / on ``port``, or None if nothing answers there."""
    try:
        return answering_pid(port)
    except OSError:
        return None


def test_the_new_generation_dying_while_the_old_one_drains_lets_the_old_one_finish(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """1. Generation 1 keeps serving 4s after its SIGTERM (--drain-seconds 4); app_timeout 10s.
    2. A slow request (3s) is in flight at generation 1; SIGUSR2: generation 2 takes over, generation 1
    is signalled and drains.
    3. Generation 2 is SIGKILLed (out of memory, say) during that drain.
    Expected: as any exit of the app: deregistered, the sidecar exits 137. Generation 1, replaced and
    draining, keeps the rest of its app_timeout: the in-flight request completes (200) and generation 1
    exits on its own after its SIGTERM (not SIGKILLed as a leftover a second after the app's exit)."""
    import threading

    mode_file = tmp_path / "mode"
    mode_file.write_text("slow")
    port = free_port()
    cfg = base_config(consul, service_name, port, hot_restart=HOT, shutdown={"app_timeout": "10s"})
    sc = start_sidecar(cfg, modal_command(mode_file, port))
    sc.wait_event("sidecar.consul.registered")
    first = sc.app_pid()
    answers: list[int] = []

    def slow() -> None:
        try:
            answers.append(http_get(f"http://127.0.0.1:{port}/slow?seconds=3", timeout=15)[0])
        except OSError:
            answers.append(-1)

    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: testkit.accepted_by(port, first) > 0, 10, what="generation 1 holding the request")
    mode_file.write_text("")
    sc.send(signal.SIGUSR2)
    second = sc.wait_event("sidecar.hot_restart.ready", timeout=20)["pid"]
    sc.wait_event("sidecar.hot_restart.old_signalled", timeout=5)
    os.kill(second, signal.SIGKILL)
    assert sc.wait() == 137
    t.join(20)
    assert answers == [200], "the request in flight at the replaced generation failed"
    stopped = sc.event("sidecar.app.stopped")
    assert stopped is not None and stopped.get("leftovers_killed") is None
    assert [name for name, _ in testkit.read_signal_log(Path(f"{mode_file}.{first}"))] == ["SIGTERM"]
    assert f"{service_name}-1" not in consul.service_ids(service_name)
    assert not pid_alive(first)


def test_after_the_drain_signals_the_app_a_late_connection_is_refused_not_left_hanging(
    start_sidecar: StartSidecar, consul: Consul, service_name: str
) -> None:
    """1. The example app under hot restart; a slow request (4s) is in flight.
    2. SIGTERM: deregistration, propagation delay, then the app gets SIGTERM: it closes its listener
    and finishes the slow request.
    3. Meanwhile a late client (a consumer with a stale view) connects.
    Expected: as without hot restart, the connection is refused at once (the client tries another
    instance), not accepted into a queue nobody serves any more (the sidecar's own copy of the socket)
    where it would hang until the sidecar exits. The slow request completes."""
    import threading

    port = free_port()
    cfg = base_config(consul, service_name, port, hot_restart=HOT)
    sc = start_sidecar(cfg, testkit.app_command(port, "127.0.0.1"))
    sc.wait_event("sidecar.consul.registered")
    answers: list[int] = []

    def slow() -> None:
        try:
            answers.append(http_get(f"http://127.0.0.1:{port}/slow?seconds=4", timeout=15)[0])
        except OSError:
            answers.append(-1)

    t = threading.Thread(target=slow)
    t.start()
    app = sc.app_pid()
    wait_for(lambda: testkit.accepted_by(port, app) > 0, 10, what="the app holding the slow request")
    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.drain.delay_done", timeout=10)
    wait_for(lambda: not testkit.listens(port), 10, what="the app (signalled) closing its listener")
    assert sc.proc is not None and sc.proc.poll() is None and t.is_alive(), "the slow request is in flight"
    c = socket.socket()
    c.settimeout(2)
    try:
        with pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", port))
    finally:
        c.close()
    t.join(15)
    assert answers == [200]
    assert sc.wait() == 0


def test_a_connection_the_old_generation_accepted_just_before_its_signal_is_served(
    start_sidecar: StartSidecar, consul: Consul, service_name: str, tmp_path: Path
) -> None:
    """1. The example app under hot restart. A client connects while generation 1 is the only one (so
    generation 1 accepts it) and has not sent its request yet (as any client between connect and send).
    2. SIGUSR2: generation 2 takes over, generation 1 gets SIGTERM.
    3. The client sends its request right after.
    Expected: it is answered (200), not closed unanswered as an idle connection: a hot restart fails
    no request (under load, such connections are the ones accepted in the instant before the SIGTERM)."""
    port = free_port()
    cfg = base_config(consul, service_name, port, hot_restart=HOT)
    siglog = tmp_path / "signals.log"
    sc = start_sidecar(cfg, testkit.app_command(port, "127.0.0.1", "--signal-log", str(siglog)))
    sc.wait_event("sidecar.consul.registered")
    first = sc.app_pid()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        wait_for(lambda: testkit.accepted_by(port, first) > 0, 10, what="generation 1 accepting the connection")
        sc.send(signal.SIGUSR2)
        assert sc.wait_event("sidecar.hot_restart.old_signalled", timeout=20)["pid"] == first
        wait_for(lambda: testkit.read_signal_log(siglog) != [], 10, what="generation 1 receiving its SIGTERM")
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    finally:
        c.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert f"X-Pid: {first}".encode() in answer
    sc.wait_event("sidecar.hot_restart.done", timeout=20)
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def test_an_app_that_binds_the_port_itself_gets_a_hint(
    start_sidecar: StartSidecar, consul: Consul, service_name: str
) -> None:
    """Hot restart on, and a server that binds service.port itself instead of taking fd 3
    (``python -m http.server``): it fails with 'address already in use' and exits 1.
    Expected: the sidecar exits with the app's status, nothing registered, and its
    ``sidecar.app.exited`` line says why (the sidecar holds the port; take fd 3)."""
    port = free_port()
    cfg = base_config(consul, service_name, port, hot_restart=HOT)
    sc = start_sidecar(cfg, [PY, "-m", "http.server", "--bind", "127.0.0.1", str(port)])
    assert sc.wait(30) == 1, sc.output()[-2000:]
    exited = sc.event("sidecar.app.exited")
    assert exited is not None and "fd 3" in (exited.get("hint") or ""), exited
    assert consul.service_ids(service_name) == []
