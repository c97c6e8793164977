"""strategy = "traffic": the drain ends on evidence (catalog, DNS, a quiet port), bounded on both sides.

Real Consul, real app processes, real consumers (nginx, a consumer with a known 5 s horizon, a
pooled keep-alive consumer), real sockets. Each scenario also says what a fixed delay would do.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from examples.rollout.consumers import PooledConsumer, horizon_drain
from examples.rollout.loadgen import summarize
from examples.rollout.rollout import Cluster, rollout
from testkit import Consul, Sidecar, app_command, free_port, http_get, read_signal_log, spawn_unseen, wait_for
from testkit.suite import StartSidecar, base_config

TRAFFIC = {
    "strategy": "traffic",
    "propagation_delay": "30s",
    "min_delay": "1s",
    "quiet_period": "1s",
    "app_timeout": "10s",
}


def delay_done(sc: Sidecar) -> dict[str, Any]:
    ev = sc.wait_event("sidecar.drain.delay_done", timeout=40)
    return ev


def test_no_traffic_ends_after_max_of_min_delay_and_quiet_period(
    consul: Consul, start_sidecar: StartSidecar, service_name: str
) -> None:
    """Nobody sends traffic: the wait is max(min_delay 1 s, quiet_period 1.5 s), not the 30 s bound."""
    port = free_port()
    cfg = base_config(consul, service_name, port, shutdown={**TRAFFIC, "quiet_period": "1.5s"})
    sc = start_sidecar(cfg, app_command(port))
    sc.wait_event("sidecar.drain.traffic_view")
    sc.send(signal.SIGTERM)
    ev = delay_done(sc)
    assert ev["reason"] == "traffic quiet", ev
    assert 1500 <= ev["elapsed_ms"] < 1500 + 1000, ev
    assert sc.wait() == 0


async def _rollout_with(tmp_path: Path, shutdown: dict[str, str]) -> tuple[int, int, list[dict[str, Any]]]:
    cluster = Cluster(tmp_path, log=lambda _: None, shutdown=shutdown)
    try:
        cluster.start()
        result = await rollout(
            cluster, naive=False, replicas=2, rate=200.0, warmup=2.0, cooldown=1.0, log=lambda _: None
        )
        delays = [
            ev for inst in cluster.stopped for ev in inst.sidecar.events() if ev["event"] == "sidecar.drain.delay_done"
        ]
    finally:
        cluster.stop()
    s = summarize(result.records)
    return s.requests, s.failed, delays


@pytest.mark.integration
@pytest.mark.asyncio
async def test_behind_nginx_traffic_mode_is_fast_and_loses_nothing(tmp_path: Path) -> None:
    """Behind nginx (resolver valid=1s) under load: each old instance's wait ends no later than
    quiet_period + 2.5 s after deregistration, and no request fails."""
    requests, failed, delays = await _rollout_with(tmp_path, TRAFFIC)
    assert requests > 1000 and failed == 0, (requests, failed)
    assert len(delays) == 2
    for ev in delays:
        assert ev["reason"] == "traffic quiet", ev
        assert ev["elapsed_ms"] <= (1.0 + 2.5) * 1000, ev


@pytest.mark.asyncio
async def test_known_horizon_consumer_fixed_delay_loses_traffic_mode_does_not(consul: Consul, tmp_path: Path) -> None:
    """1. Control: fixed 3 s delay; the consumer still routes to the old instance for 5 s: failures.
    2. Traffic mode (30 s bound): no failure, and the wait is about horizon + quiet_period
       (between 5 s and 1.1 x 5 s + 1 s + polling slack), not the 30 s bound.
    """
    requests, failed, ev = await horizon_drain(consul, tmp_path / "fixed", {"propagation_delay": "3s"})
    assert requests > 500 and failed > 0, "the fixed-delay control lost no request: the harness cannot see failures"
    assert ev["reason"] == "fixed delay"

    requests, failed, ev = await horizon_drain(consul, tmp_path / "traffic", TRAFFIC)
    assert requests > 500 and failed == 0, (requests, failed, ev)
    assert ev["reason"] == "traffic quiet", ev
    assert 5000 - 300 <= ev["elapsed_ms"] <= (1.1 * 5 + 1.0) * 1000 + 500, ev


@pytest.mark.asyncio
async def test_pooled_consumer_open_connections_do_not_hold_the_drain(consul: Consul, tmp_path: Path) -> None:
    """A consumer keeps keep-alive connections to both instances and stops using one as soon as it
    leaves Consul, without closing the connection. Expected: the wait ends on quiet (with the
    connection still open), long before the 30 s bound, and no request fails."""
    port = free_port()
    sidecars = []
    for i, addr in enumerate(("127.0.0.31", "127.0.0.32")):
        cfg = base_config(consul, "pooled", port, service={"id": f"pooled-{i}", "address": addr}, shutdown=TRAFFIC)
        sidecars.append(Sidecar(tmp_path, cfg, app_command(port, addr)))
    for sc in sidecars:
        sc.wait_event("sidecar.drain.traffic_view")
    consumer = PooledConsumer(consul.address, "pooled", port, rate=100.0)
    stop = asyncio.Event()
    load = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(2.0)
    sidecars[0].send(signal.SIGTERM)
    await asyncio.to_thread(sidecars[0].wait, 40)
    stop.set()
    records = await load
    quiet = sidecars[0].event("sidecar.drain.quiet")
    done = sidecars[0].event("sidecar.drain.delay_done")
    assert quiet is not None and done is not None
    assert quiet["open_connections"] >= 1, quiet  # the pooled connection was still open
    assert done["reason"] == "traffic quiet" and done["elapsed_ms"] < 5000, done
    s = summarize(records)
    assert s.requests > 200 and s.failed == 0, (s.requests, s.failed, s.errors)
    sidecars[1].send(signal.SIGTERM)
    await asyncio.to_thread(sidecars[1].wait, 40)


class StickyDns(threading.Thread):
    """A caching resolver that keeps answering ``address`` for ``name`` until ``until`` (monotonic),
    then NXDOMAIN: a consumer-side cache with a known horizon."""

    def __init__(self, name: str, address: str) -> None:
        super().__init__(daemon=True)
        self.name, self.address = name, address
        self.until = float("inf")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                q, peer = self.sock.recvfrom(512)
            except OSError:
                continue
            qid, qend = q[:2], 12
            while q[qend] != 0:
                qend += 1 + q[qend]
            question = q[12 : qend + 5]
            if time.monotonic() < self.until:
                answer = b"\xc0\x0c" + bytes([0, 1, 0, 1, 0, 0, 0, 0, 0, 4]) + socket.inet_aton(self.address)
                self.sock.sendto(qid + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question + answer, peer)
            else:
                self.sock.sendto(qid + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + question, peer)


def test_dns_step_holds_the_quiet_window(consul: Consul, start_sidecar: StartSidecar, service_name: str) -> None:
    """A resolver keeps returning the address for 3 s after SIGTERM. Expected: the DNS step ends only
    then, and the quiet window (1 s) starts after it: about 4 s in all, with no traffic at all."""
    dns = StickyDns(f"{service_name}.service.consul", "127.0.0.1")
    dns.start()
    try:
        port = free_port()
        cfg = base_config(consul, service_name, port, shutdown={**TRAFFIC, "dns": [f"127.0.0.1:{dns.port}"]})
        sc = start_sidecar(cfg, app_command(port))
        sc.wait_event("sidecar.drain.traffic_view")
        url = sc.status_url()
        dns.until = time.monotonic() + 3.0
        sc.send(signal.SIGTERM)
        sc.wait_event("sidecar.consul.deregistered")
        time.sleep(1.0)
        progress = json.loads(http_get(url + "/status")[1])
        assert progress["state"] == "draining" and progress["drain"]["step"] == "dns", (
            progress
        )  # /status shows the step
        ev = delay_done(sc)
        clear = sc.event("sidecar.drain.dns_clear")
        assert clear is not None and clear["elapsed_ms"] >= 2500, clear
        assert ev["reason"] == "traffic quiet" and 3000 + 1000 - 300 <= ev["elapsed_ms"] <= 3000 + 1000 + 1500, ev
        assert sc.wait() == 0
    finally:
        dns.stop.set()
        dns.join(2)
        dns.sock.close()


def test_port_not_visible_falls_back_to_the_fixed_delay(consul: Consul, tmp_path: Path, service_name: str) -> None:
    """The app listens in another network namespace (unshare --net): the sidecar cannot see its port,
    says so once, and waits the full propagation_delay (2 s here), never less."""
    port = free_port()
    siglog = tmp_path / "signals.log"
    app = spawn_unseen(app_command(port, "127.0.0.1", "--signal-log", str(siglog)), tmp_path / "app.log")
    time.sleep(0.5)
    cfg = base_config(
        consul,
        service_name,
        port,
        app={"pid": app.pid},
        startup={"wait_healthy": False},
        shutdown={**TRAFFIC, "propagation_delay": "2s"},
    )
    sc = Sidecar(tmp_path, cfg, None)
    warn = sc.wait_event("sidecar.drain.traffic_unavailable")
    assert "no listening socket" in warn["reason"]
    sc.send(signal.SIGTERM)
    ev = delay_done(sc)
    assert ev["reason"] == "fixed delay (traffic view unavailable)"
    assert 2000 <= ev["elapsed_ms"] < 2000 + 500
    assert sc.wait(20) == 0
    wait_for(lambda: read_signal_log(siglog), 5, what="the app's signal")
