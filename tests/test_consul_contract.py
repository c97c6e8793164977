"""What sidecar/registry/consul.py relies on inside python-consul2 (and one switch inside aiohttp).

The pin in pyproject.toml is exact because the client uses internals of the library, not its
public client: ``consul.base`` loaded without the package (sidecar/_consul_import.py), the
endpoint classes bound to an object whose ``Consul.__init__`` never ran (``_Endpoints``), the
``CB._status`` and ``CB.json`` callbacks and the ``Response`` tuple. Each test names what changed
if it fails: read the new version's consul/base.py before moving the pin.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
import subprocess
import tomllib
from typing import Any

import aiohttp
import pytest

from sidecar.config import ConsulSettings, TokenSource
from sidecar.registry._consul_import import consul_base
from sidecar.registry.consul import _Endpoints, _session
from testkit import PY, ROOT

WHY = (
    "sidecar/registry/consul.py relies on it: read the new consul/base.py and adapt before moving the exact pin in "
    "pyproject.toml"
)


def same(actual: object, expected: object, what: str) -> None:
    assert actual == expected, f"python-consul2 changed {what}: {actual!r}, was {expected!r}; {WHY}"


def test_the_pinned_version_is_the_installed_one() -> None:
    """pyproject.toml pins python-consul2 exactly, and that version is the one installed (these
    tests describe it)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith("python-consul2")]
    assert len(pins) == 1 and re.fullmatch(r"python-consul2==[0-9.]+", pins[0]), (
        f"python-consul2 must be pinned exactly: {pins}"
    )
    same(importlib.metadata.version("python-consul2"), pins[0].split("==")[1], "its installed version")


def test_signatures_we_call_or_implement() -> None:
    """The constructor we call, the transport methods we implement (the endpoints call them by
    keyword), the callbacks we use and the endpoint classes we bind: names and signatures."""

    def sig(f: Any) -> str:
        return str(inspect.signature(f))

    same(
        sig(consul_base.HTTPClient.__init__),
        "(self, host='127.0.0.1', port=8500, scheme='http', verify=True, cert=None, timeout=None)",
        "HTTPClient.__init__",
    )
    same(sig(consul_base.HTTPClient.get), "(self, callback, path, params=None, headers=None)", "HTTPClient.get")
    for name in ("put", "delete", "post"):
        same(
            sig(getattr(consul_base.HTTPClient, name)),
            "(self, callback, path, params=None, data='', headers=None)",
            f"HTTPClient.{name}",
        )
    same(
        sorted(consul_base.HTTPClient.__abstractmethods__),
        ["delete", "get", "post", "put"],
        "HTTPClient's abstract methods",
    )
    same(sig(consul_base.CB._status), "(response, allow_404=True)", "CB._status")
    same(
        sig(consul_base.CB.json),
        "(map=None, allow_404=True, one=False, decode=False, is_id=False, index=False)",
        "CB.json",
    )
    same(consul_base.Response._fields, ("code", "headers", "body", "content"), "the Response tuple")
    same(sig(consul_base.Consul.Agent.__init__), "(self, agent)", "Consul.Agent.__init__")
    same(sig(consul_base.Consul.Health.__init__), "(self, agent)", "Consul.Health.__init__")
    register = inspect.signature(consul_base.Consul.Agent.Service.register).parameters
    same(
        list(register)[:9],
        ["self", "name", "service_id", "address", "port", "tags", "check", "token", "meta"],
        "Consul.Agent.Service.register's parameters",
    )
    for exc in ("ACLPermissionDenied", "BadRequest", "ACLDisabled", "NotFound", "ClientError"):
        same(issubclass(getattr(consul_base, exc), consul_base.ConsulException), True, f"{exc}'s base class")


def response(code: int, body: str = "", index: str | None = None) -> Any:
    return consul_base.Response(code, {"X-Consul-Index": index} if index else {}, body, body.encode())


def test_status_callback_behaviour() -> None:
    """CB._status: 2xx and 404 pass; 400, 401, 403, other 4xx and 5xx raise the exceptions the
    transport turns into ConsulRejected, ConsulPermissionDenied and ConsulUnavailable."""
    for code in (200, 404):
        same(consul_base.CB._status(response(code)), None, f"CB._status on {code}")
    for code, exc in (
        (400, "BadRequest"),
        (401, "ACLDisabled"),
        (403, "ACLPermissionDenied"),
        (429, "ClientError"),
        (500, "ConsulException"),
        (503, "ConsulException"),
    ):
        with pytest.raises(consul_base.ConsulException) as caught:
            consul_base.CB._status(response(code, "why"))
        same(type(caught.value).__name__, exc, f"what CB._status raises on {code}")
        assert "why" in str(caught.value), f"CB._status no longer carries the agent's text on {code}; {WHY}"


