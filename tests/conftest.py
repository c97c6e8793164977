from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import testkit
from testkit import Consul, ConsulCluster, Sidecar

_names = itertools.count(1)


@pytest.fixture(scope="session", autouse=True)
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    """One real dev agent for the tests that do not restart it; each test uses its own service name.

    Autouse, so it starts before any test's own processes are counted: started lazily inside a test
    (``registered_sidecar`` asks for it by name), it was counted among that test's processes and
    killed by its teardown, and every later test of that pytest-xdist worker met a dead agent."""
    agent = Consul(tmp_path_factory.mktemp("consul"))
    agent.start()
    yield agent
    agent.stop()


ROOT_TOKEN = "3d1a7b3e-0000-4000-8000-00000000root"
ACL_HCL = (
    f'acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{ROOT_TOKEN}", agent = "{ROOT_TOKEN}" }} }}'
)


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


def base_config(agent: Consul, name: str, port: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {
        "consul": {"address": agent.address, "timeout": "1s"},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "1s"},
        "startup": {"timeout": "20s"},
        "shutdown": {"propagation_delay": "1s", "app_timeout": "10s", "deregister_timeout": "3s"},
        "status": {"listen": "127.0.0.1:0"},
    }
    return testkit.merge(cfg, sections)


StartSidecar = Callable[..., Sidecar]


@pytest.fixture
def start_sidecar(tmp_path: Path) -> StartSidecar:
    """start_sidecar(config, command=None, env=None) -> a running Sidecar process."""

    def start(
        config: dict[str, dict[str, Any]], command: list[str] | None = None, env: dict[str, str] | None = None
    ) -> Sidecar:
        return Sidecar(tmp_path, config, command, env)

    return start


RegisteredSidecar = Callable[..., tuple[Sidecar, int]]


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
