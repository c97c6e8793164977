"""Adversarial review of issues 8 and 9: the promise under deployments and faults the first tests did not try.

Real Consul, real sidecar and app processes, real signals and capabilities.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import Consul, app_command, free_port, spawn, wait_for
from testkit.restricted import answers, start_restricted
from testkit.suite import base_config

# Docker's default capability set has no CAP_SYS_PTRACE: a root sidecar there cannot read the
# descriptors (/proc/<pid>/fd/N) of a process of another user.
NO_PTRACE = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace", "--"]
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_app_running_as_another_user_is_registered_by_a_sidecar_without_ptrace(
    consul: Consul, tmp_path: Path, service_name: str
) -> None:
    """A root sidecar with Docker's default capabilities (no CAP_SYS_PTRACE) wraps an app that runs as
    another user (what gosu, su-exec or setpriv do in most official images). The app owns its port, but
    its descriptors cannot be read. Expected: the instance is registered (the owner check says it could
    not tell), drained on SIGTERM, exit 0. On main: 'a process outside the app's tree listens on ...',
    nothing registered, exit 69: the app never enters service."""
    port = free_port()
    sc = start_restricted(
        tmp_path,
        base_config(consul, service_name, port),
        [*AS_NOBODY, *app_command(port)],
        NO_PTRACE,
        deny_events=False,
    )
    sc.wait_event("sidecar.consul.registered", 30)
    assert sc.event("sidecar.startup.port_not_the_apps") is None
    unchecked = sc.event("sidecar.startup.port_owner_unchecked")
    assert unchecked is not None and "CAP_SYS_PTRACE" in unchecked["reason"], unchecked
    assert consul.service_ids(service_name) == [f"{service_name}-1"]
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.output()[-2000:]
    assert consul.service_ids(service_name) == []


def test_foreign_owner_still_refused_when_the_apps_descriptors_are_hidden(
    consul: Consul, tmp_path: Path, service_name: str
) -> None:
    """The same restricted sidecar and an app of another user that never binds, while a root server
    (readable: same user and capabilities as the sidecar) holds the port. Expected: still refused, exit 69, the foreign
    owner named; nothing registered. (The check must not be blinded by the app's hidden descriptors.)"""
    port = free_port()
    # Under Docker every process of the container has the same reduced set: so does the foreign server.
    foreign = spawn(
        [*NO_PTRACE, *app_command(port, "127.0.0.1", "--instance", "someone-else")], tmp_path / "foreign.log"
    )
    try:
        wait_for(lambda: answers(port), 10, what="the foreign server")
        sc = start_restricted(
            tmp_path, base_config(consul, service_name, port), [*AS_NOBODY, "sleep", "30"], NO_PTRACE, deny_events=False
        )
        assert sc.wait(30) == 69, sc.output()[-2000:]
        err = sc.event("sidecar.startup.port_not_the_apps")
        assert err is not None and err["owner_pid"] == foreign.pid, err
        assert consul.service_ids(service_name) == []
    finally:
        foreign.kill()
        foreign.wait(5)


# --- a resolver that never answers ----------------------------------------------------------------


@pytest.fixture
def hung_resolver(tmp_path: Path) -> Iterator[list[str]]:
    """A DNS server that reads every query and answers none (an overloaded or partitioned resolver),
    and the argv prefix that runs a process in a mount namespace whose /etc/resolv.conf points at it
    (glibc then waits 30 s per look-up)."""
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.77", 53))
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.77\noptions timeout:30 attempts:1\n")
    try:
        yield ["unshare", "-m", "sh", "-c", f'mount --bind {conf} /etc/resolv.conf && exec "$@"', "sh"]
    finally:
        hole.close()


def test_hung_resolver_for_a_host_name_address_does_not_block_the_drain(
    consul: Consul, tmp_path: Path, service_name: str, hung_resolver: list[str]
) -> None:
    """service.address is a host name and the traffic strategy has a DNS step, so the sidecar resolves
    the name at registration; the resolver never answers. SIGTERM right after the registration.
    Expected: the drain starts at once and the sidecar exits within its worst case (3 + 5 + 10 + 1 =
    19 s), nothing left registered. On main: getaddrinfo runs on the event loop, which sees the
    SIGTERM only ~30 s later (the drain starts after the worst case has passed)."""
    port = free_port()
    cfg = base_config(
        consul,
        service_name,
        port,
        service={"address": "app.hung-resolver.example"},
        check={"http": f"http://127.0.0.1:{port}/healthz", "allow_remote": True},
        shutdown={"strategy": "traffic", "dns": [f"127.0.0.1:{consul.dns_port}"], "propagation_delay": "5s"},
    )
    sc = start_restricted(tmp_path, cfg, app_command(port), hung_resolver, deny_events=False)
    sc.wait_event("sidecar.consul.registered", 30)
    t = time.monotonic()
    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.drain.started", 60)
    started = time.monotonic() - t
    assert sc.wait(60) == 0, sc.output()[-2000:]
    took = time.monotonic() - t
    assert started < 3.0, f"the drain started {started:.1f}s after SIGTERM"
    assert took < 19.0, f"exited {took:.1f}s after SIGTERM, past the worst case of 19s"
    assert consul.service_ids(service_name) == []


def test_hung_resolver_for_the_agents_name_does_not_keep_the_sidecar_alive(
    consul: Consul, tmp_path: Path, service_name: str, hung_resolver: list[str]
) -> None:
    """consul.address names the agent by a host name (compose's "http://consul:8500") and the resolver
    never answers: the agent is unreachable, the app runs unregistered. SIGTERM. Expected: the sidecar
    stops the app and exits within its worst case (3 + 1 + 10 + 1 = 15 s), and well before: nothing
    was registered. On main: it logs sidecar.stopped at once, then the process waits ~30 s for the
    look-up threads of asyncio's default executor before it can exit."""
    port = free_port()
    cfg = base_config(
        consul, service_name, port, consul={"address": f"http://consul.hung-resolver.example:{consul.http_port}"}
    )
    sc = start_restricted(tmp_path, cfg, app_command(port), hung_resolver, deny_events=False)
    sc.wait_event("sidecar.consul.unreachable", 30)
    t = time.monotonic()
    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.stopped", 30)
    assert sc.wait(60) == 0, sc.output()[-2000:]
    took = time.monotonic() - t
    assert took < 15.0, f"exited {took:.1f}s after SIGTERM, past the worst case of 15s"
    assert consul.service_ids(service_name) == []
