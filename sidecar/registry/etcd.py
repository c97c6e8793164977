"""etcd as the registry (issue 19): the key and value each format writes, and how an entry reads back.

Imported only when ``registry.kind = "etcd"``: a Consul user never loads it.

    format = "grpc"    key   <prefix>/<service.name>/<service.id>
                       value {"Op": 0, "Addr": "<address>:<port>", "Metadata": {"tags": [...], "meta": {...}}}
                       etcd's endpoints manager: resolver.NewBuilder with target etcd:///<prefix>/<service.name>
    format = "skydns"  key   /skydns/<reversed dns_domain labels>/<service.name>/<service.id>
                       value {"host": "<address>", "port": <port>, "ttl": <seconds>, "metadata": {...}}
                       CoreDNS's etcd plugin (it ignores the extra "metadata" field)

The sidecar's owner mark (OWNER_META_KEY, as in Consul's Meta) is in the metadata's ``meta``, so the
keeper's "is this entry mine" check reads an etcd entry as it reads a Consul one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Config, EtcdFormat
from ..config.model import EtcdSettings
from ..config.names import OWNER_META_KEY
from .base import (
    DeregisterResult,
    Deregistration,
    RegistryError,
    RegistryPermissionDenied,
    RegistryRejected,
    RegistryUnavailable,
)
from .etcd_blocking import kv_place as kv_place  # the record's place: written here, read by `horizon`

if TYPE_CHECKING:
    import ssl

    import aiohttp
    from structlog.typing import FilteringBoundLogger

    from ..clock import Clock

    class Probe(Protocol):
        async def probe(self) -> tuple[bool, str]: ...


def etcd_key(config: Config) -> str:
    """The instance's key in etcd."""
    svc, etcd = config.service, config.etcd
    if etcd.format is EtcdFormat.SKYDNS:
        labels = [label for label in reversed(etcd.dns_domain.rstrip(".").split(".")) if label]
        return "/skydns/" + "/".join([*labels, svc.name, svc.id])
    return f"{etcd.prefix.rstrip('/')}/{svc.name}/{svc.id}"


def dns_ttl(config: Config) -> int:
    """skydns: the records' TTL. No longer than the propagation delay (at least 1 s): a resolver's cached
    answer has expired by the time the app is signalled. A learned delay is never shorter than learned_min."""
    sd = config.shutdown
    return max(1, math.floor(sd.learned_min if sd.learned else sd.propagation_delay))


def etcd_value(config: Config, owner: str | None) -> str:
    """The JSON value of the instance's key."""
    svc = config.service
    meta = dict(svc.meta)
    if owner is not None:
        meta[OWNER_META_KEY] = owner
    metadata = {"tags": list(svc.tags), "meta": meta}
    if config.etcd.format is EtcdFormat.SKYDNS:
        doc: dict[str, Any] = {"host": svc.address, "port": svc.port, "ttl": dns_ttl(config), "metadata": metadata}
    else:
        host = f"[{svc.address}]" if ":" in svc.address else svc.address
        doc = {"Op": 0, "Addr": f"{host}:{svc.port}", "Metadata": metadata}
    return json.dumps(doc, separators=(",", ":"), sort_keys=False)


def entry_of(value: bytes | str) -> dict[str, Any] | None:
    """A value read back, in the shape the lifecycle reads entries in (``Address``, ``Port``, ``Meta``);
    None when it is no value of either format."""
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if "Addr" in doc:
        host, _, port = str(doc.get("Addr") or "").rpartition(":")
        metadata = doc.get("Metadata")
        address = host.removeprefix("[").removesuffix("]")
    elif "host" in doc:
        address, port = str(doc.get("host") or ""), str(doc.get("port"))
        metadata = doc.get("metadata")
    else:
        return None
    meta = metadata.get("meta") if isinstance(metadata, dict) else None
    return {
        "Address": address,
        "Port": int(port) if port.isdigit() else None,
        "Meta": dict(meta) if isinstance(meta, dict) else {},
        "Tags": list(metadata.get("tags") or []) if isinstance(metadata, dict) else [],
    }


