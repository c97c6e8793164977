"""Alongside mode: the app runs as another process; the sidecar stops it by PID, PID file or URL."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from testkit import Consul, app_command, free_port, http_get, pid_alive, read_signal_log, spawn, wait_for
from testkit.suite import StartSidecar, base_config


def _deregistered_at(sc_events: list[dict[str, object]]) -> str:
    ev = next(e for e in sc_events if e["event"] == "sidecar.consul.deregistered")
    return str(ev["timestamp"])


def test_pid_file(consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path) -> None:
    """1. The app runs on its own and writes a PID file; the sidecar registers it.
    2. SIGTERM to the sidecar: deregistered, then the app gets SIGTERM no sooner than the delay (1 s)
       after the sidecar's, exits, and the sidecar exits 0.
    """
    port = free_port()
    pid_file, siglog = tmp_path / "app.pid", tmp_path / "signals.log"
    app = spawn(
        app_command(port, "127.0.0.1", "--pid-file", str(pid_file), "--signal-log", str(siglog)), tmp_path / "app.log"
    )
    cfg = base_config(consul, service_name, port, app={"pid_file": str(pid_file)}, shutdown={"propagation_delay": "1s"})
    sc = start_sidecar(cfg)
    sc.wait_event("sidecar.consul.registered")
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    sent = time.monotonic()
    sc.send(signal.SIGTERM)
    assert sc.wait(20) == 0
    assert app.wait(5) == 0
    [(name, at)] = read_signal_log(siglog)
    assert name == "SIGTERM" and at - sent >= 1.0
    assert consul.instances(service_name) == []


def test_pid_hung_app_is_killed(consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path) -> None:
    """An app given by PID that ignores SIGTERM is SIGKILLed after app_timeout; the sidecar exits 137."""
    port = free_port()
    app = spawn(app_command(port, "127.0.0.1", "--ignore-sigterm"), tmp_path / "app.log")
    cfg = base_config(
        consul, service_name, port, app={"pid": app.pid}, shutdown={"propagation_delay": "0s", "app_timeout": "1s"}
    )
    sc = start_sidecar(cfg)
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    assert sc.wait(20) == 128 + signal.SIGKILL
    assert app.wait(5) == -signal.SIGKILL


def test_shutdown_url(consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path) -> None:
    """1. The app is reachable only over HTTP; [app] shutdown_url = POST /shutdown.
    2. SIGTERM to the sidecar: deregistered, then the POST; the sidecar waits until the
       check URL stops answering and exits 0; the app exits 0.
    3. The drain's horizon does not count the sidecar's own POST and polls of the app's port (its last
       look comes before the POST here, not after the signal as with a PID): no new connection near the
       window's end. Red when the look comes after the POST (horizon_ms = window_ms).
    """
    port = free_port()
    app = spawn(app_command(port), tmp_path / "app.log")
    cfg = base_config(
        consul,
        service_name,
        port,
        app={"shutdown_url": f"http://127.0.0.1:{port}/shutdown"},
        shutdown={"propagation_delay": "0.5s"},
    )
    sc = start_sidecar(cfg)
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    assert sc.wait(20) == 0
    assert app.wait(5) == 0
    stopped = sc.event("sidecar.app.stopped")
    assert stopped is not None and "stopped answering" in str(stopped["how"])
    assert "POST /shutdown" in (tmp_path / "app.log").read_text()
    done = sc.event("sidecar.drain.done")
    assert done is not None and "window_ms" in done, sc.tail()  # measured, alongside too
    # At most a Consul check in flight at the deregistration, a few ms after it.
    assert done["horizon_ms"] < done["window_ms"] - 200, done


def test_no_app_setting_deregisters_waits_and_exits(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """Without [app], the sidecar deregisters, waits the delay and exits 0, leaving the app to the orchestrator."""
    port = free_port()
    app = spawn(app_command(port), tmp_path / "app.log")
    cfg = base_config(consul, service_name, port, shutdown={"propagation_delay": "0.5s"})
    sc = start_sidecar(cfg)
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    assert sc.wait(20) == 0
    assert consul.instances(service_name) == []
    assert app.poll() is None, "the sidecar must not touch an app it was not told how to stop"


def test_app_gone_on_its_own_deregisters(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """The app (known by PID) exits on its own: the sidecar deregisters at once and exits."""
    port = free_port()
    app = spawn(app_command(port, "127.0.0.1", "--crash-after", "2"), tmp_path / "app.log")
    cfg = base_config(consul, service_name, port, app={"pid": app.pid})
    sc = start_sidecar(cfg)
    sc.wait_event("sidecar.consul.registered")
    wait_for(lambda: not pid_alive(app.pid) or app.poll() is not None, 10, what="the app to crash")
    assert sc.wait(10) == 0  # alongside mode cannot see the app's status
    assert consul.instances(service_name) == []
    assert sc.event("sidecar.app.exited") is not None


def http_ok(url: str) -> bool:
    try:
        return http_get(url, timeout=1.0)[0] == 200
    except OSError:
        return False


def _dead_pid(tmp_path: Path) -> int:
    """The PID of a process that has exited (and been reaped): what a stale PID file names."""
    gone = spawn([sys.executable, "-c", "pass"], tmp_path / "gone.log")
    gone.wait(10)
    return gone.pid


def test_stale_pid_file_naming_a_dead_pid_waits_for_the_app(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. The PID file is left from an earlier run: it names a PID that is gone.
    2. The sidecar waits (it says so in sidecar.startup.waiting), it does not take the dead PID for the app's exit.
    3. The app starts and writes its PID: the sidecar registers it and follows it.
    4. The app is killed: the sidecar deregisters at once and exits (0: alongside mode cannot see the status).
    """
    port = free_port()
    pid_file = tmp_path / "app.pid"
    dead = _dead_pid(tmp_path)
    pid_file.write_text(f"{dead}\n")
    cfg = base_config(consul, service_name, port, app={"pid_file": str(pid_file)}, startup={"timeout": "60s"})
    sc = start_sidecar(cfg)
    waiting = sc.wait_event("sidecar.startup.waiting", 30)
    assert f"PID {dead}" in str(waiting.get("pid_check")), waiting
    assert "not running" in str(waiting["pid_check"]), waiting
    assert consul.instances(service_name) == []
    app = spawn(app_command(port, "127.0.0.1", "--pid-file", str(pid_file)), tmp_path / "app.log")
    sc.wait_event("sidecar.consul.registered", 60)
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    app.kill()
    assert app.wait(5) == -signal.SIGKILL
    assert sc.wait(20) == 0
    assert consul.instances(service_name) == []
    exited = sc.event("sidecar.app.exited")
    assert exited is not None
    trusted = sc.event("sidecar.app.pid_verified")
    assert trusted is not None and trusted["pid"] == app.pid, trusted


