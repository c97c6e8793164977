"""Compose rollout benchmark: scripts/compose-demo K times per mode, and where each step's time goes.

Per run and mode: failed requests (on '/' and '/alongside/'), the rollout's duration. Per step
(one replaced instance), medians over all runs: compose's own time to create the new container,
the time until it passes in Consul, and for the stop: the sidecar's deregistration (ms), the
propagation delay, the app's exit (ms) and what is left for docker (stop, wait, rm). Target:
0 failed requests in every sidecar run, failures in every naive run.

Usage: python bench/compose_rollout.py [--runs 3] [--rate 100] [--replicas 3]
It runs scripts/compose-demo, which stops everything it started (the daemon too) at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def med(values: list[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--replicas", type=int, default=3)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-compose-"))
    t = time.monotonic()
    proc = subprocess.run(
        [
            str(ROOT / "scripts" / "compose-demo"),
            "--runs",
            str(args.runs),
            "--rate",
            str(args.rate),
            "--replicas",
            str(args.replicas),
            "--json",
            str(out / "result.json"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=sys.stderr,
    )
    took = time.monotonic() - t
    if not (out / "result.json").exists():
        print(f"scripts/compose-demo exited {proc.returncode} without results", file=sys.stderr)
        return 1
    runs: list[dict[str, Any]] = json.loads((out / "result.json").read_text())["runs"]

    print(
        f"\ncompose rollout benchmark: {args.runs} runs per mode, {args.replicas} x web "
        "and the alongside pair v1 -> v2, "
        f"{args.rate:g} requests/s on each of / and /alongside/ through nginx (resolver valid=1s), "
        "propagation_delay 5s; "
        f"{took:.0f}s in all"
    )
    print(
        f"{'mode':8} {'run':>3} {'requests':>9} {'failed /':>9} {'failed /alongside/':>19} "
        f"{'rollout s':>10} {'up s':>6} {'down s':>7}"
    )
    for r in runs:
        t_ = r["targets"]
        print(
            f"{r['mode']:8} {r['run'] + 1:3d} {r['requests']:9d} "
            f"{t_['web']['failed']:9d} {t_['alongside']['failed']:19d} "
            f"{r['rollout_seconds']:10.1f} {r['phases'].get('up', float('nan')):6.1f} "
            f"{r['phases'].get('down', float('nan')):7.1f}"
        )
    print(
        "\nper step, medians (s unless ms): compose up = compose creating the new container(s); passing = until "
        "`wait --passing` returned; stop = stop sent -> container removed; docker = stop - (dereg + delay + app exit)"
    )
    print(
        f"{'mode':8} {'unit':14} {'steps':>5} {'compose up':>10} {'passing':>8} {'stop':>6} "
        f"{'dereg ms':>9} {'delay':>6} {'app exit ms':>11} {'docker':>7}"
    )
    for mode in ("sidecar", "naive"):
        for unit in ("web", "web-alongside"):
            steps = [s for r in runs if r["mode"] == mode for s in r["steps"] if s["unit"] == unit]
            if not steps:
                continue
            rest = [
                s["stop_total"]
                - ((s["deregister_ms"] or 0) / 1000 + (s["delay"] or 0) + (s["app_exit_ms"] or 0) / 1000)
                for s in steps
                if s["stop_total"] is not None
            ]
            print(
                f"{mode:8} {unit:14} {len(steps):5d} {med([s['compose_up'] for s in steps]):10.1f} "
                f"{med([s['until_passing'] for s in steps]):8.1f} {med([s['stop_total'] for s in steps]):6.1f} "
                f"{med([s['deregister_ms'] for s in steps]):9.1f} {med([s['delay'] for s in steps]):6.2f} "
                f"{med([s['app_exit_ms'] for s in steps]):11.1f} {med(rest):7.2f}"
            )
    sc = [r["failed"] for r in runs if r["mode"] == "sidecar"]
    nv = [r["failed"] for r in runs if r["mode"] == "naive"]
    ends = all(r["end_state_ok"] for r in runs if r["mode"] == "sidecar")
    ok = all(f == 0 for f in sc) and all(f > 0 for f in nv) and ends
    print(("target met" if ok else "TARGET MISSED") + f": sidecar failed {sc}, naive failed {nv}, end state ok: {ends}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
