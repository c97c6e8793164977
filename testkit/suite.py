"""What the test suite's fixtures hand out (tests/conftest.py), for the test modules to import by name:
a test module imports testkit, never another test module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from testkit.procs import Consul, Sidecar, merge


def base_config(agent: Consul, name: str, port: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {
        "consul": {"address": agent.address, "timeout": "1s"},
        "service": {"name": name, "id": f"{name}-1", "address": "127.0.0.1", "port": port},
        "check": {"interval": "1s", "timeout": "1s"},
        "startup": {"timeout": "20s"},
        "shutdown": {"propagation_delay": "1s", "app_timeout": "10s", "deregister_timeout": "3s"},
        "status": {"listen": "127.0.0.1:0"},
    }
    return merge(cfg, sections)


StartSidecar = Callable[..., Sidecar]


RegisteredSidecar = Callable[..., tuple[Sidecar, int]]
