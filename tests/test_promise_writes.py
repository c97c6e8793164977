"""Writes in flight, hostile answers and a vanishing token, through a fault-injecting proxy between
the sidecar and a real agent. The promise checked every time: the app is signalled only after its
instance is gone from the catalog, and nothing stays registered."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from examples.rollout.fleet import CatalogWatcher
from sidecar.state import State
from testkit import Consul, Sidecar, app_command, free_port, http_get, read_signal_log, wait_for
from testkit.acl import make_token, writer_rules
from testkit.fakes import FakeAgent, FakeApp, make_config, make_sidecar, until
from testkit.faultproxy import DEREGISTER, REGISTER, FaultProxy, remove_behind_its_back
from testkit.suite import StartSidecar, base_config


@pytest.fixture
def proxy(consul: Consul) -> Iterator[FaultProxy]:
    with FaultProxy(consul.http_port) as p:
        yield p


def through(proxy: FaultProxy, cfg: dict[str, dict[str, object]], **consul: object) -> dict[str, dict[str, object]]:
    cfg["consul"] = {**cfg["consul"], "address": proxy.address, **consul}
    return cfg


def assert_promise_kept(agent: Consul, sc: Sidecar, watcher: CatalogWatcher, siglog: Path, sid: str) -> None:
    """The app's signal came after the last time the catalog listed the instance; nothing is left."""
    time.sleep(0.3)  # let the watcher see anything that lands late
    watcher.stop.set()
    signals = read_signal_log(siglog)
    assert [n for n, _ in signals] == ["SIGTERM"], (signals, sc.output()[-3000:])
    signalled = signals[0][1]
    listed_at_signal = [ids for t, ids in watcher.changes if t <= signalled][-1:]
    assert not listed_at_signal or sid not in listed_at_signal[0], (watcher.changes, signalled, sc.output()[-3000:])
    assert all(sid not in ids for t, ids in watcher.changes if t > signalled), (watcher.changes, signalled)
    assert agent.get(f"/v1/agent/service/{sid}") is None, "left registered in the agent"
    assert agent.service_ids(sid.rsplit("-", 1)[0]) == [], "left in the catalog"
    assert "Traceback" not in sc.output()


@pytest.mark.parametrize("how", ["sigterm", "app_dies"])
def test_first_register_in_flight_is_deregistered(
    consul: Consul, proxy: FaultProxy, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, how: str
) -> None:
    """1. The proxy forwards the first registration at once (the agent applies it) but holds its 200 for 1.5 s.
    2. While the sidecar waits for that answer: SIGTERM to the sidecar (or SIGKILL to its app).
    3. Expected: the sidecar treats the write as applied: it deregisters and confirms before it signals
       the app (never `nothing_registered`), and nothing stays registered.
    """
    port = free_port()
    siglog = tmp_path / "signals.log"
    sid = f"{service_name}-1"
    proxy.add("PUT", REGISTER, "hold_response", 1.5, uses=1)
    watcher = CatalogWatcher(consul, service_name)
    watcher.start()
    sc = start_sidecar(
        through(proxy, base_config(consul, service_name, port)),
        app_command(port, "127.0.0.1", "--signal-log", str(siglog)),
    )
    wait_for(lambda: proxy.seen("PUT", REGISTER), 20, what="the registration to reach the proxy")
    wait_for(lambda: consul.get(f"/v1/agent/service/{sid}"), 5, what="the agent to apply it")
    if how == "sigterm":
        sc.send(signal.SIGTERM)
        assert sc.wait(30) == 0
        assert_promise_kept(consul, sc, watcher, siglog, sid)
    else:
        os.kill(sc.app_pid(), signal.SIGKILL)
        assert sc.wait(30) == 128 + signal.SIGKILL
        watcher.stop.set()
        assert consul.get(f"/v1/agent/service/{sid}") is None and consul.service_ids(service_name) == []
    assert sc.event("sidecar.drain.nothing_registered") is None
    assert sc.event("sidecar.consul.deregistered") is not None


