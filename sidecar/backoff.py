"""Exponential backoff with full jitter, for retrying a request to the agent."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff(first: float = 1.0, cap: float = 30.0, rng: random.Random | None = None) -> Iterator[float]:
    """Yield delays: the n-th is uniform in [first, min(cap, first * 2**n)]: 1 s, then 1-2 s, 1-4 s ... 1-30 s.

    The jitter keeps fifty sidecars that lost the same agent from retrying in lockstep.
    """
    r = rng or random.Random()
    ceiling = first
    while True:
        yield r.uniform(first, ceiling)
        ceiling = min(cap, ceiling * 2)
