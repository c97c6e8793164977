"""Adversarial review of issues 8 and 9: the promise under deployments and faults the first tests did not try.

Real Consul, real sidecar and app processes, real signals and capabilities.
"""

from __future__ import annotations

import signal
from pathlib import Path

from .conftest import base_config
from .harness import Consul, app_command, free_port, spawn, wait_for
from .test_drain_evidence import _answers, start_restricted

# Docker's default capability set has no CAP_SYS_PTRACE: a root sidecar there cannot read the
# descriptors (/proc/<pid>/fd/N) of a process of another user.
NO_PTRACE = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace", "--"]
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_app_running_as_another_user_is_registered_by_a_sidecar_without_ptrace(
        consul: Consul, tmp_path: Path, service_name: str) -> None:
    """A root sidecar with Docker's default capabilities (no CAP_SYS_PTRACE) wraps an app that runs as
    another user (what gosu, su-exec or setpriv do in most official images). The app owns its port, but
    its descriptors cannot be read. Expected: the instance is registered (the owner check says it could
    not tell), drained on SIGTERM, exit 0. On main: 'a process outside the app's tree listens on ...',
    nothing registered, exit 69: the app never enters service."""
    port = free_port()
    sc = start_restricted(tmp_path, base_config(consul, service_name, port), [*AS_NOBODY, *app_command(port)],
                          NO_PTRACE, deny_events=False)
    sc.wait_event("sidecar.consul.registered", 30)
    assert sc.event("sidecar.startup.port_not_the_apps") is None
    unchecked = sc.event("sidecar.startup.port_owner_unchecked")
    assert unchecked is not None and "CAP_SYS_PTRACE" in unchecked["reason"], unchecked
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.output()[-2000:]
    assert consul.service_ids(service_name) == []


def test_foreign_owner_still_refused_when_the_apps_descriptors_are_hidden(
        consul: Consul, tmp_path: Path, service_name: str) -> None:
    """The same restricted sidecar and an app of another user that never binds, while a root server
    (readable: same user and capabilities as the sidecar) holds the port. Expected: still refused, exit 69, the foreign
    owner named; nothing registered. (The check must not be blinded by the app's hidden descriptors.)"""
    port = free_port()
    # Under Docker every process of the container has the same reduced set: so does the foreign server.
    foreign = spawn([*NO_PTRACE, *app_command(port, "127.0.0.1", "--instance", "someone-else")], tmp_path / "foreign.log")
    try:
        wait_for(lambda: _answers(port), 10, what="the foreign server")
        sc = start_restricted(tmp_path, base_config(consul, service_name, port), [*AS_NOBODY, "sleep", "30"],
                              NO_PTRACE, deny_events=False)
        assert sc.wait(30) == 69, sc.output()[-2000:]
        err = sc.event("sidecar.startup.port_not_the_apps")
        assert err is not None and err["owner_pid"] == foreign.pid, err
        assert consul.service_ids(service_name) == []
    finally:
        foreign.kill()
        foreign.wait(5)
