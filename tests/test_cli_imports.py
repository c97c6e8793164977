"""Each command imports only what it needs (issue 13): checked on sys.modules, not on timings.

`--version` and `check-config` must answer without aiohttp, structlog, the Consul client or even
asyncio (their start-up is measured against `python -c "import asyncio"`); `wait` needs the Consul
client and python-consul2 but, on the client's blocking transport, neither aiohttp nor asyncio,
structlog or the lifecycle. bench/cli.py measures what this buys.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from testkit import PY, ROOT, Consul, free_port, write_config
from testkit.etcd import Etcd

# Runs the command as the console script does and records sys.modules as the process exits.
PROBE = (
    "import atexit, json, os, sys\n"
    "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from sidecar.__main__ import entry\n"
    "sys.exit(entry())\n"
)

HEAVY = (
    "aiohttp",
    "structlog",
    "yarl",
    "multidict",
    "consul",
    "consul.base",
    "sidecar._consul_base",
    "six",
    "sidecar.registry.consul",
    "sidecar.log",
    "sidecar.lifecycle",
    "sidecar.process.app_control",
    "sidecar.process.child",
    "sidecar.process.alongside",
    "sidecar.registry.wait",
    "sidecar.process.health",
)
NOT_FOR_CHECK_CONFIG = (*HEAVY, "asyncio", "ssl", "sidecar.clock")
NOT_FOR_VERSION = (*NOT_FOR_CHECK_CONFIG, "sidecar.config", "sidecar.http.server")
NOT_FOR_WAIT = (
    "aiohttp",
    "asyncio",
    "yarl",
    "multidict",
    "structlog",
    "sidecar.log",
    "sidecar.lifecycle",
    "sidecar.process.app_control",
    "sidecar.process.child",
    "sidecar.process.alongside",
    "sidecar.http.server",
    "sidecar.process.health",
    "sidecar.drain.wait",
    "sidecar.drain.traffic",
    "aiohttp.web",
    "requests",
    "consul.std",
)


def run_probe(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["MODULES_OUT"] = str(out)
    done = subprocess.run([PY, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    return done, set(json.loads(out.read_text()))


def config_file(tmp_path: Path, address: str) -> Path:
    return write_config(
        tmp_path / "c.toml",
        {
            "consul": {"address": address},
            "service": {"name": "web", "address": "127.0.0.1", "port": 8080},
        },
    )


@pytest.mark.integration
def test_version_imports_nothing_heavy(tmp_path: Path) -> None:
    """`--version` prints the version and exits 0 having imported none of the heavy modules, nor
    asyncio nor the configuration (the control: the probe does see sidecar.cli)."""
    done, modules = run_probe(tmp_path, "--version")
    assert done.returncode == 0 and done.stdout.startswith("consul-sidecar "), done.stderr
    assert "sidecar.cli" in modules
    assert sorted(modules.intersection(NOT_FOR_VERSION)) == []


@pytest.mark.integration
def test_check_config_imports_nothing_heavy(tmp_path: Path) -> None:
    """`check-config` validates a file and prints the registration (exit 0) without aiohttp,
    structlog, python-consul2 or asyncio; a bad file exits 78 the same way."""
    done, modules = run_probe(tmp_path, "check-config", "-c", str(config_file(tmp_path, "http://127.0.0.1:8500")))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["registration"]["Name"] == "web"
    assert {"sidecar.config", "sidecar.registry.registration"} <= modules
    assert sorted(modules.intersection(NOT_FOR_CHECK_CONFIG)) == []

    bad = tmp_path / "bad.toml"
    bad.write_text('[service]\nname = "web"\nport = "eighty"\n')
    done, modules = run_probe(tmp_path, "check-config", "-c", str(bad))
    assert done.returncode == 78 and "port" in done.stderr and "Traceback" not in done.stderr
    assert sorted(modules.intersection(NOT_FOR_CHECK_CONFIG)) == []


def test_wait_imports_the_client_without_aiohttp_asyncio_logging_or_lifecycle(consul: Consul, tmp_path: Path) -> None:
    """`wait --min-passing 1` for an instance that passes ends with 0 at once, having imported the
    Consul client and python-consul2 but neither aiohttp, asyncio, structlog nor the lifecycle's
    modules; the same holds for a wait that fails (its error path)."""
    name = "cli-imports-wait"
    body = json.dumps({"Name": name, "ID": f"{name}-1", "Port": 1}).encode()
    urllib.request.urlopen(
        urllib.request.Request(f"{consul.address}/v1/agent/service/register", data=body, method="PUT"), timeout=5
    ).close()
    try:
        done, modules = run_probe(
            tmp_path,
            "wait",
            "--consul-address",
            consul.address,
            "--service",
            name,
            "--min-passing",
            "1",
            "--timeout",
            "20s",
        )
        assert done.returncode == 0, done.stderr
        assert {"sidecar.registry.consul", "sidecar._consul_base", "sidecar.registry.wait"} <= modules
        assert sorted(modules.intersection(NOT_FOR_WAIT)) == []

        done, modules = run_probe(
            tmp_path,
            "wait",
            "--consul-address",
            "http://127.0.0.1:1",
            "--service",
            name,
            "--min-passing",
            "1",
            "--timeout",
            "0.5s",
        )
        assert done.returncode == 1 and "unreachable" in done.stderr, done.stderr
        assert sorted(modules.intersection(NOT_FOR_WAIT)) == []
    finally:
        urllib.request.urlopen(
            urllib.request.Request(f"{consul.address}/v1/agent/service/deregister/{name}-1", method="PUT"), timeout=5
        ).close()


def test_maint_imports_the_client_without_aiohttp_asyncio_logging_or_lifecycle(consul: Consul, tmp_path: Path) -> None:
    """`maint --enable` then `--disable` on a registered instance exit 0 on the client's blocking
    transport: python-consul2 and the Consul client, but neither aiohttp, asyncio, structlog nor
    the lifecycle's modules."""
    name = "cli-imports-maint"
    body = json.dumps({"Name": name, "ID": f"{name}-1", "Port": 1}).encode()
    urllib.request.urlopen(
        urllib.request.Request(f"{consul.address}/v1/agent/service/register", data=body, method="PUT"), timeout=5
    ).close()
    cfg = write_config(
        tmp_path / "m.toml",
        {"consul": {"address": consul.address}, "service": {"name": name, "id": f"{name}-1", "port": 1}},
    )
    try:
        for switch in ("--enable", "--disable"):
            done, modules = run_probe(tmp_path, "maint", "-c", str(cfg), switch)
            assert done.returncode == 0, done.stderr
            assert {"sidecar.registry.consul", "sidecar._consul_base"} <= modules
            assert sorted(modules.intersection((*NOT_FOR_WAIT, "sidecar.registry.wait"))) == []
    finally:
        urllib.request.urlopen(
            urllib.request.Request(f"{consul.address}/v1/agent/service/deregister/{name}-1", method="PUT"), timeout=5
        ).close()


