"""Wrapper mode against a real Consul agent, a real app process and real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from examples.rollout.fleet import CatalogWatcher
from sidecar.registry.registration import OWNER_META_KEY
from testkit import Consul, app_command, free_port, http_get, pid_alive, read_signal_log, wait_for
from testkit.suite import RegisteredSidecar, StartSidecar, base_config


def test_registers_with_tags_meta_and_passing_at_once(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """1. The app is healthy; the sidecar registers it.
    2. The catalog shows the instance with its tags, meta, address and port,
       and its HTTP check is already passing although the check interval (30s)
       has not elapsed once: the sidecar registered it passing.
    """
    sc, port = registered_sidecar(
        service={"tags": ["v1", "blue"], "meta": {"version": "1.2.3"}}, check={"interval": "30s"}
    )
    [entry] = consul.instances(service_name)
    svc = entry["Service"]
    assert (svc["ID"], svc["Address"], svc["Port"]) == (f"{service_name}-1", "127.0.0.1", port)
    assert svc["Tags"] == ["v1", "blue"] and svc["Meta"] == {
        "version": "1.2.3",
        OWNER_META_KEY: svc["Meta"][OWNER_META_KEY],  # the sidecar's mark: its PID and a random token
    }
    assert re.fullmatch(rf"{sc.proc.pid}-[0-9a-f]{{16}}", svc["Meta"][OWNER_META_KEY]), svc["Meta"]
    check = next(c for c in entry["Checks"] if c["ServiceID"] == svc["ID"])
    assert check["Status"] == "passing"
    assert check["Type"] == "http"
    passing = consul.get(f"/v1/health/service/{service_name}?passing=1")
    assert [e["Service"]["ID"] for e in passing] == [svc["ID"]]
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGQUIT], ids=["sigterm", "sigquit"])
def test_drain_order_deregister_then_delay_then_signal(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path, stop: signal.Signals
) -> None:
    """1. A registered instance receives SIGTERM (or SIGQUIT: a Ctrl-\\, an image's STOPSIGNAL) at its sidecar.
    2. A watcher on /v1/health/service/<name> records when the instance disappears;
       the app records when its SIGTERM arrives (both on the system-wide monotonic clock).
    3. Expected: the instance is gone before the app's signal, and the signal comes
       no earlier than propagation_delay (1.5 s) after that. Signalling first, or
       not waiting, turns this red; so does SIGQUIT's default action (the sidecar dumps core at once,
       the instance left registered).
    """
    siglog = tmp_path / "signals.log"
    sc, _ = registered_sidecar("--signal-log", str(siglog), shutdown={"propagation_delay": "1.5s"})
    watcher = CatalogWatcher(consul, service_name)
    watcher.start()
    wait_for(
        lambda: watcher.changes and watcher.changes[-1][1] == [f"{service_name}-1"], 5, what="watcher sees the instance"
    )
    sent = time.monotonic()
    sc.send(stop)
    assert sc.wait() == 0
    watcher.stop.set()
    gone = watcher.first_time(lambda ids: not ids)
    assert gone is not None, watcher.changes
    [(name, signalled)] = read_signal_log(siglog)
    assert name == "SIGTERM"
    assert sent < gone < signalled, (sent, gone, signalled)
    assert signalled - gone >= 1.5 - 0.05, f"app signalled {signalled - gone:.3f}s after deregistration"
    assert signalled - gone < 1.5 + 3.0  # generous bound: the delay is not wildly overshot


def test_inflight_request_completes(consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str) -> None:
    """1. A 2-second request is in flight when the sidecar gets SIGTERM.
    2. Expected: it completes with 200 (the app drains after its signal), and the sidecar exits 0.
    """
    sc, port = registered_sidecar(shutdown={"propagation_delay": "0.5s"})
    result: dict[str, Any] = {}

    def slow() -> None:
        result["answer"] = http_get(f"http://127.0.0.1:{port}/slow?seconds=2", timeout=10)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    sc.send(signal.SIGTERM)
    t.join(15)
    assert result["answer"][0] == 200
    assert sc.wait() == 0
    stopped = sc.event("sidecar.app.stopped")
    assert stopped is not None and stopped["exit_status"] == 0


@pytest.mark.parametrize(
    ("app_args", "shutdown", "expected"),
    [
        ([], {}, 0),
        (["--exit-code", "3"], {}, 3),
        ([], {"app_signal": "SIGQUIT"}, 128 + signal.SIGQUIT),  # the app does not catch SIGQUIT: it dies of it
        (["--ignore-sigterm"], {"app_timeout": "1s"}, 128 + signal.SIGKILL),
    ],
    ids=["clean-0", "status-3", "killed-by-SIGQUIT", "hung-SIGKILL"],
)
def test_exit_status_passes_through(
    consul: Consul,
    registered_sidecar: RegisteredSidecar,
    service_name: str,
    app_args: list[str],
    shutdown: dict[str, str],
    expected: int,
) -> None:
    """SIGTERM to the sidecar; the sidecar exits with the app's status (128 + N when signal N ended it)."""
    sc, _ = registered_sidecar(*app_args, shutdown={"propagation_delay": "0s", **shutdown})
    sc.send(signal.SIGTERM)
    assert sc.wait() == expected
    if expected == 128 + signal.SIGKILL:
        killed = sc.event("sidecar.app.killed")
        assert killed is not None and killed["level"] == "error"


