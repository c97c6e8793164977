"""Structured logs: JSON lines for machines, readable lines on a terminal.

Every lifecycle step logs one event with a stable dotted name
(``sidecar.consul.deregistered``), the service ID and ``elapsed_ms``. A last
processor removes the ACL token from anything about to be written, as a
safety net behind the rule that no code path logs it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "<redacted>"


def _scrubber(secrets: Callable[[], Iterable[str]]) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    def scrub(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        try:
            found = [s for s in secrets() if s]
        except Exception:  # noqa: BLE001 - an unreadable token file must not stop logging
            found = []
        if found:
            for key, value in list(event.items()):
                text = value if isinstance(value, str) else None
                if text is not None:
                    for s in found:
                        text = text.replace(s, REDACTED)
                    event[key] = text
        return event

    return scrub


class _SafePrintLogger(structlog.PrintLogger):
    """A log line that cannot be written (stderr closed, a broken pipe) is dropped, never raised:
    the drain must go on whatever happens to the log's reader."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _SafeLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> _SafePrintLogger:
        return _SafePrintLogger(self._stream)


def _drop_none(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Fields that do not apply to this event (None) are left out of the line."""
    for key in [k for k, v in event.items() if v is None]:
        del event[key]
    return event


def configure(
    stream: TextIO = sys.stderr,
    fmt: str = "auto",
    level: str = "info",
    secrets: Callable[[], Iterable[str]] = lambda: (),
) -> None:
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _drop_none,
            _scrubber(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=_SafeLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger(**bound)
