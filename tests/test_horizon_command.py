"""``consul-sidecar horizon`` (issue 20): the fleet's record of drain horizons read back, its statistics and the
recommended delay. The statistics are pure logic (drain/record.py); the command runs as a real process
against the real agent, with samples the test writes through the HTTP API as any writer would.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sidecar.drain import record
from testkit import PY, ROOT, Consul, write_config


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
