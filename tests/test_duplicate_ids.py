"""Two sidecars whose registrations would share one service ID (issue 8, defect 7).

A real agent, real sidecars, real apps on loopback aliases (127.0.0.2, 127.0.0.3: one
address per instance, the same port). A registration with our ID is replaced only when
its owner is provably gone; a live one makes the newcomer refuse to start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import testkit
from sidecar.registry import claim as instance_claim
from testkit import Consul, app_command, pid_alive, spawn, wait_for
from testkit.faultproxy import FaultProxy
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
    wait_for(lambda: list(passing(consul, service_name).values()) == ["127.0.0.3"], 10, 0.1, "the second passing")
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
    wait_for(lambda: passing(consul, service_name) == {sid: "127.0.0.2"}, 10, 0.1, "the first instance passing")
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


# --- issue "The promise, round three", defects 1 and 2 ------------------------------------------------


def agent_put(consul: Consul, path: str, body: dict[str, Any] | None = None) -> None:
    req = urllib.request.Request(
        consul.address + path, data=json.dumps(body).encode() if body is not None else b"", method="PUT"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200, r.status


def test_claim_held_before_the_agent_has_an_entry_refuses_the_second(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """Both start at once with one explicit ID (made deterministic): the first holds the claim and its
    registration is on its way (held 8 s by a proxy), so the agent has no entry yet. Expected: the second
    exits 78 naming both addresses, registers nothing; then the first registers, the one instance."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    sid = f"{service_name}-both"
    with FaultProxy(consul.http_port) as proxy:
        proxy.add("PUT", "/v1/agent/service/register", "hold_request", seconds=8, uses=1)  # the first's
        cfg = testkit.merge(
            config_at(consul, service_name, "127.0.0.2", port, sid),
            {"consul": {"address": proxy.address, "timeout": "10s"}},
        )
        first = start_sidecar(cfg, app_command(port, "127.0.0.2"))
        wait_for(
            lambda: proxy.seen("PUT", "/v1/agent/service/register"), 30, 0.05, "the first's registration in flight"
        )
        assert consul.get(f"/v1/agent/service/{sid}") is None
        cfg2 = testkit.merge(
            config_at(consul, service_name, "127.0.0.3", port, sid), {"consul": {"address": proxy.address}}
        )
        second = start_sidecar(cfg2, app_command(port, "127.0.0.3"))  # the same agent, at once
        assert second.wait(30) == 78
        [err] = [e for e in second.events() if e.get("level") == "error"]
        assert "127.0.0.2" in err["error"] and "127.0.0.3" in err["error"] and "service.id" in err["error"], err
        assert second.event("sidecar.consul.registered") is None
        first.wait_event("sidecar.consul.registered", 30)
        wait_for(lambda: passing(consul, service_name) == {sid: "127.0.0.2"}, 10, 0.1, "the first instance passing")
        first.send(signal.SIGTERM)  # through the proxy still
        assert first.wait(30) == 0
    assert consul.instances(service_name) == []


