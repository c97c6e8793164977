"""Go-style durations ("500ms", "5s", "1m30s"), the way Consul and Nomad write them."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")

# Go's time.Duration is an int64 of nanoseconds: Consul rejects anything longer
# (HTTP 400) when the registration arrives, long after check-config said yes.
# Rounded down to the millisecond, the precision format_duration writes.
MAX_SECONDS = 9223372036.854  # 2562047h47m16.854s
MAX_TEXT = "2562047h47m16s"


def parse_duration(text: str) -> float:
    """Return seconds for a Go duration string; raise ValueError with the reason.

    "0" alone is accepted, as in Go. Every other value needs a unit, so that a
    bare "5" (seconds? milliseconds?) is an error instead of a guess. Values
    past Go's maximum duration are refused, as Consul would refuse them.
    """
    s = text.strip()
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("empty duration")
    if s.startswith("-"):
        raise ValueError(f"negative duration {_short(text)}")
    pos = 0
    total = Decimal(0)
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        try:  # Decimal, not float: 400 digits must not become inf (or a traceback)
            total += Decimal(match.group(1)) * _UNITS[match.group(2)]
        except InvalidOperation:
            raise ValueError(
                f"{_short(text)} is longer than the longest duration Consul accepts ({MAX_TEXT})"
            ) from None
        pos = match.end()
        if total > Decimal(str(MAX_SECONDS)):
            raise ValueError(f"{_short(text)} is longer than the longest duration Consul accepts ({MAX_TEXT})")
    if pos != len(s) or pos == 0:
        raise ValueError(f'{_short(text)} is not a duration like "500ms", "5s" or "1m"')
    return float(total)


def _short(text: str) -> str:
    """The value for a message: a 400-digit duration is not repeated in full."""
    return repr(text) if len(text) <= 40 else repr(text[:20]) + f"... ({len(text)} characters)"


def format_duration(seconds: float) -> str:
    """Render seconds as the shortest Go duration Consul accepts ("1.5s", "250ms", "1m0s" avoided).

    Never an exponent: "9.22337e+09s" is not a Go duration.
    """
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    if seconds < 1:
        return f"{ms}ms"
    return f"{ms // 1000}.{ms % 1000:03d}".rstrip("0") + "s"
