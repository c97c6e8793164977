"""Maintenance mode (issue 12): `consul-sidecar maint` against a real agent, and a running sidecar that keeps it.

Measured on Consul 1.8.7 (the agent here): re-registering a service the agent holds keeps its
`_service_maintenance:<id>` check; an agent that forgets the service (a `-dev` agent restarted, a
deregistration) forgets the maintenance check with it, so the sidecar's keeper applies it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.state import State
from testkit import PY, ROOT, Consul, Sidecar, http_get, wait_for, write_config
from testkit.acl import api, make_token, writer_rules
from testkit.fakes import FakeAgent, FakeApp, make_config, make_sidecar, until
from testkit.faultproxy import FaultProxy
from testkit.suite import RegisteredSidecar, base_config

MAINT = "_service_maintenance:"


def maint(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    full.update(env or {})
    return subprocess.run(
        [PY, "-m", "sidecar", "maint", "-c", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full,
        timeout=60,
    )


def in_maintenance(agent: Consul, service_id: str) -> str | None:
    """The maintenance check's reason as the agent holds it, or None."""
    check = (agent.get("/v1/agent/checks") or {}).get(MAINT + service_id)
    return None if check is None else str(check["Notes"])


def passing_ids(agent: Consul, name: str) -> list[str]:
    """What a consumer routing to healthy instances sees (`?passing`)."""
    return [e["Service"]["ID"] for e in agent.get(f"/v1/health/service/{name}?passing=1") or []]


def status(sc: Sidecar) -> dict[str, Any]:
    code, body = http_get(sc.status_url() + "/status")
    assert code == 200
    return dict(json.loads(body))


