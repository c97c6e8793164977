"""The fleet's record of drain horizons: one JSON document per service in the registry's KV store.

Each drain that measured a horizon (drain/horizon.py) appends one sample to the record of its
service, ``consul-sidecar/horizon/<service.name>`` in Consul's KV store::

    {"version": 1, "samples": [{"time": 1765054800.1, "service_id": "web-1", "horizon_ms": 2012,
                                "new_connections": 203, "slowest_peers": [{"peer": ..., ...}]}, ...]}

oldest first, at most ``RECORD_LIMIT`` samples: the last 100 drains. The writer reads the document
and its ModifyIndex, merges its sample in (``merge``) and writes it back with check-and-set; a lost
check-and-set (another instance of a rollout wrote in between) reads again and merges again, so
concurrent drains lose no sample.

Nothing here talks to a registry or logs: pure logic, also used by ``consul-sidecar horizon``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KEY_PREFIX",
    "Learned",
    "MARGIN_MAX_MS",
    "MARGIN_MIN_MS",
    "MIN_SAMPLES",
    "RECORD_LIMIT",
    "RECOMMEND_MAX_MS",
    "Summary",
    "key",
    "learned_delay",
    "merge",
    "percentile",
    "samples",
    "summarise",
    "table",
]

KEY_PREFIX = "consul-sidecar/horizon/"
RECORD_LIMIT = 100  # samples kept per service: the last 100 drains
VERSION = 1

# The recommendation (``consul-sidecar horizon``): p99 of the horizons plus a margin, bounded.
MIN_SAMPLES = 10  # fewer: no p99 worth the name (with 10, p99 is the maximum)
MARGIN_FRACTION = 0.2  # of p99: a horizon grows with the consumers' own intervals (DNS TTLs, polls)
MARGIN_MIN_MS = 500  # the measurement's own error (events read up to 100 ms late) and a slow consumer's lag
MARGIN_MAX_MS = 5_000
RECOMMEND_MAX_MS = 120_000  # a drain longer than two minutes is a consumer that never lets go, not a delay to set


def key(service_name: str) -> str:
    """The record's key in Consul's KV store."""
    return KEY_PREFIX + service_name


def samples(document: bytes | str | None) -> list[dict[str, Any]]:
    """The samples of a stored document, oldest first; [] for none, or for a document that is not ours
    (it is then replaced by the next write rather than block every drain)."""
    if not document:
        return []
    try:
        parsed = json.loads(document)
    except ValueError:
        return []
    found = parsed.get("samples") if isinstance(parsed, dict) else None
    if not isinstance(found, list):
        return []
    return [s for s in found if isinstance(s, dict) and isinstance(s.get("horizon_ms"), int | float)]


def merge(document: bytes | str | None, sample: dict[str, Any], limit: int = RECORD_LIMIT) -> bytes:
    """The document with ``sample`` appended, keeping the last ``limit`` samples. A sample already there is
    not added again: a write that got no answer but landed, then sent again, leaves one."""
    found = samples(document)
    kept = (found if sample in found else [*found, sample])[-limit:]
    return json.dumps({"version": VERSION, "samples": kept}, separators=(",", ":")).encode()


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100) of sorted or unsorted ``values``: always one of
    them, never an interpolation between two (a horizon that no drain saw)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    """What the record says: the horizons' statistics, the slowest peers, the recommended delay
    (None with fewer than ``MIN_SAMPLES`` samples)."""

    count: int
    p50_ms: int | None
    p90_ms: int | None
    p99_ms: int | None
    max_ms: int | None
    slowest_peers: list[dict[str, Any]]
    recommended_ms: int | None
    margin_ms: int | None
    needed: int  # samples still needed for a recommendation (0: there is one)
    capped: bool  # the recommendation hit RECOMMEND_MAX_MS

    def as_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "slowest_peers": self.slowest_peers,
            "recommended_ms": self.recommended_ms,
            "margin_ms": self.margin_ms,
            "samples_needed": self.needed,
            "capped": self.capped,
        }


def margin(p99_ms: float) -> int:
    """The margin added to p99: a fifth of it, at least MARGIN_MIN_MS, at most MARGIN_MAX_MS."""
    return int(min(MARGIN_MAX_MS, max(MARGIN_MIN_MS, math.ceil(MARGIN_FRACTION * p99_ms))))


def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f} s"


def table(service: str, summary: Summary) -> str:
    """The summary for a terminal."""
    lines = [f"horizon of {service}: {summary.count} drain{'s' if summary.count != 1 else ''} recorded"]
    for label, ms in (
        ("p50", summary.p50_ms),
        ("p90", summary.p90_ms),
        ("p99", summary.p99_ms),
        ("max", summary.max_ms),
    ):
        lines.append(f"  {label:<18} {_s(ms):>10}")
    if summary.recommended_ms is None:
        lines.append(
            f"  {'recommended delay':<18} {'-':>10}  ({summary.needed} more samples needed, {MIN_SAMPLES} in all)"
        )
    else:
        why = f"p99 {_s(summary.p99_ms)} + margin {_s(summary.margin_ms)}"
        if summary.capped:
            why += f", capped at {_s(RECOMMEND_MAX_MS)}: a consumer that never lets go"
        lines.append(f"  {'recommended delay':<18} {_s(summary.recommended_ms):>10}  ({why})")
    if summary.slowest_peers:
        lines.append("slowest peers (their last new connection after a confirmed deregistration):")
        for p in summary.slowest_peers:
            lines.append(f"  {p['peer']:<40} {_s(p['last_ms']):>10}  {p.get('service_id') or ''}".rstrip())
    return "\n".join(lines)


def summarise(found: Sequence[dict[str, Any]], peers: int = 5, margin_ms: int | None = None) -> Summary:
    """The statistics of the samples' ``horizon_ms``, the slowest peers over all samples (each peer's
    latest ``last_ms``), and the recommendation: p99 plus ``margin_ms``, or plus ``margin(p99)``."""
    fixed_margin = margin_ms
    values = [float(s["horizon_ms"]) for s in found]
    slowest: dict[str, dict[str, Any]] = {}
    for s in found:
        for p in s.get("slowest_peers") or []:
            if not isinstance(p, dict) or not isinstance(p.get("last_ms"), int | float):
                continue
            name = str(p.get("peer"))
            seen = slowest.get(name)
            if seen is None or p["last_ms"] > seen["last_ms"]:
                slowest[name] = {"peer": name, "last_ms": int(p["last_ms"]), "service_id": s.get("service_id")}
    top = sorted(slowest.values(), key=lambda p: -p["last_ms"])[:peers]
    needed = max(0, MIN_SAMPLES - len(values))
    if not values:
        return Summary(0, None, None, None, None, top, None, None, needed, False)
    p99 = percentile(values, 99)
    recommended = None
    margin_ms = None
    capped = False
    if not needed:
        margin_ms = margin(p99) if fixed_margin is None else fixed_margin
        recommended = int(math.ceil(p99)) + margin_ms
        capped = recommended > RECOMMEND_MAX_MS
        recommended = min(recommended, RECOMMEND_MAX_MS)
    return Summary(
        count=len(values),
        p50_ms=int(percentile(values, 50)),
        p90_ms=int(percentile(values, 90)),
        p99_ms=int(p99),
        max_ms=int(max(values)),
        slowest_peers=top,
        recommended_ms=recommended,
        margin_ms=margin_ms,
        needed=needed,
        capped=capped,
    )


@dataclass(frozen=True)
class Learned:
    """The delay ``propagation_delay = "learned"`` waits, and why: the record's recommendation within
    [learned_min, learned_max], or learned_max when the record cannot recommend anything."""

    delay_s: float
    reason: str  # "record", "too_few_samples" or "record_unreadable"
    why: str  # the same, in words, with the figures
    count: int  # samples in the record (0 when unreadable)
    p99_ms: int | None
    margin_ms: int | None
    clamped: str | None  # "learned_min" or "learned_max" when the recommendation was outside them

    def as_json(self) -> dict[str, Any]:
        return {
            "delay_s": self.delay_s,
            "reason": self.reason,
            "why": self.why,
            "samples": self.count,
            "p99_ms": self.p99_ms,
            "margin_ms": self.margin_ms,
            "clamped": self.clamped,
        }


def learned_delay(
    found: Sequence[dict[str, Any]] | None,
    learned_min: float,
    learned_max: float,
    learned_margin: float | None = None,
    unreadable: str | None = None,
) -> Learned:
    """What a learned drain waits, given the record's samples (None: the record could not be read,
    ``unreadable`` says why). The recommendation is ``consul-sidecar horizon``'s (p99 plus the margin),
    with ``learned_margin`` (seconds) in place of the computed margin when set."""
    bounds = f"learned_min {learned_min:g}s .. learned_max {learned_max:g}s"
    if found is None:
        return Learned(
            learned_max,
            "record_unreadable",
            f"the record could not be read ({unreadable}): learned_max",
            0,
            None,
            None,
            None,
        )
    margin_ms = None if learned_margin is None else int(round(learned_margin * 1000))
    try:
        summary = summarise(found, peers=0, margin_ms=margin_ms)
    except (ValueError, OverflowError) as e:  # NaN or Infinity: json.loads takes them, no drain measures them
        return learned_delay(None, learned_min, learned_max, learned_margin, f"a horizon no drain measured: {e}")
    if summary.recommended_ms is None:
        return Learned(
            float(learned_max),
            "too_few_samples",
            f"{summary.count} of the {MIN_SAMPLES} drains a recommendation needs: learned_max",
            summary.count,
            summary.p99_ms,
            None,
            None,
        )
    wanted = summary.recommended_ms / 1000
    delay = min(learned_max, max(learned_min, wanted))
    clamped = "learned_max" if wanted > learned_max else "learned_min" if wanted < learned_min else None
    why = f"p99 {_s(summary.p99_ms)} + margin {_s(summary.margin_ms)} over {summary.count} drains"
    if summary.capped:
        why += f", capped at {_s(RECOMMEND_MAX_MS)}"
    if clamped is not None:
        why += f" = {wanted:g}s, outside {bounds}: {clamped}"
    return Learned(float(delay), "record", why, summary.count, summary.p99_ms, summary.margin_ms, clamped)