def test_app_crash_deregisters_within_a_second(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """1. The app exits on its own with status 3 about 2 s after start.
    2. Expected: the instance leaves the catalog within 1 s of the app's exit and
       the sidecar exits 3.
    """
    sc, _ = registered_sidecar("--crash-after", "2", "--crash-code", "3")
    watcher = CatalogWatcher(consul, service_name)
    watcher.start()
    app_pid = sc.app_pid()
    wait_for(lambda: not pid_alive(app_pid), 10, 0.005, "the app to crash")
    died = time.monotonic()
    assert sc.wait() == 3
    wait_for(lambda: watcher.changes and watcher.changes[-1][1] == [], 5, what="watcher sees the instance gone")
    watcher.stop.set()
    gone = watcher.first_time(lambda ids: not ids)
    assert gone is not None and gone - died < 1.0, (died, watcher.changes)


def test_app_never_healthy_registers_nothing(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """1. The app never answers 2xx on its health URL; startup.timeout is 2 s.
    2. Expected: nothing is ever registered, the app is stopped, the sidecar exits 69.
    """
    port = free_port()
    cfg = base_config(consul, service_name, port, startup={"timeout": "2s"})
    sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--unhealthy"))
    app_pid = sc.app_pid()
    assert sc.wait(20) == 69
    assert consul.get(f"/v1/agent/service/{service_name}-1") is None
    assert consul.instances(service_name) == []
    assert sc.event("sidecar.consul.registered") is None
    assert sc.event("sidecar.startup.unhealthy") is not None
    assert not pid_alive(app_pid)


def test_waits_for_health_before_registering(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """1. The app answers 503 for its first 1.5 s.
    2. Expected: no registration exists while it is unhealthy; it appears (passing) once healthy.
    """
    port = free_port()
    cfg = base_config(consul, service_name, port)
    sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--healthy-after", "1.5"))
    sc.app_pid()
    wait_for(
        lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 503 if answers(port) else False,
        10,
        what="app answering 503",
    )
    assert consul.instances(service_name) == []
    sc.wait_event("sidecar.consul.registered")
    healthy = sc.event("sidecar.startup.healthy")
    assert healthy is not None and healthy["elapsed_ms"] >= 1000
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def answers(port: int) -> bool:
    try:
        http_get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
        return True
    except OSError:
        return False


def test_forwards_signals_to_the_app(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH sent to the sidecar reach the app; the sidecar keeps running.
    Each leaves one `sidecar.signal.forwarded` line at info, the default level (a reload the app did
    not do must be traceable to whether the sidecar passed the signal on)."""
    siglog = tmp_path / "signals.log"
    sc, _ = registered_sidecar("--signal-log", str(siglog))
    sent = [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH]
    for sig in sent:
        sc.send(sig)
        time.sleep(0.1)
    wait_for(lambda: len(read_signal_log(siglog)) == 4, 5, what="four forwarded signals")
    assert [n for n, _ in read_signal_log(siglog)] == [s.name for s in sent]

    def forwarded() -> list[tuple[str, str]]:
        return [(e["signal"], e["level"]) for e in sc.events() if e.get("event") == "sidecar.signal.forwarded"]

    wait_for(lambda: len(forwarded()) >= 4, 5, what="four sidecar.signal.forwarded lines")
    assert forwarded() == [(s.name, "info") for s in sent]
    assert sc.proc.poll() is None
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def test_double_ctrl_c_ends_the_delay_third_kills(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. propagation_delay is 60 s. SIGINT starts the drain; the instance is deregistered.
    2. A second SIGINT ends the delay: the app gets SIGTERM within a second or two, not a minute.
    3. The app ignores SIGTERM (app_timeout 60 s); a third SIGINT SIGKILLs it: exit 137.
    4. Further SIGTERMs during the drain change nothing (no second deregistration).
    """
    siglog = tmp_path / "signals.log"
    shutdown = {"propagation_delay": "60s", "app_timeout": "60s"}
    sc, _ = registered_sidecar("--ignore-sigterm", "--signal-log", str(siglog), shutdown=shutdown)
    sc.send(signal.SIGINT)
    sc.wait_event("sidecar.consul.deregistered")
    assert consul.instances(service_name) == []
    sc.send(signal.SIGTERM)
    time.sleep(0.3)
    assert read_signal_log(siglog) == [], "the app was signalled before the delay ended"
    second = time.monotonic()
    sc.send(signal.SIGINT)
    wait_for(lambda: read_signal_log(siglog), 5, what="the app's SIGTERM after the second SIGINT")
    assert read_signal_log(siglog)[0][0] == "SIGTERM"
    assert read_signal_log(siglog)[0][1] - second < 3
    assert sc.proc.poll() is None  # still waiting for the app, which ignores SIGTERM
    sc.send(signal.SIGINT)
    assert sc.wait(10) == 128 + signal.SIGKILL
    assert len([e for e in sc.events() if e["event"] == "sidecar.consul.deregistered"]) == 1


def test_app_does_not_outlive_a_killed_sidecar(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """SIGKILL to the sidecar (no chance to clean up): the kernel ends the app too."""
    sc, _ = registered_sidecar()
    app_pid = sc.app_pid()
    assert pid_alive(app_pid)
    sc.send(signal.SIGKILL)
    sc.wait(5)
    wait_for(lambda: not pid_alive(app_pid), 3, what="the app to die with its sidecar")


def test_status_endpoint_reports_the_state(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """/healthz answers 200; /status shows registered, then draining during the delay."""
    sc, _ = registered_sidecar(shutdown={"propagation_delay": "3s"})
    url = sc.status_url()
    assert http_get(url + "/healthz")[0] == 200
    st = json.loads(http_get(url + "/status")[1])
    assert st["state"] == "registered" and st["service_id"] == f"{service_name}-1" and st["consul_reachable"] is True
    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.consul.deregistered")
    st = json.loads(http_get(url + "/status")[1])
    assert st["state"] == "draining"
    assert sc.wait() == 0


def test_command_not_found(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """A command that does not exist: exit 127, one error event, nothing registered."""
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port), ["/nonexistent/app-binary"])
    assert sc.wait(10) == 127
    ev = sc.event("sidecar.app.start_failed")
    assert ev is not None and "/nonexistent/app-binary" in ev["error"]
    assert "Traceback" not in sc.output()
    assert consul.instances(service_name) == []


def test_command_not_executable(consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path) -> None:
    """A command that exists but may not be executed (no x bit): exit 126, as a shell would, one
    error event naming it, no traceback, nothing registered."""
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port), [str(script)])
    assert sc.wait(10) == 126
    ev = sc.event("sidecar.app.start_failed")
    assert ev is not None and "PermissionError" in ev["error"] and str(script) in ev["error"], ev
    assert "Traceback" not in sc.output()
    assert consul.instances(service_name) == []


def _caught(pid: int) -> int:
    """The signals ``pid`` catches (``SigCgt`` in /proc/PID/status), as a bit mask."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))


def test_a_reload_signal_during_start_up_does_not_end_the_sidecar(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH whose default action ends a process, sent while the
    sidecar is still importing (before its event loop's handlers exist): a reload right after a start.
    1. Start the sidecar in wrapper mode; the moment its process has loaded aiohttp (seen in
       /proc/PID/maps, well before its own handlers are installed), send SIGUSR2 and SIGHUP.
    Expected: by then the four signals are already caught (SigCgt); the sidecar lives on, logs
    each as ignored (there was no app to pass it to yet: it is not replayed to the app starting),
    starts the app, registers, and drains on SIGTERM with exit 0."""
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port), app_command(port))
    deadline = time.monotonic() + 30
    loaded = False
    while not loaded and time.monotonic() < deadline and sc.proc.poll() is None:
        try:
            with open(f"/proc/{sc.pid}/maps") as f:
                loaded = "/aiohttp/" in f.read()
            caught = _caught(sc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        if not loaded:
            time.sleep(0.001)
    assert loaded, f"the sidecar never loaded aiohttp (exit {sc.proc.poll()}):\n{sc.output()[-2000:]}"
    held = [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH]
    missing = [s.name for s in held if not caught & (1 << (s - 1))]
    sc.send(signal.SIGUSR2)
    sc.send(signal.SIGHUP)
    assert not missing, f"not caught yet once aiohttp was loaded: {missing}"
    sc.wait_event("sidecar.consul.registered", timeout=30)
    assert sc.proc.poll() is None
    ignored = sorted(e["signal"] for e in sc.events() if e.get("event") == "sidecar.signal.ignored")
    assert ignored == ["SIGHUP", "SIGUSR2"], ignored
    assert sc.event("sidecar.signal.forwarded") is None
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0, sc.output()[-2000:]


def test_hint_names_where_the_app_listens(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """Tried as a new user would: the app listens on another port than service.port. Instead of 'cannot connect'
    alone, the sidecar's unhealthy error (exit 69) says where the app listens."""
    port, other_port = free_port(), free_port()
    cfg = base_config(consul, service_name, port, startup={"timeout": "15s"})
    sc = start_sidecar(cfg, app_command(other_port, "127.0.0.1"))
    assert sc.wait(60) == 69
    unhealthy = sc.event("sidecar.startup.unhealthy")
    assert unhealthy is not None, sc.output()[-3000:]
    hint = str(unhealthy.get("hint"))
    assert f"listens on 127.0.0.1:{other_port}, not service.address:port 127.0.0.1:{port}" in hint, unhealthy


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat: the kernel may lack .../children)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def _loaded(pid: int, what: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return what in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("moment", ["aiohttp-loaded", "app-spawned", "0s", "0.05s", "0.1s", "0.2s", "0.3s", "0.45s"])
def test_ctrl_c_during_start_up(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, moment: str
) -> None:
    """Ctrl-C at one moment of the sidecar's first second in wrapper mode: while it imports aiohttp
    (asyncio.run's own SIGINT handler would cancel the start-up while the app is spawned anyway), the
    moment its app's process appears, or at an offset from the moment the sidecar's own code runs.
    Expected: whenever the app was spawned, it is stopped with app_signal (SIGTERM), never SIGKILLed,
    and the sidecar logs why it exits (sidecar.signal.received); an app not spawned yet is never
    spawned; no traceback; nothing registered."""
    port = free_port()
    siglog = tmp_path / "signals.log"
    sc = start_sidecar(
        base_config(consul, service_name, port), app_command(port, "127.0.0.1", "--signal-log", str(siglog))
    )
    t0 = time.monotonic()
    deadline = t0 + 30
    if moment == "aiohttp-loaded":
        while sc.proc.poll() is None and time.monotonic() < deadline and not _loaded(sc.pid, "/aiohttp/"):
            time.sleep(0.001)
    elif moment == "app-spawned":
        while sc.proc.poll() is None and time.monotonic() < deadline and not _children(sc.pid):
            time.sleep(0.001)
    else:  # an offset from the moment the sidecar's own code runs (its entry holds SIGHUP; before that,
        # a Ctrl-C meets the interpreter's start-up, which the sidecar cannot speak for)
        while (
            sc.proc.poll() is None and time.monotonic() < deadline and not _caught(sc.pid) & (1 << (signal.SIGHUP - 1))
        ):
            time.sleep(0.001)
        time.sleep(float(moment.rstrip("s")))
    assert sc.proc.poll() is None, sc.output()[-2000:]
    sc.send(signal.SIGINT)
    status = sc.wait(30)
    out = sc.output()
    assert "Traceback" not in out, out[-3000:]
    events = sc.events()
    names = [e.get("event") for e in events]
    if "sidecar.app.started" in names:
        got = sc.event("sidecar.signal.received")
        assert got is not None and got["signal"] == "SIGINT", f"exit {status}, no reason logged:\n{out[-3000:]}"
        stopped = sc.event("sidecar.app.stopped")
        assert stopped is not None and "SIGKILL" not in stopped["how"], f"exit {status}:\n{out[-3000:]}"
        assert status != 128 + signal.SIGKILL, out[-3000:]
    else:
        # 130, or killed by SIGINT (what a shell also reports as 130): Python ends itself so when a
        # Ctrl-C meets its own import machinery, before the sidecar's log exists
        assert status in (130, -signal.SIGINT), out[-3000:]
        assert read_signal_log(siglog) == []
        if names:  # the log was set up: it says why the sidecar ends
            got = sc.event("sidecar.signal.received")
            assert got is not None and got["signal"] == "SIGINT", f"exit {status}, no reason logged:\n{out[-3000:]}"
    if moment == "app-spawned":
        assert "sidecar.app.started" in names, out[-3000:]
    assert consul.instances(service_name) == []
