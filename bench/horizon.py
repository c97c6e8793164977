"""The horizon's cost: sidecar CPU during a fixed drain under load, with the view and without it.

Two instances; a consumer opens a new connection per request (``Connection: close``), 200 requests/s
in all, and keeps routing to the draining instance for the whole drain (its horizon, 60 s, is longer
than the wait), so the view sees about 100 new connections a second. Each run SIGTERMs the first
instance's sidecar and reads ``cpu_ms`` of its ``sidecar.drain.delay_done`` (the process CPU time
during the wait). Three variants, interleaved so all see the same machine noise:

  fixed, no view   the code before the horizon (``--base``, a commit: its sidecar/ is unpacked aside)
  fixed, view      this tree: the fixed strategy with the horizon's view
  traffic (base)   the code before: the traffic strategy over the same 5 s (the load never lets it go quiet)
  traffic          this tree: the traffic strategy and the horizon's view beside it

Target (issue 20): the fixed drain with the view costs no more than the traffic drain.

Usage: python bench/horizon.py [--runs 5] [--base 941e7c2] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trees import base_python  # noqa: E402

from examples.rollout.consumers import HorizonConsumer, end_drain  # noqa: E402
from testkit import APP, Consul, Sidecar, free_port, procs, scratch_agent, wait_for  # noqa: E402

DELAY = 5.0
VARIANTS: dict[str, dict[str, str]] = {
    "fixed, no view (base)": {"strategy": "fixed", "propagation_delay": f"{DELAY:g}s"},
    "fixed, view": {"strategy": "fixed", "propagation_delay": f"{DELAY:g}s"},
    "traffic (base)": {
        "strategy": "traffic",
        "propagation_delay": f"{DELAY:g}s",
        "min_delay": "1s",
        "quiet_period": "1s",
    },
    "traffic": {"strategy": "traffic", "propagation_delay": f"{DELAY:g}s", "min_delay": "1s", "quiet_period": "1s"},
}


async def one_drain(consul: Consul, work: Path, name: str, shutdown: dict[str, str], rate: float) -> dict[str, Any]:
    port = free_port()
    sidecars = []
    for i, addr in enumerate(("127.0.0.61", "127.0.0.62")):
        config: dict[str, dict[str, Any]] = {
            "consul": {"address": consul.address},
            "service": {"name": name, "id": f"{name}-{i}", "address": addr, "port": port},
            "shutdown": {"app_timeout": "10s", **shutdown},
            "status": {"listen": ""},
        }
        sidecars.append(Sidecar(work, config, [sys.executable, str(APP), "--host", addr, "--port", str(port)]))
    consumer = HorizonConsumer(consul.address, name, port, horizon=60.0, rate=rate)
    stop = asyncio.Event()
    load = None
    try:
        for sc in sidecars:
            sc.wait_event("sidecar.consul.registered")
        load = asyncio.create_task(consumer.run(stop))
        await asyncio.to_thread(wait_for, lambda: len(consumer.records) > rate, 30, what="one second of load")
        sidecars[0].send(signal.SIGTERM)
        done = await asyncio.to_thread(sidecars[0].wait_event, "sidecar.drain.delay_done", 60)
        await asyncio.to_thread(sidecars[0].wait, 60)
        horizon = sidecars[0].event("sidecar.drain.done")
    finally:
        await end_drain(stop, load, sidecars)
    return {"cpu_ms": done["cpu_ms"], "elapsed_ms": done["elapsed_ms"], "done": horizon}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base", default="941e7c2", help="the commit before the horizon")
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with scratch_agent() as (work, consul):
        base = base_python(args.base, work)
        own = procs.PY
        try:
            for run in range(args.runs):
                for variant, shutdown in VARIANTS.items():
                    procs.PY = base if variant.endswith("(base)") else own
                    d = work / f"{run}-{list(VARIANTS).index(variant)}"
                    d.mkdir()
                    r = await one_drain(consul, d, f"hb{run}{list(VARIANTS).index(variant)}", shutdown, args.rate)
                    if variant.endswith("(base)") and r["done"] is not None:
                        raise SystemExit("the base variant logged sidecar.drain.done: it is not the code before")
                    if not variant.endswith("(base)") and (r["done"] is None or "horizon_ms" not in r["done"]):
                        raise SystemExit(f"{variant}: no horizon measured ({r['done']})")
                    results[variant].append(r)
                    extra = f" new_connections={r['done']['new_connections']}" if r["done"] else ""
                    print(f"run {run} {variant}: cpu {r['cpu_ms']} ms over {r['elapsed_ms']} ms{extra}", flush=True)
        finally:
            procs.PY = own
    print(f"\nmedians over {args.runs} runs, {args.rate:g} requests/s (about half to the draining instance):")
    print("| variant | sidecar CPU during the 5 s wait | per second | new connections seen |")
    print("|---|---|---|---|")
    for variant, rs in results.items():
        cpu = statistics.median(r["cpu_ms"] for r in rs)
        seen = [r["done"]["new_connections"] for r in rs if r["done"]]
        shown = f"{statistics.median(seen):g}" if seen else "–"
        print(f"| {variant} | {cpu:.1f} ms | {cpu / DELAY:.1f} ms/s | {shown} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    asyncio.run(main())
