"""The horizon behind nginx following Consul DNS: what the sidecar measures against what nginx's resolver allows.

The demo's stack (examples/rollout/nginx_horizon.py): nginx with ``resolver ... valid=Ns`` in front of two
instances under sidecars (fixed strategy, delay valid + 2.5 s), open-loop load through nginx (a new upstream
connection per request), nginx's look-ups relayed and written down (testkit/dns_relay.py). Each drain
SIGTERMs the first instance at a random phase of nginx's cache period (uniform in [0, valid) after one of
its look-ups) and compares:

  measured    ``horizon_ms`` of the sidecar's ``sidecar.drain.done``
  expected    from the confirmed deregistration to nginx's look-up that dropped the instance (the relay)
  validity    the same predicted from nginx's validity alone: the answer before the drain, kept until the
              whole second after ``valid`` (nginx counts in whole seconds), minus the confirmation

Usage: python bench/horizon_nginx.py [--drains 5] [--valid 2 4] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.rollout.loadgen import summarize  # noqa: E402
from examples.rollout.nginx_horizon import NginxDrain, drain_behind_nginx  # noqa: E402
from testkit import scratch_agent  # noqa: E402


def _row(label: str, values: list[float]) -> str:
    return f"| {label} | {statistics.median(values):.0f} ms | {min(values):.0f} ms | {max(values):.0f} ms |"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drains", type=int, default=5, help="drains per validity")
    ap.add_argument("--valid", type=int, nargs="+", default=[2, 4], help="nginx's resolver validities, seconds")
    ap.add_argument("--rate", type=float, default=100.0, help="requests/s through nginx")
    args = ap.parse_args()
    rng = random.SystemRandom()
    results: dict[int, list[NginxDrain]] = {v: [] for v in args.valid}
    with scratch_agent() as (work, consul):
        for run in range(args.drains):
            for valid in args.valid:  # interleaved: both see the same machine noise
                d = work / f"{valid}-{run}"
                d.mkdir()
                phase = rng.uniform(0, valid)
                r = await drain_behind_nginx(consul, d, f"hn{valid}r{run}", valid, valid + 2.5, args.rate, phase)
                failed = summarize(r.records).failed
                results[valid].append(r)
                print(
                    f"valid={valid}s drain {run}: phase {phase:.2f} s, measured {r.horizon_ms} ms,"
                    f" expected {r.expected_ms:.0f} ms, validity {r.predicted_ms:.0f} ms,"
                    f" nginx kept the answer {r.cache_ms:.0f} ms, failed requests {failed}",
                    flush=True,
                )
    for valid, rs in results.items():
        print(f"\nvalid={valid}s, {len(rs)} drains, {args.rate:g} requests/s through nginx:")
        print("| | median | min | max |")
        print("|---|---|---|---|")
        print(_row("measured horizon", [r.horizon_ms for r in rs]))
        print(_row("expected (nginx's look-up)", [r.expected_ms for r in rs]))
        print(_row("measured - expected", [r.horizon_ms - r.expected_ms for r in rs]))
        print(_row("measured - validity's prediction", [r.horizon_ms - r.predicted_ms for r in rs]))
        print(_row("nginx kept the answer", [r.cache_ms for r in rs]))
        print(f"failed requests: {sum(summarize(r.records).failed for r in rs)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    asyncio.run(main())
