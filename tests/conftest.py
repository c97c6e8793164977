from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import testkit
from testkit import Consul, ConsulCluster, Sidecar
from testkit.acl import ACL_HCL, ROOT_TOKEN
from testkit.etcd import Etcd, EtcdCluster
from testkit.suite import RegisteredSidecar, StartSidecar, base_config

_names = itertools.count(1)


@pytest.fixture(scope="session")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    """One real dev agent for the tests that do not restart it; each test uses its own service name.

    Started by the first test that asks for it, and kept for the session: the first test's teardown
    neither kills nor counts it (``testkit.keep_for_session``)."""
    agent = Consul(tmp_path_factory.mktemp("consul"))
    agent.start()
    assert agent.proc is not None
    testkit.keep_for_session(agent.proc)
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def acl_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    """A dev agent with ACLs on and default_policy "deny" (ROOT_TOKEN is its master token), one per test module."""
    agent = Consul(tmp_path_factory.mktemp("acl"), hcl=ACL_HCL, admin_token=ROOT_TOKEN)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def fresh_consul(tmp_path: Path) -> Iterator[Consul]:
    """A dev agent of the test's own, for tests that stop, restart or freeze it."""
    agent = Consul(tmp_path)
    yield agent
    agent.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ConsulCluster]:
    """A cluster of the test's own (3 servers, 1 client agent) with fast raft timing (raft_multiplier 1),
    so that tests can kill its leader; ~2 s to start."""
    c = ConsulCluster(tmp_path, fast=True)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def default_timing_cluster(tmp_path: Path) -> Iterator[ConsulCluster]:
    """The same with Consul's production timing (raft_multiplier 5): elections take several seconds."""
    c = ConsulCluster(tmp_path, fast=False)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    """One real etcd member for the session (each xdist worker has its own): about 1 s to start, so one
    per test would cost the suite more than it buys. Tests keep apart by key: each writes only under its
    own ``etcd_prefix``. A test that kills, restarts or freezes etcd takes ``fresh_etcd`` instead.

    Started by the first test that asks for it and kept for the session, like ``consul``."""
    member = Etcd(tmp_path_factory.mktemp("etcd"))
    member.start()
    assert member.proc is not None
    testkit.keep_for_session(member.proc)
    yield member
    member.stop()


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test (in this run, or another run on the same member) writes under."""
    return f"/testkit/{os.environ.get('PYTEST_XDIST_WORKER', 'w')}p{os.getpid()}n{next(_names)}/"


@pytest.fixture
def fresh_etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A started etcd member of the test's own, for tests that stop, restart or freeze it."""
    member = Etcd(tmp_path)
    try:
        member.start()
        yield member
    finally:
        member.stop()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three started etcd members of the test's own on loopback (default raft timing: an election
    takes about 1-2 s), for tests that kill, restart or freeze members."""
    c = EtcdCluster(tmp_path, size=3)
    try:
        c.start_all()
        yield c
    finally:
        c.stop_all()


# A test is a unit test (scripts/test unit) unless it asks for one of these fixtures or is marked
# ``integration``; the guard below fails a unit test that starts a process all the same.
REAL_PARTS = {
    "consul",
    "acl_consul",
    "fresh_consul",
    "cluster",
    "default_timing_cluster",
    "etcd",
    "fresh_etcd",
    "etcd_cluster",
    "start_sidecar",
    "registered_sidecar",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        marked = item.get_closest_marker("integration") or item.get_closest_marker("compose")
        if marked is None and not fixtures & REAL_PARTS:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test counted as a unit test must not start a process (an agent, a server, the sidecar, a
    namespace): it would make `scripts/test unit` slow and need the real parts installed."""
    if request.node.get_closest_marker("unit") is None:
        return
    import subprocess

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            f"{request.node.nodeid} is a unit test (no real-parts fixture) but starts a process: "
            "mark it @pytest.mark.integration"
        )

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


@pytest.fixture(autouse=True)
def _kill_what_the_test_started() -> Iterator[None]:
    """Whatever the test started is killed afterwards, also on failure. But first: a process whose
    sidecar (or other starter) has already exited must not be alive, or the test fails."""
    before = testkit.started_count()
    yield
    left = testkit.leftovers_of_exited(before)
    testkit.stop_started(before)
    assert not left, f"processes outlived the process that started them: {left}"


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    yield
    testkit.kill_all_started()
    left = testkit.leftovers()
    assert not left, f"processes left behind by the suite: {left}"


@pytest.fixture
def service_name() -> str:
    # Unique on the host, not only in this process: the pytest-xdist workers (and other test runs on the
    # same host) share it, and an instance's ID is claimed host-wide per agent (sidecar/instance_claim.py).
    return f"svc{next(_names)}{os.environ.get('PYTEST_XDIST_WORKER', '')}p{os.getpid()}"


@pytest.fixture
def start_sidecar(tmp_path: Path) -> StartSidecar:
    """start_sidecar(config, command=None, env=None) -> a running Sidecar process."""

    def start(
        config: dict[str, dict[str, Any]], command: list[str] | None = None, env: dict[str, str] | None = None
    ) -> Sidecar:
        return Sidecar(tmp_path, config, command, env)

    return start


@pytest.fixture
def registered_sidecar(
    request: pytest.FixtureRequest, start_sidecar: StartSidecar, service_name: str
) -> RegisteredSidecar:
    """registered_sidecar(*app_args, agent=None, env=None, **sections) -> (sidecar, app port).

    The example app (with ``app_args``) on a free port under a sidecar configured with
    ``base_config(agent, service_name, port, **sections)``, returned once the sidecar has logged
    ``sidecar.consul.registered``. ``agent`` defaults to the session's ``consul`` agent."""

    def start(
        *app_args: str, agent: Consul | None = None, env: dict[str, str] | None = None, **sections: dict[str, Any]
    ) -> tuple[Sidecar, int]:
        if agent is None:
            agent = request.getfixturevalue("consul")
        port = testkit.free_port()
        cfg = base_config(agent, service_name, port, **sections)
        sc = start_sidecar(cfg, testkit.app_command(port, "127.0.0.1", *app_args), env)
        sc.wait_event("sidecar.consul.registered")
        return sc, port

    return start
