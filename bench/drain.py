"""Drain strategies compared: fixed 5 s (the common default) vs traffic (30 s upper bound).

Two consumers, K runs each, strategies interleaved so both see the same machine noise:

  nginx     the demo's surge rollout (3 instances, 300 requests/s, resolver valid=1s)
  horizon   a consumer that routes by the Consul answer of 5 s ago (100 requests/s, 2 instances)
  short     a client with a cached address: one short connection, closed by the client right after
            the response, every 0.33 s, for 5 s after the deregistration (1 instance)

Per strategy and consumer: failed requests (each run), drain time per instance (from confirmed
deregistration to the app's signal), rollout time (nginx), and the poll cost (sidecar CPU ms per
second of draining) and, for traffic, its lag: how long after the last activity's quiet_period the
drain ended (what the sidecar adds to what the evidence requires; from sidecar.drain.quiet's
elapsed_ms - last_activity_ms - quiet_period, for drains that saw traffic). Targets: 0 failures for
traffic in every run; traffic's drain no more than 1.1 x the consumer's real horizon + quiet_period
(horizon 5s, short); poll CPU <= 10 ms/s.

Usage: python bench/drain.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.rollout.consumers import horizon_drain  # noqa: E402
from examples.rollout.loadgen import summarize  # noqa: E402
from examples.rollout.rollout import Cluster, rollout  # noqa: E402
from testkit import Consul, kill_all_started  # noqa: E402

STRATEGIES: dict[str, dict[str, str]] = {
    "fixed 5s": {"strategy": "fixed", "propagation_delay": "5s"},
    "traffic": {"strategy": "traffic", "propagation_delay": "30s", "min_delay": "1s", "quiet_period": "1s"},
}


def lags(events: list[dict[str, Any]]) -> list[float]:
    """Seconds between last activity + quiet_period and the end of the quiet step, where traffic was seen."""
    return [
        (e["elapsed_ms"] - e["last_activity_ms"]) / 1000 - e["quiet_period_s"]
        for e in events
        if e.get("event") == "sidecar.drain.quiet"
        and e.get("last_activity", "start") != "start"
        and "last_activity_ms" in e
    ]


async def nginx_run(work: Path, shutdown: dict[str, str]) -> dict[str, Any]:
    cluster = Cluster(work, log=lambda _: None, shutdown=shutdown)
    try:
        cluster.start()
        r = await rollout(cluster, naive=False, replicas=3, rate=300.0, log=lambda _: None)
        events = [e for i in cluster.stopped for e in i.sidecar.events() if e["event"] == "sidecar.drain.delay_done"]
        lag = lags([e for i in cluster.stopped for e in i.sidecar.events()])
    finally:
        cluster.stop()
    return {
        "failed": summarize(r.records).failed,
        "drain_s": [e["elapsed_ms"] / 1000 for e in events],
        "cpu_per_s": [e["cpu_ms"] / max(0.001, e["elapsed_ms"] / 1000) for e in events if e.get("cpu_ms") is not None],
        "rollout_s": r.rollout_seconds,
        "lag_s": lag,
    }


async def horizon_run(work: Path, shutdown: dict[str, str]) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    consul = Consul(work)
    consul.start()
    try:
        _, failed, ev = await horizon_drain(consul, work / "h", shutdown)
        lag = lags([e for log in (work / "h").glob("sidecar-*.log") for e in _events(log)])
    finally:
        consul.stop()
    return {
        "failed": failed,
        "drain_s": [ev["elapsed_ms"] / 1000],
        "cpu_per_s": [ev["cpu_ms"] / max(0.001, ev["elapsed_ms"] / 1000)] if ev.get("cpu_ms") is not None else [],
        "rollout_s": None,
        "lag_s": lag,
    }


def _events(log: Path) -> list[dict[str, Any]]:
    import json

    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def short_run_sync(work: Path, shutdown: dict[str, str]) -> dict[str, Any]:
    import signal
    import threading
    import time

    from testkit import Sidecar, app_command, free_port
    from testkit.shortclient import AFTER, CachedClient

    work.mkdir(parents=True, exist_ok=True)
    consul = Consul(work)
    consul.start()
    try:
        port = free_port()
        cfg: dict[str, dict[str, Any]] = {
            "consul": {"address": consul.address},
            "service": {"name": "short", "id": "short-1", "address": "127.0.0.1", "port": port},
            "shutdown": {"app_timeout": "10s", **shutdown},
            "status": {"listen": ""},
        }
        sc = Sidecar(work, cfg, app_command(port))
        sc.wait_event("sidecar.consul.registered")
        client = CachedClient("127.0.0.1", port, "close")
        th = threading.Thread(target=client.run, daemon=True)
        th.start()
        time.sleep(1.0)
        sc.send(signal.SIGTERM)
        sc.wait_event("sidecar.consul.deregistered")
        time.sleep(AFTER)
        client.stop.set()
        th.join(10)
        sc.wait(60)
        ev = sc.event("sidecar.drain.delay_done") or {}
        lag = lags(sc.events())
    finally:
        consul.stop()
    return {
        "failed": len(client.failed),
        "drain_s": [ev["elapsed_ms"] / 1000],
        "cpu_per_s": [ev["cpu_ms"] / max(0.001, ev["elapsed_ms"] / 1000)] if ev.get("cpu_ms") is not None else [],
        "rollout_s": None,
        "lag_s": lag,
    }


async def short_run(work: Path, shutdown: dict[str, str]) -> dict[str, Any]:
    return await asyncio.to_thread(short_run_sync, work, shutdown)


async def main_async(runs: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    base = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i in range(runs):
        for consumer, fn in (("nginx", nginx_run), ("horizon 5s", horizon_run), ("short 3/s", short_run)):
            for name, shutdown in STRATEGIES.items():
                res = await fn(base / f"{i}-{consumer[:5]}-{name[:5]}", shutdown)
                out.setdefault((consumer, name), []).append(res)
                print(
                    f"run {i + 1}/{runs} {consumer:10} {name:8}: failed {res['failed']}, drain "
                    + ", ".join(f"{d:.2f}s" for d in res["drain_s"]),
                    file=sys.stderr,
                )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    try:
        results = asyncio.run(main_async(args.runs))
    finally:
        kill_all_started()
    print(f"\ndrain strategies, {args.runs} runs each (medians; failed requests listed per run)")
    print(
        f"{'consumer':11} {'strategy':9} {'failed per run':>18} {'drain s':>8} {'max drain':>9} "
        f"{'rollout s':>9} {'poll CPU ms/s':>13} {'lag ms':>7}"
    )
    ok = True
    for (consumer, name), rows in results.items():
        drains = [d for r in rows for d in r["drain_s"]]
        cpu = [c for r in rows for c in r["cpu_per_s"]]
        rollouts = [r["rollout_s"] for r in rows if r["rollout_s"] is not None]
        failed = [r["failed"] for r in rows]
        lag = [x for r in rows for x in r.get("lag_s", [])]
        print(
            f"{consumer:11} {name:9} {' '.join(str(f) for f in failed):>18} "
            f"{statistics.median(drains):8.2f} {max(drains):9.2f} "
            f"{(f'{statistics.median(rollouts):.1f}' if rollouts else '-'):>9} "
            f"{(f'{statistics.median(cpu):.1f}' if cpu else '-'):>13} "
            f"{(f'{statistics.median(lag) * 1000:.0f}' if lag else '-'):>7}"
        )
        if name == "traffic":
            ok &= all(f == 0 for f in failed)
            if not consumer.startswith("nginx"):
                ok &= max(drains) <= 1.1 * 5 + 1
            ok &= not cpu or statistics.median(cpu) <= 10
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
