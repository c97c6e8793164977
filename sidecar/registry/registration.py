"""What the sidecar asks the agent to hold: the service definition with its HTTP check."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..config.names import OWNER_META_KEY
from ..durations import format_duration

__all__ = ["OWNER_META_KEY", "registration_payload"]


def registration_payload(config: Config, passing: bool, owner: str | None = None) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register``.

    ``passing`` is true when the sidecar has just seen the check URL answer 2xx:
    the check then starts passing and the instance takes traffic at once,
    instead of one check interval later (Consul starts new checks critical).
    ``owner``: the running sidecar's mark, put in ``Meta`` under OWNER_META_KEY.
    """
    svc, chk = config.service, config.check
    check: dict[str, Any] = {
        "Name": f"{svc.name} HTTP check",
        "HTTP": chk.http,
        "Method": "GET",
        "Interval": format_duration(chk.interval),
        "Timeout": format_duration(chk.timeout),
    }
    if chk.deregister_critical_after > 0:
        check["DeregisterCriticalServiceAfter"] = format_duration(chk.deregister_critical_after)
    if chk.failures_before_critical > 1:
        # Consul's field of the same name (Consul 1.9 and later; 1.8.7, Debian bullseye's, accepts it and
        # ignores it: measured). Left out at 1, Consul's behaviour without it, so a default payload is as before.
        check["FailuresBeforeCritical"] = chk.failures_before_critical
    if passing:
        check["Status"] = "passing"
    meta = dict(svc.meta)
    if owner is not None:
        meta[OWNER_META_KEY] = owner
    return {
        "ID": svc.id,
        "Name": svc.name,
        "Address": svc.address,
        "Port": svc.port,
        "Tags": list(svc.tags),
        "Meta": meta,
        "Check": check,
    }
