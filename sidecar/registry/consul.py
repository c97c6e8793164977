"""The one module that talks to the Consul agent.

It uses python-consul2's endpoint classes (``consul.base.Consul.Agent`` and
``.Health``) over a transport of ours, because the library's asyncio transport
sets no timeout, opens a session per request, ignores CA files and client
certificates, and reads ``CONSUL_*`` variables behind the configuration's back.
Here every request has a deadline, the token is read from its source on each
request (so a rotated token file takes effect at once; for ``run`` off the event loop, with a
deadline, see token_cache.py) and every failure is
turned into one of three errors the lifecycle can act on.

Two transports share that contract, the token handling and the reading of answers: ``_Transport``
on aiohttp for ``run`` (concurrent, kept-alive reads), and ``_BlockingTransport`` on http.client
for ``consul-sidecar wait``, a one-shot command that needs no concurrency: importing aiohttp
(its connector builds SSL contexts at import) would be most of its run time. So aiohttp, yarl and
asyncio are imported where the asynchronous transport runs, never at this module's import.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import posixpath
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ConsulSettings, TokenError
from ..config.files import read_ca_dir
from ..durations import parse_duration
from ..redact import scrub
from ._consul_import import consul_base
from .base import Agent as Agent  # re-exported: the names the lifecycle once took from here
from .base import DeregisterResult as DeregisterResult
from .base import Deregistration as Deregistration
from .base import (
    RegistryError,
    RegistryPermissionDenied,
    RegistryRejected,
    RegistryUnavailable,
)

if TYPE_CHECKING:
    import ssl

    import aiohttp
    import yarl
    from structlog.typing import FilteringBoundLogger

    from ..clock import Clock
    from .token_cache import TokenCache


class ConsulError(RegistryError):
    """A request to the agent failed. The message never contains the token: what answers at the
    agent's address may echo the request's headers into its error body, so every answer's body and
    every error leaving a transport pass ``redact.scrub`` with the token sent and the last one read."""


class ConsulUnavailable(ConsulError, RegistryUnavailable):
    """No answer, a timeout or a 5xx: retrying may help.

    ``maybe_applied`` is False only when the request cannot have reached the agent (the
    connection was refused or the name did not resolve): then a write is known not to be done.
    """


class ConsulPermissionDenied(ConsulError, RegistryPermissionDenied):
    """403 from the ACL system: retrying with the same token will not help."""


class ConsulRejected(ConsulError, RegistryRejected):
    """400: the agent refused the request as malformed."""


class _TokenReader:
    """The token, read from its source for each request; shared by both transports."""

    def __init__(self, settings: ConsulSettings, log: FilteringBoundLogger | None) -> None:
        self.settings = settings
        self._logger = log
        self._last_token: str | None = None  # the last token read successfully
        self._token_problem: str | None = None  # why the source gives none now (warned once)

    @property
    def _log(self) -> FilteringBoundLogger:
        if self._logger is None:
            # Resolved when first needed: `wait` never logs and does not import structlog.
            from ..log import get_logger

            self._logger = get_logger()
        return self._logger

    def token(self) -> str | None:
        """The token for the next request: the source's, or the last good one while the source fails.

        A token file deleted or garbled mid-run must not leave the drain's requests without a
        token (they would be refused, and the app signalled while registered): keep the last good
        one and warn once. Raises ConsulPermissionDenied only if no good token was ever read.
        """
        try:
            token = self.settings.token.read()
        except TokenError as e:
            if self._last_token is None:
                raise ConsulPermissionDenied(str(e)) from None
            if self._token_problem is None:
                self._log.warning(
                    "sidecar.consul.token_unreadable",
                    error=str(e),
                    action="using the last token read successfully until the file is fixed",
                )
            self._token_problem = str(e)
            return self._last_token
        if self._token_problem is not None:
            self._token_problem = None
            self._log.info("sidecar.consul.token_readable", source=self.settings.token.describe())
        self._last_token = token
        return token

    def _secrets(self, sent: str | None) -> tuple[str | None, ...]:
        """What an answer or an error must not show: the token sent with the request, the last one read."""
        return (sent, self._last_token)

    def _scrubbed(self, e: ConsulError, sent: str | None) -> ConsulError:
        """``e`` with the token removed from its message (the last safety net; answers are scrubbed first)."""
        e.args = tuple(scrub(a, self._secrets(sent)) if isinstance(a, str) else a for a in e.args)
        return e

    def _headers(self, headers: dict[str, str] | None) -> tuple[dict[str, str], str | None]:
        hdrs = dict(headers or {})
        token = self.token()
        if token:
            hdrs["X-Consul-Token"] = token
        return hdrs, token

    def _target(self, path: str, params: Any = None) -> str:
        """``path`` as built by this module, already percent-encoded (see ``_segment``), sent as is:
        python-consul2's ``uri`` and yarl would otherwise quote it again or resolve dot segments."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return path + query


