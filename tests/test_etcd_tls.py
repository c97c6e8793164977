"""etcd over TLS (``etcd.ca_file``, ``etcd.cert_file``, ``etcd.key_file``, or etcdctl's ETCDCTL_CACERT,
ETCDCTL_CERT and ETCDCTL_KEY): the real sidecar against a real etcd member that serves https and requires a
client certificate signed by the test's CA (made with openssl, testkit.acl's helpers).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.acl import make_ca, make_cert
from testkit.etcd import Etcd, EtcdctlError, etcdctl
from testkit.procs import Sidecar, app_command, free_port

pytestmark = [pytest.mark.integration]


class TlsEtcd(Etcd):
    """A member whose client URL is https, with a server certificate for 127.0.0.1 and client-cert-auth."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        super().__init__(workdir, name="tls")
        self.pki = pki

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    def argv(self) -> list[str]:
        return [
            *super().argv(),
            f"--cert-file={self.pki / 'server.pem'}",
            f"--key-file={self.pki / 'server.key'}",
            f"--trusted-ca-file={self.pki / 'ca.pem'}",
            "--client-cert-auth",
        ]

    def ctl(self) -> tuple[str, ...]:
        return (
            f"--cacert={self.pki / 'ca.pem'}",
            f"--cert={self.pki / 'client.pem'}",
            f"--key={self.pki / 'client.key'}",
        )

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"etcd {self.name} exited with {self.proc.returncode}: {self.tail()}")
        try:
            return bool(etcdctl(self.endpoint, *self.ctl(), "endpoint", "health", timeout=2)[0]["health"])
        except (EtcdctlError, KeyError, IndexError):
            return False


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca")
    make_cert(d, "ca", "server", "IP:127.0.0.1")
    make_cert(d, "ca", "client", "DNS:client")
    make_ca(d, "other")  # a CA that signed nothing here
    return d


@pytest.fixture
def tls_etcd(tmp_path: Path, pki: Path) -> Iterator[TlsEtcd]:
    member = TlsEtcd(tmp_path, pki)
    try:
        member.start()
        yield member
    finally:
        member.stop()


def keys(member: TlsEtcd) -> list[Any]:
    return list(etcdctl(member.endpoint, *member.ctl(), "get", "--prefix", "services/").get("kvs") or [])


def start(tmp_path: Path, member: TlsEtcd, name: str, etcd: dict[str, Any], env: dict[str, str]) -> Sidecar:
    port = free_port()
    config: dict[str, dict[str, Any]] = {
        "registry": {"kind": "etcd"},
        "etcd": {"endpoints": [member.endpoint], "lease_ttl": "3s", **etcd},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "shutdown": {"propagation_delay": "1s", "deregister_timeout": "5s", "app_timeout": "5s"},
    }
    return Sidecar(tmp_path, config, app_command(port), env=env)


@pytest.mark.parametrize("source", ["keys", "ETCDCTL_*"])
def test_registers_and_drains_over_tls_with_a_client_certificate(
    tmp_path: Path, tls_etcd: TlsEtcd, pki: Path, source: str
) -> None:
    """The CA and the client certificate from the [etcd] keys, or from etcdctl's variables: the key is registered
    (etcdctl over TLS sees it), SIGTERM deletes it, confirmed, exit 0. Red if the adapter spoke plain HTTP,
    did not verify with the CA, sent no client certificate, or ignored the variables."""
    files = {"ca_file": pki / "ca.pem", "cert_file": pki / "client.pem", "key_file": pki / "client.key"}
    names = {"ca_file": "ETCDCTL_CACERT", "cert_file": "ETCDCTL_CERT", "key_file": "ETCDCTL_KEY"}
    if source == "keys":
        sc = start(tmp_path, tls_etcd, "tlsweb", {k: str(v) for k, v in files.items()}, {})
    else:
        sc = start(tmp_path, tls_etcd, "tlsweb", {}, {names[k]: str(v) for k, v in files.items()})
    sc.wait_event("sidecar.consul.registered")
    assert len(keys(tls_etcd)) == 1
    sc.send(signal.SIGTERM)
    assert sc.wait() == 0, sc.tail(30)
    assert sc.event("sidecar.consul.deregistered") is not None
    assert keys(tls_etcd) == []


@pytest.mark.parametrize("case", ["other CA", "no client certificate"])
def test_a_tls_misconfiguration_exits_78_saying_so(tmp_path: Path, tls_etcd: TlsEtcd, pki: Path, case: str) -> None:
    """A CA that did not sign etcd's certificate, or no client certificate while etcd requires one: exit 78 (a
    configuration problem, as with Consul's TLS), one error naming the TLS handshake (and, without a
    client certificate, etcd.cert_file); no key. Red if it were retried as an outage (no exit) or exited 77."""
    if case == "other CA":
        etcd = {
            "ca_file": str(pki / "other.pem"),
            "cert_file": str(pki / "client.pem"),
            "key_file": str(pki / "client.key"),
        }
    else:
        etcd = {"ca_file": str(pki / "ca.pem")}
    sc = start(tmp_path, tls_etcd, "tlsbad", etcd, {})
    assert sc.wait(60) == 78, sc.tail(30)
    rejected = sc.event("sidecar.consul.registration_rejected")
    assert rejected is not None and "TLS handshake with" in rejected["error"], sc.tail(30)
    if case == "no client certificate":
        assert "etcd.cert_file" in rejected["error"], rejected
    assert keys(tls_etcd) == []