# --- the adapter: etcd's JSON gateway over aiohttp --------------------------------------------------


class EtcdError(RegistryError):
    """A request to etcd failed (base class of the three below)."""


class EtcdUnavailable(EtcdError, RegistryUnavailable):
    """No answer, a timeout, no leader: retrying may help (``maybe_applied`` as for Consul)."""


class EtcdPermissionDenied(EtcdError, RegistryPermissionDenied):
    """etcd's auth refused the request or the credentials."""


class EtcdRejected(EtcdError, RegistryRejected):
    """etcd refused the request as malformed, or asked for what the sidecar cannot do (maintenance mode)."""


def tls_context(etcd: EtcdSettings) -> ssl.SSLContext | None:
    """TLS to etcd's members (``https://`` endpoints): etcd.ca_file to verify them, etcd.cert_file and
    etcd.key_file as the client certificate; None when none is set (the system's CAs then, for https).
    A file that is no PEM certificate or key is an EtcdRejected naming the key."""
    if not (etcd.ca_file or etcd.cert_file):
        return None
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=str(etcd.ca_file) if etcd.ca_file else None)
    except (ssl.SSLError, OSError) as e:
        raise EtcdRejected(f"etcd.ca_file {str(etcd.ca_file)!r}: no PEM certificate ({e})") from None
    if etcd.cert_file:
        try:
            ctx.load_cert_chain(str(etcd.cert_file), str(etcd.key_file) if etcd.key_file else None)
        except (ssl.SSLError, OSError) as e:
            raise EtcdRejected(
                f"etcd.cert_file {str(etcd.cert_file)!r} / etcd.key_file: not a certificate and its key ({e})"
            ) from None
    return ctx


def aiohttp_error(message: str) -> Exception:
    """An error of the kind ``_call`` passes over to the next member (the answer was no etcd's)."""
    import aiohttp

    return aiohttp.ClientError(message)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


MAX_BODY = 4 * 1024 * 1024  # an answer larger than this is no answer of etcd's to our requests (one key, a lease)


