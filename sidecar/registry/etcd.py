"""etcd as the registry (issue 19): the key and value each format writes, and how an entry reads back.

Imported only when ``registry.kind = "etcd"``: a Consul user never loads it.

    format = "grpc"    key   <prefix>/<service.name>/<service.id>
                       value {"Op": 0, "Addr": "<address>:<port>", "Metadata": {"tags": [...], "meta": {...}}}
                       etcd's endpoints manager: resolver.NewBuilder with target etcd:///<prefix>/<service.name>
    format = "skydns"  key   /skydns/<reversed dns_domain labels>/<service.name>/<service.id>
                       value {"host": "<address>", "port": <port>, "ttl": <seconds>, "metadata": {...}}
                       CoreDNS's etcd plugin (it ignores the extra "metadata" field)

The sidecar's owner mark (OWNER_META_KEY, as in Consul's Meta) is in the metadata's ``meta``, so the
keeper's "is this entry mine" check reads an etcd entry as it reads a Consul one.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..config import Config, EtcdFormat
from ..config.names import OWNER_META_KEY


def etcd_key(config: Config) -> str:
    """The instance's key in etcd."""
    svc, etcd = config.service, config.etcd
    if etcd.format is EtcdFormat.SKYDNS:
        labels = [label for label in reversed(etcd.dns_domain.rstrip(".").split(".")) if label]
        return "/skydns/" + "/".join([*labels, svc.name, svc.id])
    return f"{etcd.prefix.rstrip('/')}/{svc.name}/{svc.id}"


def dns_ttl(config: Config) -> int:
    """skydns: the records' TTL. No longer than the propagation delay (at least 1 s): a resolver's cached
    answer has expired by the time the app is signalled."""
    return max(1, math.floor(config.shutdown.propagation_delay))


def etcd_value(config: Config, owner: str | None) -> str:
    """The JSON value of the instance's key."""
    svc = config.service
    meta = dict(svc.meta)
    if owner is not None:
        meta[OWNER_META_KEY] = owner
    metadata = {"tags": list(svc.tags), "meta": meta}
    if config.etcd.format is EtcdFormat.SKYDNS:
        doc: dict[str, Any] = {"host": svc.address, "port": svc.port, "ttl": dns_ttl(config), "metadata": metadata}
    else:
        host = f"[{svc.address}]" if ":" in svc.address else svc.address
        doc = {"Op": 0, "Addr": f"{host}:{svc.port}", "Metadata": metadata}
    return json.dumps(doc, separators=(",", ":"), sort_keys=False)


def entry_of(value: bytes | str) -> dict[str, Any] | None:
    """A value read back, in the shape the lifecycle reads entries in (``Address``, ``Port``, ``Meta``);
    None when it is no value of either format."""
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if "Addr" in doc:
        host, _, port = str(doc.get("Addr") or "").rpartition(":")
        metadata = doc.get("Metadata")
        address = host.removeprefix("[").removesuffix("]")
    elif "host" in doc:
        address, port = str(doc.get("host") or ""), str(doc.get("port"))
        metadata = doc.get("metadata")
    else:
        return None
    meta = metadata.get("meta") if isinstance(metadata, dict) else None
    return {
        "Address": address,
        "Port": int(port) if port.isdigit() else None,
        "Meta": dict(meta) if isinstance(meta, dict) else {},
        "Tags": list(metadata.get("tags") or []) if isinstance(metadata, dict) else [],
    }
