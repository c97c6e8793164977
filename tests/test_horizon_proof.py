"""Issue 20's proof, end to end: the record of horizons learned over real drains recommends a delay that
loses nothing, and a delay shorter than the horizon, as the control, loses requests.

Real Consul, real sidecars and apps, real signals, a real consumer with a known horizon (it routes each
request, a new connection each, by Consul's answer of H seconds ago), the recommendation read by this tree's
``consul-sidecar horizon`` as a process. The tight figures (p99 within [H, H + 0.3 s], H = 2 and 4 s) are
bench/horizon_proof.py's; this test holds the claim for H = 2 s with bounds a loaded 2-core machine keeps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.rollout.horizon_proof import KnownHorizonRollout, ProofPlan
from sidecar.drain import record
from testkit import Consul

H = 2.0


@pytest.mark.asyncio
async def test_a_rollout_at_the_recommended_delay_loses_nothing_and_a_shorter_one_loses_requests(
    consul: Consul, tmp_path: Path, service_name: str
) -> None:
    """One load (100 requests/s, open loop) through four phases of a rolling update of two instances (start
    the new one, wait until Consul lists it passing, SIGTERM the oldest's sidecar):
    1. record: 10 drains with a fixed delay of H + 1 s; each appends its horizon to the record;
    2. ``consul-sidecar horizon --json`` reads the record: 10 samples, a recommendation;
    3. recommended: 3 drains with ``propagation_delay = "learned"`` (``learned_max`` 30 s, far above any
       recommendation here): each reads the record at its start;
    4. control: 2 drains with a fixed delay of H / 2.
    Expected: every drain measured its horizon; the record's p99 in [H - 0.1 s, H + 1.5 s] and the
    command's figures those of the drains; the record phase and the recommended phase lose 0 requests;
    the first learned drain waits exactly the command's recommendation (the same 10 samples, the same
    rule), each one at most the recommendation + 0.5 s (the phase's own drains join the record) and
    less than ``learned_max`` (the wait came from the record, not the bound); the control loses requests
    (the consumer keeps coming for H, the app is gone after H / 2).
    Red when the horizon is not measured or not recorded, when the learned delay does not come from the
    record or does not cover the horizon (the phase at H / 2 loses requests), or when the harness cannot see
    a loss (the control at 2 H loses none)."""
    plan = ProofPlan(
        consul, service_name, H, record_delay=H + 1.0, recommended_drains=3, control_drains=2, learned=True
    )
    async with KnownHorizonRollout(consul, tmp_path, service_name, H, rate=100.0) as rollout:
        phases = {p.name: p for p in await rollout.run(plan.phases)}
    recorded, recommended, control = phases["record"], phases["recommended"], phases["control"]
    drains = [d for p in phases.values() for d in p.drains]
    assert all(d.exit_code == 0 for d in drains), [(d.old, d.exit_code) for d in drains]

    assert len(recorded.horizons_ms) == 10, [d.done for d in recorded.drains]
    p99 = record.percentile([float(h) for h in recorded.horizons_ms], 99)
    assert H * 1000 - 100 <= p99 <= H * 1000 + 1500, recorded.horizons_ms
    rec = plan.recommendation
    assert rec is not None and rec["count"] == 10 and rec["p99_ms"] == p99, (rec, recorded.horizons_ms)
    assert rec["recommended_ms"] > p99, rec
    assert recorded.load.failed == 0, recorded.load.errors

    assert recommended.load.requests > 100 and recommended.load.failed == 0, (
        recommended.load.errors,
        rec,
        [(d.horizon_ms, d.waited_ms) for d in recommended.drains],
    )
    learned = [d.learned for d in recommended.drains]
    assert all(e is not None and e["reason"] == "record" for e in learned), learned
    first = learned[0]
    assert first is not None and first["samples"] == 10, first
    assert abs(first["delay_s"] * 1000 - rec["recommended_ms"]) <= 1, (first, rec)
    for d in recommended.drains:
        assert d.learned is not None and d.bound_s == d.learned["delay_s"], (d.delay_done, d.learned)
        assert d.bound_s * 1000 <= rec["recommended_ms"] + 500 and d.bound_s < plan.learned_max, (d.learned, rec)
        assert d.waited_ms <= rec["recommended_ms"] + 500 + 500, (d.delay_done, rec)  # + a loaded timer's lateness

    assert control.load.failed > 0, (control.load.requests, [d.horizon_ms for d in control.drains])
