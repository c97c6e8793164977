"""Alongside mode: the app runs as another process; the sidecar stops it by PID, PID file or URL."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from testkit import Consul, app_command, free_port, pid_alive, read_signal_log, spawn, wait_for

from .conftest import StartSidecar, base_config


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