def test_horizon_imports_the_client_without_aiohttp_asyncio_logging_or_lifecycle(
    consul: Consul, tmp_path: Path
) -> None:
    """`horizon --service NAME` reads the record (none here: exit 1, "0 samples") on the client's blocking
    transport: python-consul2 and the Consul client, but neither aiohttp, asyncio, structlog nor the
    lifecycle's modules; the same for an unreachable agent (its error path, exit 69)."""
    for address, code in ((consul.address, 1), ("http://127.0.0.1:1", 69)):
        done, modules = run_probe(tmp_path, "horizon", "--service", "cli-imports-horizon", "--http-addr", address)
        assert done.returncode == code, done.stderr
        assert {"sidecar.registry.consul", "sidecar._consul_base", "sidecar.drain.record"} <= modules
        assert sorted(modules.intersection((*NOT_FOR_WAIT, "sidecar.registry.wait"))) == []


def test_horizon_with_etcd_imports_neither_asyncio_aiohttp_the_adapter_nor_consul(
    etcd: Etcd, etcd_prefix: str, tmp_path: Path
) -> None:
    """`horizon -c FILE` with registry.kind = "etcd" reads the record (none here: exit 1, "0 samples") over
    registry/etcd_blocking.py: neither asyncio, aiohttp, structlog, the etcd adapter (registry/etcd.py, which
    imports asyncio) nor the Consul client; the same for unreachable endpoints (exit 69). Red when horizon
    reads etcd through the adapter."""
    for endpoint, code in ((etcd.endpoint, 1), (f"http://127.0.0.1:{free_port()}", 69)):
        cfg = write_config(
            tmp_path / "etcd.toml",
            {
                "registry": {"kind": "etcd"},
                "etcd": {"endpoints": [endpoint], "prefix": etcd_prefix},
                "service": {"name": "cli-imports-horizon", "address": "127.0.0.1", "port": 8080},
            },
        )
        done, modules = run_probe(tmp_path, "horizon", "-c", str(cfg))
        assert done.returncode == code, done.stderr
        assert {"sidecar.registry.etcd_blocking", "sidecar.drain.record"} <= modules
        heavy = {"sidecar.registry.etcd", "sidecar.registry.consul", "consul", "sidecar.registry.wait"}
        assert sorted(modules.intersection((*NOT_FOR_WAIT, *heavy))) == []
