"""The real sidecar (``registry.kind = "etcd"``) against a real three-member etcd cluster that loses members.

Each test has a cluster of its own (``etcd_cluster``: default raft timing, an election takes about 1-2 s) and
gives the sidecar all three members' client URLs. The app logs the SIGTERM it gets (``--signal-log``), and
etcdctl reads the key through the members that are still up: what the consumers see, not what the sidecar
believes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.etcd import Etcd, EtcdCluster, EtcdctlError, get_prefix
from testkit.procs import Sidecar, app_command, free_port, read_signal_log, wait_for

pytestmark = [pytest.mark.integration]

LEASE_TTL = 3.0


def sidecar_config(endpoints: list[str], port: int, name: str, **shutdown: str) -> dict[str, dict[str, Any]]:
    return {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": endpoints, "lease_ttl": f"{LEASE_TTL:g}s"},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "500ms"},
        "shutdown": {"propagation_delay": "1s", "deregister_timeout": "8s", "app_timeout": "5s", **shutdown},
    }


def keys(endpoints: list[str], name: str) -> dict[str, tuple[bytes, int]] | None:
    """The service's keys as a linearizable read through ``endpoints`` finds them; None when it cannot be
    had (no leader yet, an election under way)."""
    try:
        return get_prefix(endpoints, f"services/{name}/", timeout=2)
    except EtcdctlError:
        return None


def start(tmp_path: Path, endpoints: list[str], name: str, **shutdown: str) -> tuple[Sidecar, Path]:
    """The sidecar with an app that logs its signals, registered: etcdctl sees the key."""
    port, log = free_port(), tmp_path / f"{name}.signals"
    sc = Sidecar(
        tmp_path,
        sidecar_config(endpoints, port, name, **shutdown),
        app_command(port, "127.0.0.1", "--signal-log", str(log)),
    )
    sc.wait_event("sidecar.consul.registered")
    assert keys(endpoints, name), sc.tail()
    return sc, log


def frozen(member: Etcd) -> bool:
    return member.frozen()


def leader_and_followers(cluster: EtcdCluster) -> tuple[Etcd, list[Etcd]]:
    leader: Etcd = wait_for(cluster.leader, timeout=30, interval=0.1, what="an etcd leader")
    return leader, [m for m in cluster.members if m is not leader]


def drained_confirmed(sc: Sidecar, log: Path, survivors: list[str], name: str, sent: float, within: float) -> None:
    """The key is gone as etcdctl reads it through ``survivors`` before the app records its SIGTERM; the
    deregistration was confirmed within ``within`` seconds of the SIGTERM, and nothing is reported left."""
    wait_for(lambda: keys(survivors, name) == {}, timeout=30, interval=0.02, what="the key gone")
    gone_at = time.monotonic()
    assert sc.wait() == 0, sc.tail(40)
    [(sig, t_sig)] = read_signal_log(log)
    assert sig == "SIGTERM" and gone_at < t_sig, (gone_at - sent, t_sig - sent)
    done = sc.event("sidecar.consul.deregistered")
    assert done is not None and done["elapsed_ms"] < within * 1000, sc.output()[-3000:]
    delay = sc.event("sidecar.drain.delay_done")
    assert delay is not None and delay["deregistration"] == "confirmed", delay
    assert sc.event("sidecar.consul.left_registered") is None
    assert sc.event("sidecar.consul.deregister_unconfirmed") is None


def test_the_leader_killed_at_sigterm_the_drain_confirms_through_the_others(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """1. The sidecar talks to the leader (its first endpoint) and registers.
    2. The leader is SIGKILLed, SIGTERM right after: the drain runs while the others elect a new leader.
    3. Expected: the key is gone as etcdctl reads it through the survivors before the app gets its SIGTERM;
       the deregistration is confirmed within deregister_timeout (8 s), and the drain's last word
       (``sidecar.drain.delay_done``) says confirmed.
    Red if requests did not pass on to the next member when one drops the connection or has no leader
    (checked: ``_call`` trying the first endpoint alone ends the drain unconfirmed).
    """
    leader, followers = leader_and_followers(etcd_cluster)
    survivors = [m.endpoint for m in followers]
    sc, log = start(tmp_path, [leader.endpoint, *survivors], "leaderkill")
    etcd_cluster.kill(leader)
    sc.send(signal.SIGTERM)
    sent = time.monotonic()
    drained_confirmed(sc, log, survivors, "leaderkill", sent, within=8)


@pytest.mark.parametrize("role", ["follower", "leader"])
def test_the_member_the_sidecar_talks_to_frozen_the_drain_confirms_through_the_others(
    etcd_cluster: EtcdCluster, tmp_path: Path, role: str
) -> None:
    """1. The sidecar's first endpoint (the member it talks to) is a follower, or the leader.
    2. That member is frozen (SIGSTOP: its socket accepts, it answers nobody, peers included), then SIGTERM.
    3. Expected: the drain confirms through the other two within deregister_timeout (8 s; the frozen
       member costs a share of etcd.timeout, 2 s, per request, and an election when it was the leader);
       the key is gone before the app gets its SIGTERM.
    Red if a request that times out were not passed on to the next member (checked: raising on the
    timeout, as before, ends the drain unconfirmed: every round waits on the frozen member).
    """
    leader, followers = leader_and_followers(etcd_cluster)
    member = leader if role == "leader" else followers[0]
    others = [m.endpoint for m in etcd_cluster.members if m is not member]
    sc, log = start(tmp_path, [member.endpoint, *others], f"frozen{role}")
    etcd_cluster.freeze(member)
    wait_for(lambda: frozen(member), timeout=10, what="the member frozen")
    sc.send(signal.SIGTERM)
    sent = time.monotonic()
    drained_confirmed(sc, log, others, f"frozen{role}", sent, within=8)


def test_quorum_lost_the_drain_ends_at_its_bound_unconfirmed_naming_the_lease_ttl(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """1. Registered; two of the three members are SIGKILLed (the leader among them): no quorum, no leader.
    2. SIGTERM (deregister_timeout 3 s, propagation_delay 1 s).
    3. Expected, as with Consul's servers without a leader: the sidecar keeps trying until the drain's
       bound (3 s + 1 s) and only then signals the app; it reports the deregistration unconfirmed
       (``deregister_unconfirmed``, ``delay_done`` at error, and the last word ``left_registered``), each
       hint naming etcd.lease_ttl as the bound; exit status 0 (the app's).
    4. Once a killed member is back (quorum again), the key is gone within lease_ttl and an election.
    Red if the drain waited past its bound, signalled the app early, claimed a confirmation, or gave Consul's
    words (check.deregister_critical_after) instead of the lease.
    """
    leader, followers = leader_and_followers(etcd_cluster)
    kept = followers[0]
    sc, log = start(
        tmp_path,
        [m.endpoint for m in etcd_cluster.members],
        "noquorum",
        deregister_timeout="3s",
        propagation_delay="1s",
    )
    etcd_cluster.kill(leader)
    etcd_cluster.kill(followers[1])
    sc.send(signal.SIGTERM)
    sent = time.monotonic()
    assert sc.wait() == 0, sc.tail(40)
    [(sig, t_sig)] = read_signal_log(log)
    assert sig == "SIGTERM" and 3 + 1 - 0.1 <= t_sig - sent <= 3 + 1 + 4, t_sig - sent
    out = sc.output()[-4000:]
    assert sc.event("sidecar.consul.deregistered") is None, out
    unconfirmed = sc.event("sidecar.consul.deregister_unconfirmed")
    assert unconfirmed is not None and "etcd.lease_ttl (3s)" in unconfirmed["hint"], out
    delay = sc.event("sidecar.drain.delay_done")
    assert delay is not None and delay["deregistration"] == "unconfirmed" and delay["level"] == "error", delay
    assert delay["hint"] == "the app is signalled although etcd may still hold the key", delay
    left = sc.event("sidecar.consul.left_registered")
    assert left is not None and "etcd.lease_ttl (3s)" in left["hint"], out
    etcd_cluster.start(followers[1])
    back = [kept.endpoint, followers[1].endpoint]
    wait_for(lambda: keys(back, "noquorum") == {}, timeout=LEASE_TTL + 15, interval=0.1, what="the key expired")


def test_the_keepalive_survives_the_death_of_the_member_it_talks_to(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """1. The sidecar's first endpoint is a follower (no election follows its death, so etcd does not
       renew the leases on its own); registered, lease_ttl 3 s, kept alive every 1 s.
    2. That member is SIGKILLed.
    3. Expected: for more than two lease TTLs every read through the survivors finds the key, on the same
       lease as before (kept alive through another member, not expired and put back).
    Red if keepalives stayed with the dead member (checked: ``_call`` trying the first endpoint alone: the
    lease expires after 3 s).
    """
    _, followers = leader_and_followers(etcd_cluster)
    victim = followers[0]
    survivors = [m.endpoint for m in etcd_cluster.members if m is not victim]
    sc, log = start(tmp_path, [victim.endpoint, *survivors], "keepalive")
    before = keys(survivors, "keepalive")
    assert before
    [(_, lease)] = before.values()
    etcd_cluster.kill(victim)
    t = time.monotonic()
    reads = 0
    while time.monotonic() - t < 2 * LEASE_TTL + 1:  # watching over a span of time is the test itself
        now = keys(survivors, "keepalive")
        assert now != {}, f"the key expired {time.monotonic() - t:.1f}s after the member's death"
        if now is not None:
            reads += 1
            [(_, now_lease)] = now.values()
            assert now_lease == lease, "the lease expired and the key was put back on a new one"
        time.sleep(0.3)
    assert reads >= 5
    os.kill(sc.pid, signal.SIGTERM)
    assert sc.wait() == 0, sc.tail(40)
    assert keys(survivors, "keepalive") == {}