def test_enable_takes_the_instance_out_the_keeper_keeps_it_and_disable_restores(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """A registered instance; `maint --enable --reason` exits 0. Expected: consumers' `?passing` view
    excludes it at once while the catalog still lists it with a critical maintenance check, the
    keeper (check interval 1 s) leaves it so for several intervals and /status shows it with the
    reason; `--disable` exits 0 and the instance passes again, /status says so."""
    sc, _ = registered_sidecar()
    sid = f"{service_name}-1"
    wait_for(lambda: passing_ids(consul, service_name) == [sid], 10, what="instance passing")

    done = maint(sc.config_path, "--enable", "--reason", "disk swap, ticket 42")
    assert done.returncode == 0, done.stderr
    assert "maintenance mode on" in done.stdout and "disk swap" in done.stdout
    assert passing_ids(consul, service_name) == []
    assert consul.service_ids(service_name) == [sid]  # still in the catalog: taken out of rotation, not stopped
    assert in_maintenance(consul, sid) == "disk swap, ticket 42"

    sc.wait_event("sidecar.maintenance.enabled", timeout=10)
    time.sleep(4)  # four keeper rounds
    assert in_maintenance(consul, sid) == "disk swap, ticket 42"
    assert passing_ids(consul, service_name) == []
    st = status(sc)
    assert st["maintenance"] is True and st["maintenance_reason"] == "disk swap, ticket 42", st
    assert st["state"] == "registered"

    again = maint(sc.config_path, "--enable", "--reason", "other")
    assert again.returncode == 0 and "already in maintenance mode" in again.stdout, again
    assert "the reason stays" in again.stdout

    done = maint(sc.config_path, "--disable")
    assert done.returncode == 0, done.stderr
    assert in_maintenance(consul, sid) is None
    wait_for(lambda: passing_ids(consul, service_name) == [sid], 10, what="instance passing again")
    sc.wait_event("sidecar.maintenance.disabled", timeout=10)
    st = status(sc)
    assert st["maintenance"] is False and st["maintenance_reason"] is None, st
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def test_agent_forgetting_the_service_keeps_maintenance_on(
    fresh_consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """A `-dev` agent restarted while the instance is in maintenance forgets the service and its
    maintenance check. Expected: the keeper registers it again *in maintenance* with the same
    reason (`sidecar.consul.reregistered` with `maintenance: true`, `sidecar.maintenance.reapplied`),
    and consumers never see it passing after the restart, over several keeper rounds."""
    fresh_consul.start()
    sc, _ = registered_sidecar(agent=fresh_consul)
    sid = f"{service_name}-1"
    assert maint(sc.config_path, "--enable", "--reason", "kernel update").returncode == 0
    sc.wait_event("sidecar.maintenance.enabled", timeout=10)

    fresh_consul.restart()
    assert sid not in fresh_consul.service_ids(service_name) or in_maintenance(fresh_consul, sid)
    seen_passing: list[float] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        if sid in passing_ids(fresh_consul, service_name):
            seen_passing.append(time.monotonic())
        time.sleep(0.05)
    assert fresh_consul.service_ids(service_name) == [sid]  # registered again
    assert seen_passing == [], f"consumers saw the instance passing {len(seen_passing)} times after the restart"
    assert in_maintenance(fresh_consul, sid) == "kernel update"
    assert sc.event("sidecar.maintenance.reapplied") is not None, sc.output()[-3000:]
    rereg = sc.event("sidecar.consul.reregistered")
    assert rereg is not None and rereg.get("maintenance") is True, rereg
    assert status(sc)["maintenance"] is True
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0


def test_agent_restarted_with_its_data_keeps_maintenance_and_the_keeper_leaves_it(
    tmp_path: Path, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """An agent with a data directory restarted while the instance is in maintenance. Expected: the
    agent brings back the service and its maintenance check by itself; the keeper neither re-registers
    nor re-applies anything, and the instance stays out of `?passing` for several rounds."""
    agent = Consul(tmp_path / "agent", data_dir=tmp_path / "data")
    (tmp_path / "agent").mkdir()
    agent.start()
    try:
        sc, _ = registered_sidecar(agent=agent)
        sid = f"{service_name}-1"
        assert maint(sc.config_path, "--enable", "--reason", "restart me").returncode == 0
        sc.wait_event("sidecar.maintenance.enabled", timeout=10)
        agent.restart()
        time.sleep(4)
        assert in_maintenance(agent, sid) == "restart me"
        assert passing_ids(agent, service_name) == []
        assert sc.event("sidecar.consul.reregistered") is None and sc.event("sidecar.maintenance.reapplied") is None
        assert sc.event("sidecar.maintenance.disabled") is None
        sc.send(signal.SIGTERM)
        assert sc.wait() == 0
        assert agent.service_ids(service_name) == []
    finally:
        agent.stop()


def test_sigterm_in_maintenance_drains_and_deregisters(
    consul: Consul, registered_sidecar: RegisteredSidecar, service_name: str
) -> None:
    """SIGTERM while in maintenance. Expected: the usual drain (deregistered and confirmed, the
    propagation delay, the app stopped), exit 0, nothing left in the catalog, no maintenance check left."""
    sc, _ = registered_sidecar()
    sid = f"{service_name}-1"
    assert maint(sc.config_path, "--enable").returncode == 0
    sc.wait_event("sidecar.maintenance.enabled", timeout=10)
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0
    assert sc.event("sidecar.consul.deregistered") is not None
    assert sc.event("sidecar.app.stopped") is not None
    assert sc.event("sidecar.drain.delay_done") is not None
    assert consul.service_ids(service_name) == []
    assert in_maintenance(consul, sid) is None


def test_unregistered_service_is_one_clear_error(consul: Consul, tmp_path: Path, service_name: str) -> None:
    """`maint` for a configuration whose service.id the agent does not hold. Expected: exit 67, one
    line naming the ID and the agent, no traceback, nothing registered."""
    cfg = write_config(tmp_path / "c.toml", base_config(consul, service_name, 8080))
    for args in (["--enable", "--reason", "x"], ["--disable"]):
        done = maint(cfg, *args)
        assert done.returncode == 67, done
        assert f"'{service_name}-1' is not registered in the Consul agent at {consul.address}" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert consul.service_ids(service_name) == []


def test_acl_denial_names_service_write(acl_consul: Consul, tmp_path: Path, service_name: str) -> None:
    """An instance registered on an agent with default_policy deny; `maint` with no token, then with
    a token that may only read the service. Expected: exit 77, one line saying maintenance mode
    needs service:write on the service, the token never printed; with a writer's token it works."""
    sid = f"{service_name}-1"
    api(acl_consul, "PUT", "/v1/agent/service/register", {"Name": service_name, "ID": sid, "Port": 8080})
    try:
        reader = make_token(acl_consul, f'service "{service_name}" {{ policy = "read" }}')
        writer = make_token(acl_consul, writer_rules(service_name))
        base = base_config(acl_consul, service_name, 8080)
        no_token = write_config(tmp_path / "none.toml", base)
        (tmp_path / "reader").write_text(reader + "\n")
        (tmp_path / "writer").write_text(writer + "\n")
        for path, tokfile in (("reader.toml", "reader"), ("writer.toml", "writer")):
            cfg = dict(base)
            cfg["consul"] = {**base["consul"], "token_file": str(tmp_path / tokfile)}
            write_config(tmp_path / path, cfg)
            os.chmod(tmp_path / tokfile, 0o600)
        for cfg_path in (no_token, tmp_path / "reader.toml"):
            done = maint(cfg_path, "--enable", "--reason", "x")
            assert done.returncode == 77, done
            assert f"needs service:write on '{service_name}'" in done.stderr, done.stderr
            assert "permission denied" in done.stderr.lower()
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
            assert reader not in done.stderr + done.stdout and writer not in done.stderr + done.stdout
        # The same through CONSUL_HTTP_TOKEN: the environment is a token source as for `run`.
        done = maint(no_token, "--enable", env={"CONSUL_HTTP_TOKEN": reader})
        assert done.returncode == 77 and reader not in done.stderr, done
        done = maint(tmp_path / "writer.toml", "--enable", "--reason", "acl ok")
        assert done.returncode == 0, done.stderr
        checks = api(acl_consul, "GET", "/v1/agent/checks")
        assert isinstance(checks, dict) and checks[MAINT + sid]["Notes"] == "acl ok"
    finally:
        api(acl_consul, "PUT", f"/v1/agent/service/deregister/{sid}")


def test_bad_arguments_and_unreachable_agent(tmp_path: Path, service_name: str, consul: Consul) -> None:
    """Bad command lines exit 2 with one line; an agent that does not answer exits 69 naming it."""
    cfg = write_config(tmp_path / "c.toml", base_config(consul, service_name, 8080))
    for args, text in (
        (["--disable", "--reason", "x"], "--reason: only with --enable"),
        (["--enable", "--reason", "  "], "--reason: must not be empty"),
        ([], "one of the arguments --enable --disable is required"),
        (["--enable", "--disable"], "not allowed with argument"),
    ):
        done = maint(cfg, *args)
        assert done.returncode == 2 and text in done.stderr, (args, done)
        assert "Traceback" not in done.stderr
    cfg_dead = base_config(consul, service_name, 8080)
    cfg_dead["consul"] = {**cfg_dead["consul"], "address": "http://127.0.0.1:1"}
    done = maint(write_config(tmp_path / "dead.toml", cfg_dead), "--enable")
    assert done.returncode == 69, done
    assert "unreachable" in done.stderr and "http://127.0.0.1:1" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize(("status", "exit_status"), [(500, 69), (403, 77)])
def test_token_echoed_by_the_agents_address_is_not_printed(
    consul: Consul, tmp_path: Path, service_name: str, status: int, exit_status: int
) -> None:
    """Whatever answers at the agent's address echoes `maint`'s request, headers and all (the token
    among them), into an error body (500, or 403 as an ACL refusal would be). Expected: the usual
    one-line error and exit status, without the token or any piece of it."""
    secret = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
    (tmp_path / "token").write_text(secret + "\n")
    with FaultProxy(consul.http_port) as proxy:
        proxy.add("*", "/", "echo", status=status)
        cfg = base_config(consul, service_name, 8080)
        cfg["consul"] = {**cfg["consul"], "address": proxy.address, "token_file": str(tmp_path / "token")}
        done = maint(write_config(tmp_path / "c.toml", cfg), "--enable", "--reason", "x")
        assert proxy.seen("GET", "/v1/agent/service/"), "the echo was never asked"
    assert done.returncode == exit_status, done
    assert "rejected request" in done.stderr and "X-Consul-Token" in done.stderr, done.stderr
    assert secret not in done.stderr + done.stdout and secret[:8] not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


class MaintAgent(FakeAgent):
    """The fake agent with a maintenance check that goes when the agent forgets the service."""

    reason: str | None = None

    async def maintenance(self, service_id: str) -> str | None:
        return self.reason if self.held else None

    async def set_maintenance(self, service_id: str, enable: bool, reason: str | None) -> bool:
        await super().set_maintenance(service_id, enable, reason)
        if self.held:
            self.reason = reason if enable else None
        return self.held


@pytest.mark.asyncio
async def test_reregistration_in_maintenance_never_starts_passing(tmp_path: Path) -> None:
    """Pure logic: the keeper has read maintenance mode ("swap"); the agent forgets the service.
    Expected: the keeper registers it with its check *not* passing, then applies maintenance again
    with the reason it read; outside maintenance a re-registration starts passing as before."""
    calls: list[str] = []
    agent = MaintAgent(calls)
    config = make_config(tmp_path)
    config = dataclasses.replace(config, check=dataclasses.replace(config.check, interval=0.05))
    sc, inbox = make_sidecar(config, agent, FakeApp(calls))
    with structlog.testing.capture_logs() as logs:
        run = asyncio.create_task(sc.run())
        await until(lambda: sc.status.state is State.REGISTERED)
        agent.reason = "swap"
        await until(lambda: sc.status.maintenance_reason == "swap")
        calls.clear()
        agent.held, agent.reason = False, None  # an agent restarted without its data
        await until(lambda: agent.reason == "swap")
        assert calls[:2] == ["register passing=False", "maintenance True"], calls
        agent.reason = None  # maint --disable
        await until(lambda: not sc.status.maintenance)
        calls.clear()
        agent.held = False
        await until(lambda: agent.held)
        assert calls == ["register passing=True"], calls
        inbox.queue.put_nowait(signal.SIGTERM)
        assert await run == 0
    events = [e["event"] for e in logs]
    assert events.count("sidecar.maintenance.reapplied") == 1
    assert events.count("sidecar.maintenance.enabled") == 1 and events.count("sidecar.maintenance.disabled") == 1


@pytest.mark.asyncio
async def test_reapplying_maintenance_that_fails_is_retried_and_said_once(tmp_path: Path) -> None:
    """Pure logic: after the agent forgot the service, applying maintenance again fails twice (no
    answer). Expected: one `sidecar.maintenance.reapply_failed` error, the instance registered not
    passing and never registered passing, maintenance applied on the third round with the reason."""
    from sidecar.registry.consul import ConsulUnavailable

    class Failing(MaintAgent):
        failures = 0

        async def set_maintenance(self, service_id: str, enable: bool, reason: str | None) -> bool:
            if self.failures:
                self.failures -= 1
                raise ConsulUnavailable("no answer within 1s")
            return await super().set_maintenance(service_id, enable, reason)

    calls: list[str] = []
    agent = Failing(calls)
    config = make_config(tmp_path)
    config = dataclasses.replace(config, check=dataclasses.replace(config.check, interval=0.05))
    sc, inbox = make_sidecar(config, agent, FakeApp(calls))
    with structlog.testing.capture_logs() as logs:
        run = asyncio.create_task(sc.run())
        await until(lambda: sc.status.state is State.REGISTERED)
        agent.reason = "swap"
        await until(lambda: sc.status.maintenance_reason == "swap")
        calls.clear()
        agent.failures = 2
        agent.held, agent.reason = False, None
        await until(lambda: agent.reason == "swap")
        inbox.queue.put_nowait(signal.SIGTERM)
        assert await run == 0
    assert "register passing=True" not in calls, calls
    events = [e["event"] for e in logs]
    assert events.count("sidecar.maintenance.reapply_failed") == 1, events
    assert events.count("sidecar.maintenance.reapplied") == 1
    assert sc.status.maintenance_reason == "swap"
