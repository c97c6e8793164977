"""``consul-sidecar horizon`` (issue 20): the fleet's record of drain horizons read back, its statistics and the
recommended delay. The statistics are pure logic (drain/record.py); the command runs as a real process
against the real agent, with samples the test writes through the HTTP API as any writer would; with
``registry.kind = "etcd"``, against a real etcd member, with samples a real drain and the adapter's
update_kv wrote (or root's etcdctl, with auth on).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sidecar.drain import record
from testkit import PY, ROOT, Consul, Sidecar, app_command, free_port, write_config
from testkit.etcd import Etcd, etcdctl, etcdctl_binary


def _sample(ms: int, sid: str = "web-1", peers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"time": 1.0, "service_id": sid, "horizon_ms": ms, "new_connections": 3, "slowest_peers": peers or []}


def test_percentiles_are_nearest_rank_values_a_drain_saw() -> None:
    """1..100 ms: p50 50, p90 90, p99 99, max 100; a single value is every percentile. Red with an
    interpolating percentile (49.5, 89.1, ...) or an off-by-one rank."""
    s = record.summarise([_sample(ms) for ms in range(100, 0, -1)])  # unsorted on purpose
    assert (s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms) == (100, 50, 90, 99, 100)
    assert record.percentile([7.0], 50) == record.percentile([7.0], 99) == 7.0
    # With exactly MIN_SAMPLES, p99 is the maximum: the recommendation covers every drain seen.
    assert record.summarise([_sample(ms) for ms in range(1, 11)]).p99_ms == 10


@pytest.mark.parametrize(
    "p99, recommended, margin, capped",
    [
        (0, 500, 500, False),  # no consumer ever came late: still the measurement's own error
        (2000, 2500, 500, False),  # a fifth is 400: the floor wins
        (10_000, 12_000, 2000, False),  # a fifth
        (40_000, 45_000, 5000, False),  # the margin's ceiling
        (200_000, 120_000, 5000, True),  # the recommendation's ceiling, said
    ],
)
def test_the_recommendation_is_p99_plus_a_bounded_margin_itself_bounded(
    p99: int, recommended: int, margin: int, capped: bool
) -> None:
    """Ten samples whose largest is ``p99``. Red when the margin or either bound changes unannounced."""
    s = record.summarise([_sample(p99 if i == 9 else 0) for i in range(10)])
    assert (s.p99_ms, s.recommended_ms, s.margin_ms, s.capped, s.needed) == (p99, recommended, margin, capped, 0)


def test_too_few_samples_recommend_nothing_and_say_how_many_more() -> None:
    """Red when fewer than MIN_SAMPLES give a recommendation, or ``needed`` miscounts."""
    s = record.summarise([_sample(100)] * 3)
    assert s.recommended_ms is None and s.needed == record.MIN_SAMPLES - 3 == 7
    empty = record.summarise([])
    assert empty.count == 0 and empty.p99_ms is None and empty.needed == record.MIN_SAMPLES


def test_the_slowest_peers_are_each_peers_latest_over_all_drains() -> None:
    """One peer in two drains counts once, with its latest connection (from the older drain here) and the
    instance that saw it. Red when peers repeat, a later drain's earlier figure replaces it, or the order is
    not latest first."""
    found = [
        _sample(1500, "web-2", [{"peer": "10.0.0.7", "last_ms": 1500}]),
        _sample(900, "web-1", [{"peer": "10.0.0.7", "last_ms": 900}, {"peer": "10.0.0.9", "last_ms": 100}]),
        _sample(50, "web-3", [{"peer": "10.0.0.8", "last_ms": 50}]),
    ]
    assert record.summarise(found).slowest_peers == [
        {"peer": "10.0.0.7", "last_ms": 1500, "service_id": "web-2"},
        {"peer": "10.0.0.9", "last_ms": 100, "service_id": "web-1"},
        {"peer": "10.0.0.8", "last_ms": 50, "service_id": "web-3"},
    ]


def _put_record(consul: Consul, name: str, samples: list[dict[str, Any]]) -> None:
    body = json.dumps({"version": 1, "samples": samples}).encode()
    req = urllib.request.Request(f"{consul.address}/v1/kv/{record.key(name)}", data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read()) is True


def _horizon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "sidecar", "horizon", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def test_the_command_reads_the_record_from_the_agent(consul: Consul, service_name: str, tmp_path: Path) -> None:
    """Twelve samples written through the HTTP API (horizons 100..1200 ms, the slowest peer in the last).
    Expected: ``--json`` exits 0 with count 12, p50 600, p90 1100, p99 and max 1200, the recommendation
    1700 (p99 + the 500 ms floor) and the slowest peer; the table (no --json) says the same for a
    person; ``-c FILE`` finds the service by its service.name. Red when the command reads another key,
    miscounts, or its table and JSON disagree."""
    samples = [
        _sample(100 * i, f"{service_name}-{i % 3}", [{"peer": f"10.1.0.{i}", "last_ms": 100 * i}]) for i in range(1, 13)
    ]
    _put_record(consul, service_name, samples)
    done = _horizon("--service", service_name, "--http-addr", consul.address, "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["key"] == f"consul-sidecar/horizon/{service_name}" and got["count"] == 12, got
    assert (got["p50_ms"], got["p90_ms"], got["p99_ms"], got["max_ms"]) == (600, 1100, 1200, 1200), got
    assert (got["recommended_ms"], got["margin_ms"], got["samples_needed"]) == (1700, 500, 0), got
    assert got["slowest_peers"][0] == {"peer": "10.1.0.12", "last_ms": 1200, "service_id": f"{service_name}-0"}

    cfg = write_config(
        tmp_path / "c.toml",
        {"consul": {"address": consul.address}, "service": {"name": service_name, "address": "127.0.0.1", "port": 1}},
    )
    table = _horizon("-c", str(cfg))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"horizon of {service_name}: 12 drains recorded", table.stdout
    assert any(line.split()[:2] == ["p99", "1.20"] for line in lines), table.stdout
    assert any("recommended delay" in line and "1.70 s" in line and "margin 0.50 s" in line for line in lines)
    assert any(line.split()[:3] == ["10.1.0.12", "1.20", "s"] for line in lines), table.stdout


def test_too_few_samples_exit_1_saying_how_many_are_needed(consul: Consul, service_name: str) -> None:
    """Three samples: exit 1, the figures still printed, no recommendation, and one line saying 10 are needed
    (7 more). No record at all: exit 1, count 0. Red when a recommendation is made from 3, or the exit is 0."""
    _put_record(consul, service_name, [_sample(300), _sample(400), _sample(500)])
    done = _horizon("--service", service_name, "--http-addr", consul.address, "--json")
    assert done.returncode == 1, done.stderr
    got = json.loads(done.stdout)
    assert got["count"] == 3 and got["max_ms"] == 500 and got["recommended_ms"] is None, got
    assert "needs 10 (7 more drains" in done.stderr and "Traceback" not in done.stderr, done.stderr
    none = _horizon("--service", f"{service_name}x", "--http-addr", consul.address)
    assert none.returncode == 1 and "0 samples" in none.stderr and "needs 10" in none.stderr, none.stderr


@pytest.mark.integration
def test_service_alone_reads_consul_and_says_where_an_etcd_record_is_read(tmp_path: Path) -> None:
    """``--service NAME`` without ``-c`` against no agent: exit 69, one line that also says an etcd record needs
    ``-c FILE`` (the operator of an etcd fleet who typed --service alone). Red when the hint is missing or the
    exit is not 69."""
    done = _horizon("--service", "web", "--http-addr", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 69, done.stderr
    [line] = done.stderr.splitlines()
    assert "needs -c FILE" in line and 'registry.kind = "etcd"' in line, line


# --- etcd: the record beside etcd.prefix ------------------------------------------------------------------


def _etcd_config(endpoints: list[str], prefix: str, name: str, port: int = 1, **etcd: str) -> dict[str, dict[str, Any]]:
    return {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": endpoints, "prefix": prefix, "lease_ttl": "3s", "timeout": "2s", **etcd},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "500ms"},
        "shutdown": {"propagation_delay": "1s", "deregister_timeout": "3s", "app_timeout": "5s"},
        "status": {"listen": ""},
    }


_files = itertools.count()


def _etcd_file(tmp_path: Path, endpoints: list[str], prefix: str, name: str, **etcd: str) -> Path:
    return write_config(tmp_path / f"etcd-{next(_files)}.toml", _etcd_config(endpoints, prefix, name, 1, **etcd))


@contextlib.contextmanager
def _answering(body: bytes) -> Iterator[str]:
    """An HTTP server on loopback that answers every POST with 200 and ``body``: a proxy, or another service
    on the port. Yields its URL; stopped on leaving."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _merged(sample: dict[str, Any], document: bytes | None) -> bytes:
    return record.merge(document, sample)


