"""Issue 20's proof with its tight figures: a consumer of known horizon H (2 s, then 4 s), one rolling update
after another behind it, under one open-loop load.

Per H, one Consul dev agent's service of two instances (the example app, each wrapped by the sidecar) and a
consumer that routes each request (100/s, a new connection each) by Consul's answer of H seconds ago
(examples/rollout/horizon_proof.py runs the phases; tests/test_horizon_proof.py holds the same claim with
loose bounds):

  record       10 drains, fixed delay H + 1.5 s; each appends its horizon to consul-sidecar/horizon/<name>.
               Per drain: horizon_ms of sidecar.drain.done; then p50, p99 and whether p99 lies in [H, H + 0.3 s].
  horizon      consul-sidecar horizon --service NAME --http-addr ... --json (this tree's CLI, a process):
               its p99 and its recommendation.
  recommended  5 drains with propagation_delay = "learned" (learned_max 30 s, far above the recommendation:
               the sidecar reads the record at each drain's start and waits p99 + margin): failed requests
               (target 0) and each drain's wait (elapsed_ms and bound_s of sidecar.drain.delay_done, the
               learned delay_s) against the recommendation. With --fixed, the recommendation as a fixed delay
               instead, after a bridge of 2 more drains like the record's (the next instances start two drains
               ahead of their own, so their fixed delay is known only then).
  control      3 drains, fixed delay H / 2: must lose requests.

Failures are counted per phase from the consumer's own records (a phase ends once the consumer no longer
routes to any drained instance).

Usage: python bench/horizon_proof.py [--horizons 2 4] [--fixed]     (~3.5 min for H = 2 and 4 s)
Everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.rollout.horizon_proof import KnownHorizonRollout, PhaseResult, ProofPlan  # noqa: E402
from sidecar.drain import record  # noqa: E402
from testkit import Consul, scratch_agent  # noqa: E402


def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f}"


def _log(quiet: bool) -> Callable[[str], None]:
    def log(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    return log


async def one_horizon(
    consul: Consul, work: Path, horizon: float, learned: bool, rate: float, log: Callable[[str], None]
) -> list[str]:
    name = f"proof{int(horizon * 10)}"
    plan = ProofPlan(consul, name, horizon, record_delay=horizon + 1.5, learned=learned, control_drains=3, log=log)
    async with KnownHorizonRollout(consul, work / name, name, horizon, rate=rate, log=log) as rollout:
        phases = await rollout.run(plan.phases)
    rec = plan.recommendation
    assert rec is not None
    by_name = {p.name: p for p in phases}
    horizons = by_name["record"].horizons_ms
    p50 = record.percentile([float(h) for h in horizons], 50)
    p99 = record.percentile([float(h) for h in horizons], 99)
    inside = horizon * 1000 <= p99 <= horizon * 1000 + 300
    out = [
        f"H = {horizon:g} s: record, {len(horizons)} drains, horizon_ms: {' '.join(str(h) for h in horizons)}",
        f"  p50 {_s(p50)} s, p99 {_s(p99)} s: in [H, H + 0.3 s] = [{horizon:g}, {horizon + 0.3:g}]: "
        f"{'yes' if inside else 'NO'}",
        f"  consul-sidecar horizon --json: count {rec['count']}, p99 {_s(rec['p99_ms'])} s, "
        f"recommended {_s(rec['recommended_ms'])} s (margin {_s(rec['margin_ms'])} s)",
        "",
        "  | phase | drains | delay | requests | failed | horizon (median) | waited, each drain | bound_s |",
        "  |---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        out.append("  " + _row(p))
    rd = by_name["recommended"]
    over = [round(d.bound_s * 1000) - rec["recommended_ms"] for d in rd.drains]
    late = [d.waited_ms - round(d.bound_s * 1000) for d in rd.drains]
    out.append(
        f"  recommended: {rd.load.failed} failed (target 0); each drain's bound_s - the recommendation "
        f"({rec['recommended_ms']} ms): {' '.join(f'{o:+d}' for o in over)} ms; elapsed_ms - bound_s: "
        f"{' '.join(f'{x:+d}' for x in late)} ms"
    )
    if learned:
        out.append(
            "  learned_delay per drain (delay_s, reason, samples): "
            + "; ".join(f"{e['delay_s']:g}s {e['reason']} {e['samples']}" for d in rd.drains if (e := d.learned))
        )
    out.append(f"  control: {by_name['control'].load.failed} failed (must be > 0)")
    return out


def _row(p: PhaseResult) -> str:
    delay = p.drains[0].shutdown["propagation_delay"] if p.drains else "-"
    h = p.horizons_ms
    waited = " ".join(_s(d.waited_ms) for d in p.drains)
    bounds = " ".join(f"{d.bound_s:g}" for d in p.drains)
    med = _s(statistics.median(h)) if h else "-"
    cells = [p.name, str(len(p.drains)), str(delay), str(p.load.requests), str(p.load.failed), med + " s"]
    cells += [waited, bounds]
    return "| " + " | ".join(cells) + " |"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--horizons", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--fixed", action="store_true", help="the recommendation as a fixed delay, not learned")
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--quiet", action="store_true", help="only the summary, not each drain")
    args = ap.parse_args()
    summary: list[str] = []
    with scratch_agent() as (work, consul):
        for horizon in args.horizons:
            summary += await one_horizon(consul, work, horizon, not args.fixed, args.rate, _log(args.quiet))
            summary.append("")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(asyncio.run(main()))
