"""The one scrubber of secrets (the ACL token) for every text the sidecar shows: log lines, error
messages, ``/status``, ``maint``'s stderr.

Standard library only: ``wait`` and ``maint`` use it without importing structlog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

REDACTED = "<redacted>"


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each (non-empty) secret replaced by ``REDACTED``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def read_secrets(source: Callable[[], Iterable[str | None]]) -> list[str]:
    """The secrets ``source`` gives now; none when it fails (an unreadable token file must not stop
    anything from being shown: what was read before is scrubbed where it was used)."""
    try:
        return [s for s in source() if s]
    except Exception:  # noqa: BLE001 - a secrets source that fails hides nothing, breaks nothing
        return []
