"""Go-style durations ("500ms", "5s", "1m30s"), the way Consul and Nomad write them."""

from __future__ import annotations

import re

_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Return seconds for a Go duration string; raise ValueError with the reason.

    "0" alone is accepted, as in Go. Every other value needs a unit, so that a
    bare "5" (seconds? milliseconds?) is an error instead of a guess.
    """
    s = text.strip()
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("empty duration")
    if s.startswith("-"):
        raise ValueError(f"negative duration {text!r}")
    pos = 0
    total = 0.0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"{text!r} is not a duration like \"500ms\", \"5s\" or \"1m\"")
    return total


def format_duration(seconds: float) -> str:
    """Render seconds as the shortest Go duration Consul accepts ("1.5s", "250ms", "1m0s" avoided)."""
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    if seconds < 1:
        return f"{ms}ms"
    return f"{ms / 1000:g}s"