@pytest.mark.parametrize(
    ("consul_timeout", "hold", "expect_reappeared"),
    [("3s", 1.0, False), ("1s", 1.5, True)],
    ids=["answered-within-the-fence", "times-out-lands-during-the-delay"],
)
def test_keeper_write_in_flight_cannot_land_after_the_deregistration(
    consul: Consul,
    proxy: FaultProxy,
    start_sidecar: StartSidecar,
    service_name: str,
    tmp_path: Path,
    consul_timeout: str,
    hold: float,
    expect_reappeared: bool,
) -> None:
    """1. Registered. The agent forgets the service; the keeper re-registers, and the proxy holds that
       request (then forwards it even if the sidecar has given up on it). SIGTERM while it is held.
    2. answered-within-the-fence: the drain waits for the write's answer (within its 3 s timeout)
       before deregistering. times-out-lands-during-the-delay: the write times out (1 s) and lands
       0.5 s later, inside the 2 s propagation delay: the final read finds it, deregisters again
       and waits the delay again.
    3. Expected either way: the app is signalled only after the instance is gone, nothing is left.
    """
    port = free_port()
    siglog = tmp_path / "signals.log"
    sid = f"{service_name}-1"
    cfg = through(
        proxy,
        base_config(consul, service_name, port, shutdown={"propagation_delay": "2s", "deregister_timeout": "3s"}),
        timeout=consul_timeout,
    )
    sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--signal-log", str(siglog)))
    sc.wait_event("sidecar.consul.registered")
    watcher = CatalogWatcher(consul, service_name)
    watcher.start()
    proxy.add("PUT", REGISTER, "hold_request", hold, uses=1)
    remove_behind_its_back(consul, sid)
    wait_for(lambda: len(proxy.seen("PUT", REGISTER)) == 2, 10, what="the keeper's re-registration to reach the proxy")
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    assert_promise_kept(consul, sc, watcher, siglog, sid)
    assert (sc.event("sidecar.consul.reappeared") is not None) == expect_reappeared, sc.output()[-3000:]


@pytest.mark.parametrize(
    ("hold", "deregister_timeout", "app_timeout", "expect_status"),
    [(3.0, "2s", "10s", 0), (8.0, "1s", "1500ms", 75)],
    ids=["lands-while-the-sidecar-still-reads", "lands-after-the-drains-worst-case"],
)
def test_unanswered_first_registration_landing_after_the_drain(
    consul: Consul,
    proxy: FaultProxy,
    start_sidecar: StartSidecar,
    service_name: str,
    tmp_path: Path,
    hold: float,
    deregister_timeout: str,
    app_timeout: str,
    expect_status: int,
) -> None:
    """1. A hop (the proxy) holds the first registration `hold` seconds and then delivers it, although
       the sidecar gave up after consul.timeout (1 s). SIGTERM as soon as the request is held.
    2. Expected: the sidecar never exits 0 while the agent lists the instance once the held write has
       landed. lands-while-the-sidecar-still-reads (3 s): the drain keeps reading the agent until the
       write's window has passed, sees it land, deregisters again: exit 0, nothing left.
       lands-after-the-drains-worst-case (8 s, a 4 s worst case): the window (1 s + 5 s) outlasts the
       drain, so its last word is left_registered (reason write_unanswered) and it exits 75 (or the app's
       137 if load kept the app from exiting within its 1.5 s); the write then does land.
    """
    port = free_port()
    siglog = tmp_path / "signals.log"
    sid = f"{service_name}-1"
    proxy.add("PUT", REGISTER, "hold_request", hold, uses=1)
    shutdown = {"propagation_delay": "500ms", "deregister_timeout": deregister_timeout, "app_timeout": app_timeout}
    sc = start_sidecar(
        through(proxy, base_config(consul, service_name, port, shutdown=shutdown)),
        app_command(port, "127.0.0.1", "--signal-log", str(siglog)),
    )
    wait_for(lambda: proxy.seen("PUT", REGISTER), 20, what="the registration to reach the proxy")
    sc.send(signal.SIGTERM)
    code = sc.wait(40)
    held = proxy.seen("PUT", REGISTER)[0]
    wait_for(lambda: held.applied is not None, hold + 10, what="the held registration to reach the agent")
    listed = consul.get(f"/v1/agent/service/{sid}") is not None
    try:
        assert not (code == 0 and listed), f"exit 0, yet the agent lists the instance: {sc.output()[-3000:]}"
        killed = code == 128 + signal.SIGKILL and sc.event("sidecar.app.killed") is not None
        assert code == expect_status or (expect_status != 0 and killed), sc.output()[-3000:]
        if expect_status == 0:
            assert sc.event("sidecar.consul.reappeared") is not None, sc.output()[-3000:]
            assert not listed and consul.service_ids(service_name) == []
        else:
            left = sc.event("sidecar.consul.left_registered")
            assert left is not None and left["reason"] == "write_unanswered", sc.output()[-3000:]
            assert listed, "the sidecar said the write might land; it did"
        assert "Traceback" not in sc.output()
    finally:
        if listed:
            remove_behind_its_back(consul, sid)


