"""The etcd test kit (testkit/etcd.py) against real etcd members: what the etcd registry's tests will stand on."""

from __future__ import annotations

import time

import pytest

from testkit import wait_for
from testkit.etcd import Etcd, EtcdCluster, EtcdctlError, etcdctl, get_prefix, lease_grant, lease_ttl


def test_a_key_on_a_lease_reads_back_with_its_lease(etcd: Etcd, etcd_prefix: str) -> None:
    lease = lease_grant(etcd.endpoint, 60)
    etcdctl(etcd.endpoint, "put", etcd_prefix + "a", '{"Addr":"127.0.0.1:80"}', f"--lease={lease:x}")
    etcdctl(etcd.endpoint, "put", etcd_prefix + "b", "plain")

    assert get_prefix(etcd.endpoint, etcd_prefix) == {
        etcd_prefix + "a": (b'{"Addr":"127.0.0.1:80"}', lease),
        etcd_prefix + "b": (b"plain", 0),
    }
    assert 0 < lease_ttl(etcd.endpoint, lease) <= 60
    assert get_prefix(etcd.endpoint, etcd_prefix + "none/") == {}


def test_a_leased_key_disappears_after_the_ttl(etcd: Etcd, etcd_prefix: str) -> None:
    lease = lease_grant(etcd.endpoint, 2)
    granted = time.monotonic()
    etcdctl(etcd.endpoint, "put", etcd_prefix + "k", "v", f"--lease={lease:x}")
    assert etcd_prefix + "k" in get_prefix(etcd.endpoint, etcd_prefix)

    wait_for(lambda: not get_prefix(etcd.endpoint, etcd_prefix), 15, 0.1, "the leased key to expire")
    assert time.monotonic() - granted >= 1.5  # gone because the lease ran out, not at once
    assert lease_ttl(etcd.endpoint, lease) == -1


def test_killing_the_leader_elects_another_and_writes_go_on(etcd_cluster: EtcdCluster) -> None:
    old = wait_for(etcd_cluster.leader, 15, 0.1, "a leader")
    etcd_cluster.kill(old)

    new = wait_for(etcd_cluster.leader, 20, 0.1, "a new leader")
    assert new is not old and new.running()
    etcdctl(etcd_cluster.endpoints, "put", "/after", "yes")
    assert get_prefix(new.endpoint, "/after") == {"/after": (b"yes", 0)}


def test_without_a_quorum_a_linearizable_read_fails_within_its_deadline(etcd_cluster: EtcdCluster) -> None:
    etcdctl(etcd_cluster.endpoints, "put", "/k", "v")
    last, *others = etcd_cluster.members
    assert get_prefix(last.endpoint, "/k") == {"/k": (b"v", 0)}  # the same read works with a quorum

    for m in others:
        etcd_cluster.kill(m)
    started = time.monotonic()
    with pytest.raises(EtcdctlError):
        get_prefix(last.endpoint, "/k", timeout=2)
    assert time.monotonic() - started < 8

    etcd_cluster.start(others[0])  # a quorum again: the same read answers
    assert get_prefix(last.endpoint, "/k") == {"/k": (b"v", 0)}


def test_a_frozen_member_is_left_out_and_comes_back(etcd_cluster: EtcdCluster) -> None:
    leader = wait_for(etcd_cluster.leader, 15, 0.1, "a leader")
    etcd_cluster.freeze(leader)
    new = wait_for(etcd_cluster.leader, 20, 0.1, "a leader among the others")
    assert new is not leader
    etcdctl([m.endpoint for m in etcd_cluster.members if m is not leader], "put", "/while-frozen", "1")

    etcd_cluster.thaw(leader)
    leader.wait_healthy(20)
    wait_for(lambda: "/while-frozen" in get_prefix(leader.endpoint, "/while-frozen"), 20, 0.1, "the thawed member")


def test_a_restarted_member_keeps_its_data(fresh_etcd: Etcd) -> None:
    etcdctl(fresh_etcd.endpoint, "put", "/kept", "1")
    fresh_etcd.restart()
    assert get_prefix(fresh_etcd.endpoint, "/kept") == {"/kept": (b"1", 0)}