def _response(status: int, headers: Any, content: bytes, secrets: tuple[str | None, ...]) -> Any:
    """python-consul2's Response. Whatever answers at the agent's address (a proxy's latin-1 502
    page) may not be UTF-8: the status decides what it means, the body only explains. The token is
    taken out of the body before anything reads it (an agent's answer never contains it; a server that
    echoes the request's headers into an error would put it into every message built from the body,
    and a message cut at 300 characters would keep a piece of it that no later scrub recognises)."""
    if any(s and s.encode() in content for s in secrets):
        content = scrub(content.decode("utf-8", errors="replace"), secrets).encode()
    return consul_base.Response(status, headers, content.decode("utf-8", errors="replace"), content)


def _answer(callback: Callable[[Any], Any], response: Any, what: str, address: str) -> Any:
    """What ``callback`` makes of an answer, its failures turned into the three errors."""
    try:
        return callback(response)
    except consul_base.ACLPermissionDenied as e:
        raise ConsulPermissionDenied(f"{what}: permission denied by Consul ACLs: {_one_line(e)}") from None
    except consul_base.BadRequest as e:
        raise ConsulRejected(f"{what}: rejected by the agent: {_one_line(e)}") from None
    except consul_base.ConsulException as e:
        raise ConsulUnavailable(f"{what}: agent error: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the callbacks parse whatever came back
        # A 200 whose body is not the agent's JSON, or no X-Consul-Index: not a Consul agent.
        raise ConsulUnavailable(
            f"{what}: unexpected answer from {address} (HTTP {response.code}): is it a Consul agent? "
            f"{e.__class__.__name__}: {_one_line(e)}"
        ) from None


def _no_answer(what: str, s: ConsulSettings, limit: float) -> ConsulUnavailable:
    return ConsulUnavailable(f"{what}: no answer from {s.address} within {limit:g}s")


def _failed(what: str, s: ConsulSettings, e: BaseException, never_sent: bool) -> ConsulError:
    """A request that got no answer: a TLS configuration problem, or the agent unreachable."""
    if _tls_failure(e):
        hint = (
            ""
            if s.cert_file
            else " (does the agent require a client certificate? set consul.cert_file and consul.key_file)"
        )
        return ConsulRejected(f"{what}: TLS handshake with {s.address} failed: {e}{hint}")
    return ConsulUnavailable(
        f"{what}: {s.address} unreachable: {e.__class__.__name__}: {e}", maybe_applied=not never_sent
    )


def _unusable(what: str, s: ConsulSettings, e: BaseException, token: str | None) -> ConsulUnavailable:
    # A malformed status line or header, a header value the client refuses: an unusable answer,
    # never a crash; the request may have been applied.
    return ConsulUnavailable(f"{what}: unusable answer from {s.address}: {e.__class__.__name__}: {_one_line(e, token)}")


class _Transport(_TokenReader, consul_base.HTTPClient):  # type: ignore[misc]  # python-consul2 has no type hints
    """python-consul2's HTTPClient contract, on aiohttp sessions with deadlines.

    Reads (GET) go over one kept-alive connection: the registration check every second then
    costs one request, not a connect, a close and a TIME_WAIT socket each time. A pooled
    connection can be dead on reuse (the agent restarted or closed it at that moment): a read
    that meets a dropped connection is sent once more on a fresh one, within its deadline.
    Writes are never re-sent (one that may have been sent counts as applied, see lifecycle.py)
    and keep one short connection each, as before: they never meet a stale pooled connection,
    so "connection refused" still proves a write was not sent.

    aiohttp would re-send a dropped GET, PUT or DELETE by itself, once, from whatever its pool
    holds; that is turned off (``_session``): a registration could be sent twice, and a re-send
    refused by a restarting agent would report "not sent" for a write that may have landed.
    """

    def __init__(
        self, settings: ConsulSettings, log: FilteringBoundLogger | None = None, tokens: TokenCache | None = None
    ) -> None:
        consul_base.HTTPClient.__init__(self, settings.host, settings.port, settings.scheme, verify=settings.tls_verify)
        _TokenReader.__init__(self, settings, log)
        if tokens is None:
            from .token_cache import READ_DEADLINE, TokenCache

            tokens = TokenCache(settings.token, min(READ_DEADLINE, settings.timeout / 2), log)
        # Read off the event loop with a deadline: a token file on a stalled mount must not freeze the sidecar.
        self.tokens = tokens
        self.base_uri = settings.base_url
        self._session: aiohttp.ClientSession | None = None  # reads: kept alive
        self._write_session: aiohttp.ClientSession | None = None  # writes: one connection per request
        self._ssl: ssl.SSLContext | None = _ssl_context(settings) if settings.scheme == "https" else None
        # Failed requests per operation (``operation``), for /metrics: one dict update per failure.
        self.errors: dict[str, int] = dict.fromkeys(OPERATIONS, 0)

    def _get_session(self, method: str = "GET") -> aiohttp.ClientSession:
        if method != "GET":
            if self._write_session is None or self._write_session.closed:
                self._write_session = _session(self.settings, force_close=True)
            return self._write_session
        if self._session is None or self._session.closed:
            self._session = _session(self.settings, force_close=False)
        return self._session

    async def close(self) -> None:
        for session in (self._session, self._write_session):
            if session is not None:
                await session.close()

    async def _exchange(
        self, session: aiohttp.ClientSession, method: str, uri: yarl.URL, data: Any, headers: dict[str, str]
    ) -> Any:
        async with session.request(
            method,
            uri,
            data=data,
            headers=headers,
            ssl=self._ssl or True,
            server_hostname=self.settings.tls_server_name,
        ) as resp:
            return _response(resp.status, resp.headers, await resp.read(), self._secrets(headers.get("X-Consul-Token")))

    async def _read_again(self, uri: yarl.URL, headers: dict[str, str]) -> Any:
        """A read once more, on a connection of its own (never one from the pool)."""
        async with _session(self.settings, force_close=True) as fresh:
            return await self._exchange(fresh, "GET", uri, None, headers)

    def uri(self, path: str, params: Any = None) -> yarl.URL:
        import yarl

        return yarl.URL(self.settings.base_url + self._target(path, params), encoded=True)

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
        try:
            return await self._request(callback, method, path, params, data, headers, timeout)
        except ConsulError as e:
            op = operation(method, path)
            self.errors[op] = self.errors.get(op, 0) + 1
            raise self._scrubbed(e, None) from None

    async def _request(
        self,
        callback: Callable[[Any], Any],
        method: str,
        path: str,
        params: Any,
        data: Any,
        headers: dict[str, str] | None,
        timeout: float | None,
    ) -> Any:
        import asyncio

        import aiohttp

        from .token_cache import TokenStalled

        uri = self.uri(path, params)
        hdrs = dict(headers or {})
        try:
            token = await self.tokens.current()
        except TokenError as e:
            raise ConsulPermissionDenied(str(e)) from None
        except TokenStalled as e:
            raise ConsulUnavailable(f"{method} {path}: {e}", maybe_applied=False) from None
        if token:
            hdrs["X-Consul-Token"] = token
        limit = self.settings.timeout if timeout is None else timeout
        what = f"{method} {path}"
        try:
            async with asyncio.timeout(limit):
                try:
                    response = await self._exchange(self._get_session(method), method, uri, data, hdrs)
                except _dropped() as e:
                    if method != "GET" or isinstance(e, aiohttp.ClientConnectorError):
                        raise
                    response = await self._read_again(uri, hdrs)
        except TimeoutError:
            raise _no_answer(what, self.settings, limit) from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise ConsulRejected(
                f"{what}: TLS certificate of {self.settings.address} not trusted: {e.certificate_error}"
            ) from None
        except aiohttp.ClientSSLError as e:
            raise ConsulRejected(f"{what}: TLS handshake with {self.settings.address} failed: {e}") from None
        except (aiohttp.ClientError, OSError) as e:
            never_sent = isinstance(e, aiohttp.ClientConnectorError) and not isinstance(e, aiohttp.ClientSSLError)
            raise _failed(what, self.settings, e, never_sent) from None
        except Exception as e:  # noqa: BLE001 - anything else aiohttp raises on what it sent or got
            raise _unusable(what, self.settings, e, token) from None
        return _answer(callback, response, what, self.settings.address)

    # The contract python-consul2's endpoint classes call.
    async def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return await self.request(callback, "GET", path, params, None, headers)

    async def put(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return await self.request(callback, "PUT", path, params, data, headers)

    async def delete(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return await self.request(callback, "DELETE", path, params, data, headers)

    async def post(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return await self.request(callback, "POST", path, params, data, headers)


class _CutOff(Exception):
    """The caller's own deadline ended a request (not the request's deadline)."""


class _Connection(http.client.HTTPConnection):
    """One connection to the agent: TCP or its unix socket, TLS when the address is https."""

    def __init__(self, s: ConsulSettings, context: ssl.SSLContext | None, timeout: float) -> None:
        super().__init__("localhost" if s.unix_socket is not None else s.host, s.port or None, timeout=timeout)
        self._settings = s
        self._context = context

    def connect(self) -> None:
        if self._settings.unix_socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self._settings.unix_socket)
            except BaseException:
                sock.close()
                raise
            self.sock = sock
        else:
            super().connect()
        if self._context is not None:
            self.sock = self._context.wrap_socket(
                self.sock, server_hostname=self._settings.tls_server_name or self._settings.host
            )


class _BlockingTransport(_TokenReader, consul_base.HTTPClient):  # type: ignore[misc]  # python-consul2 has no type hints
    """python-consul2's HTTPClient contract, blocking, on the standard library: for ``wait``.

    One connection per request (a blocking query lasts seconds: nothing to keep alive for).
    A request's deadline covers all of it, connect to last byte, as ``asyncio.timeout`` does for
    ``_Transport``: a watchdog shuts the socket down when it passes, so an agent that trickles
    bytes cannot stretch it.
    """

    def __init__(self, settings: ConsulSettings) -> None:
        consul_base.HTTPClient.__init__(self, settings.host, settings.port, settings.scheme, verify=settings.tls_verify)
        _TokenReader.__init__(self, settings, None)
        self.base_uri = settings.base_url
        self._ssl: ssl.SSLContext | None = _ssl_context(settings) if settings.scheme == "https" else None

    def close(self) -> None:
        """Nothing is kept open between requests."""

    def request(
        self,
        callback: Callable[[Any], Any],
        method: str,
        path: str,
        params: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        cutoff: float | None = None,
    ) -> Any:
        """As ``_Transport.request``; ``cutoff`` (monotonic), when sooner than the request's own
        deadline, ends it with ``_CutOff`` instead of an error."""
        try:
            return self._request(callback, method, path, params, data, headers, timeout, cutoff)
        except ConsulError as e:
            raise self._scrubbed(e, None) from None

    def _request(
        self,
        callback: Callable[[Any], Any],
        method: str,
        path: str,
        params: Any,
        data: Any,
        headers: dict[str, str] | None,
        timeout: float | None,
        cutoff: float | None,
    ) -> Any:
        hdrs, token = self._headers(headers)
        own = self.settings.timeout if timeout is None else timeout
        limit = own if cutoff is None else max(0.001, min(own, cutoff - time.monotonic()))
        cut = limit < own
        what = f"{method} {path}"
        conn = _Connection(self.settings, self._ssl, limit)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(limit, expire)
        watchdog.daemon = True
        watchdog.start()
        connected = False
        try:
            conn.connect()
            connected = True
            body = data.encode() if isinstance(data, str) else data
            conn.request(method, self._target(path, params), body=body or None, headers=hdrs)
            resp = conn.getresponse()
            response = _response(resp.status, resp.headers, resp.read(), self._secrets(token))
        except Exception as e:  # noqa: BLE001 - sorted below, as _Transport sorts aiohttp's
            if expired.is_set() or isinstance(e, TimeoutError):
                if cut:
                    raise _CutOff() from None
                raise _no_answer(what, self.settings, limit) from None
            ssl = sys.modules.get("ssl")
            if ssl is not None and isinstance(e, ssl.SSLCertVerificationError):
                raise ConsulRejected(f"{what}: TLS certificate of {self.settings.address} not trusted: {e}") from None
            if isinstance(e, OSError) or not connected:
                # Refused, or a name that does not resolve: nothing reached the agent.
                never_sent = not connected and isinstance(
                    e, (ConnectionRefusedError, FileNotFoundError, socket.gaierror)
                )
                raise _failed(what, self.settings, e, never_sent) from None
            raise _unusable(what, self.settings, e, token) from None
        finally:
            watchdog.cancel()
            conn.close()
        return _answer(callback, response, what, self.settings.address)

    # The contract python-consul2's endpoint classes call.
    def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return self.request(callback, "GET", path, params, None, headers)

    def put(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return self.request(callback, "PUT", path, params, data, headers)

    def delete(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return self.request(callback, "DELETE", path, params, data, headers)

    def post(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return self.request(callback, "POST", path, params, data, headers)


def _health_query(
    name: str, index: str | None, wait: str | None, passing: bool, consistent: bool, timeout: float
) -> tuple[str, list[tuple[str, str]], float]:
    """Path, parameters and deadline of a (blocking-capable) read of /v1/health/service/<name>."""
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
    return f"/v1/health/service/{_segment(name)}", params, timeout + extra


class BlockingHealth:
    """``consul-sidecar wait``'s reads of the catalog, blocking, without aiohttp or asyncio."""

    def __init__(self, settings: ConsulSettings) -> None:
        self._transport = _BlockingTransport(settings)
        self.address = settings.address

    def close(self) -> None:
        self._transport.close()

    def health_service(
        self,
        name: str,
        index: str | None = None,
        wait: str | None = None,
        passing: bool = False,
        consistent: bool = False,
        cutoff: float | None = None,
    ) -> tuple[str, list[dict[str, Any]]]:
        """As ``ConsulAgent.health_service``; raises TimeoutError when ``cutoff`` (monotonic) ends it first."""
        path, params, limit = _health_query(name, index, wait, passing, consistent, self._transport.settings.timeout)
        try:
            idx, entries = self._transport.request(
                consul_base.CB.json(index=True), "GET", path, params, timeout=limit, cutoff=cutoff
            )
        except _CutOff:
            raise TimeoutError from None
        return str(idx), list(entries or [])


_CERT_PROBLEMS = ("CERTIFICATE", "UNKNOWN_CA", "WRONG_VERSION_NUMBER", "HANDSHAKE_FAILURE")


def _tls_failure(e: BaseException) -> bool:
    """A certificate problem anywhere in the chain: configuration, not an outage. (An EOF in the
    middle of a handshake, e.g. while the agent restarts, is an outage and is retried.)"""
    ssl = sys.modules.get("ssl")  # not imported: no TLS was attempted
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen).upper()
        if ((ssl is not None and isinstance(seen, ssl.SSLError)) or "[SSL:" in text) and any(
            p in text for p in _CERT_PROBLEMS
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# The ``operation`` label of consul_sidecar_consul_request_errors_total: (method, path prefix, name),
# the first match wins. Stable names: dashboards and alerts match on them.
_OPERATIONS = (
    ("PUT", "/v1/agent/service/register", "register"),
    ("PUT", "/v1/agent/service/deregister/", "deregister"),
    ("PUT", "/v1/agent/service/maintenance/", "maintenance"),
    ("GET", "/v1/agent/service/", "read_registration"),
    ("GET", "/v1/agent/checks", "read_checks"),
    ("GET", "/v1/agent/health/service/id/", "read_health"),
    ("GET", "/v1/health/service/", "read_catalog"),
    ("GET", "/v1/status/leader", "read_leader"),
)
OPERATIONS = (*(name for _, _, name in _OPERATIONS), "other")


def operation(method: str, path: str) -> str:
    """The ``operation`` label of a request to the agent."""
    for m, prefix, name in _OPERATIONS:
        if method == m and path.startswith(prefix):
            return name
    return "other"


def _segment(value: str) -> str:
    """``value`` as one percent-encoded segment of an agent API path.

    The agent decodes the path and, like every Go ``http.ServeMux``, answers a path that
    ``path.Clean`` would change (``.``, ``..``, ``a/../b``, ``a//b``) with a redirect to another
    endpoint: such a value cannot be addressed at all, so it is refused before anything is sent
    (and before it is registered, since it could never be read back or deregistered).
    """
    if not value or value in (".", "..") or value.startswith("/") or _go_clean(f"/x/{value}") != f"/x/{value}":
        raise ConsulRejected(
            f"{value!r} cannot be used in a Consul agent API path: the agent would read it as another path"
        )
    return urllib.parse.quote(value, safe="")


def _go_clean(path: str) -> str:
    """What Go's ServeMux makes of a decoded path (path.Clean, keeping a trailing slash)."""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


# Texts of the agent's 500 answers when the servers behind it cannot serve a read: no leader
# (an election, a lost quorum), or the server it asked cannot reach one.
_SERVER_TROUBLE = ("no cluster leader", "rpc error", "no known consul servers", "leadership lost", "raft")


@dataclass(frozen=True)
class _ServersUnavailable:
    """A catalog read the agent could not get answered by the servers (HTTP 500)."""

    detail: str


def _catalog_answer(response: Any) -> Any:
    """Callback: the entries of a catalog read, or ``_ServersUnavailable`` for a 500 naming the servers."""
    if response.code == 500 and any(m in str(response.body).lower() for m in _SERVER_TROUBLE):
        return _ServersUnavailable(" ".join(str(response.body).split())[:300])
    consul_base.CB._status(response)
    return json.loads(response.body)


def _agent_health_answer(response: Any) -> Any:
    """Callback: /v1/agent/health/service/id answers its verdict in the status code too (429 warning,
    503 critical), with the same JSON body as a 200; None for 404 (the agent holds no such service)."""
    if response.code == 404:
        return None
    if response.code not in (429, 503):
        consul_base.CB._status(response)
    doc = json.loads(response.body)
    if not isinstance(doc, dict) or "AggregatedStatus" not in doc:
        raise ValueError("no AggregatedStatus in the answer")
    return doc


def _deregister_answer(response: Any) -> bool:
    """Callback: True if the agent took the deregistration; False for its 500 "Unknown service",
    which only an agent that enforces ACLs gives for an ID it no longer holds."""
    if response.code == 500 and "unknown service" in str(response.body).lower():
        return False
    consul_base.CB._status(response)
    return True


def _one_line(e: BaseException, secret: str | None = None) -> str:
    text = str(e)
    if secret:
        text = text.replace(secret, "<redacted>")
    return " ".join(text.split())[:300]


def _session(s: ConsulSettings, force_close: bool) -> aiohttp.ClientSession:
    import aiohttp

    session = aiohttp.ClientSession(connector=_connector(s, force_close=force_close))
    # What aiohttp's own test client does to stop it re-sending requests (see _Transport);
    # tests/test_consul_contract.py fails if the switch goes away.
    session._retry_connection = False
    return session


# The agent closed the connection without answering (reset, broken pipe, EOF): what a pooled
# connection does on reuse when the agent has restarted. (ClientConnectorError, a connect that
# failed, is excluded where this is caught: a fresh connection would fail the same way.)
# (aiohttp's ClientConnectionResetError, "cannot write to closing transport", is a ConnectionResetError.)
def _dropped() -> tuple[type[BaseException], ...]:
    import aiohttp

    return (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError, BrokenPipeError)


def _connector(s: ConsulSettings, **options: Any) -> aiohttp.BaseConnector:
    """TCP, or the agent's unix socket (``unix:///path``, as the consul CLI takes it).

    With a unix socket, the URL's host is only a Host header.
    """
    import aiohttp

    if s.unix_socket is not None:
        return aiohttp.UnixConnector(path=s.unix_socket, **options)
    return aiohttp.TCPConnector(**options)


def _ssl_context(s: ConsulSettings) -> ssl.SSLContext:
    import ssl

    # A CA directory is read as the consul CLI reads it (every file, PEM), not as OpenSSL's hashed capath.
    cadata = read_ca_dir(s.ca_path) if s.ca_path is not None and s.ca_file is None else None
    ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None, cadata=cadata)
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


MAINTENANCE_CHECK = "_service_maintenance:"  # + the service ID: the agent's check for a service in maintenance


def maintenance_reason(checks: Any, service_id: str) -> str | None:
    """From an answer of ``GET /v1/agent/checks``: the maintenance check's notes (its reason) when
    ``service_id`` is in maintenance mode, else None. Consul fills the notes with a default message
    when no reason was given, so an instance in maintenance never reads as None."""
    if not isinstance(checks, dict):
        return None
    check = checks.get(MAINTENANCE_CHECK + service_id)
    if not isinstance(check, dict):
        return None
    return str(check.get("Notes") or "")


def _maintenance_answer(response: Any) -> bool:
    """Callback of ``PUT /v1/agent/service/maintenance/<id>``: False when the agent holds no such service (404)."""
    if response.code == 404:
        return False
    consul_base.CB._status(response)
    return True


def _maintenance_request(service_id: str, enable: bool, reason: str | None) -> tuple[str, list[tuple[str, str]]]:
    params = [("enable", "true" if enable else "false")]
    if enable and reason:
        params.append(("reason", reason))
    return f"/v1/agent/service/maintenance/{_segment(service_id)}", params


class BlockingMaintenance:
    """``consul-sidecar maint``'s requests, blocking, without aiohttp or asyncio: each within consul.timeout."""

    def __init__(self, settings: ConsulSettings) -> None:
        self._transport = _BlockingTransport(settings)
        self.address = settings.address

    def close(self) -> None:
        self._transport.close()

    def registered(self, service_id: str) -> bool:
        """Whether the agent holds ``service_id`` (``GET /v1/agent/service/<id>``)."""
        return self._transport.get(_json_or_none, f"/v1/agent/service/{_segment(service_id)}") is not None

    def maintenance(self, service_id: str) -> str | None:
        """The reason when ``service_id`` is in maintenance mode, else None."""
        return maintenance_reason(self._transport.get(_json_or_none, "/v1/agent/checks"), service_id)

    def set(self, service_id: str, enable: bool, reason: str | None = None) -> bool:
        """Turn maintenance mode on or off; False when the agent holds no such service."""
        path, params = _maintenance_request(service_id, enable, reason)
        return bool(self._transport.put(_maintenance_answer, path, params))


def _kv_entry(response: Any) -> tuple[int, bytes | None]:
    """Callback of ``GET /v1/kv/<key>``: (ModifyIndex, value); (0, None) when the key does not exist
    (a check-and-set with index 0 then writes it only if it still does not)."""
    if response.code == 404:
        return 0, None
    consul_base.CB._status(response)
    entries = json.loads(response.body)
    entry = entries[0] if isinstance(entries, list) and entries and isinstance(entries[0], dict) else {}
    value = entry.get("Value")
    return int(entry.get("ModifyIndex") or 0), base64.b64decode(value) if isinstance(value, str) else None


def _cas_answer(response: Any) -> bool:
    """Callback of ``PUT /v1/kv/<key>?cas=<index>``: whether the check-and-set won."""
    consul_base.CB._status(response)
    return bool(json.loads(response.body) is True)


def _kv_path(key: str) -> str:
    """``/v1/kv/<key>``, each of the key's segments checked and encoded as ``_segment`` does."""
    return "/v1/kv/" + "/".join(_segment(part) for part in key.split("/"))


def read_kv(settings: ConsulSettings, key: str) -> bytes | None:
    """The value under ``key`` in the KV store, blocking, within consul.timeout; None when there is none.
    For ``consul-sidecar horizon``: no aiohttp, no asyncio."""
    transport = _BlockingTransport(settings)
    try:
        return transport.get(_kv_entry, _kv_path(key))[1]  # type: ignore[no-any-return]
    finally:
        transport.close()


class ConsulAgent:
    """The local Consul agent, reached through python-consul2 with deadlines."""

    unavailable_error: type[RegistryUnavailable] = ConsulUnavailable  # what a write refused by the drain raises

    def __init__(
        self,
        settings: ConsulSettings,
        clock: Clock,
        log: FilteringBoundLogger | None = None,
        tokens: TokenCache | None = None,
    ) -> None:
        self._transport = _Transport(settings, log, tokens)
        self._c = _Endpoints(self._transport)
        self._clock = clock
        self.address = settings.address
        self._registered_with: str | None = None  # digest of the token of the last registration
        self._catalog_visible: bool | None = None  # can our token read our own catalog entry?

    def _token_digest(self) -> str:
        """Of the token as last read (each request reads it): no file read here, on the event loop."""
        read, token = self._transport.tokens.cached()
        if not read:
            return self._registered_with or ""  # never readable: the next request reports it
        return hashlib.sha256((token or "").encode()).hexdigest()

    def token_rotated(self) -> bool:
        """Whether the token source now holds another token than the last registration used."""
        return self._registered_with is not None and self._token_digest() != self._registered_with

    async def close(self) -> None:
        await self._transport.close()

    async def register(self, payload: dict[str, Any]) -> None:
        """PUT /v1/agent/service/register (replaces a definition with the same ID)."""
        _segment(payload["ID"])  # an ID that could never be read back or deregistered is not registered
        _segment(payload["Name"])
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
            raise ConsulRejected(
                f"PUT /v1/agent/service/register: {self.address} did not answer 200: is it a Consul agent?"
            )
        self._registered_with = digest

    @property
    def request_errors(self) -> dict[str, int]:
        """Failed requests so far, by ``operation`` (live: the status server reads it for /metrics)."""
        return self._transport.errors

    async def service_health(self, service_id: str, timeout: float) -> tuple[str, list[dict[str, Any]]] | None:
        """The agent's own view of ``service_id``'s checks, within ``timeout``: (aggregated status,
        checks), or None when it holds no such service. Maintenance mode is one of these checks."""
        answer = await self._transport.request(
            _agent_health_answer, "GET", f"/v1/agent/health/service/id/{_segment(service_id)}", timeout=timeout
        )
        if answer is None:
            return None
        checks = answer.get("Checks") if isinstance(answer, dict) else None
        return str(answer.get("AggregatedStatus")), [c for c in checks or [] if isinstance(c, dict)]

    async def registered(self, service_id: str) -> dict[str, Any] | None:
        """The agent's local definition of ``service_id``, or None if it holds none."""
        result = await self._transport.get(_json_or_none, f"/v1/agent/service/{_segment(service_id)}")
        return result if isinstance(result, dict) else None

    async def check_status(self, service_id: str) -> str | None:
        """The worst status of the agent's checks of ``service_id`` ("critical", "warning",
        "passing"), or None when it holds no check for it."""
        checks = await self._transport.get(_json_or_none, "/v1/agent/checks")
        if not isinstance(checks, dict):
            return None
        found = {
            str(c.get("Status")) for c in checks.values() if isinstance(c, dict) and c.get("ServiceID") == service_id
        }
        if not found:
            return None
        return next((s for s in ("critical", "warning", "passing") if s in found), "unknown")

    async def maintenance(self, service_id: str) -> str | None:
        """The reason when the agent holds ``service_id`` in maintenance mode, else None."""
        return maintenance_reason(await self._transport.get(_json_or_none, "/v1/agent/checks"), service_id)

    async def set_maintenance(self, service_id: str, enable: bool, reason: str | None) -> bool:
        """``PUT /v1/agent/service/maintenance/<id>``; False when the agent holds no such service."""
        path, params = _maintenance_request(service_id, enable, reason)
        return bool(await self._transport.put(_maintenance_answer, path, params))

    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool:
        """Whether the servers' catalog (/v1/health/service/<name>) lists ``service_id``.

        ``consistent``: read through the leader with a quorum check, not a possibly stale follower.
        """
        entries = await self._catalog_entries(name, consistent)
        if isinstance(entries, _ServersUnavailable):
            raise ConsulUnavailable(f"GET /v1/health/service/{name}: the servers cannot answer: {entries.detail}")
        return _lists(entries, service_id)

    async def _catalog_entries(self, name: str, consistent: bool = False) -> list[dict[str, Any]] | _ServersUnavailable:
        result = await self._transport.get(
            _catalog_answer, f"/v1/health/service/{_segment(name)}", [("consistent", "")] if consistent else None
        )
        if isinstance(result, _ServersUnavailable):
            return result
        return list(result or [])

    async def leader(self) -> str | None:
        """The servers' leader as the agent's server sees it ("" when there is none), or None if unknown."""
        try:
            answer = await self._transport.request(
                _catalog_answer, "GET", "/v1/status/leader", timeout=min(1.0, self._transport.settings.timeout)
            )
        except ConsulError:
            return None
        if isinstance(answer, _ServersUnavailable):
            return ""
        return answer if isinstance(answer, str) else None

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
        self,
        name: str,
        index: str | None = None,
        wait: str | None = None,
        passing: bool = False,
        consistent: bool = False,
    ) -> tuple[str, list[dict[str, Any]]]:
        """Blocking-capable read of /v1/health/service/<name>: (X-Consul-Index, entries)."""
        path, params, limit = _health_query(name, index, wait, passing, consistent, self._transport.settings.timeout)
        idx, entries = await self._transport.request(
            consul_base.CB.json(index=True), "GET", path, params, timeout=limit
        )
        return str(idx), list(entries or [])

    async def read_kv(self, key: str) -> tuple[int, bytes | None]:
        """The value under ``key`` and its ModifyIndex ((0, None): no value), for a later ``update_kv``."""
        return await self._transport.get(_kv_entry, _kv_path(key))  # type: ignore[no-any-return]

    async def update_kv(
        self, key: str, change: Callable[[bytes | None], bytes], read: tuple[int, bytes | None] | None = None
    ) -> int:
        """Replace the value under ``key`` in the KV store by ``change(value)`` (None: no value yet) with
        check-and-set: read the value and its ModifyIndex, write the change with ``?cas=<index>``, and on
        a lost check-and-set (another writer in between) read and change again, so that no concurrent
        change is lost (the fleet's record of horizons, drain/record.py). Returns the number of writes it
        took. ``read``: what ``read_kv`` answered earlier, used for the first write (one round trip when
        nobody wrote since). No deadline of its own: the caller bounds it. Raises ConsulPermissionDenied
        (no key:read or key:write on ``key``), ConsulError."""
        import random

        path = _kv_path(key)
        attempts = 0
        while True:
            attempts += 1
            index, value = read if read is not None else await self._transport.get(_kv_entry, path)
            read = None
            if await self._transport.put(_cas_answer, path, [("cas", str(index))], change(value)):
                return attempts
            # Lost to a concurrent writer: a few ms apart, so that two losers do not meet again at once.
            await self._clock.sleep(random.uniform(0.0, 0.02 * min(attempts, 5)))

    async def deregister_confirmed(self, name: str, service_id: str, deadline: float) -> DeregisterResult:
        """Deregister through the agent and prove it, retrying until ``deadline`` (monotonic).

        A write that failed or timed out is "maybe applied", not "not done": every round ends with
        reads of the agent and the catalog, which alone decide. The agent answers 200 and drops its
        local copy at once; the catalog on the servers follows through the agent's sync, which may
        be refused (ACLs: the registering token is gone) or impossible for now (no cluster leader).
        Those are told apart by what the agent and the servers answer, and while the catalog lags
        the deregistration is sent again: on an agent without ACLs each one makes it sync at once.
        A round cut off by the deadline does not erase what the previous complete round showed.
        """
        import asyncio

        attempts = 0
        outcome: Deregistration = Deregistration.UNCONFIRMED
        error: str | None = f"no answer from {self.address} before the deregistration deadline"
        dropped = False
        delay = 0.05
        acls = _AclEvidence()
        answered = False
        path = f"/v1/agent/service/deregister/{_segment(service_id)}"
        while True:
            attempts += 1
            try:
                # One round must not outlive the deadline, whatever the per-request timeout.
                async with asyncio.timeout(max(0.001, deadline - self._clock.monotonic())):
                    outcome, error, dropped = await self._deregister_round(name, service_id, path, acls)
                    answered = True
                if outcome is Deregistration.CONFIRMED:
                    return DeregisterResult(outcome, attempts, None, True, True)
            except TimeoutError:
                pass
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return DeregisterResult(outcome, attempts, error, answered, dropped)
            await self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    async def _deregister_round(
        self, name: str, service_id: str, path: str, acls: _AclEvidence
    ) -> tuple[Deregistration, str | None, bool]:
        """One deregistration and the reads that judge it: (outcome, why not confirmed, agent dropped it)."""
        write_error: str | None = None
        if not acls.enforced:  # an ACL agent answers every later one with "Unknown service": no use
            try:
                if await self._transport.put(_deregister_answer, path) is False:
                    acls.enforced = True
            except ConsulError as e:
                write_error = str(e)  # maybe applied: the reads decide
        try:
            held = await self.registered(service_id) is not None
        except ConsulError as e:
            # An agent syncing with servers that have no leader holds its state lock while it
            # waits for them (up to 7 s): its own endpoints stop answering meanwhile.
            if await self.leader() == "":
                return (
                    Deregistration.NO_LEADER,
                    f"the agent does not answer while the servers have no leader: {e}",
                    False,
                )
            return Deregistration.UNCONFIRMED, str(e), False
        if held:
            return (
                Deregistration.UNCONFIRMED,
                write_error or "the agent still holds the service after deregistering it",
                False,
            )
        if self._catalog_visible is False:
            return (
                Deregistration.CONFIRMED,
                None,
                True,
            )  # the token cannot see the catalog: the agent's word is all there is
        try:
            entries = await self._catalog_entries(name)
        except ConsulError as e:
            entries = _ServersUnavailable(str(e))
        if isinstance(entries, _ServersUnavailable):
            return (
                Deregistration.NO_LEADER,
                "the agent dropped the service, but the servers cannot answer a catalog read "
                f"(no cluster leader?): {entries.detail}",
                True,
            )
        if not _lists(entries, service_id):
            return Deregistration.CONFIRMED, None, True
        if await self.leader() == "":
            return (
                Deregistration.NO_LEADER,
                "the agent dropped the service, but the catalog still lists it and the servers have no leader",
                True,
            )
        if acls.enforced:
            return (
                Deregistration.BLOCKED,
                (
                    "the agent dropped the service but the catalog still lists it: the agent enforces ACLs, "
                    "so its sync is most likely refused (deregistration blocked by ACLs?)"
                ),
                True,
            )
        return (
            Deregistration.CATALOG_STALE,
            "the agent dropped the service but the catalog still lists it: "
            "the agent's sync to the servers has not succeeded yet",
            True,
        )


@dataclass
class _AclEvidence:
    enforced: bool = False  # the agent answered "Unknown service" to a repeated deregistration


def _lists(entries: list[dict[str, Any]], service_id: str) -> bool:
    return any(isinstance(e, dict) and (e.get("Service") or {}).get("ID") == service_id for e in entries)