@pytest.mark.parametrize(
    ("method", "prefix", "action", "status"),
    [
        ("PUT", DEREGISTER, "latin1", 0),
        ("PUT", DEREGISTER, "truncated", 0),
        ("PUT", DEREGISTER, "status", 429),
        ("GET", "/v1/agent/service/", "garbage", 0),
    ],
    ids=["latin1-502-on-deregister", "truncated-deregister", "429-on-deregister", "garbage-json-on-read"],
)
def test_hostile_answers_during_the_drain(
    consul: Consul,
    proxy: FaultProxy,
    start_sidecar: StartSidecar,
    service_name: str,
    tmp_path: Path,
    method: str,
    prefix: str,
    action: str,
    status: int,
) -> None:
    """1. Registered; the proxy answers the drain's first two such requests itself with a hostile answer
       (a latin-1 502 page, a truncated body, 429, a 200 whose body is not JSON).
    2. Expected: a Consul error, retried: the drain confirms the deregistration, signals the app after
       it, exits 0, no traceback, nothing left.
    """
    port = free_port()
    siglog = tmp_path / "signals.log"
    sid = f"{service_name}-1"
    sc = start_sidecar(
        through(proxy, base_config(consul, service_name, port)),
        app_command(port, "127.0.0.1", "--signal-log", str(siglog)),
    )
    sc.wait_event("sidecar.consul.registered")
    watcher = CatalogWatcher(consul, service_name)
    watcher.start()
    wait_for(lambda: watcher.changes, 5, what="the watcher's first answer")
    proxy.add(method, prefix, action, status=status, uses=2)
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0, sc.output()[-3000:]
    assert_promise_kept(consul, sc, watcher, siglog, sid)
    assert [s for s in proxy.seen(method, prefix) if s.action == action], "the fault was never injected"


