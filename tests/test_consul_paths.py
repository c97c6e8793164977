"""Service IDs and names in agent API paths, against a real agent; and how agent answers are classified."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sidecar.clock import SystemClock
from sidecar.config import ConsulSettings, TokenSource, parse_consul_address
from sidecar.registry.consul import (
    ConsulAgent,
    ConsulRejected,
    Deregistration,
    _catalog_answer,
    _deregister_answer,
    _ServersUnavailable,
)
from testkit import Consul


def agent_for(consul: Consul) -> ConsulAgent:
    scheme, host, port = parse_consul_address(consul.address)
    settings = ConsulSettings(
        scheme=scheme,
        host=host,
        port=port,
        token=TokenSource(),
        ca_file=None,
        cert_file=None,
        key_file=None,
        tls_verify=True,
        timeout=2.0,
    )
    return ConsulAgent(settings, SystemClock())


def payload(name: str, service_id: str) -> dict[str, Any]:
    return {
        "Name": name,
        "ID": service_id,
        "Address": "127.0.0.1",
        "Port": 1,
        "Tags": [],
        "Meta": {},
        "Check": {"TTL": "30s", "Status": "passing"},
    }


# Characters the URL layer would read as a query, a fragment, an escape or a path separator.
ODD_IDS = ["a%2fb", "a?b#c d", "a/b", "x/", "50%", "a;b=c&d", "é+ü"]


@pytest.mark.asyncio
@pytest.mark.parametrize("service_id", ODD_IDS)
async def test_odd_ids_round_trip(consul: Consul, service_name: str, service_id: str) -> None:
    """An ID with characters that mean something in a URL is registered, read back under exactly
    that ID (agent and catalog), then deregistered and confirmed gone; no other service is touched."""
    agent = agent_for(consul)
    bystander = f"{service_name}-bystander"
    try:
        await agent.register(payload(service_name, bystander))
        await agent.register(payload(service_name, service_id))
        held = await agent.registered(service_id)
        assert held is not None and held["ID"] == service_id
        assert await agent.check_catalog_visibility(service_name, service_id)
        result = await agent.deregister_confirmed(service_name, service_id, time.monotonic() + 5)
        assert result.outcome is Deregistration.CONFIRMED, result
        assert await agent.registered(service_id) is None
        assert consul.service_ids(service_name) == [bystander]
    finally:
        await agent.deregister_confirmed(service_name, bystander, time.monotonic() + 5)
        await agent.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("service_id", [".", "..", "a/../b", "a/./b", "a//b", "/a"])
async def test_ids_the_agent_would_read_as_another_path_are_never_registered(
    consul: Consul, service_name: str, service_id: str
) -> None:
    """The agent cleans the decoded path and redirects (`..`, `a/../b`...): such an ID could be
    registered but never read back or deregistered. Expected: refused as malformed (ConsulRejected,
    exit 78 in the sidecar) before anything is sent; nothing registered."""
    agent = agent_for(consul)
    try:
        with pytest.raises(ConsulRejected, match="agent API path"):
            await agent.register(payload(service_name, service_id))
        assert consul.service_ids(service_name) == []
        assert service_id not in (consul.get("/v1/agent/services") or {})
    finally:
        await agent.close()


class Answer:
    def __init__(self, code: int, body: str) -> None:
        self.code, self.body, self.headers = code, body, {"X-Consul-Index": "7"}


@pytest.mark.parametrize(
    "body",
    [
        "No cluster leader",
        "rpc error making call: rpc error getting client: failed to get conn: "
        "dial tcp 127.0.9.2:0->127.0.9.3:8300: connect: connection refused",
        "rpc error getting client: failed to get conn: dial tcp: i/o timeout",
        "No known Consul servers",
    ],
)
def test_servers_without_a_leader_are_told_from_other_answers(body: str) -> None:
    """What a client agent answers (HTTP 500) while the servers have no leader is 'servers unavailable',
    whatever the server it asked; a 403 stays an ACL denial and a 200 is the entries."""
    assert isinstance(_catalog_answer(Answer(500, body)), _ServersUnavailable)


def test_other_answers_are_not_taken_for_a_missing_leader() -> None:
    from sidecar.registry._consul_import import consul_base  # the sidecar's copy: a plain `import consul` gets another

    with pytest.raises(consul_base.ACLPermissionDenied):
        _catalog_answer(Answer(403, "Permission denied"))
    with pytest.raises(consul_base.ConsulException):
        _catalog_answer(Answer(500, "something else broke"))
    assert _catalog_answer(Answer(200, json.dumps([{"Service": {"ID": "x"}}]))) == [{"Service": {"ID": "x"}}]
    assert _deregister_answer(Answer(500, 'Unknown service "x"')) is False  # an ACL agent: it no longer holds x
    assert _deregister_answer(Answer(200, "")) is True
    with pytest.raises(consul_base.ConsulException):
        _deregister_answer(Answer(500, "No cluster leader"))
