"""A bad day: the agent restarts, freezes or dies, the health check fails, the sidecar is killed,
signals arrive in a storm, the wall clock jumps. Real agent, real processes, real signals."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from sidecar.registry.registration import OWNER_META_KEY
from testkit import Consul, app_command, free_port, pid_alive, read_signal_log, wait_for
from testkit.suite import RegisteredSidecar, StartSidecar, base_config


def test_agent_restart_with_data_dir_no_duplicate_no_flapping(
    tmp_path: Path, start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. The agent keeps its state in a data dir; it restarts while the sidecar runs.
    2. Expected: the agent restores the registration itself, so the sidecar does not re-register;
       exactly one instance with that ID; once its check has run after the restart it is passing
       and stays passing (no flapping). Consul itself restores an HTTP check as critical until its
       first run (within one interval): that window is Consul's and is bounded here too.
    """
    agent = Consul(tmp_path, data_dir=tmp_path / "data")
    try:
        agent.start()
        port = free_port()
        sc = start_sidecar(base_config(agent, service_name, port), app_command(port))
        sc.wait_event("sidecar.consul.registered")
        agent.restart()
        back = time.monotonic()
        seen: list[tuple[float, list[str], list[str]]] = []
        while time.monotonic() < back + 7:
            entries = agent.instances(service_name)
            seen.append(
                (
                    time.monotonic() - back,
                    [e["Service"]["ID"] for e in entries],
                    [c["Status"] for e in entries for c in e["Checks"] if c["ServiceID"]],
                )
            )
            time.sleep(0.05)
        assert all(len(ids) <= 1 for _, ids, _ in seen), seen
        first_passing = next((t for t, _, st in seen if st == ["passing"]), None)
        assert first_passing is not None and first_passing <= 5.0, seen  # Consul's first check run: a generous bound
        assert all(st == ["passing"] for t, _, st in seen if t >= first_passing), seen
        assert agent.service_ids(service_name) == [f"{service_name}-1"]
        assert sc.event("sidecar.consul.reregistered") is None
        sc.send(signal.SIGTERM)
        assert sc.wait() == 0
    finally:
        agent.stop()


