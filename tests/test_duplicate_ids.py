"""Two sidecars whose registrations would share one service ID (issue 8, defect 7).

A real agent, real sidecars, real apps on loopback aliases (127.0.0.2, 127.0.0.3: one
address per instance, the same port). A registration with our ID is replaced only when
its owner is provably gone; a live one makes the newcomer refuse to start.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

from testkit import Consul, app_command, pid_alive, spawn, wait_for
from testkit.suite import StartSidecar, base_config


def free_port_on(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (both apps bind it, each on its own address)."""
    while True:
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            for h in hosts[1:]:
                with socket.socket() as t:
                    t.bind((h, port))
            return port
        except OSError:
            continue


def config_at(consul: Consul, name: str, address: str, port: int, service_id: str | None) -> dict[str, dict[str, Any]]:
    cfg = base_config(consul, name, port, service={"address": address})
    if service_id is None:
        del cfg["service"]["id"]
    else:
        cfg["service"]["id"] = service_id
    return cfg


def passing(consul: Consul, name: str) -> dict[str, str]:
    """ID -> address of every instance whose checks all pass."""
    return {
        e["Service"]["ID"]: e["Service"]["Address"]
        for e in consul.instances(name)
        if all(c["Status"] == "passing" for c in e["Checks"])
    }


def test_default_ids_differ_per_address(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """1. Two sidecars on one host, same name and port, addresses 127.0.0.2 and 127.0.0.3, default IDs.
    2. Expected: two instances with two IDs, each naming its address; nothing replaced.
    3. SIGTERM to the first: only its own entry goes; the second stays registered and passing."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    first = start_sidecar(config_at(consul, service_name, "127.0.0.2", port, None), app_command(port, "127.0.0.2"))
    first.wait_event("sidecar.consul.registered")
    second = start_sidecar(config_at(consul, service_name, "127.0.0.3", port, None), app_command(port, "127.0.0.3"))
    second.wait_event("sidecar.consul.registered")
    ids = wait_for(
        lambda: (lambda p: p if len(p) == 2 else None)(passing(consul, service_name)), 10, 0.1, "two passing instances"
    )
    assert sorted(ids.values()) == ["127.0.0.2", "127.0.0.3"], ids
    assert all(ids[i] in i for i in ids), ids  # the ID names the address: readable, and unique per address
    assert second.event("sidecar.consul.stale_registration_replaced") is None
    first.send(signal.SIGTERM)
    assert first.wait(30) == 0
    assert [a for a in passing(consul, service_name).values()] == ["127.0.0.3"]
    second.send(signal.SIGTERM)
    assert second.wait(30) == 0
    assert consul.instances(service_name) == []


def test_same_id_other_address_live_instance_refused(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. A sidecar registers service.id X for 127.0.0.2 and stays up (its check passing).
    2. A second sidecar with the same X but address 127.0.0.3 starts.
    Expected: the second exits 78 with one error naming both addresses, its app stopped, nothing of it
    registered; the first's entry is untouched and its drain still works."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    sid = f"{service_name}-shared"
    first = start_sidecar(config_at(consul, service_name, "127.0.0.2", port, sid), app_command(port, "127.0.0.2"))
    first.wait_event("sidecar.consul.registered")
    wait_for(lambda: passing(consul, service_name) == {sid: "127.0.0.2"}, 10, 0.1, "the first instance passing")
    second = start_sidecar(config_at(consul, service_name, "127.0.0.3", port, sid), app_command(port, "127.0.0.3"))
    second_app = second.app_pid()
    assert second.wait(30) == 78
    [err] = [e for e in second.events() if e.get("level") == "error"]
    assert "127.0.0.2" in err["error"] and "127.0.0.3" in err["error"] and "service.id" in err["error"], err
    assert "Traceback" not in second.output()
    assert not pid_alive(second_app)
    assert second.event("sidecar.consul.stale_registration_replaced") is None
    assert passing(consul, service_name) == {sid: "127.0.0.2"}
    assert consul.get(f"/v1/agent/service/{sid}")["Address"] == "127.0.0.2"
    first.send(signal.SIGTERM)
    assert first.wait(30) == 0
    assert first.event("sidecar.consul.deregistered") is not None
    assert consul.instances(service_name) == []


def test_same_id_same_address_live_sidecar_refused(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """Alongside mode: one app, two sidecars with the same configuration (same ID, address and port).
    Expected: the second sees that a live sidecar holds the ID, exits 78 naming the address, and does
    not touch the first's registration; the first then drains normally."""
    port = free_port_on("127.0.0.1")
    spawn(app_command(port), tmp_path / "app.log")
    cfg = base_config(consul, service_name, port)
    first = start_sidecar(cfg)
    first.wait_event("sidecar.consul.registered")
    index_before = consul.get(f"/v1/agent/service/{service_name}-1")["ContentHash"]
    second = start_sidecar(cfg)
    assert second.wait(30) == 78
    [err] = [e for e in second.events() if e.get("level") == "error"]
    assert "live consul-sidecar" in err["error"] and f"127.0.0.1:{port}" in err["error"], err
    assert second.event("sidecar.consul.stale_registration_replaced") is None
    assert first.proc.poll() is None
    assert consul.get(f"/v1/agent/service/{service_name}-1")["ContentHash"] == index_before
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    first.send(signal.SIGTERM)
    assert first.wait(30) == 0
    assert consul.instances(service_name) == []


def test_same_id_other_address_dead_owner_replaced(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. A sidecar for 127.0.0.2 is SIGKILLed (its app dies with it); its entry stays and its check
       goes critical.
    2. A sidecar with the same ID for 127.0.0.3 starts. Expected: the dead entry is replaced (its owner
       is provably gone), one instance at 127.0.0.3, passing."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    sid = f"{service_name}-moved"
    first = start_sidecar(config_at(consul, service_name, "127.0.0.2", port, sid), app_command(port, "127.0.0.2"))
    first.wait_event("sidecar.consul.registered")
    app1 = first.app_pid()
    first.send(signal.SIGKILL)
    first.wait(5)
    wait_for(lambda: not pid_alive(app1), 3, what="the first app to die with its sidecar")
    wait_for(
        lambda: (
            [c["Status"] for e in consul.instances(service_name) for c in e["Checks"] if c["ServiceID"] == sid]
            == ["critical"]
        ),
        15,
        0.1,
        "the dead instance's check to go critical",
    )
    second = start_sidecar(config_at(consul, service_name, "127.0.0.3", port, sid), app_command(port, "127.0.0.3"))
    second.wait_event("sidecar.consul.registered")
    replaced = second.event("sidecar.consul.stale_registration_replaced")
    assert (
        replaced is not None and replaced["reason"] == "its check is critical" and "127.0.0.2" in replaced["previous"]
    )
    assert passing(consul, service_name) == {sid: "127.0.0.3"}
    second.send(signal.SIGTERM)
    assert second.wait(30) == 0
