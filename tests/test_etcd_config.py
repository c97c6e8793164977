"""etcd's configuration (issue 19): [registry] kind, [etcd], check.failures_before_critical, and the
combinations refused before anything starts (one line each, exit 78)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar import cli
from sidecar.config import ConfigError, EtcdFormat, RegistryKind, load_config

SERVICE = '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\n'
ETCD = '[registry]\nkind = "etcd"\n[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n'


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> object:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p, env or {}, hostname=lambda: "h", local_address=lambda h, p: "10.9.8.7")


def test_consul_is_the_default_and_etcd_defaults_are_the_issues(tmp_path: Path) -> None:
    """Red if the defaults drift from issue 19's: consul, prefix "services", grpc, 10s lease, 1 failure."""
    c = load(tmp_path, SERVICE)
    assert c.registry.kind is RegistryKind.CONSUL  # type: ignore[attr-defined]
    c = load(tmp_path, ETCD + SERVICE)
    e = c.etcd  # type: ignore[attr-defined]
    assert (e.endpoints, e.prefix, e.format, e.lease_ttl) == (
        ("http://127.0.0.1:2379",),
        "services",
        EtcdFormat.GRPC,
        10.0,
    )
    assert c.check.failures_before_critical == 1  # type: ignore[attr-defined]


def test_endpoints_from_etcdctl_variable(tmp_path: Path) -> None:
    """ETCDCTL_ENDPOINTS is comma-separated, as etcdctl reads it (red if read as one URL)."""
    c = load(tmp_path, '[registry]\nkind = "etcd"\n' + SERVICE, {"ETCDCTL_ENDPOINTS": "http://a:2379,http://b:2379"})
    assert c.etcd.endpoints == ("http://a:2379", "http://b:2379")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (ETCD + '[consul]\naddress = "http://127.0.0.1:8500"\n' + SERVICE, ": consul: "),
        (ETCD + SERVICE + '[check]\nderegister_critical_after = "2m"\n', "check.deregister_critical_after"),
        ('[registry]\nkind = "etcd"\n[etcd]\nendpoints = []\n' + SERVICE, "etcd.endpoints"),
        (ETCD + 'format = "skydns"\n' + SERVICE, "etcd.dns_domain"),
        (ETCD + 'user = "svc"\n' + SERVICE, "etcd.user"),
    ],
    ids=[
        "consul-section",
        "deregister_critical_after",
        "no-endpoints",
        "skydns-without-domain",
        "user-without-password",
    ],
)
def test_bad_combinations_are_one_line_each(tmp_path: Path, text: str, names: str) -> None:
    """Each bad combination is exactly one problem naming its key (red if accepted, or if reported twice)."""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    [line] = e.value.problems
    assert names in line and "\n" not in line


def test_check_config_exits_78_with_one_line_and_prints_etcd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config: a bad etcd combination is one stderr line and 78, no traceback; a good one prints [etcd]."""
    p = tmp_path / "c.toml"
    p.write_text('[registry]\nkind = "etcd"\n[etcd]\nendpoints = []\n' + SERVICE)
    assert cli.main(["check-config", "-c", str(p)]) == 78
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    p.write_text(ETCD + 'password_file = "/nonexistent"\nuser = "u"\n' + SERVICE)
    assert cli.main(["check-config", "-c", str(p)]) == 78
    capsys.readouterr()
    p.write_text(ETCD + SERVICE)
    assert cli.main(["check-config", "-c", str(p)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["registry"] == {"kind": "etcd"} and doc["etcd"]["endpoints"] == ["http://127.0.0.1:2379"]
    assert "consul" not in doc


def test_maint_with_etcd_is_one_line_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """maint is Consul's: with etcd one clear line, non-zero (red if it tried to reach a Consul agent)."""
    p = tmp_path / "c.toml"
    p.write_text(ETCD + SERVICE)
    assert cli.main(["maint", "-c", str(p), "--enable"]) == 78
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "maintenance mode is Consul's" in line


def test_run_refuses_a_ca_file_that_is_no_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """etcd.ca_file readable but no PEM certificate: run exits 78 with one line naming the key, before starting
    the app. Red if run started (the app's command would create the marker) or the line named no key."""
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    p = tmp_path / "c.toml"
    p.write_text(ETCD + f'ca_file = "{tmp_path / "ca.pem"}"\n' + SERVICE + '[status]\nlisten = ""\n')
    marker = tmp_path / "started"
    assert cli.main(["run", "-c", str(p), "--", "touch", str(marker)]) == 78
    err = capsys.readouterr().err
    assert "etcd.ca_file" in err and not marker.exists()
