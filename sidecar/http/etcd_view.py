"""What /ready, /status and /metrics show with ``registry.kind = "etcd"``: read from the adapter's own
view (``EtcdRegistry.status_view``, no request) and, for /ready, one bounded read of the key.

Kept apart from the Consul path so that a Consul user's answers stay byte for byte as they were; the
server calls these only when it was given an etcd view.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..state import Status
    from .readiness import Readiness

# /status keys that speak of Consul alone: an etcd sidecar shows its registry under "registry" instead.
CONSUL_ONLY_STATUS_KEYS = ("consul_reachable", "maintenance", "maintenance_reason")


class EtcdView(Protocol):
    """What the status server needs of the etcd adapter (sidecar/registry/etcd.py's EtcdRegistry)."""

    def status_view(self) -> dict[str, Any]: ...

    async def check_status(self, service_id: str) -> str | None: ...


def health_reader(view: EtcdView) -> Callable[[str, float], Awaitable[tuple[str, list[dict[str, Any]]] | None]]:
    """/ready's read for etcd, in the shape Readiness takes: ("passing", []) while the key is there, None
    when etcd holds no key, ("critical", [the check]) while the key is withheld because the check fails."""

    async def read(service_id: str, timeout: float) -> tuple[str, list[dict[str, Any]]] | None:
        seen = view.status_view()
        if seen["key_withheld"]:
            output = "check.http fails: the key is deleted until it passes"
            return "critical", [{"CheckID": "check.http", "Status": "critical", "Output": output}]
        return ("passing", []) if await view.check_status(service_id) == "passing" else None

    return read


def readiness(status: Status, view: EtcdView, timeout: float) -> Readiness:
    from .readiness import Readiness

    key = view.status_view()["key"]
    missing = f"etcd holds no key {key} (the sidecar puts it back)"
    return Readiness(status, health_reader(view), timeout=timeout, registry="etcd", missing=missing)


def status_doc(doc: dict[str, Any], status: Status, view: EtcdView) -> dict[str, Any]:
    """/status's document with the Consul-only keys replaced by ``registry``: the kind, whether etcd
    answered the last registration or check, the key, the lease (hex, as ``etcdctl lease timetolive``
    takes it) and its TTL, whether the key is withheld (the check fails), keepalive failures."""
    out = {k: v for k, v in doc.items() if k not in CONSUL_ONLY_STATUS_KEYS}
    out["registry"] = {"kind": "etcd", "reachable": status.consul_reachable, **view.status_view()}
    return out