class _NotEtcd(Exception):
    """An answer that is not etcd's JSON gateway's: too large, not JSON, or without etcd's header."""


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, at most MAX_BODY bytes (an endpoint streaming without end must not fill the memory)."""
    if resp.content_length is not None and resp.content_length > MAX_BODY:
        raise _NotEtcd(f"an answer of {resp.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY:
            raise _NotEtcd(f"an answer over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _cluster_of(doc: dict[str, Any]) -> str | None:
    """The cluster ID in etcd's response header (``header``, or ``result.header`` for a keepalive), or None:
    every answer of etcd's gateway carries one, so an answer without it is not etcd's."""
    header = doc.get("header")
    if not isinstance(header, dict):
        result = doc.get("result")
        header = result.get("header") if isinstance(result, dict) else None
    cluster = header.get("cluster_id") if isinstance(header, dict) else None
    return str(cluster) if cluster else None


def _lease_id(answer: dict[str, Any]) -> int:
    try:
        lease = int(answer["ID"])
    except (KeyError, TypeError, ValueError):
        raise EtcdUnavailable("POST /v3/lease/grant: etcd's answer has no lease ID") from None
    if lease <= 0:
        raise EtcdUnavailable(f"POST /v3/lease/grant: etcd's answer has no lease ID ({lease})")
    return lease


class EtcdRegistry:
    """The instance's key on a lease in etcd, through the JSON gateway (``/v3/...``), each request within
    ``etcd.timeout`` and passed over to the next member when one does not answer (``_call``). Entries
    read back in the lifecycle's shape (``entry_of``). With a prober, the key exists only while check.http
    passes (``_follow_health``). With ``etcd.user``, requests carry the token etcd's ``/v3/auth/authenticate``
    gave for the password in ``etcd.password_file``.

    Counters (read by /metrics): ``keepalive_failures`` (a keepalive round that failed or found its lease
    gone), ``failovers`` (a request passed on to the next member).
    """

    unavailable_error: type[RegistryUnavailable] = EtcdUnavailable  # what a write refused by the drain raises

    def __init__(
        self, config: Config, clock: Clock, prober: Probe | None = None, log: FilteringBoundLogger | None = None
    ) -> None:
        self._config = config
        self._clock = clock
        self._endpoints = list(config.etcd.endpoints)
        self.address = self._endpoints[0]
        self._key = etcd_key(config)
        self._lease: int | None = None
        self._value: str | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.keepalive_failures = 0
        self._prober = prober
        self._log = log
        self._health: asyncio.Task[None] | None = None
        self._withheld = False  # the check is failing: the key is deleted on purpose until it passes
        self._in_flight: asyncio.Future[None] | None = None  # a background put, never cancelled mid-flight
        self._stopping = False
        self._cluster: str | None = None  # the cluster ID of the first answer: a member of another is not ours
        self.failovers = 0  # requests passed on to the next member (no answer, a dropped connection, no leader)
        self._user = config.etcd.user
        self._password_file = config.etcd.password_file
        self._token: str | None = None
        self._auth_off = False  # etcd said its auth is not enabled: no token to send
        self._tls = tls_context(config.etcd)

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._tls) if self._tls is not None else None
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _tls_failed(self, path: str, endpoint: str, e: BaseException) -> EtcdRejected | None:
        """A certificate problem in the handshake: configuration, not an outage (as with Consul: exit 78)."""
        ssl = sys.modules.get("ssl")  # not imported: no TLS was attempted
        seen: BaseException | None = e
        while seen is not None:
            text = str(seen).upper()
            if ((ssl is not None and isinstance(seen, ssl.SSLError)) or "[SSL" in text) and "CERTIFICATE" in text:
                hint = (
                    ""
                    if self._config.etcd.cert_file
                    else (" (does etcd require a client certificate? set etcd.cert_file and etcd.key_file)")
                )
                return EtcdRejected(f"POST {path}: TLS handshake with {endpoint} failed: {e}{hint}")
            seen = seen.__cause__ or seen.__context__
        return None

    async def _call(
        self, path: str, body: dict[str, Any], timeout: float | None = None, again: bool = False
    ) -> dict[str, Any]:
        """POST ``body`` to the members in turn, the one that answered last first, within ``etcd.timeout``
        in all; errors as the lifecycle reads them.

        Each member gets an equal share of what is left of the deadline, so a frozen member (its socket
        accepts, nobody answers) costs a share, not the whole deadline. A member that does not answer,
        drops the connection or has no leader is passed over for the next one: every request the adapter
        sends is idempotent (a put of the same value on the same lease, a delete, a revoke, a keepalive,
        a read; a grant repeated elsewhere leaves at most an empty lease that expires by its TTL). Only
        when every member refused the connection is the request known not to be applied."""
        import aiohttp

        session = self._client()
        loop = asyncio.get_running_loop()
        end = loop.time() + (self._config.etcd.timeout if timeout is None else timeout)
        first = self._endpoints.index(self.address) if self.address in self._endpoints else 0
        order = self._endpoints[first:] + self._endpoints[:first]
        errors: list[str] = []
        maybe_applied = False
        for i, endpoint in enumerate(order):
            share = (end - loop.time()) / (len(order) - i)
            if share <= 0:
                break
            if i > 0:
                self.failovers += 1
            try:
                async with asyncio.timeout(share):
                    async with session.post(
                        endpoint.rstrip("/") + path, json=body, headers=await self._auth_headers(endpoint)
                    ) as resp:
                        raw = await _read_capped(resp)
                        status = resp.status
            except _NotEtcd as e:
                maybe_applied = True
                errors.append(f"{endpoint}: not etcd's JSON gateway ({e})")
                continue
            except TimeoutError:
                maybe_applied = True
                errors.append(f"{endpoint}: no answer within {share:.2g}s")
                continue
            except aiohttp.ClientConnectorError as e:
                if (tls := self._tls_failed(path, endpoint, e)) is not None:
                    raise tls from None
                errors.append(f"{endpoint}: {e.__class__.__name__}: {e.strerror or e}")  # never sent
                continue
            except (aiohttp.ClientError, OSError) as e:
                if (tls := self._tls_failed(path, endpoint, e)) is not None:
                    raise tls from None
                maybe_applied = True
                errors.append(f"{endpoint}: {e.__class__.__name__}: {e}")
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                maybe_applied = True
                errors.append(f"{endpoint} (HTTP {status}): not etcd's JSON gateway")
                continue
            if status == 200 and isinstance(doc, dict) and "error" not in doc:
                # A 200 is etcd's only with etcd's header: an answer without it (a proxy's, another
                # service's on that port) must never read as "no key" and confirm a deregistration.
                cluster = _cluster_of(doc)
                if cluster is None or (self._cluster is not None and cluster != self._cluster):
                    maybe_applied = True
                    errors.append(
                        f"{endpoint}: not etcd's JSON gateway (no response header)"
                        if cluster is None
                        else f"{endpoint}: a member of another etcd cluster ({cluster}, not {self._cluster})"
                    )
                    continue
                self._cluster = cluster
                self.address = endpoint
                return doc
            message = str(doc.get("message") or doc.get("error") or raw[:200]) if isinstance(doc, dict) else str(raw)
            code = doc.get("code") if isinstance(doc, dict) else None
            if (
                self._user is not None
                and not again
                and (code == 16 or "auth token" in message or "user name is empty" in message)
            ):
                # The token expired (simple tokens do after minutes unused), or auth was enabled since:
                # authenticate again, once per request.
                self._token, self._auth_off = None, False
                return await self._call(path, body, max(0.001, end - loop.time()), again=True)
            if code in (7, 16) or any(
                w in message for w in ("permission denied", "authentication", "user name is empty")
            ):
                raise EtcdPermissionDenied(f"POST {path}: {endpoint}: {message}{self._who()}")
            if code == 3:
                raise EtcdRejected(f"POST {path}: {endpoint}: {message}")
            if code in (4, 14) or status >= 500 and code is None or "leader" in message or "timed out" in message:
                # No leader, an election, a request timed out inside etcd: another member may do better.
                maybe_applied = True
                errors.append(f"{endpoint}: {message}")
                continue
            self.address = endpoint
            raise EtcdUnavailable(f"POST {path}: {endpoint}: {message}")
        if not errors:
            errors.append(f"no time left of {self._config.etcd.timeout if timeout is None else timeout:g}s")
        raise EtcdUnavailable(f"POST {path}: no etcd member answered: {'; '.join(errors)}", maybe_applied=maybe_applied)

    # --- auth: etcd.user and etcd.password_file -------------------------------------------------------

    def _who(self) -> str:
        if self._user is None:
            return " (no etcd.user is configured: etcd's auth is on)"
        return f" (etcd.user {self._user!r} needs a role with readwrite on {self._key!r})"

    def permission_hint(self) -> str:
        """What the lifecycle says when etcd refuses a request (exit 77)."""
        if self._user is None:
            # etcdctl's ETCDCTL_USER ("user:password") and ETCDCTL_PASSWORD are not read: a password
            # belongs in a file, never in the environment a wrapped app inherits.
            return (
                "etcd's auth is on: set etcd.user and etcd.password_file (ETCDCTL_USER/ETCDCTL_PASSWORD are not read)"
            )
        return (
            f"etcd.user {self._user!r} needs a role with readwrite on the key {self._key!r} (or its prefix), "
            "and etcd.password_file its password"
        )

    async def _auth_headers(self, endpoint: str) -> dict[str, str]:
        """The ``Authorization`` header with etcd's token, authenticating first when there is none. The
        password is read from its file here, for this request alone: never kept, logged or put in an error."""
        if self._user is None or self._auth_off:
            return {}
        if self._token is None:
            assert self._password_file is not None
            try:
                password = self._password_file.read_text().rstrip("\r\n")
            except OSError as e:
                raise EtcdPermissionDenied(
                    f"etcd.password_file {str(self._password_file)!r}: cannot be read ({e.strerror})"
                ) from None
            url = endpoint.rstrip("/") + "/v3/auth/authenticate"
            async with self._client().post(url, json={"name": self._user, "password": password}) as resp:
                try:
                    raw, status = await _read_capped(resp), resp.status
                except _NotEtcd as e:
                    raise aiohttp_error(f"{endpoint}: authenticate: not etcd's JSON gateway ({e})") from None
            del password
            try:
                doc = json.loads(raw)
            except ValueError:
                raise aiohttp_error(f"{endpoint} (HTTP {status}): not etcd's JSON gateway") from None
            if status == 200 and isinstance(doc, dict) and doc.get("token"):
                self._token = str(doc["token"])
            else:
                message = str(doc.get("message") or doc.get("error")) if isinstance(doc, dict) else str(raw[:200])
                if "not enabled" in message:
                    self._auth_off = True  # nothing to authenticate to: requests need no token
                    return {}
                if "authentication failed" in message or "permission denied" in message:
                    raise EtcdPermissionDenied(
                        f"etcd refused etcd.user {self._user!r} with the password in etcd.password_file "
                        f"({endpoint}: {message})"
                    )
                raise aiohttp_error(f"{endpoint}: authenticate: {message}")
        return {"Authorization": self._token}

    # --- the Agent protocol ---------------------------------------------------------------------------

    async def register(self, payload: dict[str, Any]) -> None:
        """A lease (granted once, again when it is gone) and the key on it."""
        # A registration after a deregistration (a stale key of a dead sidecar replaced at start) follows
        # health and keeps its lease again; during a drain the lifecycle's fenced ledger sends none.
        self._stopping = False
        owner = (payload.get("Meta") or {}).get(OWNER_META_KEY)
        self._value = etcd_value(self._config, owner)
        await self._ensure_lease()
        passing = (payload.get("Check") or {}).get("Status") == "passing"
        if self._prober is not None and not passing:
            self._withheld = True  # not seen healthy: the health loop puts the key once the check passes
            if self._health is None or self._health.done():
                self._health = asyncio.create_task(self._follow_health())
            return
        try:
            await self._put()
        except EtcdUnavailable as e:
            if "lease not found" in str(e):
                self._lease = None  # expired meanwhile: the next attempt grants a new one
            raise
        except EtcdPermissionDenied:
            # A user who may read and grant leases but not write the key: leave no empty lease behind.
            lease, self._lease = self._lease, None
            with contextlib.suppress(RegistryError):
                await self._call("/v3/lease/revoke", {"ID": str(lease)})
            raise
        self._withheld = False
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_alive())
        if self._prober is not None and (self._health is None or self._health.done()):
            self._health = asyncio.create_task(self._follow_health())

    async def _background_put(self) -> None:
        """A put of the keepalive or the health loop: in a task of its own, so that stopping the loop (the
        drain) waits for it instead of cutting it off; one that lands late finds its lease revoked."""
        if self._stopping:
            return
        self._in_flight = asyncio.ensure_future(self._put())
        await asyncio.shield(self._in_flight)

    async def _follow_health(self) -> None:
        """Every check.interval, probe check.http: after failures_before_critical failures in a row the key
        is deleted; it is put back once the check passes again."""
        assert self._prober is not None
        cfg = self._config.check
        failures = 0
        while not self._stopping:
            await self._clock.sleep(cfg.interval)
            ok, detail = await self._prober.probe()
            try:
                if ok:
                    failures = 0
                    if self._withheld:
                        await self._ensure_lease()  # it may have expired while the key was withheld
                        await self._background_put()
                        self._withheld = False
                        if self._log is not None:
                            self._log.info("sidecar.etcd.check_passing", key=self._key, action="key put back")
                    continue
                failures += 1
                if failures >= cfg.failures_before_critical and not self._withheld:
                    await self._call("/v3/kv/deleterange", {"key": _b64(self._key)})
                    self._withheld = True
                    if self._log is not None:
                        self._log.warning(
                            "sidecar.etcd.check_critical",
                            key=self._key,
                            failures=failures,
                            last_answer=detail,
                            action="key deleted until the check passes",
                        )
            except RegistryError as e:
                if self._log is not None:
                    self._log.warning("sidecar.etcd.health_write_failed", error=str(e))

    async def _ensure_lease(self) -> None:
        """A lease to put the key on: granted when there is none. A grant answered once the drain has begun
        (it was in flight at SIGTERM) is revoked at once and nothing is put on it: the drain may already
        have confirmed the key gone, and the app be signalled."""
        if self._lease is not None:
            return
        answer = await self._call("/v3/lease/grant", {"TTL": max(1, round(self._config.etcd.lease_ttl))})
        lease = _lease_id(answer)
        if self._stopping:
            with contextlib.suppress(RegistryError):
                await self._call("/v3/lease/revoke", {"ID": str(lease)})
            raise EtcdUnavailable("the sidecar is draining: no key is put", maybe_applied=False)
        self._lease = lease

    async def _put(self) -> None:
        if self._stopping:
            raise EtcdUnavailable("the sidecar is draining: no key is put", maybe_applied=False)
        if self._value is None or self._lease is None:
            raise EtcdUnavailable("no lease to put the key on (it is granted again first)", maybe_applied=False)
        await self._call("/v3/kv/put", {"key": _b64(self._key), "value": _b64(self._value), "lease": str(self._lease)})

    async def _keep_alive(self) -> None:
        """Every lease_ttl / 3: keep the lease alive; a lease gone (expired while etcd was unreachable) is
        granted again and the key put back on it."""
        every = self._config.etcd.lease_ttl / 3
        while True:
            await self._clock.sleep(every)
            try:
                if self._lease is not None:
                    answer = await self._call("/v3/lease/keepalive", {"ID": str(self._lease)})
                    result = answer.get("result")
                    if isinstance(result, dict) and result.get("TTL"):
                        continue
                    self.keepalive_failures += 1  # the lease is gone (expired while etcd was out of reach)
                    self._lease = None
                if self._value is not None:
                    # No lease (gone, or its grant failed last round): grant one and put the key back on it.
                    await self._ensure_lease()
                    if not self._withheld:
                        await self._background_put()
            except RegistryError:
                self.keepalive_failures += 1

    def token_rotated(self) -> bool:
        return False

    async def _read(self) -> bytes | None:
        """The key's value by a linearizable range (etcd's default), or None."""
        answer = await self._call("/v3/kv/range", {"key": _b64(self._key)})
        kvs = answer.get("kvs") or []
        if not kvs:
            return None
        try:
            return base64.b64decode(kvs[0].get("value") or "", validate=True)
        except (AttributeError, TypeError, IndexError, KeyError, binascii.Error):
            raise EtcdUnavailable(f"POST /v3/kv/range: {self.address}: a value etcd's gateway does not send") from None

    async def registered(self, service_id: str) -> dict[str, Any] | None:
        """The entry etcd holds; while the check fails (the key deleted on purpose) the entry as it will be
        put back, so the keeper does not take the missing key for a lost registration."""
        if self._withheld and self._value is not None and not self._stopping:
            return entry_of(self._value)
        value = await self._read()
        return None if value is None else entry_of(value)

    async def check_status(self, service_id: str) -> str | None:
        return "passing" if await self._read() is not None else None  # a key exists only while its check passes

    async def maintenance(self, service_id: str) -> str | None:
        return None  # maintenance mode is Consul's

    async def set_maintenance(self, service_id: str, enable: bool, reason: str | None) -> bool:
        raise EtcdRejected("maintenance mode is Consul's; etcd has none")

    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool:
        return await self._read() is not None

    async def check_catalog_visibility(self, name: str, service_id: str) -> bool:
        return True

    async def deregister_confirmed(self, name: str, service_id: str, deadline: float) -> DeregisterResult:
        """Delete the key, revoke the lease, and confirm by a linearizable read that the key is gone, until
        ``deadline``. Unconfirmed: the lease's TTL bounds how long the key can outlive this sidecar."""
        self._stopping = True
        for task in (self._keeper, self._health):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._in_flight is not None and not self._in_flight.done():
            # A put in flight is waited for, never assumed unsent; one still unanswered at the deadline
            # fails on the revoked lease if it lands later.
            await asyncio.wait([self._in_flight], timeout=max(0.0, deadline - self._clock.monotonic()))
        attempts, error = 0, f"no answer from etcd ({self.address}) before the deregistration deadline"
        answered = False
        delay = 0.05
        while True:
            attempts += 1
            try:
                async with asyncio.timeout(max(0.001, deadline - self._clock.monotonic())):
                    await self._call("/v3/kv/deleterange", {"key": _b64(self._key)})
                    if self._lease is not None:
                        try:
                            await self._call("/v3/lease/revoke", {"ID": str(self._lease)})
                        except EtcdUnavailable as e:
                            if "lease not found" not in str(e):
                                raise
                        self._lease = None
                    gone = await self._read() is None
                    answered = True
                    if gone:
                        return DeregisterResult(Deregistration.CONFIRMED, attempts, None, True, True)
                    error = "etcd still holds the key after deleting it"
            except TimeoutError:
                pass
            except RegistryError as e:
                error = str(e)
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return DeregisterResult(
                    Deregistration.UNCONFIRMED,
                    attempts,
                    error,
                    answered,
                    hint=f"etcd may still hold the key; its lease expires within etcd.lease_ttl "
                    f"({self._config.etcd.lease_ttl:g}s) of the last keepalive",
                )
            await self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    async def read_kv(self, key: str) -> tuple[int, bytes | None]:
        """The value of ``key`` (placed by ``kv_place``) and its mod_revision ((0, None): no key)."""
        kvs = (await self._call("/v3/kv/range", {"key": _b64(kv_place(self._config.etcd.prefix, key))})).get("kvs")
        if not kvs:
            return 0, None
        try:
            return int(kvs[0].get("mod_revision") or 0), base64.b64decode(kvs[0].get("value") or "", validate=True)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:  # binascii.Error is a ValueError
            raise EtcdUnavailable(f"{self.address}: the record's range answer is not etcd's: {e}") from None

    async def update_kv(
        self, key: str, change: Callable[[bytes | None], bytes], read: tuple[int, bytes | None] | None = None
    ) -> int:
        """Replace the value of ``key`` (placed by ``kv_place``) by ``change(value)`` with a transaction that
        compares the key's mod_revision (0: no key yet) with the one read; on a failed compare (another
        writer in between) read and change again. Returns the number of transactions it took. ``read``: what
        ``read_kv`` answered earlier, for the first transaction. No deadline
        of its own: the caller bounds it. (A transaction passed over to another member may have been
        applied by the first: ``change`` must leave a value that already holds its change as it is.)"""
        import random

        place = _b64(kv_place(self._config.etcd.prefix, key))
        attempts = 0
        while True:
            attempts += 1
            revision, value = read if read is not None else await self.read_kv(key)
            read = None
            compare = {"key": place, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
            put = {"request_put": {"key": place, "value": base64.b64encode(change(value)).decode()}}
            if (await self._call("/v3/kv/txn", {"compare": [compare], "success": [put]})).get("succeeded"):
                return attempts
            await self._clock.sleep(random.uniform(0.0, 0.02 * min(attempts, 5)))

    async def close(self) -> None:
        self._stopping = True
        for task in (self._keeper, self._health):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # --- read-only view for /status, /ready and /metrics (sidecar/http/etcd_view.py) ---------------------

    def status_view(self) -> dict[str, Any]:
        """What this adapter holds now, without a request: the key, the lease (hex, as etcdctl takes it),
        whether the key is withheld because the check fails, the member last answered, the failure counts."""
        return {
            "endpoint": self.address,
            "key": self._key,
            "lease_id": None if self._lease is None else format(self._lease, "x"),
            "lease_ttl_s": self._config.etcd.lease_ttl,
            "key_withheld": self._withheld and not self._stopping,
            "keepalive_failures": self.keepalive_failures,
            "failovers": self.failovers,
        }
