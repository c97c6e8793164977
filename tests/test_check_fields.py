"""check.failures_before_critical reaches Consul as the check's field of the same name (issue 19)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from sidecar.config import Config, load_config
from sidecar.registry.registration import registration_payload
from testkit import Consul


def config(tmp_path: Path, name: str, failures: int | None) -> Config:
    p = tmp_path / "c.toml"
    extra = "" if failures is None else f"failures_before_critical = {failures}\n"
    p.write_text(f'[service]\nname = "{name}"\nport = 8080\naddress = "127.0.0.1"\n[check]\n{extra}')
    return load_config(p, {})


def test_the_field_is_sent_above_its_default_and_only_then(tmp_path: Path) -> None:
    """Pure: failures_before_critical = 3 puts FailuresBeforeCritical 3 in the check; the default (1, what
    Consul does without the field) leaves the payload as it was. Red if the field were dropped, or sent
    at the default."""
    assert registration_payload(config(tmp_path, "web", 3), True)["Check"]["FailuresBeforeCritical"] == 3
    assert "FailuresBeforeCritical" not in registration_payload(config(tmp_path, "web", None), True)["Check"]


@pytest.mark.integration
def test_the_real_agent_takes_the_field(consul: Consul, service_name: str, tmp_path: Path) -> None:
    """The payload with FailuresBeforeCritical is registered by the real agent (HTTP 200) and listed with
    its check. Red if the agent refused the field (it would answer 400). Consul 1.8.7 accepts the field and
    ignores it (measured: a failing check is critical after one failure with the field at 4); Consul 1.9 and
    later follow it."""
    payload = registration_payload(config(tmp_path, service_name, 4), True)
    request = urllib.request.Request(
        consul.address + "/v1/agent/service/register", data=json.dumps(payload).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    try:
        [entry] = consul.instances(service_name)
        assert [c["ServiceID"] for c in entry["Checks"] if c["ServiceID"]] == [payload["ID"]]
    finally:
        urllib.request.urlopen(
            urllib.request.Request(consul.address + f"/v1/agent/service/deregister/{payload['ID']}", method="PUT"),
            timeout=10,
        ).read()
