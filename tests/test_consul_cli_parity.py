"""The agent is reached as the consul CLI reaches it: CONSUL_HTTP_SSL, CONSUL_TLS_SERVER_NAME, CONSUL_CAPATH,
Go's boolean forms, unix:// addresses, and `wait --http-addr` (issue 13, item 7)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_config
from testkit import PY, ROOT, Consul, app_command, free_port
from testkit.acl import make_ca, make_cert
from testkit.suite import StartSidecar, base_config

MINIMAL = '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\n'
GO_TRUE = ["1", "t", "T", "TRUE", "true", "True"]
GO_FALSE = ["0", "f", "F", "FALSE", "false", "False"]


def load(tmp_path: Path, env: dict[str, str], text: str = MINIMAL):  # type: ignore[no-untyped-def]
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p, env, hostname=lambda: "h", local_address=lambda h, port: "10.9.8.7")


def problems(tmp_path: Path, env: dict[str, str], text: str = MINIMAL) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, env, text)
    return e.value.problems


# --- the loader -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", GO_TRUE + GO_FALSE)
def test_consul_http_ssl_in_gos_forms(tmp_path: Path, value: str) -> None:
    """CONSUL_HTTP_SSL in each of strconv.ParseBool's forms: true makes an address without a scheme (and the
    default address) https, as the consul CLI does; false leaves it http. An explicit scheme is kept."""
    scheme = "https" if value in GO_TRUE else "http"
    c = load(tmp_path, {"CONSUL_HTTP_SSL": value, "CONSUL_HTTP_ADDR": "consul.local:8501"})
    assert c.consul.address == f"{scheme}://consul.local:8501"
    assert load(tmp_path, {"CONSUL_HTTP_SSL": value}).consul.address == f"{scheme}://127.0.0.1:8500"
    assert load(tmp_path, {"CONSUL_HTTP_SSL": value, "CONSUL_HTTP_ADDR": "http://a:1"}).consul.address == "http://a:1"


@pytest.mark.parametrize("value", GO_TRUE + GO_FALSE)
def test_consul_http_ssl_verify_in_gos_forms(tmp_path: Path, value: str) -> None:
    """CONSUL_HTTP_SSL_VERIFY takes the same forms ("t", "F", ... used to be refused)."""
    assert load(tmp_path, {"CONSUL_HTTP_SSL_VERIFY": value}).consul.tls_verify is (value in GO_TRUE)


@pytest.mark.parametrize("var", ["CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY"])
def test_a_boolean_variable_that_is_none_is_one_problem(tmp_path: Path, var: str) -> None:
    """ "maybe" is neither true nor false: one problem naming the variable, exit 78 (never a silent guess)."""
    [line] = problems(tmp_path, {var: "maybe"})
    assert f"{var} (environment)" in line and "'maybe'" in line


def test_tls_server_name(tmp_path: Path) -> None:
    """CONSUL_TLS_SERVER_NAME, as the consul CLI reads it: a port in it is dropped; consul.tls_server_name wins."""
    assert load(tmp_path, {}).consul.tls_server_name is None
    assert load(tmp_path, {"CONSUL_TLS_SERVER_NAME": "consul.example:8501"}).consul.tls_server_name == "consul.example"
    c = load(tmp_path, {"CONSUL_TLS_SERVER_NAME": "x"}, '[consul]\ntls_server_name = "server.dc1.consul"\n' + MINIMAL)
    assert c.consul.tls_server_name == "server.dc1.consul"
    [line] = problems(tmp_path, {"CONSUL_TLS_SERVER_NAME": "a b"})
    assert "CONSUL_TLS_SERVER_NAME" in line


def test_unix_socket_address(tmp_path: Path) -> None:
    """unix:///path is the agent's socket; with it, service.address cannot be guessed and must be set
    (one problem naming it); "unix://" alone names the address at fault."""
    c = load(tmp_path, {"CONSUL_HTTP_ADDR": "unix:///run/consul/http.sock"})
    assert (c.consul.address, c.consul.unix_socket) == ("unix:///run/consul/http.sock", "/run/consul/http.sock")
    [line] = problems(tmp_path, {}, '[consul]\naddress = "unix:///run/c.sock"\n[service]\nname = "web"\nport = 80\n')
    assert "service.address" in line and "unix socket" in line
    [line] = problems(tmp_path, {}, '[consul]\naddress = "unix://"\n' + MINIMAL)
    assert "consul.address" in line


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, another CA, and a server certificate for the name consul.example only (not its IP)."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "server", "DNS:consul.example")
    return d


def test_ca_path_is_read_as_the_consul_cli_reads_it(tmp_path: Path, pki: Path) -> None:
    """CONSUL_CAPATH: every file in the directory must hold PEM certificates (a stray file is one problem
    naming the variable and the file); with a CA file set too, the directory is ignored with a warning."""
    cas = tmp_path / "cas"
    (cas / "sub").mkdir(parents=True)
    (cas / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())
    (cas / "sub" / "other.pem").write_bytes((pki / "other-ca.pem").read_bytes())
    c = load(tmp_path, {"CONSUL_CAPATH": str(cas)})
    assert c.consul.ca_path == cas and not c.warnings
    (cas / "README").write_text("not a certificate\n")
    [line] = problems(tmp_path, {"CONSUL_CAPATH": str(cas)})
    assert "CONSUL_CAPATH (environment)" in line and str(cas / "README") in line
    [line] = problems(tmp_path, {}, f'[consul]\nca_path = "{tmp_path / "missing"}"\n' + MINIMAL)
    assert "consul.ca_path" in line
    c = load(tmp_path, {"CONSUL_CAPATH": str(cas), "CONSUL_CACERT": str(pki / "ca.pem")})
    assert c.consul.ca_path is None and any("CONSUL_CAPATH" in w and "ignored" in w for w in c.warnings)


# --- a real agent ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unix_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Consul, Path]]:
    """A dev agent serving its HTTP API on loopback (for the harness) and on a unix socket."""
    d = tmp_path_factory.mktemp("ux")
    sock = d / "consul.sock"
    agent = Consul(d, hcl=f'addresses {{ http = "127.0.0.1 unix://{sock}" }}')
    agent.start()
    yield agent, sock
    agent.stop()


def wait_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([PY, "-m", "sidecar", "wait", *args], capture_output=True, text=True, env=env, timeout=60)


def test_run_and_wait_over_a_unix_socket(
    unix_consul: tuple[Consul, Path], start_sidecar: StartSidecar, service_name: str
) -> None:
    """1. The sidecar's consul.address is unix:///<socket>: it registers through the socket.
    2. `wait --http-addr unix://<socket> --passing` sees the instance; the old flag --consul-address works too.
    3. SIGTERM: deregistered through the socket and confirmed, exit 0; `wait -http-addr ... --gone` (the
       consul CLI's single-dash spelling) returns at once."""
    agent, sock = unix_consul
    port = free_port()
    sc = start_sidecar(base_config(agent, service_name, port, consul={"address": f"unix://{sock}"}), app_command(port))
    sc.wait_event("sidecar.consul.registered", 30)
    assert agent.service_ids(service_name) == [f"{service_name}-1"]
    r = wait_cli(
        "--http-addr",
        f"unix://{sock}",
        "--service",
        service_name,
        "--id",
        f"{service_name}-1",
        "--passing",
        "--timeout",
        "20s",
    )
    assert r.returncode == 0, r.stderr
    r = wait_cli(
        "--consul-address", f"unix://{sock}", "--service", service_name, "--min-passing", "1", "--timeout", "20s"
    )
    assert r.returncode == 0, r.stderr
    sc.send(signal.SIGTERM)
    assert sc.wait(30) == 0
    assert sc.event("sidecar.consul.deregistered") is not None
    assert agent.service_ids(service_name) == []
    r = wait_cli(
        "-http-addr",
        f"unix://{sock}",
        "--service",
        service_name,
        "--id",
        f"{service_name}-1",
        "--gone",
        "--timeout",
        "20s",
    )
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def named_tls_consul(pki: Path) -> Iterator[tuple[Consul, int]]:
    """An agent serving HTTPS with a certificate for consul.example only: reached at 127.0.0.1, it is
    verified only against the name CONSUL_TLS_SERVER_NAME gives."""
    https = free_port()
    agent = Consul(pki, hcl=f'ports {{ https = {https} }} cert_file = "{pki}/server.pem" key_file = "{pki}/server.key"')
    agent.start()
    yield agent, https
    agent.stop()


@pytest.mark.parametrize("case", ["server-name", "no-server-name", "wrong-ca-dir"])
def test_tls_server_name_and_ca_directory(
    named_tls_consul: tuple[Consul, int],
    pki: Path,
    tmp_path: Path,
    start_sidecar: StartSidecar,
    service_name: str,
    case: str,
) -> None:
    """https://127.0.0.1:<port>, CA from CONSUL_CAPATH, certificate for consul.example only.
    server-name: CONSUL_TLS_SERVER_NAME=consul.example:8501 -> verified, registered, deregistered, exit 0.
    no-server-name (control): the certificate does not match 127.0.0.1 -> one TLS error, exit 78.
    wrong-ca-dir (control): a directory holding only another CA -> not trusted, exit 78."""
    agent, https = named_tls_consul
    cas = tmp_path / "cas"
    cas.mkdir()
    (cas / "ca.pem").write_bytes((pki / ("other-ca.pem" if case == "wrong-ca-dir" else "ca.pem")).read_bytes())
    env = {"CONSUL_CAPATH": str(cas)}
    if case != "no-server-name":
        env["CONSUL_TLS_SERVER_NAME"] = "consul.example:8501"
    port = free_port()
    cfg = base_config(
        agent, service_name, port, consul={"address": f"https://127.0.0.1:{https}"}, startup={"timeout": "10s"}
    )
    sc = start_sidecar(cfg, app_command(port), env=env)
    if case == "server-name":
        sc.wait_event("sidecar.consul.registered", 30)
        assert agent.service_ids(service_name) == [f"{service_name}-1"]
        sc.send(signal.SIGTERM)
        assert sc.wait(30) == 0
        assert sc.event("sidecar.consul.deregistered") is not None
    else:
        assert sc.wait(30) == 78
        err = sc.event("sidecar.consul.registration_rejected")
        assert err is not None and "not trusted" in err["error"], sc.output()[-2000:]
    assert agent.service_ids(service_name) == []
    assert "Traceback" not in sc.output()
