"""The one module that talks to the Consul agent.

It uses python-consul2's endpoint classes (``consul.base.Consul.Agent`` and
``.Health``) over a transport of ours, because the library's asyncio transport
sets no timeout, opens a session per request, ignores CA files and client
certificates, and reads ``CONSUL_*`` variables behind the configuration's back.
Here every request has a deadline, the token is read from its source on each
request (so a rotated token file takes effect at once) and every failure is
turned into one of three errors the lifecycle can act on.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from ._consul_import import consul_base

from .clock import Clock
from .config import ConsulSettings
from .durations import parse_duration


class ConsulError(Exception):
    """A request to the agent failed. The message never contains the token."""


class ConsulUnavailable(ConsulError):
    """No answer, a timeout or a 5xx: retrying may help.

    ``maybe_applied`` is False only when the request cannot have reached the agent (the
    connection was refused or the name did not resolve): then a write is known not to be done.
    """

    def __init__(self, message: str, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class ConsulPermissionDenied(ConsulError):
    """403 from the ACL system: retrying with the same token will not help."""


class ConsulRejected(ConsulError):
    """400: the agent refused the request as malformed."""


class _Transport(consul_base.HTTPClient):  # type: ignore[misc]  # python-consul2 has no type hints
    """python-consul2's HTTPClient contract, on one aiohttp session with deadlines."""

    def __init__(self, settings: ConsulSettings) -> None:
        super().__init__(settings.host, settings.port, settings.scheme, verify=settings.tls_verify)
        self.settings = settings
        self.base_uri = settings.address
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = _ssl_context(settings) if settings.scheme == "https" else None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # force_close: one short connection per request. A pooled keep-alive
            # connection to an agent that restarted fails on reuse, which would
            # look like an outage; a loopback connect costs well under 1 ms.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        callback: Callable[[Any], Any],
        method: str,
        path: str,
        params: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        uri = self.uri(path, params)
        hdrs = dict(headers or {})
        try:
            token = self.settings.token.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConsulPermissionDenied(f"cannot read the ACL token file {self.settings.token.file}: {e}") from None
        if token:
            hdrs["X-Consul-Token"] = token
        limit = self.settings.timeout if timeout is None else timeout
        what = f"{method} {path}"
        try:
            async with asyncio.timeout(limit):
                async with self._get_session().request(method, uri, data=data, headers=hdrs, ssl=self._ssl or True) as resp:
                    body = await resp.text(encoding="utf-8")
                    response = consul_base.Response(resp.status, resp.headers, body, body.encode())
        except TimeoutError:
            raise ConsulUnavailable(f"{what}: no answer from {self.settings.address} within {limit:g}s") from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise ConsulRejected(f"{what}: TLS certificate of {self.settings.address} not trusted: {e.certificate_error}") from None
        except aiohttp.ClientSSLError as e:
            raise ConsulRejected(f"{what}: TLS handshake with {self.settings.address} failed: {e}") from None
        except (aiohttp.ClientError, OSError) as e:
            if _tls_failure(e):
                hint = "" if self.settings.cert_file else " (does the agent require a client certificate? set consul.cert_file and consul.key_file)"
                raise ConsulRejected(f"{what}: TLS handshake with {self.settings.address} failed: {e}{hint}") from None
            never_sent = isinstance(e, aiohttp.ClientConnectorError) and not isinstance(e, aiohttp.ClientSSLError)
            raise ConsulUnavailable(f"{what}: {self.settings.address} unreachable: {e.__class__.__name__}: {e}",
                                    maybe_applied=not never_sent) from None
        try:
            return callback(response)
        except consul_base.ACLPermissionDenied as e:
            raise ConsulPermissionDenied(f"{what}: permission denied by Consul ACLs: {_one_line(e)}") from None
        except consul_base.BadRequest as e:
            raise ConsulRejected(f"{what}: rejected by the agent: {_one_line(e)}") from None
        except consul_base.ConsulException as e:
            raise ConsulUnavailable(f"{what}: agent error: {_one_line(e)}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # A 200 whose body is not the agent's JSON, or no X-Consul-Index: not a Consul agent.
            raise ConsulUnavailable(
                f"{what}: unexpected answer from {self.settings.address} (HTTP {response.code}): is it a Consul agent? "
                f"{e.__class__.__name__}: {_one_line(e)}"
            ) from None

    # The contract python-consul2's endpoint classes call.
    async def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return await self.request(callback, "GET", path, params, None, headers)

    async def put(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return await self.request(callback, "PUT", path, params, data, headers)

    async def delete(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return await self.request(callback, "DELETE", path, params, data, headers)

    async def post(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return await self.request(callback, "POST", path, params, data, headers)


_CERT_PROBLEMS = ("CERTIFICATE", "UNKNOWN_CA", "WRONG_VERSION_NUMBER", "HANDSHAKE_FAILURE")


def _tls_failure(e: BaseException) -> bool:
    """A certificate problem anywhere in the chain: configuration, not an outage. (An EOF in the
    middle of a handshake, e.g. while the agent restarts, is an outage and is retried.)"""
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen).upper()
        if (isinstance(seen, ssl.SSLError) or "[SSL:" in text) and any(p in text for p in _CERT_PROBLEMS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _ssl_context(s: ConsulSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
    if s.cert_file and s.key_file:
        ctx.load_cert_chain(str(s.cert_file), str(s.key_file))
    if not s.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Endpoints(consul_base.Consul):  # type: ignore[misc]  # python-consul2 has no type hints
    """python-consul2's endpoint groups bound to our transport.

    ``consul.base.Consul.__init__`` is deliberately not called: it reads
    CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN itself (overriding the validated
    configuration) and raises on addresses our configuration accepts.
    """

    def __init__(self, transport: _Transport) -> None:  # noqa: D107
        self.http = transport
        self.token = None  # the transport adds the token, read fresh per request
        self.dc = None
        self.consistency = "default"
        self.agent = consul_base.Consul.Agent(self)
        self.health = consul_base.Consul.Health(self)


def _json_or_none(response: Any) -> Any:
    """Callback: JSON body, or None for 404."""
    if response.code == 404:
        return None
    consul_base.CB._status(response)
    return json.loads(response.body)


class Deregistration(enum.Enum):
    CONFIRMED = "confirmed"  # the agent and the catalog no longer list the instance
    BLOCKED = "blocked"  # the agent dropped it but the catalog still lists it (ACLs)
    UNCONFIRMED = "unconfirmed"  # the deadline passed without an answer that proves it


@dataclass(frozen=True)
class DeregisterResult:
    outcome: Deregistration
    attempts: int
    error: str | None


class Agent(Protocol):
    """What the lifecycle needs from Consul; tests of pure logic may pass a fake."""

    address: str

    async def register(self, payload: dict[str, Any]) -> None: ...

    def token_rotated(self) -> bool: ...

    async def registered(self, service_id: str) -> dict[str, Any] | None: ...

    async def check_status(self, service_id: str) -> str | None: ...

    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool: ...

    async def check_catalog_visibility(self, name: str, service_id: str) -> bool: ...

    async def deregister_confirmed(self, name: str, service_id: str, deadline: float) -> DeregisterResult: ...

    async def close(self) -> None: ...


class ConsulAgent:
    """The local Consul agent, reached through python-consul2 with deadlines."""

    def __init__(self, settings: ConsulSettings, clock: Clock) -> None:
        self._transport = _Transport(settings)
        self._c = _Endpoints(self._transport)
        self._clock = clock
        self.address = settings.address
        self._registered_with: str | None = None  # digest of the token of the last registration
        self._catalog_visible: bool | None = None  # can our token read our own catalog entry?

    def _token_digest(self) -> str:
        try:
            token = self._transport.settings.token.read() or ""
        except (OSError, UnicodeDecodeError):
            return self._registered_with or ""  # unreadable now: the next request reports it
        return hashlib.sha256(token.encode()).hexdigest()

    def token_rotated(self) -> bool:
        """Whether the token source now holds another token than the last registration used."""
        return self._registered_with is not None and self._token_digest() != self._registered_with

    async def close(self) -> None:
        await self._transport.close()

    async def register(self, payload: dict[str, Any]) -> None:
        """PUT /v1/agent/service/register (replaces a definition with the same ID)."""
        digest = self._token_digest()
        ok = await self._c.agent.service.register(
            payload["Name"],
            service_id=payload["ID"],
            address=payload["Address"],
            port=payload["Port"],
            tags=payload["Tags"],
            meta=payload["Meta"],
            check=payload["Check"],
        )
        if ok is not True:
            raise ConsulRejected(f"PUT /v1/agent/service/register: {self.address} did not answer 200: is it a Consul agent?")
        self._registered_with = digest

    async def registered(self, service_id: str) -> dict[str, Any] | None:
        """The agent's local definition of ``service_id``, or None if it holds none."""
        result = await self._transport.get(_json_or_none, f"/v1/agent/service/{service_id}")
        return result if isinstance(result, dict) else None

    async def check_status(self, service_id: str) -> str | None:
        """The worst status of the agent's checks of ``service_id`` ("critical", "warning",
        "passing"), or None when it holds no check for it."""
        checks = await self._transport.get(_json_or_none, "/v1/agent/checks")
        if not isinstance(checks, dict):
            return None
        found = {str(c.get("Status")) for c in checks.values() if isinstance(c, dict) and c.get("ServiceID") == service_id}
        if not found:
            return None
        return next((s for s in ("critical", "warning", "passing") if s in found), "unknown")

    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool:
        """Whether the servers' catalog (/v1/health/service/<name>) lists ``service_id``.

        ``consistent``: read through the leader with a quorum check, not a possibly stale follower.
        """
        if consistent:
            _, entries = await self.health_service(name, consistent=True)
        else:
            _, entries = await self._c.health.service(name)
        return any(e.get("Service", {}).get("ID") == service_id for e in entries or [])

    async def check_catalog_visibility(self, name: str, service_id: str) -> bool:
        """Right after a registration: does the catalog show it to our token?

        With ACLs, /v1/health/service answers an empty list to a token without
        node:read, which would make every deregistration look confirmed. If we
        cannot see ourselves, confirmations rely on the agent's answer alone.
        """
        deadline = self._clock.monotonic() + max(1.0, self._transport.settings.timeout)
        while True:
            if await self.catalog_lists(name, service_id):
                self._catalog_visible = True
                return True
            if self._clock.monotonic() >= deadline:
                self._catalog_visible = False
                return False
            await self._clock.sleep(0.1)

    async def health_service(
        self, name: str, index: str | None = None, wait: str | None = None, passing: bool = False, consistent: bool = False
    ) -> tuple[str, list[dict[str, Any]]]:
        """Blocking-capable read of /v1/health/service/<name>: (X-Consul-Index, entries)."""
        params: list[tuple[str, str]] = []
        if index:
            params += [("index", index)]
            if wait:
                params += [("wait", wait)]
        if passing:
            params += [("passing", "1")]
        if consistent:
            params += [("consistent", "")]
        # A blocking query legitimately takes up to `wait` (plus Consul's jitter
        # of wait/16): the request deadline must cover it.
        extra = parse_duration(wait) * 1.1 if (index and wait) else 0.0
        idx, entries = await self._transport.request(
            consul_base.CB.json(index=True),
            "GET",
            f"/v1/health/service/{name}",
            params,
            None,
            None,
            timeout=self._transport.settings.timeout + extra,
        )
        return str(idx), list(entries or [])

    async def deregister_confirmed(self, name: str, service_id: str, deadline: float) -> DeregisterResult:
        """Deregister through the agent and prove it, retrying until ``deadline`` (monotonic).

        A timed-out request is "unknown", not "done": the write may still be
        applied later (a frozen agent), so every round ends with reads of the
        agent and the catalog. The agent answers 200 even where ACLs keep the
        catalog entry, which is why the catalog is read too. A round cut off by
        the deadline does not erase what the previous complete round showed.
        """
        attempts = 0
        outcome, error = Deregistration.UNCONFIRMED, f"no answer from {self.address} before the deregistration deadline"
        delay = 0.05
        agent_gone = False
        while True:
            attempts += 1
            try:
                # One round (deregister, read the agent, read the catalog) must
                # not outlive the deadline, whatever the per-request timeout.
                async with asyncio.timeout(max(0.001, deadline - self._clock.monotonic())):
                    # Once the agent has dropped it, only read: with ACLs on, deregistering
                    # an ID the agent no longer knows answers 500 "Unknown service".
                    if not agent_gone:
                        await self._c.agent.service.deregister(service_id)
                    agent_gone = await self.registered(service_id) is None
                    listed = self._catalog_visible is not False and await self.catalog_lists(name, service_id)
                if agent_gone and not listed:
                    return DeregisterResult(Deregistration.CONFIRMED, attempts, None)
                if agent_gone:
                    outcome = Deregistration.BLOCKED
                    error = "the agent dropped the service but the catalog still lists it (deregistration blocked by ACLs?)"
                else:
                    outcome, error = Deregistration.UNCONFIRMED, "the agent still holds the service after deregistering it"
            except TimeoutError:
                pass
            except ConsulError as e:
                outcome, error = Deregistration.UNCONFIRMED, str(e)
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return DeregisterResult(outcome, attempts, error)
            await self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)