@pytest.mark.parametrize("how", ["pid_file", "pid"])
def test_pid_naming_an_unrelated_process_is_not_trusted(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, how: str
) -> None:
    """1. The app listens on service.address:port; app.pid_file (or app.pid) names another live process (sleep).
    2. The sidecar does not register while the PID is not the app's: after startup.timeout it exits 69,
       and its error names both the PID it was given and the one that listens.
    3. Neither process is signalled: the sidecar signals only a PID it has seen listen on the port.
    """
    port = free_port()
    app = spawn(app_command(port, "127.0.0.1"), tmp_path / "app.log")
    other = spawn(["sleep", "600"], tmp_path / "sleep.log")
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60, what="the app to listen")
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{other.pid}\n")
    app_section: dict[str, object] = {"pid_file": str(pid_file)} if how == "pid_file" else {"pid": other.pid}
    cfg = base_config(consul, service_name, port, app=app_section, startup={"timeout": "3s"})
    sc = start_sidecar(cfg)
    assert sc.wait(30) == 69
    unhealthy = sc.event("sidecar.startup.unhealthy")
    assert unhealthy is not None, sc.output()[-3000:]
    why = str(unhealthy.get("pid_check"))
    assert f"PID {other.pid} (sleep 600)" in why and f"PID {app.pid} " in why, why
    assert f"127.0.0.1:{port}" in why, why
    assert sc.event("sidecar.consul.registered") is None
    assert consul.instances(service_name) == []
    assert other.poll() is None and app.poll() is None, "neither process may be signalled"


def test_hint_names_where_the_app_listens_alongside(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """The app (app.pid) listens on another port than service.port: the unhealthy error says where it listens."""
    port, other_port = free_port(), free_port()
    app = spawn(app_command(other_port, "127.0.0.1"), tmp_path / "app.log")
    wait_for(lambda: http_ok(f"http://127.0.0.1:{other_port}/healthz"), 60, what="the app to listen")
    cfg = base_config(consul, service_name, port, app={"pid": app.pid}, startup={"timeout": "2s"})
    sc = start_sidecar(cfg)
    assert sc.wait(30) == 69
    unhealthy = sc.event("sidecar.startup.unhealthy")
    assert unhealthy is not None, sc.output()[-3000:]
    hint = str(unhealthy.get("hint"))
    assert f"listens on 127.0.0.1:{other_port}, not service.address:port 127.0.0.1:{port}" in hint, unhealthy


def test_stale_pid_file_without_wait_healthy_waits_for_the_pid(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """startup.wait_healthy = false (no probe): a PID file naming a dead PID still holds the registration back
    until the app has written its own PID and listens; then the sidecar registers and follows it."""
    port = free_port()
    pid_file = tmp_path / "app.pid"
    dead = _dead_pid(tmp_path)
    pid_file.write_text(f"{dead}\n")
    cfg = base_config(
        consul, service_name, port, app={"pid_file": str(pid_file)}, startup={"wait_healthy": False, "timeout": "60s"}
    )
    sc = start_sidecar(cfg)
    waiting = sc.wait_event("sidecar.startup.waiting", 30)
    assert f"PID {dead}, which is not running" in str(waiting.get("pid_check")), waiting
    assert consul.instances(service_name) == []
    app = spawn(app_command(port, "127.0.0.1", "--pid-file", str(pid_file)), tmp_path / "app.log")
    verified = sc.wait_event("sidecar.app.pid_verified", 60)
    assert verified["pid"] == app.pid, verified
    sc.wait_event("sidecar.consul.registered", 30)
    sc.send(signal.SIGTERM)
    assert sc.wait(20) == 0
    assert app.wait(5) == 0
    assert consul.instances(service_name) == []