def test_agent_spelled_localhost_is_the_same_claim(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """Alongside mode, one app, two sidecars with one ID, address and port; the second spells the agent
    `localhost` instead of `127.0.0.1`. Expected: the second exits 78 (the claim is the ID's, however the
    agent is spelled), the first's entry untouched."""
    port = free_port_on("127.0.0.1")
    app = spawn(app_command(port), tmp_path / "app.log")
    cfg = base_config(consul, service_name, port, app={"pid": app.pid})
    first = start_sidecar(cfg)
    first.wait_event("sidecar.consul.registered")
    before = consul.get(f"/v1/agent/service/{service_name}-1")["ContentHash"]
    other = testkit.merge(cfg, {"consul": {"address": consul.address.replace("127.0.0.1", "localhost")}})
    second = start_sidecar(other)
    assert second.wait(30) == 78
    assert second.event("sidecar.consul.stale_registration_replaced") is None
    assert consul.get(f"/v1/agent/service/{service_name}-1")["ContentHash"] == before
    assert pid_alive(app.pid) and first.proc.poll() is None
    first.send(signal.SIGTERM)
    assert first.wait(30) == 0
    assert consul.instances(service_name) == []


def test_other_address_briefly_critical_but_claimed_is_not_replaced(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """The first instance (127.0.0.2) is alive but its check is critical for a moment (its app stopped with
    SIGSTOP). A second sidecar with the same ID for 127.0.0.3 starts. Expected: exit 78 (the claim is held
    by a live sidecar), the first's entry stays and passes again once its app goes on."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    sid = f"{service_name}-paused"
    first = start_sidecar(config_at(consul, service_name, "127.0.0.2", port, sid), app_command(port, "127.0.0.2"))
    first.wait_event("sidecar.consul.registered")
    app1 = first.app_pid()
    os.kill(app1, signal.SIGSTOP)
    try:
        wait_for(
            lambda: (
                [c["Status"] for e in consul.instances(service_name) for c in e["Checks"] if c["ServiceID"] == sid]
                == ["critical"]
            ),
            15,
            0.1,
            "the paused instance's check to go critical",
        )
        second = start_sidecar(config_at(consul, service_name, "127.0.0.3", port, sid), app_command(port, "127.0.0.3"))
        assert second.wait(30) == 78
    finally:
        os.kill(app1, signal.SIGCONT)
    assert second.event("sidecar.consul.stale_registration_replaced") is None
    assert consul.get(f"/v1/agent/service/{sid}")["Address"] == "127.0.0.2"
    wait_for(lambda: passing(consul, service_name) == {sid: "127.0.0.2"}, 15, 0.1, "the first instance passing again")
    first.send(signal.SIGTERM)
    assert first.wait(30) == 0
    assert first.event("sidecar.consul.deregistered") is not None
    assert consul.instances(service_name) == []


def test_keeper_never_keeps_or_removes_an_entry_not_its_own(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """A sidecar is registered for 127.0.0.2; then another owner (a registration by hand, a sidecar of
    another host) registers the same ID for 127.0.0.3. Expected: an error event; when that owner
    deregisters, the keeper does not put the ID back (3 check intervals); when it registers again and our
    sidecar drains, the other's entry is not removed and no deregistration is claimed."""
    port = free_port_on("127.0.0.2", "127.0.0.3")
    sid = f"{service_name}-taken"
    first = start_sidecar(config_at(consul, service_name, "127.0.0.2", port, sid), app_command(port, "127.0.0.2"))
    first.wait_event("sidecar.consul.registered")
    theirs = {"ID": sid, "Name": service_name, "Address": "127.0.0.3", "Port": port, "Meta": {"owner": "someone"}}
    agent_put(consul, "/v1/agent/service/register", theirs)
    taken = first.wait_event("sidecar.consul.registration_taken", 15)
    assert taken["level"] == "error" and f"127.0.0.3:{port}" in taken["registered"], taken
    agent_put(consul, f"/v1/agent/service/deregister/{sid}")
    deadline = time.monotonic() + 3.5  # three check intervals of the keeper: it must not register us again
    while time.monotonic() < deadline:
        assert consul.get(f"/v1/agent/service/{sid}") is None, "the keeper put back an ID that is not its own"
        time.sleep(0.1)
    assert first.event("sidecar.consul.reregistered") is None
    agent_put(consul, "/v1/agent/service/register", theirs)
    first.send(signal.SIGTERM)
    assert first.wait(30) == 0
    assert first.event("sidecar.consul.deregistered") is None
    assert consul.get(f"/v1/agent/service/{sid}")["Address"] == "127.0.0.3"
    agent_put(consul, f"/v1/agent/service/deregister/{sid}")


def test_alongside_refusal_does_not_signal_the_app(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """Alongside mode with `[app] pid`: a second sidecar with the first's configuration refuses to start.
    Expected: exit 78, and the app (the live instance's) is never signalled: it keeps running, registered."""
    port = free_port_on("127.0.0.1")
    app = spawn(app_command(port), tmp_path / "app.log")
    cfg = base_config(consul, service_name, port, app={"pid": app.pid})
    first = start_sidecar(cfg)
    first.wait_event("sidecar.consul.registered")
    second = start_sidecar(cfg)
    assert second.wait(30) == 78
    assert app.poll() is None, f"the live instance's app was stopped by the refused sidecar: {app.returncode}"
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    first.send(signal.SIGTERM)
    assert first.wait(30) == 0
    assert app.wait(10) is not None


SQUATTER = r"""
import fcntl, json, os, signal, socket, sys
names, lock = json.loads(sys.argv[1]), sys.argv[2]
took, kept = [], []
for n in names:  # the claim's old form: an abstract socket name, which has no permissions
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind("\0" + n)
        took.append(n); kept.append(s)
    except OSError as e:
        s.close()
try:  # the claim's lock file
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    took.append(lock)
except OSError as e:
    pass
print(json.dumps({"uid": os.getuid(), "tried": names + [lock], "took": took}), flush=True)
signal.pause()
"""


def fds_of(pid: int) -> list[str]:
    """What the descriptors of process ``pid`` point at."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def test_claim_directory_trusted_only_if_no_one_else_can_write_it(tmp_path: Path) -> None:
    """Pure logic: a directory is trusted for the claims of uid U only if it is a real directory owned by
    root or U that no one else may write."""
    good = tmp_path / "good"
    good.mkdir(0o755)
    assert instance_claim.dir_problem(good, os.geteuid()) is None
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by others" in (instance_claim.dir_problem(shared, os.geteuid()) or "")
    theirs = tmp_path / "theirs"
    theirs.mkdir(0o700)
    os.chown(theirs, 65534, 65534)
    assert "owned by uid 65534" in (instance_claim.dir_problem(theirs, 4242) or "")
    link = tmp_path / "link"
    link.symlink_to(good)
    assert "not a directory" in (instance_claim.dir_problem(link, os.geteuid()) or "")


def test_agent_key_is_one_spelling_per_agent() -> None:
    """Pure logic: the claim's key names the agent, not how its address is written."""
    key = instance_claim.agent_key
    assert key("http://127.0.0.1:8500") == key("localhost:8500") == key("http://[::1]:8500") == "local:8500"
    assert key("https://LOCALHOST:8501") == key("127.0.0.2:8501") == "local:8501"
    assert key("http://127.0.0.1:8500") != key("http://127.0.0.1:8600")
    assert key("http://192.0.2.7:8500") == "192.0.2.7:8500"  # TEST-NET-1: never an address of this host
    assert key("unix:///run/consul/../consul/http.sock") == "unix:/run/consul/http.sock"


def abstract_names_of(pid: int) -> list[str]:
    """The abstract unix socket names a process holds (from /proc/net/unix, by its sockets' inodes)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    names = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith("@consul-sidecar/"):
            names.append(parts[7][1:])
    return names


def test_another_user_cannot_squat_the_claim(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """A sidecar is SIGKILLed (its entry stays). A process of another user (nobody) then tries to take
    the claim on its ID (the abstract name the sidecar held, and the lock file). Expected: it cannot, and the
    restarted sidecar starts, replacing the dead entry."""
    if os.geteuid() != 0:
        raise AssertionError("this test needs root (to run a process as another user)")
    port = free_port_on("127.0.0.1")
    cfg = base_config(consul, service_name, port)
    # The lock file the claim on this ID uses (under /run/consul-sidecar, as root).
    lock = str(instance_claim.lock_path(instance_claim.SYSTEM_DIR, consul.address, f"{service_name}-1"))
    first = start_sidecar(cfg, app_command(port))
    first.wait_event("sidecar.consul.registered")
    app1 = first.app_pid()
    names = abstract_names_of(first.proc.pid)
    # The claim is the lock file, held by the sidecar alone: the app never inherits it (close-on-exec).
    assert lock in fds_of(first.proc.pid) and lock not in fds_of(app1), (fds_of(first.proc.pid), fds_of(app1))
    first.send(signal.SIGKILL)
    first.wait(5)
    wait_for(lambda: not pid_alive(app1), 5, what="the first app to die with its sidecar")
    out = tmp_path / "squatter.log"
    spawn(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            SQUATTER,
            json.dumps(names),
            lock,
        ],
        out,
    )
    report = wait_for(lambda: out.exists() and out.read_text().strip(), 15, 0.05, "the squatter's report")
    got = json.loads(report.splitlines()[-1])
    assert got["uid"] == 65534 and lock in got["tried"], got
    second = start_sidecar(cfg, app_command(port))
    second.wait_event("sidecar.consul.registered", 30)
    assert got["took"] == [], got
    assert second.event("sidecar.consul.stale_registration_replaced") is not None
    second.send(signal.SIGTERM)
    assert second.wait(30) == 0
    assert consul.instances(service_name) == []