def test_json_callback_with_index_behaviour() -> None:
    """CB.json(index=True), used for blocking reads: (X-Consul-Index, parsed body); 404 gives
    (index, None); an error status raises."""
    cb = consul_base.CB.json(index=True)
    same(
        cb(response(200, '[{"Service": {"ID": "a"}}]', "7")),
        ("7", [{"Service": {"ID": "a"}}]),
        "CB.json(index=True) on 200",
    )
    same(cb(response(404, "", "8")), ("8", None), "CB.json(index=True) on 404")
    with pytest.raises(consul_base.ACLPermissionDenied):
        cb(response(403, "denied"))


class Recorder:
    """Stands in for the transport: records what an endpoint asks it to send."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []

    def put(self, callback: Any, **kwargs: Any) -> Any:
        self.calls.append(("put", callback, kwargs))
        return "sent"

    get = delete = post = put


def test_endpoints_work_without_consul_init() -> None:
    """_Endpoints skips Consul.__init__ (it reads CONSUL_* itself): the endpoint classes must need
    nothing else from it. The registration we use sends the same PUT, path, body and no token
    header, through the transport's put, and its callback is CB.bool's."""
    rec = Recorder()
    endpoints = _Endpoints(rec)  # type: ignore[arg-type]
    check = {"HTTP": "http://127.0.0.1:8080/healthz", "Interval": "1s", "Status": "passing"}
    got = endpoints.agent.service.register(
        "web", service_id="web-1", address="127.0.0.1", port=8080, tags=["v1"], meta={"k": "v"}, check=check
    )
    same(got, "sent", "what register returns (the transport's answer)")
    ((method, callback, kwargs),) = rec.calls
    same(
        (method, kwargs.get("path"), kwargs.get("headers") or {}),
        ("put", "/v1/agent/service/register", {}),
        "how register calls the transport",
    )
    # Lower-case keys: the agent reads the register body case-insensitively.
    same(
        json.loads(kwargs["data"]),
        {
            "name": "web",
            "id": "web-1",
            "address": "127.0.0.1",
            "port": 8080,
            "tags": ["v1"],
            "meta": {"k": "v"},
            "check": check,
        },
        "the registration body",
    )
    same(callback(response(200, "")), True, "register's callback on 200")
    with pytest.raises(consul_base.BadRequest):
        callback(response(400, "bad"))


@pytest.mark.integration
def test_no_consul_package_is_left_behind_for_others() -> None:
    """In one process: the sidecar's client loads, without python-consul2's package nor requests;
    then other code's `import consul` gets the whole package (its Consul class, its version)."""
    code = (
        "import sys\n"
        "import sidecar.registry.consul\n"
        "print(sorted(m for m in ('consul', 'consul.base', 'requests') if m in sys.modules))\n"
        "import consul\n"
        "print(consul.__version__, consul.Consul.__module__, consul.base.ConsulException.__name__)\n"
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    same(
        out.stdout.splitlines(),
        ["[]", f"{importlib.metadata.version('python-consul2')} consul.std ConsulException"],
        "what a later `import consul` gets",
    )


@pytest.mark.integration
def test_a_consul_package_imported_before_is_used_as_it_is() -> None:
    """Other code imported `consul` first: the sidecar uses that very consul.base (one set of
    exception classes in the process), not a second copy."""
    code = "import consul, sidecar.registry.consul as c\nprint(c.consul_base is consul.base)\n"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    same(out.stdout.strip(), "True", "which consul.base the sidecar uses")


@pytest.mark.asyncio
async def test_aiohttp_still_has_the_switch_that_stops_re_sending() -> None:
    """consul_client turns off aiohttp's own re-sending of dropped requests through
    ClientSession._retry_connection (as aiohttp's test client does); the attribute must still be
    one aiohttp declares and reads (tests/test_consul_keepalive.py checks the behaviour)."""
    assert "_retry_connection" in aiohttp.ClientSession.ATTRS, "aiohttp renamed ClientSession._retry_connection"
    assert "self._retry_connection" in inspect.getsource(aiohttp.ClientSession._request), (
        "aiohttp changed how it decides to re-send a request: check consul_client._session"
    )
    settings = ConsulSettings(
        scheme="http",
        host="127.0.0.1",
        port=8500,
        token=TokenSource(),
        ca_file=None,
        cert_file=None,
        key_file=None,
        tls_verify=True,
        timeout=2.0,
    )
    session = _session(settings, force_close=True)
    try:
        assert session._retry_connection is False
    finally:
        await session.close()