def test_agent_frozen_during_drain(
    fresh_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. SIGSTOP the agent, then SIGTERM the sidecar.
    2. Expected: the drain still ends within its budget, the app is signalled and stops, an error
       event says the deregistration is unconfirmed.
    3. SIGCONT the agent while the drain still runs: the background retry confirms it, and the
       catalog does not keep the instance.
    """
    fresh_consul.start()
    siglog = tmp_path / "signals.log"
    shutdown = {"deregister_timeout": "1s", "propagation_delay": "3s", "app_timeout": "5s"}
    sc, _ = registered_sidecar("--signal-log", str(siglog), agent=fresh_consul, shutdown=shutdown)
    assert fresh_consul.proc is not None
    fresh_consul.proc.send_signal(signal.SIGSTOP)
    try:
        sent = time.monotonic()
        sc.send(signal.SIGTERM)
        sc.wait_event("sidecar.consul.deregister_unconfirmed", timeout=10)
    finally:
        fresh_consul.proc.send_signal(signal.SIGCONT)
    assert sc.wait(30) == 0
    took = time.monotonic() - sent
    assert took < 1 + 3 + 5 + 1 + 3, took  # worst case, plus process slack
    [(name, at)] = read_signal_log(siglog)
    assert name == "SIGTERM" and at - sent >= 1 + 3 - 0.1
    late = [e for e in sc.events() if e["event"] == "sidecar.consul.deregistered"]
    assert late and late[0].get("late") is True
    wait_for(lambda: fresh_consul.instances(service_name) == [], 5, what="the catalog to drop the instance")
    assert fresh_consul.get(f"/v1/agent/service/{service_name}-1") is None


@pytest.mark.parametrize("fault", ["status=500", "status=200&delay=3"], ids=["http-500", "slow"])
def test_failing_health_check_leaves_routing_to_consul(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, fault: str
) -> None:
    """1. The app starts answering its health check with 500 (or too slowly for the 1 s check timeout).
    2. Expected: Consul marks the check critical and stops handing out the instance; the sidecar keeps
       running and keeps the registration as it is (no re-registration, no deregistration).
    """
    sc, port = registered_sidecar()
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}/health?{fault}", method="POST"), timeout=5
    ) as r:
        assert r.status == 200

    def critical() -> bool:
        return any(
            c["Status"] == "critical" for e in consul.instances(service_name) for c in e["Checks"] if c["ServiceID"]
        )

    wait_for(critical, 10, 0.1, "Consul to mark the check critical")
    assert consul.get(f"/v1/health/service/{service_name}?passing=1") == []
    time.sleep(3)  # three keeper rounds
    assert sc.proc.poll() is None
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    names = [e["event"] for e in sc.events()]
    assert "sidecar.consul.reregistered" not in names and "sidecar.consul.deregistered" not in names
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0


def test_killed_sidecar_restarted_replaces_its_registration(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. SIGKILL the sidecar (wrapper mode): its app dies with it, the registration stays behind.
    2. A new sidecar with the same service ID starts: expected one instance, not two, and passing.
    """
    port = free_port()
    cfg = base_config(consul, service_name, port, service={"meta": {"generation": "1"}})
    first = start_sidecar(cfg, app_command(port))
    first.wait_event("sidecar.consul.registered")
    app1 = first.app_pid()
    first.send(signal.SIGKILL)
    first.wait(5)
    wait_for(lambda: not pid_alive(app1), 3, what="the first app to die with its sidecar")
    assert consul.service_ids(service_name) == [f"{service_name}-1"]  # stale, left behind
    second = start_sidecar(
        base_config(consul, service_name, port, service={"meta": {"generation": "2"}}), app_command(port)
    )
    second.wait_event("sidecar.consul.registered")
    [entry] = consul.instances(service_name)
    assert {k: v for k, v in entry["Service"]["Meta"].items() if k != OWNER_META_KEY} == {"generation": "2"}
    # Passing at once: the stale entry (whose check went critical when app 1 died) was replaced.
    assert all(c["Status"] == "passing" for c in entry["Checks"])
    assert second.event("sidecar.consul.stale_registration_replaced") is not None
    second.send(signal.SIGTERM)
    assert second.wait() == 0


def test_signal_storm(consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path) -> None:
    """1. Within 100 ms: 30 SIGTERMs, 10 SIGHUPs and one SIGINT, interleaved.
    2. Expected: one drain, one deregistration, the SIGHUPs reach the app (signals of one kind may
       coalesce, so at least one), the app ends with 0 after the full delay, no traceback.
    """
    siglog = tmp_path / "signals.log"
    sc, _ = registered_sidecar("--signal-log", str(siglog), shutdown={"propagation_delay": "1s"})
    t = time.monotonic()
    for i in range(30):
        sc.send(signal.SIGTERM)
        if i % 3 == 0:
            sc.send(signal.SIGHUP)
        if i == 15:
            sc.send(signal.SIGINT)
    assert time.monotonic() - t < 0.1
    assert sc.wait(30) == 0
    events = [e["event"] for e in sc.events()]
    assert events.count("sidecar.drain.started") == 1
    assert events.count("sidecar.consul.deregistered") == 1
    names = [n for n, _ in read_signal_log(siglog)]
    assert "SIGHUP" in names and names[-1] == "SIGTERM" and names.count("SIGTERM") == 1
    assert "Traceback" not in sc.output()


def _faketime_lib() -> str:
    for cand in (
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ):
        if Path(cand).exists():
            return cand
    found = subprocess.run(
        ["sh", "-c", "ls /usr/lib/*/faketime/libfaketime.so.1 2>/dev/null | head -n1"], capture_output=True, text=True
    ).stdout.strip()
    assert found, "libfaketime is missing: scripts/setup installs Debian's faketime package"
    return found


def test_wall_clock_jump_does_not_change_the_delay(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. The sidecar runs under libfaketime with a wall clock read from a file; the monotonic clock is real.
    2. During a 2 s propagation delay the wall clock jumps one hour forward, then a day back.
    3. Expected: the app is still signalled 2 s (not 0 s, not never) after the deregistration.
    """
    lib = _faketime_lib()
    siglog = tmp_path / "signals.log"
    stamp = tmp_path / "faketime"
    stamp.write_text("+0s\n")
    env = {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": str(stamp),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    sc, _ = registered_sidecar("--signal-log", str(siglog), env=env, shutdown={"propagation_delay": "2s"})
    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.consul.deregistered")
    gone = time.monotonic()
    stamp.write_text("+1h\n")
    time.sleep(0.7)
    stamp.write_text("-1d\n")
    assert sc.wait(20) == 0
    [(name, at)] = read_signal_log(siglog)
    assert name == "SIGTERM"
    assert 2.0 - 0.1 <= at - gone <= 2.0 + 1.5, at - gone

    # The jump was real for the sidecar: its wall-clock log timestamps went back about a day.
    def wall(name: str) -> float:
        event = sc.event(name)
        assert event is not None, name
        return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()

    assert wall("sidecar.drain.delay_done") < wall("sidecar.consul.deregistered") - 20 * 3600