def _append_with_the_adapter(path: Path, name: str, found: list[dict[str, Any]]) -> None:
    """Each sample appended as a drain appends it: EtcdRegistry.update_kv with record.merge."""
    from sidecar.clock import SystemClock
    from sidecar.config import load_config
    from sidecar.registry.etcd import EtcdRegistry

    async def append() -> None:
        adapter = EtcdRegistry(load_config(path, {}), SystemClock())
        try:
            for s in found:
                await adapter.update_kv(record.key(name), functools.partial(_merged, s))
        finally:
            await adapter.close()

    asyncio.run(append())


def test_the_command_reads_the_etcd_record_a_drain_and_the_adapter_wrote(
    etcd: Etcd, etcd_prefix: str, tmp_path: Path
) -> None:
    """1. A real sidecar with registry.kind = "etcd" drains (SIGTERM): its sample is in the record beside the
    prefix. ``horizon -c FILE --json``: exit 1, count 1, "9 more drains". 2. The adapter's update_kv appends
    eleven more (100..1100 ms, the slowest peer in the last). ``--json``: exit 0, count 12, the key beside the
    prefix (as etcdctl reads it), p99 and the recommendation as record.summarise computes them from the
    drain's own horizon and the eleven; the table says the same. Red when the command reads Consul, another
    key (under the prefix, or the record's Consul key), or miscounts."""
    from sidecar.registry.etcd_blocking import kv_place

    name = "hzcli"
    path = _etcd_file(tmp_path, [etcd.endpoint], etcd_prefix, name)
    port = free_port()
    sc = Sidecar(tmp_path, _etcd_config([etcd.endpoint], etcd_prefix, name, port), app_command(port))
    sc.wait_event("sidecar.consul.registered")
    sc.send(signal.SIGTERM)
    drained = sc.wait_event("sidecar.drain.done", timeout=60)
    assert sc.wait(60) == 0, sc.tail()
    assert sc.event("sidecar.drain.horizon_saved") is not None, sc.tail()

    place = kv_place(etcd_prefix, record.key(name))
    assert not place.startswith(etcd_prefix) and etcdctl(etcd.endpoint, "get", place).get("kvs"), place
    one = _horizon("-c", str(path), "--json")
    assert one.returncode == 1, one.stderr
    assert json.loads(one.stdout)["count"] == 1 and "(9 more drains" in one.stderr, one

    more = [_sample(100 * i, f"{name}-2", [{"peer": f"10.2.0.{i}", "last_ms": 100 * i}]) for i in range(1, 12)]
    _append_with_the_adapter(path, name, more)
    done = _horizon("-c", str(path), "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    values = [float(drained["horizon_ms"])] + [100.0 * i for i in range(1, 12)]
    want = record.summarise([_sample(int(v)) for v in values])
    assert (got["service"], got["key"], got["count"]) == (name, place, 12), got
    assert (got["p50_ms"], got["p99_ms"], got["max_ms"]) == (want.p50_ms, want.p99_ms, want.max_ms), (got, values)
    assert got["recommended_ms"] == want.recommended_ms and got["samples_needed"] == 0, got
    assert got["slowest_peers"][0]["peer"] == "10.2.0.11", got

    table = _horizon("-c", str(path))
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == f"horizon of {name}: 12 drains recorded", table.stdout
    assert want.recommended_ms is not None and f"{want.recommended_ms / 1000:.2f} s" in table.stdout, table.stdout


def test_too_few_etcd_samples_exit_1_saying_how_many_are_needed(etcd: Etcd, etcd_prefix: str, tmp_path: Path) -> None:
    """Three samples appended by the adapter: exit 1, the figures printed, no recommendation, one line saying 10
    are needed (7 more) and naming the key beside the prefix. No record at all: exit 1, 0 samples. Red when
    a recommendation is made from 3, or the exit is 0."""
    from sidecar.registry.etcd_blocking import kv_place

    path = _etcd_file(tmp_path, [etcd.endpoint], etcd_prefix, "hzfew")
    _append_with_the_adapter(path, "hzfew", [_sample(300), _sample(400), _sample(500)])
    done = _horizon("-c", str(path), "--json")
    assert done.returncode == 1, done.stderr
    got = json.loads(done.stdout)
    assert got["count"] == 3 and got["max_ms"] == 500 and got["recommended_ms"] is None, got
    [line] = done.stderr.splitlines()
    assert "needs 10 (7 more drains" in line and repr(kv_place(etcd_prefix, record.key("hzfew"))) in line, line
    none = _horizon("-c", str(path), "--service", "hzfew-none")
    assert none.returncode == 1 and "0 samples of 'hzfew-none'" in none.stderr, none.stderr


@pytest.mark.integration
def test_unreachable_or_impostor_etcd_exits_69_in_one_line(tmp_path: Path) -> None:
    """Two endpoints where nothing listens: exit 69, one line naming both, no traceback. An endpoint that
    answers 200 ``{}`` to everything (no etcd response header): 69 too, "not etcd's JSON gateway", never
    read as "no record" (which would exit 1 with 0 samples). ``--http-addr`` with an etcd file: exit 2.
    Red when the reader takes any JSON for etcd's, or an unreachable etcd ends otherwise."""
    ends = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    done = _horizon("-c", str(_etcd_file(tmp_path, ends, "services", "web")))
    assert done.returncode == 69, (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()
    assert "no etcd member reachable" in line and ends[0] in line and ends[1] in line, line

    with _answering(b"{}") as url:
        done = _horizon("-c", str(_etcd_file(tmp_path, [url], "services", "web")), "--json")
    assert done.returncode == 69 and done.stdout == "", (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()
    assert "not etcd's JSON gateway (no response header)" in line, line

    flag = _horizon("-c", str(_etcd_file(tmp_path, ends, "services", "web")), "--http-addr", ends[0])
    assert flag.returncode == 2 and "--http-addr is the Consul agent's" in flag.stderr, flag.stderr


def test_with_etcd_auth_a_user_without_read_exits_77_naming_the_key(fresh_etcd: Etcd, tmp_path: Path) -> None:
    """etcd with auth on (users made by the real etcdctl as root); root puts a record of 12 samples at the
    place beside prefix /srv/services. User ``reader`` (a role with read on /srv/consul-sidecar/horizon/):
    exit 0, count 12. User ``svc`` (readwrite on /srv/services/ only): exit 77, one line naming the key and
    that a role of 'svc' needs read on it. A wrong password: 77, "etcd refused etcd.user". No password appears
    in any output. Red when the command sent no token, mapped a refusal to another exit, or printed a password."""
    from sidecar.registry.etcd_blocking import kv_place

    url = fresh_etcd.endpoint
    place = kv_place("/srv/services", record.key("authhz"))
    passwords = {"reader": "rd-" + os.urandom(6).hex(), "svc": "sv-" + os.urandom(6).hex()}
    for args in (
        ("user", "add", "root:root-pw-hz"),
        ("user", "grant-role", "root", "root"),
        ("role", "add", "hzread"),
        ("role", "grant-permission", "hzread", "--prefix=true", "read", "/srv/consul-sidecar/horizon/"),
        ("user", "add", f"reader:{passwords['reader']}"),
        ("user", "grant-role", "reader", "hzread"),
        ("role", "add", "svc"),
        ("role", "grant-permission", "svc", "--prefix=true", "readwrite", "/srv/services/"),
        ("user", "add", f"svc:{passwords['svc']}"),
        ("user", "grant-role", "svc", "svc"),
    ):
        etcdctl(url, *args)
    document = json.dumps({"version": 1, "samples": [_sample(100 * i) for i in range(1, 13)]})
    etcdctl(url, "put", place, document)
    enabled = subprocess.run(
        [etcdctl_binary(), f"--endpoints={url}", "auth", "enable"],
        capture_output=True,
        text=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=30,
        check=False,
    )
    assert enabled.returncode == 0, enabled.stderr

    def run(user: str, password: str) -> subprocess.CompletedProcess[str]:
        pw = tmp_path / f"{user}.pw"
        pw.write_text(password + "\n")
        path = _etcd_file(tmp_path, [url], "/srv/services", "authhz", user=user, password_file=str(pw))
        done = _horizon("-c", str(path), "--json")
        for secret in passwords.values():
            assert secret not in done.stdout + done.stderr, done
        return done

    ok = run("reader", passwords["reader"])
    assert ok.returncode == 0 and json.loads(ok.stdout)["count"] == 12, ok.stderr

    denied = run("svc", passwords["svc"])
    assert denied.returncode == 77, denied.stderr
    [line] = denied.stderr.splitlines()
    assert f"reading the record needs read on {place!r}" in line and "etcd.user 'svc'" in line, line

    wrong = run("reader", passwords["svc"])
    assert wrong.returncode == 77, wrong.stderr
    [line] = wrong.stderr.splitlines()
    assert "etcd refused etcd.user 'reader'" in line, line