def test_latin1_answer_to_the_keepers_read_does_not_kill_it(
    consul: Consul, proxy: FaultProxy, start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. Registered; the keeper's periodic reads get a latin-1 502 page three times.
    2. Then the agent forgets the service. Expected: the keeper is still alive and re-registers it;
       /status showed the error meanwhile; no traceback.
    """
    port = free_port()
    sid = f"{service_name}-1"
    sc = start_sidecar(through(proxy, base_config(consul, service_name, port)), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    proxy.add("GET", f"/v1/agent/service/{sid}", "latin1", uses=3)
    wait_for(
        lambda: len([s for s in proxy.seen("GET", f"/v1/agent/service/{sid}") if s.action == "latin1"]) == 3,
        10,
        what="three hostile answers",
    )
    status = json.loads(http_get(sc.status_url() + "/status")[1])
    assert "502" in (status["last_error"] or ""), status
    remove_behind_its_back(consul, sid)
    # The event first: the catalog may still list the instance for a moment after the removal.
    sc.wait_event("sidecar.consul.reregistered", timeout=10)
    wait_for(lambda: consul.service_ids(service_name) == [sid], 10, what="the keeper to re-register")
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    assert "Traceback" not in sc.output()


def test_token_with_a_line_break_inside_is_a_config_error(
    consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """A token file holding `tok-1\\ntok-2`: exit 78 before anything starts, one line naming the token file,
    neither token printed, no traceback."""
    tf = tmp_path / "token"
    tf.write_text("tok-1\ntok-2\n")
    port = free_port()
    sc = start_sidecar(base_config(consul, service_name, port, consul={"token_file": str(tf)}), app_command(port))
    assert sc.wait(30) == 78
    out = sc.output()
    assert str(tf) in out and "line break" in out, out
    assert "tok-1" not in out and "tok-2" not in out and "Traceback" not in out
    assert sc.event("sidecar.app.started") is None
    assert consul.service_ids(service_name) == []


@pytest.mark.asyncio
async def test_keeper_that_fails_unexpectedly_says_so_and_restarts(tmp_path: Path) -> None:
    """Pure logic: the agent's read raises something that is not a Consul error (a bug) twice.
    Expected: an error event each time, /status's last_error names it, and the keeper keeps going
    (a later round re-registers a forgotten service)."""

    class Flaky(FakeAgent):
        boom = 0

        async def registered(self, service_id: str) -> dict[str, object] | None:
            if self.boom:
                self.boom -= 1
                raise RuntimeError("unexpected")
            return await super().registered(service_id)

    calls: list[str] = []
    agent = Flaky(calls)
    config = make_config(tmp_path)
    config = dataclasses.replace(config, check=dataclasses.replace(config.check, interval=0.05))
    sc, inbox = make_sidecar(config, agent, FakeApp(calls))
    with structlog.testing.capture_logs() as logs:
        run = asyncio.create_task(sc.run())
        await until(lambda: sc.status.state is State.REGISTERED)
        agent.boom = 2  # the keeper's next two reads
        await until(lambda: agent.boom == 0)
        await until(lambda: sc.status.last_error is not None and "keeper failed" in sc.status.last_error)
        agent.held = False  # the agent forgets us
        await until(lambda: agent.held, 3)
        inbox.queue.put_nowait(signal.SIGTERM)
        assert await run == 0
    failed = [e for e in logs if e["event"] == "sidecar.consul.keeper_failed"]
    assert len(failed) == 2 and failed[0]["log_level"] == "error"
    assert calls.count("register passing=True") == 2


def test_token_file_gone_mid_run_keeps_the_last_good_token(
    start_sidecar: StartSidecar, service_name: str, tmp_path: Path, acl_consul: Consul
) -> None:
    """1. ACLs on (default deny); registered with a token from a file.
    2. The file is deleted, then comes back with a line break inside.
    3. Expected: one warning (sidecar.consul.token_unreadable) per episode, the keeper and the drain
       keep using the last good token: the deregistration is confirmed, the app exits 0, nothing left,
       the token never printed.
    """
    token = make_token(acl_consul, writer_rules(service_name))
    tf = tmp_path / "token"
    tf.write_text(token)
    port = free_port()
    sid = f"{service_name}-1"
    sc = start_sidecar(base_config(acl_consul, service_name, port, consul={"token_file": str(tf)}), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    tf.unlink()
    sc.wait_event("sidecar.consul.token_unreadable")
    time.sleep(2.2)  # two keeper rounds without the file
    tf.write_text(f"{token}\n{token}\n")
    time.sleep(1.5)
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0, sc.output()[-3000:]
    warnings = [e for e in sc.events() if e["event"] == "sidecar.consul.token_unreadable"]
    assert len(warnings) == 1, warnings  # the episode goes on: the file never held one good token again
    assert sc.event("sidecar.consul.deregistered") is not None
    assert sc.event("sidecar.consul.deregister_unconfirmed") is None
    assert acl_consul.get(f"/v1/agent/service/{sid}") is None and acl_consul.service_ids(service_name) == []
    assert token not in sc.output() and "Traceback" not in sc.output()


@pytest.mark.parametrize("status", [500, 403])
def test_token_echoed_by_the_agents_address_never_reaches_status(
    consul: Consul, proxy: FaultProxy, start_sidecar: StartSidecar, service_name: str, tmp_path: Path, status: int
) -> None:
    """1. Registered through the proxy, with a token from a file. Then whatever answers at the agent's
       address echoes each of the keeper's reads, headers and all (the token among them), into an
       error body (500, or 403 as an ACL refusal would be).
    2. Expected: /status's last_error shows that error without the token (nor any piece of it), the
       log never shows it; once the agent answers again, last_error is cleared.
    """
    secret = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
    tf = tmp_path / "token"
    tf.write_text(secret + "\n")
    port = free_port()
    sc = start_sidecar(through(proxy, base_config(consul, service_name, port), token_file=str(tf)), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    url = sc.status_url() + "/status"
    proxy.add("GET", "/v1/agent/service/", "echo", status=status)
    wait_for(
        lambda: "rejected request" in (json.loads(http_get(url)[1])["last_error"] or ""),
        15,
        what="the echoed error in /status",
    )
    shown = json.loads(http_get(url)[1])["last_error"]
    assert [s for s in proxy.seen("GET", "/v1/agent/service/") if s.action == "echo"]
    assert "X-Consul-Token" in shown, shown  # the header's line is there: only its value is hidden
    assert secret not in shown and secret[:8] not in shown, shown
    proxy.clear()
    wait_for(lambda: json.loads(http_get(url)[1])["last_error"] is None, 15, what="last_error to be cleared")
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0, sc.output()[-3000:]
    assert secret not in sc.output() and secret[:8] not in sc.output()
    assert "Traceback" not in sc.output()
