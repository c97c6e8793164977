"""The fleet's record of drain horizons (issue 20): every drain that measured a horizon appends its sample to
Consul's KV store under ``consul-sidecar/horizon/<service.name>``, a bounded record written with check-and-set.

Real Consul agents (one with ACLs), real sidecars and app processes, real signals; the first tests are the
record's pure logic (drain/record.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.clock import SystemClock
from sidecar.config import ConsulSettings, TokenSource, parse_consul_address
from sidecar.drain import record
from sidecar.registry.consul import ConsulAgent
from testkit import Consul, Sidecar, app_command, free_port, terminate_all, wait_for, write_config
from testkit.acl import make_token, writer_rules
from testkit.suite import StartSidecar, base_config


def _sample(i: int, service_id: str = "web-1") -> dict[str, Any]:
    return {"time": 1.0 * i, "service_id": service_id, "horizon_ms": i, "new_connections": 1, "slowest_peers": []}


def test_the_record_keeps_the_last_hundred_drains_oldest_first() -> None:
    """Red when the record grows without bound, drops the newest instead of the oldest, or reorders."""
    document: bytes | None = None
    for i in range(130):
        document = record.merge(document, _sample(i))
    kept = record.samples(document)
    assert len(kept) == record.RECORD_LIMIT == 100
    assert [s["horizon_ms"] for s in kept] == list(range(30, 130))


def test_a_document_that_is_not_a_record_is_replaced_not_fatal() -> None:
    """Someone else's value under the key (or a broken one) must not stop every drain from saving: the next
    write starts a fresh record. Red when merge raises on it."""
    for junk in (b"not json", b"[1, 2]", b'{"samples": "x"}', b'{"samples": [{"horizon_ms": "1"}, 3]}', b""):
        assert record.samples(record.merge(junk, _sample(7))) == [_sample(7)]


def test_a_horizon_that_is_no_duration_is_dropped_never_a_crash() -> None:
    """json.loads takes NaN and Infinity: a record holding them (or a negative horizon, or true, which is an
    int to isinstance) keeps its good samples only, ``summarise`` answers, and the next write leaves JSON
    that any reader takes. Same for a slowest peer's ``last_ms``. Red when samples() keeps them: summarise
    then raises (int(nan)) or p99 is NaN, and merge writes NaN back."""
    good = _sample(7)
    one = '{"time": 7.0, "service_id": "web-1", "horizon_ms": %s, "new_connections": 1, "slowest_peers": []}'
    texts = [one % v for v in ("7", "NaN", "Infinity", "-Infinity", "-5", "-0.5", "true")]
    document = '{"version": 1, "samples": [' + ", ".join(texts) + "]}"
    assert len(json.loads(document)["samples"]) == 7  # the control: json.loads takes every one of them
    assert record.samples(document) == [good]
    assert record.samples(record.merge(document, _sample(8))) == [good, _sample(8)]
    assert "NaN" not in record.merge(document, _sample(8)).decode()
    zero = {**good, "horizon_ms": 0}
    assert record.samples(json.dumps({"samples": [zero]})) == [zero]  # no consumer came late: a horizon of 0

    peers = [{"peer": "10.0.0.1", "last_ms": float(v)} for v in ("nan", "inf", "-inf")]
    peers.append({"peer": "10.0.0.2", "last_ms": 40})
    s = record.summarise([{**good, "slowest_peers": peers}])
    assert (s.count, s.p99_ms) == (1, 7)
    assert s.slowest_peers == [{"peer": "10.0.0.2", "last_ms": 40, "service_id": "web-1"}]


def _appends(sample: dict[str, Any]) -> Callable[[bytes | None], bytes]:
    return lambda document: record.merge(document, sample)


def _agent(consul: Consul, token: str | None = None) -> ConsulAgent:
    scheme, host, port = parse_consul_address(consul.address)
    settings = ConsulSettings(
        scheme=scheme,
        host=host,
        port=port,
        token=TokenSource(value=token) if token else TokenSource(),
        ca_file=None,
        cert_file=None,
        key_file=None,
        tls_verify=True,
        timeout=5.0,
    )
    return ConsulAgent(settings, SystemClock())


def stored(consul: Consul, name: str) -> list[dict[str, Any]]:
    """The record as any HTTP client reads it: GET /v1/kv/<key>, the value base64 in the JSON answer."""
    entries = consul.get(f"/v1/kv/{record.key(name)}")
    if entries is None:
        return []
    return record.samples(base64.b64decode(entries[0]["Value"]))


@pytest.mark.asyncio
async def test_concurrent_appends_lose_no_sample(consul: Consul, service_name: str) -> None:
    """Three clients (one each, as three sidecars have) append 15 samples each to one service's record, all at
    once, against the real agent. Expected: all 45 in the record, and some appends took more than one write
    (lost a check-and-set and merged again). Red without the check-and-set (a plain PUT of the merge: writes
    read the same document and overwrite each other's samples)."""
    agents = [_agent(consul) for _ in range(3)]
    try:

        async def appender(i: int, agent: ConsulAgent) -> list[int]:
            sid, key = f"{service_name}-{i}", record.key(service_name)
            return [await agent.update_kv(key, _appends(_sample(100 * i + n, sid))) for n in range(15)]

        writes = await asyncio.gather(*(appender(i, a) for i, a in enumerate(agents)))
    finally:
        for a in agents:
            await a.close()
    kept = stored(consul, service_name)
    assert sorted(s["horizon_ms"] for s in kept) == sorted(100 * i + n for i in range(3) for n in range(15))
    assert max(max(w) for w in writes) > 1, writes  # the race did happen: the test can tell


def _config(agent: Consul, name: str, i: int, port: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cfg = base_config(agent, name, port, **sections)
    cfg["service"]["id"] = f"{name}-{i}"
    return cfg


def _drained(sc: Sidecar) -> tuple[dict[str, Any], dict[str, Any]]:
    done = sc.wait_event("sidecar.drain.done", timeout=60)
    assert sc.wait(60) == 0, sc.tail()
    saved = sc.event("sidecar.drain.horizon_saved")
    assert saved is not None, sc.tail()
    return done, saved


def test_one_drain_writes_one_sample(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """A real sidecar's drain (fixed delay 1 s): ``horizon_saved`` once, after the app stopped, and the record
    read back over HTTP holds exactly one sample with the drain's own figures. Red when nothing is written, or
    a sample differs from ``sidecar.drain.done``'s, or the record is not read during the wait (the write
    after it would then take two round trips, not one)."""
    port = free_port()
    sc = start_sidecar(_config(consul, service_name, 1, port), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    done, saved = _drained(sc)
    events = [e["event"] for e in sc.events()]
    assert events.count("sidecar.drain.horizon_saved") == 1 and "sidecar.drain.horizon_not_saved" not in events
    assert (
        events.index("sidecar.app.stopped")
        < events.index("sidecar.drain.horizon_saved")
        < events.index("sidecar.stopped")
    ), events
    assert saved["key"] == f"consul-sidecar/horizon/{service_name}" and saved["writes"] == 1, saved
    assert saved["read_during_wait"] is True, saved  # after the wait: the check-and-set alone, one round trip
    [only] = stored(consul, service_name)
    assert only["service_id"] == f"{service_name}-1"
    assert only["horizon_ms"] == done["horizon_ms"] and only["new_connections"] == done["new_connections"]
    assert only["slowest_peers"] == [{"peer": p["peer"], "last_ms": p["last_ms"]} for p in done["slowest_peers"]]
    assert abs(only["time"] - time.time()) < 120, only


def test_three_instances_draining_at_once_all_land_their_samples(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """Three instances of one service (three apps, three sidecars), SIGTERMed together: each logs
    ``horizon_saved`` and the record holds the three samples. Red when a write overwrites another's sample
    (no check-and-set: seen red with a plain PUT when two drains end within a request of each other; the
    adapter-level test above makes that race certain)."""
    sidecars: list[Sidecar] = []
    try:
        for i in range(3):
            port = free_port()
            sidecars.append(start_sidecar(_config(consul, service_name, i, port), app_command(port)))
        for sc in sidecars:
            sc.wait_event("sidecar.consul.registered")
        for sc in sidecars:
            sc.send(signal.SIGTERM)
        for sc in sidecars:
            _drained(sc)
    finally:
        terminate_all(sidecars)
    assert sorted(s["service_id"] for s in stored(consul, service_name)) == [f"{service_name}-{i}" for i in range(3)]


def test_a_token_without_key_write_is_one_warning_not_a_failed_drain(
    acl_consul: Consul, start_sidecar: StartSidecar, service_name: str, tmp_path: Path
) -> None:
    """ACLs with default_policy deny; the token may register its service (service:write, node:read) but has no
    key:write. The app exits 3 on its signal. Expected: the drain completes (the catalog no longer lists the
    instance), the sidecar exits with the app's status 3, one ``horizon_not_saved`` warning naming the key and
    key:write, and nothing stored. Red when the refusal fails the drain, changes the exit status, is silent,
    or is said more than once."""
    token = make_token(acl_consul, writer_rules(service_name))
    (tmp_path / "token").write_text(token)
    port = free_port()
    cfg = _config(acl_consul, service_name, 1, port, consul={"token_file": str(tmp_path / "token")})
    sc = start_sidecar(cfg, app_command(port, "127.0.0.1", "--exit-code", "3"))
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    sc.wait_event("sidecar.drain.done", timeout=60)
    assert sc.wait(60) == 3, sc.tail()
    events = [e for e in sc.events() if e["event"].startswith("sidecar.drain.horizon")]
    assert [e["event"] for e in events] == ["sidecar.drain.horizon_not_saved"], events
    [warn] = events
    assert warn["level"] == "warning" and warn["reason"] == "permission_denied", warn
    assert warn["key"] == f"consul-sidecar/horizon/{service_name}" and "key:write" in warn["hint"], warn
    assert token not in sc.output()
    assert acl_consul.service_ids(service_name) == []
    wait_for(lambda: acl_consul.get(f"/v1/kv/{record.key(service_name)}") is None, 5, what="no record stored")


def test_a_sample_already_in_the_record_is_not_added_again() -> None:
    """A write that got no answer but landed, sent again (etcd passes a request over to another member), must
    leave one sample. Red when merge appends it twice."""
    once = record.merge(None, _sample(5))
    assert record.samples(record.merge(once, _sample(5))) == [_sample(5)]
    assert record.samples(record.merge(once, _sample(6))) == [_sample(5), _sample(6)]


# --- etcd: the record beside etcd.prefix, written with a transaction comparing mod_revision -------------


def test_the_etcd_record_lives_beside_the_prefix_never_under_it() -> None:
    """Consumers take every key under <prefix>/<service>/ for an instance: the record must not be there.
    Red when the place is under the prefix, or loses the prefix's root."""
    from sidecar.registry.etcd import kv_place

    k = record.key("web")
    assert kv_place("services", k) == "consul-sidecar/horizon/web"
    assert kv_place("/services/", k) == "/consul-sidecar/horizon/web"
    assert kv_place("/srv/services", k) == "/srv/consul-sidecar/horizon/web"


def _etcd_record(url: str, prefix: str, name: str) -> list[dict[str, Any]]:
    from sidecar.registry.etcd import kv_place
    from testkit.etcd import etcdctl

    reply = etcdctl(url, "get", kv_place(prefix, record.key(name)))
    kvs = reply.get("kvs") or []
    return record.samples(base64.b64decode(kvs[0]["value"])) if kvs else []


def _etcd_config(url: str, prefix: str, name: str, i: int, port: int) -> dict[str, dict[str, Any]]:
    return {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": [url], "lease_ttl": "3s", "prefix": prefix},
        "service": {"name": name, "id": f"{name}-{i}", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "500ms"},
        "shutdown": {"propagation_delay": "1s", "deregister_timeout": "3s", "app_timeout": "5s"},
        "status": {"listen": ""},
    }


@pytest.mark.asyncio
async def test_etcd_concurrent_appends_lose_no_sample(etcd: Any, etcd_prefix: str, tmp_path: Path) -> None:
    """As for Consul: three adapters append 15 samples each at once to one record on a real etcd member.
    Expected: all 45 kept (etcdctl reads them back), some appends took more than one transaction. Red
    without the compare on mod_revision (each put overwrites the others' samples)."""
    from sidecar.config import load_config
    from sidecar.registry.etcd import EtcdRegistry

    name = "hzetcd"
    path = write_config(tmp_path / "c.toml", _etcd_config(etcd.endpoint, etcd_prefix, name, 1, 8080))
    adapters = [EtcdRegistry(load_config(path, {}), SystemClock()) for _ in range(3)]
    try:

        async def appender(i: int, adapter: EtcdRegistry) -> list[int]:
            key = record.key(name)
            return [await adapter.update_kv(key, _appends(_sample(100 * i + n, f"{name}-{i}"))) for n in range(15)]

        writes = await asyncio.gather(*(appender(i, a) for i, a in enumerate(adapters)))
    finally:
        for a in adapters:
            await a.close()
    kept = await asyncio.to_thread(_etcd_record, etcd.endpoint, etcd_prefix, name)
    assert sorted(s["horizon_ms"] for s in kept) == sorted(100 * i + n for i in range(3) for n in range(15))
    assert max(max(w) for w in writes) > 1, writes


def test_etcd_one_drain_writes_one_sample(etcd: Any, etcd_prefix: str, tmp_path: Path) -> None:
    """A real sidecar with registry.kind = "etcd" drains: ``horizon_saved`` once and etcdctl reads one sample
    with the drain's figures beside the prefix. Red when the etcd adapter keeps no record."""
    name = "hzetcd1"
    port = free_port()
    sc = Sidecar(tmp_path, _etcd_config(etcd.endpoint, etcd_prefix, name, 1, port), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    done, saved = _drained(sc)
    [only] = _etcd_record(etcd.endpoint, etcd_prefix, name)
    assert only["service_id"] == f"{name}-1" and only["horizon_ms"] == done["horizon_ms"], (only, done)
    assert saved["writes"] == 1 and saved["read_during_wait"] is True, saved
