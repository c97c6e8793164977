"""A 3-server Consul cluster (plus the client agent the sidecar talks to) losing its Raft leader during the drain."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from testkit import ConsulCluster, app_command, free_port, read_signal_log, wait_for
from testkit.suite import StartSidecar


class CatalogWatch:
    """Polls every living server's own copy of the catalog (stale reads: what a consumer reading any
    server may be told) and keeps the start time of the last read that still listed the instance."""

    def __init__(self, cluster: ConsulCluster, name: str, service_id: str) -> None:
        self.cluster, self.name, self.service_id = cluster, name, service_id
        self.last_listed: float | None = None
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CatalogWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            if self.cluster.listed_anywhere(self.name, self.service_id):
                self.last_listed = started
            self.reads += 1
            self._stop.wait(0.02)


def cluster_config(cluster: ConsulCluster, name: str, port: int, **shutdown: str) -> dict[str, dict[str, Any]]:
    return {
        "consul": {"address": cluster.address, "timeout": "1s"},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "1s"},
        "startup": {"timeout": "20s"},
        "shutdown": {
            "deregister_timeout": "3s",
            "propagation_delay": "1s",
            "app_timeout": "10s",
            "budget": "60s",
            **shutdown,
        },
        "status": {"listen": "127.0.0.1:0"},
    }


def drain_with_leader_killed(
    cluster: ConsulCluster,
    start_sidecar: StartSidecar,
    name: str,
    tmp_path: Path,
    servers_to_kill: int,
    **shutdown: str,
) -> tuple[Any, float, float | None, list[tuple[str, float]]]:
    """Register through the client agent; kill the leader (and more servers if asked), then SIGTERM the
    sidecar at once. Returns the sidecar, when SIGTERM was sent, the start of the last read that saw the
    instance in any server's catalog, and the app's signal log."""
    port = free_port()
    siglog = tmp_path / f"signals-{name}.log"
    sc = start_sidecar(
        cluster_config(cluster, name, port, **shutdown), app_command(port, "127.0.0.1", "--signal-log", str(siglog))
    )
    sc.wait_event("sidecar.consul.registered")
    wait_for(lambda: cluster.listed_anywhere(name, f"{name}-1"), 10, what="the instance in the servers' catalog")
    with CatalogWatch(cluster, name, f"{name}-1") as watch:
        leader = cluster.leader()
        assert leader is not None
        victims = [leader] + [i for i in range(cluster.SERVERS) if i != leader][: servers_to_kill - 1]
        for i in victims:
            cluster.kill(i)
        sent = time.monotonic()
        sc.send(signal.SIGTERM)
        assert sc.wait(60) == 0, sc.output()[-3000:]
        if servers_to_kill == 1:
            # The cluster recovers: the watch must see the instance go, or its "last listed" means nothing.
            wait_for(lambda: cluster.listed_anywhere(name, f"{name}-1") is False, 30, what="the catalog to clear")
            time.sleep(0.2)
    assert watch.reads > 10
    return sc, sent, watch.last_listed, read_signal_log(siglog)


def test_leader_killed_before_sigterm_is_waited_for_not_blamed_on_acls(
    cluster: ConsulCluster, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. 3 servers (fast raft timing) + a client agent, no ACLs; the sidecar registered through the client.
    2. The Raft leader is SIGKILLed, then the sidecar gets SIGTERM at once. The agent drops the instance,
       but the catalog can be neither read nor updated until the other servers elect a leader (~1-3 s).
    3. Expected: no ACL blame ("deregister_blocked", "token_file"); the deregistration is confirmed
       within the drain's bound (deregister_timeout 3 s + propagation_delay 5 s); the app gets SIGTERM
       only after the last read of any server's catalog that still listed the instance; nothing is
       reported as left registered, and the instance is gone from the catalog.
    """
    sc, sent, last_listed, signals = drain_with_leader_killed(
        cluster, start_sidecar, service_name, tmp_path, 1, propagation_delay="5s"
    )
    out = sc.output()
    assert sc.event("sidecar.consul.deregister_blocked") is None, out[-3000:]
    assert "token_file" not in out and "blocked by ACLs" not in out
    assert sc.event("sidecar.consul.deregistered") is not None, out[-3000:]
    assert sc.event("sidecar.consul.left_registered") is None
    delay = sc.event("sidecar.drain.delay_done")
    assert delay is not None and delay["deregistration"] == "confirmed"
    [(name, at)] = signals
    assert name == "SIGTERM"
    assert last_listed is not None
    assert at > last_listed, f"app signalled {at - sent:.2f}s after SIGTERM, listed until {last_listed - sent:.2f}s"
    assert at - sent <= 3 + 5 + 1.0  # within the drain's bound (+ process slack)
    assert cluster.get(f"/v1/health/service/{service_name}") == []


def test_no_quorum_for_the_whole_drain_is_reported_honestly(
    cluster: ConsulCluster, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. As above, but two of the three servers are killed: no leader can be elected during the drain.
    2. Expected: the sidecar keeps trying until the drain's bound (deregister_timeout 2 s +
       propagation_delay 2 s) and only then signals the app; every report names the missing leader,
       none blames ACLs; a read after the app's stop still finds no leader, and the last word says so
       (left_registered, reason no_leader); exit status 0.
    """
    sc, sent, _, signals = drain_with_leader_killed(
        cluster, start_sidecar, service_name, tmp_path, 2, deregister_timeout="2s", propagation_delay="2s"
    )
    out = sc.output()
    assert sc.event("sidecar.consul.deregister_blocked") is None and "blocked by ACLs" not in out, out[-3000:]
    unconfirmed = sc.event("sidecar.consul.deregister_unconfirmed")
    assert unconfirmed is not None and unconfirmed["reason"] == "no_leader", out[-3000:]
    delay = sc.event("sidecar.drain.delay_done")
    assert delay is not None and delay["deregistration"] == "no_leader" and delay["level"] == "error"
    left = sc.event("sidecar.consul.left_registered")
    assert left is not None and left["reason"] == "no_leader", out[-3000:]
    assert sc.event("sidecar.consul.deregistered") is None
    [(name, at)] = signals
    assert name == "SIGTERM" and at - sent >= 2 + 2 - 0.1  # not before the drain's bound
    assert sc.event("sidecar.stopped") is not None


@pytest.mark.slow
def test_leader_killed_with_production_raft_timing(
    default_timing_cluster: ConsulCluster, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """1. 3 servers + a client with Consul's default timing (raft_multiplier 5): after the leader's
       SIGKILL the servers notice and elect a new one within ~5-15 s.
    2. SIGTERM right after the kill, with a drain bound long enough for that (deregister_timeout 20 s
       + propagation_delay 2 s).
    3. Expected: no ACL blame, the deregistration confirmed late, the app signalled only after the
       last read of any server's catalog that listed the instance, nothing reported as left behind.
    """
    sc, sent, last_listed, signals = drain_with_leader_killed(
        default_timing_cluster,
        start_sidecar,
        service_name,
        tmp_path,
        1,
        deregister_timeout="20s",
        propagation_delay="2s",
    )
    out = sc.output()
    assert sc.event("sidecar.consul.deregister_blocked") is None and "blocked by ACLs" not in out, out[-3000:]
    assert sc.event("sidecar.consul.deregistered") is not None, out[-3000:]
    assert sc.event("sidecar.consul.left_registered") is None
    [(name, at)] = signals
    assert last_listed is not None
    assert at > last_listed, f"app signalled {at - sent:.2f}s after SIGTERM, listed until {last_listed - sent:.2f}s"
