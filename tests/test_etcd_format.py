"""The etcd key and value of each format (issue 19), as their consumers read them: unit tests."""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.config import Config, load_config
from sidecar.config.names import OWNER_META_KEY
from sidecar.registry.etcd import entry_of, etcd_key, etcd_value

SERVICE = (
    '[service]\nname = "web"\nid = "web-1"\nport = 8080\naddress = "127.0.0.2"\n'
    'tags = ["v2"]\nmeta = { version = "1.0" }\n'
)


def load(tmp_path: Path, etcd: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text('[registry]\nkind = "etcd"\n[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n' + etcd + SERVICE)
    return load_config(p, {}, hostname=lambda: "h", local_address=lambda h, p: "10.9.8.7")


def test_grpc_key_and_value_are_the_endpoints_managers(tmp_path: Path) -> None:
    """Red if the key leaves <prefix>/<name>/<id> or the value is not {"Op":0,"Addr":"host:port",...}:
    etcd's gRPC resolver (target etcd:///services/web) would not find or not parse it."""
    c = load(tmp_path, "")
    assert etcd_key(c) == "services/web/web-1"
    value = json.loads(etcd_value(c, owner="me"))
    assert value == {
        "Op": 0,
        "Addr": "127.0.0.2:8080",
        "Metadata": {"tags": ["v2"], "meta": {"version": "1.0", OWNER_META_KEY: "me"}},
    }
    assert entry_of(etcd_value(c, owner="me")) == {
        "Address": "127.0.0.2",
        "Port": 8080,
        "Meta": {"version": "1.0", OWNER_META_KEY: "me"},
        "Tags": ["v2"],
    }
    assert etcd_key(load(tmp_path, 'prefix = "svc/"\n')) == "svc/web/web-1"


def test_skydns_key_and_value_are_corednss(tmp_path: Path) -> None:
    """Red if the domain's labels are not reversed under /skydns or host/port/ttl are missing: CoreDNS's
    etcd plugin would answer nothing for web.skydns.local."""
    c = load(tmp_path, 'format = "skydns"\ndns_domain = "skydns.local"\n')
    assert etcd_key(c) == "/skydns/local/skydns/web/web-1"
    value = json.loads(etcd_value(c, owner="me"))
    assert (value["host"], value["port"], value["ttl"]) == ("127.0.0.2", 8080, 5)  # ttl: propagation_delay 5s
    assert value["metadata"]["meta"][OWNER_META_KEY] == "me"
    # A learned delay may be as short as learned_min: the TTL follows it, not learned_max (the upper bound).
    learned = load(
        tmp_path,
        'format = "skydns"\ndns_domain = "skydns.local"\n'
        '[shutdown]\npropagation_delay = "learned"\nlearned_min = "2s"\n',
    )
    assert json.loads(etcd_value(learned, owner="me"))["ttl"] == 2
    entry = entry_of(etcd_value(c, owner="me"))
    assert entry is not None and (entry["Address"], entry["Port"]) == ("127.0.0.2", 8080)


def test_foreign_values_read_as_no_entry() -> None:
    """A value of neither format (or not JSON) is no entry of ours: red if it were read as one."""
    assert entry_of(b"not json") is None
    assert entry_of(b"[1]") is None
    assert entry_of(b'{"x":1}') is None
