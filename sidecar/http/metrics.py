"""``GET /metrics``: what the lifecycle recorded in its ``Status``, in Prometheus' text format 0.0.4.

Written by hand rather than with prometheus-client: the sidecar exports a dozen series whose values
already live in ``Status``, and the library would add its import (and a registry of its own) to every
sidecar's start and memory for what is a few lines of text (docs/benchmarks.md has the figures).
Rendering happens on each scrape, from the values as they are; nothing here keeps state.

The names and labels are a contract (issue 12): dashboards and alerts match on them.

With ``registry.kind = "etcd"`` (``etcd``: the adapter's ``status_view``) the families that speak of
Consul alone are absent rather than 0 (``consul_reachable``, ``consul_request_errors_total``,
``maintenance``); ``etcd_reachable``, ``etcd_keepalive_failures_total`` and ``etcd_key_withheld``
stand in their place. A Consul sidecar's exposition is as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from ..state import Status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")


def render(
    status: Status,
    request_errors: Mapping[str, int] | None = None,
    log_lines_dropped: int = 0,
    drain_end_reasons: Iterable[str] = (),
    etcd: Mapping[str, Any] | None = None,
) -> bytes:
    """The exposition of ``status`` (and the counters kept outside it): bytes of ``CONTENT_TYPE``."""
    from ..state import State

    w = _Writer()
    p = "consul_sidecar_"
    w.family(p + "build_info", "gauge", "The sidecar's version; always 1.", [({"version": __version__}, 1)])
    w.family(
        p + "state",
        "gauge",
        "The sidecar's lifecycle state: 1 for the current one, 0 for the others.",
        [({"state": s.value}, 1 if s is status.state else 0) for s in State],
    )
    if etcd is None:
        w.family(
            p + "consul_reachable",
            "gauge",
            "1 when the sidecar's last registration or registration check reached the Consul agent, "
            "0 otherwise or before the first.",
            [({}, 1 if status.consul_reachable else 0)],
        )
    else:
        w.family(
            p + "etcd_reachable",
            "gauge",
            "1 when the sidecar's last registration or registration check reached etcd, "
            "0 otherwise or before the first.",
            [({}, 1 if status.consul_reachable else 0)],
        )
    w.family(
        p + "registrations_total",
        "counter",
        "Registration writes the agent accepted, re-registrations included."
        if etcd is None
        else "Registrations etcd accepted (the key put on its lease), re-registrations included.",
        [({}, status.registrations_total)],
    )
    w.family(
        p + "reregistrations_total",
        "counter",
        "Re-registrations by the keeper: the agent had forgotten the service (service_missing), "
        "or the ACL token changed (token_rotated)."
        if etcd is None
        else "Re-registrations by the keeper: etcd no longer held the key (service_missing); token_rotated "
        "is Consul's and stays 0.",
        [({"reason": r}, n) for r, n in status.reregistrations_total.items()],
    )
    if etcd is None:
        w.family(
            p + "consul_request_errors_total",
            "counter",
            "Requests to the Consul agent that failed (no answer, a timeout, an error status), by operation.",
            [({"operation": op}, n) for op, n in (request_errors or {}).items()],
        )
    else:
        w.family(
            p + "etcd_keepalive_failures_total",
            "counter",
            "Lease keepalives that failed (no answer, an error, the lease found gone and granted again).",
            [({}, int(etcd.get("keepalive_failures") or 0))],
        )
        w.family(
            p + "etcd_failovers_total",
            "counter",
            "Requests passed on to the next etcd member (no answer, a dropped connection, no leader).",
            [({}, int(etcd.get("failovers") or 0))],
        )
        w.family(
            p + "etcd_key_withheld",
            "gauge",
            "1 while the app's check fails and the key is deleted until it passes again.",
            [({}, 1 if etcd.get("key_withheld") else 0)],
        )
    w.family(
        p + "deregistration_seconds",
        "gauge",
        "How long the last confirmed deregistration took (absent before the first).",
        [] if status.deregistration_seconds is None else [({}, round(status.deregistration_seconds, 6))],
    )
    w.family(
        p + "drain_seconds",
        "gauge",
        "How long the last drain waited between the confirmed deregistration and the app's signal "
        "(absent before the first).",
        [] if status.drain_seconds is None else [({}, round(status.drain_seconds, 6))],
    )
    reasons = list(drain_end_reasons)
    if status.drain_end is not None and status.drain_end not in reasons:
        reasons.append(status.drain_end)
    w.family(
        p + "drain_end",
        "gauge",
        "Why the last drain's wait ended: 1 for its reason, 0 for the others (all 0 before the first drain).",
        [({"reason": r}, 1 if r == status.drain_end else 0) for r in reasons],
    )
    w.family(
        p + "drain_horizon_seconds",
        "gauge",
        "The last measured drain's horizon: from the confirmed deregistration to the last new connection "
        "on the app's port (0 without one; absent before the first).",
        [] if status.drain_horizon_seconds is None else [({}, round(status.drain_horizon_seconds, 3))],
    )
    w.family(
        p + "drain_new_connections_total",
        "counter",
        "New connections on the app's port between a confirmed deregistration and the app's signal.",
        [({}, status.drain_new_connections_total)],
    )
    w.family(p + "app_restarts_total", "counter", "Hot restarts of the app.", [({}, status.hot_restarts_total)])
    w.family(
        p + "app_restart_failures_total",
        "counter",
        "Hot restarts that failed: the new generation was stopped, the previous one serves on.",
        [({}, status.hot_restart_failures_total)],
    )
    w.family(
        p + "log_lines_dropped_total",
        "counter",
        "Log lines dropped because the log's reader did not keep up.",
        [({}, log_lines_dropped)],
    )
    if etcd is None:
        w.family(
            p + "maintenance",
            "gauge",
            "1 when the instance is in Consul's maintenance mode.",
            [({}, 1 if status.maintenance else 0)],
        )
    w.lines.append("")
    return "\n".join(w.lines).encode()
