"""Every configuration key, once: section, type, default, bounds, environment fallback, parser, documentation.

The loader reads every key through this table in one generic pass (the file's value, else the
first set variable of ``Key.env``, else the key's one default), parsing it by its ``kind`` and
then by its own ``check``; only the rules that tie keys together are written in the loader.
The frozen settings take their defaults from it (a test checks the settings' fields are the
table's), ``check-config`` prints the effective value of each key, and ``docs/configuration.md``
is generated from it (``python -m sidecar.config.docs``). A new key is one ``Key(...)`` here and
its field in model.py; a test fails until the docs are regenerated.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..durations import parse_duration
from .addresses import DEFAULT_CONSUL_ADDRESS, parse_listen, server_name, url_problem
from .files import FileProblem, check_readable
from .names import DNS_LABEL, SERVICE_NAME


class Strategy(enum.StrEnum):
    """How the drain waits between the confirmed deregistration and the app's signal."""

    FIXED = "fixed"  # wait shutdown.propagation_delay
    TRAFFIC = "traffic"  # wait for evidence that nobody sends traffic, bounded by min_delay and propagation_delay


class ReadyMode(enum.StrEnum):
    """How a hot restart knows the new app generation is ready."""

    NOTIFY = "notify"  # it sends READY=1 on NOTIFY_SOCKET
    WARMUP = "warmup"  # it stays alive for hot_restart.warmup


class RegistryKind(enum.StrEnum):
    """Where the instance is registered."""

    CONSUL = "consul"  # the local Consul agent
    ETCD = "etcd"  # keys on a lease in etcd


class EtcdFormat(enum.StrEnum):
    """The layout of the key and value in etcd: who reads them."""

    GRPC = "grpc"  # etcd's endpoints manager (the gRPC resolver)
    SKYDNS = "skydns"  # CoreDNS's etcd plugin


class Kind(enum.Enum):
    """A key's type: how the loader reads it and how the docs name it."""

    STRING = "string"
    BOOL = "boolean"
    DURATION = "duration"
    INTEGER = "integer"
    PATH = "path"
    STRINGS = "list of strings"
    TABLE = "table of strings"
    SIGNAL = "signal name"
    CHOICE = "string, one of"
    URL = "URL"
    HOST_PORT = '"host:port"'


_KEEP: Any = object()


class Invalid(ValueError):
    """What a key's ``check`` raises for a value it refuses: one line per problem. The loader reports each
    and goes on with ``keep`` when given (so later rules see the value), else with the key's default."""

    def __init__(self, *problems: str, keep: Any = _KEEP) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.keeps = keep is not _KEEP
        self.keep = None if keep is _KEEP else keep


@dataclass(frozen=True)
class OnlyWith:
    """A key that is shown and used only while another key of its section has this value."""

    key: str  # a key of the same section
    value: enum.StrEnum | str
    flag: str = ""  # the settings' boolean field that says the key has this value, when the key's own does not

    @property
    def words(self) -> str:
        return f'{self.key} = "{self.value}"'

    def holds(self, settings: object) -> bool:
        if self.flag:
            return bool(getattr(settings, self.flag, False))
        return bool(getattr(settings, self.key, None) == self.value)


@dataclass(frozen=True)
class Key:
    """One configuration key. ``default`` is written as a file would write it (``"5s"``, ``true``,
    ``()`` for an empty list or table); None: none (``default_doc`` then says what happens instead).
    It is parsed by its ``kind`` (the loader's reader for that kind, with ``minimum``, ``maximum``,
    ``choices`` and ``off``), then by ``check``: the key's own rule, which may refine the value (a
    server name loses its port) or refuse it (raise Invalid)."""

    section: str
    name: str
    kind: Kind
    doc: str
    default: str | bool | int | tuple[()] | None = None
    default_doc: str = ""  # a computed default, in words
    env: tuple[str, ...] = ()  # Consul's variables used when the file does not set the key, first wins
    minimum: float | None = None  # durations: seconds; integers: the smallest value
    maximum: int | None = None  # integers
    why_minimum: str = ""  # appended to the "shorter than" message
    choices: type[enum.StrEnum] | None = None  # Kind.CHOICE
    choice_words: tuple[str, ...] = ()  # Kind.CHOICE: what each choice means, in the problem for a bad one
    off: tuple[str, ...] = ()  # values that turn the feature off instead of being parsed
    # Kind.DURATION: the one word the key takes instead of a duration. The key then fills two fields: the
    # seconds (None for the word) and whether the word was given (shutdown.propagation_delay = "learned").
    word: str = ""
    required: bool = False
    only_with: OnlyWith | None = None  # shown and used only with this setting
    field: str = ""  # the attribute of the section's settings holding the value ("" = name)
    fields: tuple[str, ...] = ()  # the settings' fields the value is stored in, when not just ``attr``
    form: str = ""  # Kind.STRINGS and TABLE: how the value is written, for the problem when it is not
    check: Callable[[Any], Any] | None = None  # the key's own rule, after the kind's parsing

    @property
    def value(self) -> Any:
        """The parsed default (seconds for a duration, a Signals, a Strategy, ...); None when there is none."""
        return None if self.default is None else _parse_default(self)

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def attr(self) -> str:
        return self.field or self.name

    @property
    def model_fields(self) -> tuple[str, ...]:
        return self.fields or (self.attr,)


def parse_signal(text: str) -> signal.Signals:
    name = text.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"{text!r} is not a signal name like SIGTERM, SIGINT or SIGQUIT") from None


# --- the keys' own rules (Key.check): each takes the value parsed by its kind -------------------


def _readable(path: Path | None) -> Path | None:
    if path is not None:
        try:
            check_readable(path)
        except FileProblem as e:
            raise Invalid(str(e), keep=path) from None
    return path


def _web_url(text: str | None) -> str | None:
    if not text:
        return None
    problem = url_problem(text)
    if problem is not None:
        raise Invalid(problem, keep=text)
    return text


def _check_url(text: str | None) -> str | None:
    return _web_url(text) if text else None  # none or empty: built from the service's address


def _server_name(text: str | None) -> str | None:
    name = server_name(text or "") or None
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,253}", name):
        raise Invalid(f"{name!r} is not a host name or IP address", keep=name)
    return name


def _service_name(text: str | None) -> str | None:
    if text and not SERVICE_NAME.match(text):
        raise Invalid(
            f"{text!r}: use letters, digits, '-' and '_' (at most 63), so Consul DNS can answer for it", keep=text
        )
    return text


def _dns_servers(texts: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    servers, problems = [], []
    for d in texts:
        try:
            host, port = parse_listen(d)
            if port == 0:
                raise ValueError(f"{d!r}: port 0")
            ipaddress.ip_address(host)
            servers.append((host, port))
        except ValueError as e:
            problems.append(f'{e} (give an IP address and port, e.g. "127.0.0.1:8600")')
    if problems:
        raise Invalid(*problems, keep=tuple(servers))
    return tuple(servers)


def _dns_name(text: str | None) -> str:
    name = (text or "").rstrip(".")
    if name and (len(name) > 253 or not all(DNS_LABEL.match(label) for label in name.split("."))):
        raise Invalid(
            f"{name!r} is not a DNS name (labels of letters, digits, '-' and '_', e.g. \"v2.web.service.dc1.consul\")",
            keep=name,
        )
    return name


def _endpoints(texts: tuple[str, ...]) -> tuple[str, ...]:
    problems = [p for p in (url_problem(t) for t in texts) if p is not None]
    if problems:
        raise Invalid(*problems, keep=texts)
    return texts


def _listen(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    try:
        return parse_listen(text)
    except ValueError as e:
        raise Invalid(str(e), keep=None) from None


def _app_signal(sig: signal.Signals) -> signal.Signals:
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise Invalid(f"{sig.name} cannot be caught, so the app could not drain; use SIGTERM", keep=sig)
    return sig


# Signals that already mean something to the sidecar, or that cannot be caught.
_NOT_A_RESTART_SIGNAL = {
    signal.SIGTERM: "starts the drain",
    signal.SIGINT: "starts the drain",
    signal.SIGKILL: "cannot be caught",
    signal.SIGSTOP: "cannot be caught",
    signal.SIGCHLD: "is how the sidecar learns that a child exited",
}


def _restart_signal(sig: signal.Signals) -> signal.Signals:
    why = _NOT_A_RESTART_SIGNAL.get(sig)
    if why is not None:
        raise Invalid(f"{sig.name} {why}; use SIGUSR2 (the default), SIGHUP or SIGUSR1", keep=sig)
    return sig


_POSITIVE = 0.001  # durations that bound a wait: "0" would mean "give up at once"
_TRAFFIC = OnlyWith("strategy", Strategy.TRAFFIC)
_LEARNED = OnlyWith("propagation_delay", "learned", flag="learned")

KEYS: tuple[Key, ...] = (
    # --- [consul] ---------------------------------------------------------------------------------
    Key(
        "consul",
        "address",
        Kind.URL,
        "the local agent: `http://host:port`, `https://host:port`, `host:port` "
        "(https with `CONSUL_HTTP_SSL=true`) or `unix:///path/to/consul.sock`",
        default=DEFAULT_CONSUL_ADDRESS,
        default_doc="`http://127.0.0.1:8500`",
        env=("CONSUL_HTTP_ADDR",),
        fields=("scheme", "host", "port"),
    ),
    Key(
        "consul",
        "token",
        Kind.STRING,
        "ACL token (set `token` or `token_file`, not both). Never logged; the app started in "
        "wrapper mode gets neither `CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE` nor any variable used here "
        "(`${MY_TOKEN}`). From the environment, `CONSUL_HTTP_TOKEN_FILE` (see `token_file`) wins over "
        "`CONSUL_HTTP_TOKEN`",
        default_doc="none",
        env=("CONSUL_HTTP_TOKEN",),
    ),
    Key(
        "consul",
        "token_file",
        Kind.PATH,
        "a file holding the ACL token, re-read on every request (rotating it needs no "
        "restart): a regular file of at most 64 KiB holding one printable-ASCII token; a group- or world-writable one "
        "is "
        "warned about (`check-config`, and `sidecar.config.warning` at start)",
        default_doc="none",
        env=("CONSUL_HTTP_TOKEN_FILE",),
        field="token",
    ),
    Key(
        "consul",
        "ca_file",
        Kind.PATH,
        "CA certificate(s) that signed the agent's certificate (PEM); the system's CAs otherwise",
        default_doc="none",
        env=("CONSUL_CACERT",),
        check=_readable,
    ),
    Key(
        "consul",
        "ca_path",
        Kind.PATH,
        "a directory of CA certificates (every file in it, PEM), as the consul CLI reads "
        "it; ignored (with a warning) when a CA file is set",
        default_doc="none",
        env=("CONSUL_CAPATH",),
    ),
    Key(
        "consul",
        "cert_file",
        Kind.PATH,
        "client certificate for TLS to the agent (with `key_file`)",
        default_doc="none",
        env=("CONSUL_CLIENT_CERT",),
        check=_readable,
    ),
    Key(
        "consul",
        "key_file",
        Kind.PATH,
        "the client certificate's private key (with `cert_file`)",
        default_doc="none",
        env=("CONSUL_CLIENT_KEY",),
        check=_readable,
    ),
    Key(
        "consul",
        "tls_server_name",
        Kind.STRING,
        "the name sent as SNI and checked against the agent's certificate, "
        "instead of the address's host (a port in it is ignored)",
        default_doc="the address's host",
        env=("CONSUL_TLS_SERVER_NAME",),
        check=_server_name,
    ),
    Key(
        "consul",
        "tls_verify",
        Kind.BOOL,
        "verify the agent's certificate (the environment takes Go's forms: "
        "`1 t T TRUE true True 0 f F FALSE false False`)",
        default=True,
        env=("CONSUL_HTTP_SSL_VERIFY",),
    ),
    Key("consul", "timeout", Kind.DURATION, "deadline of one request to the agent", default="2s", minimum=_POSITIVE),
    # --- [registry] -------------------------------------------------------------------------------
    Key(
        "registry",
        "kind",
        Kind.CHOICE,
        '`"consul"`: the local Consul agent; `"etcd"`: a key on a lease in etcd, kept only while the check passes',
        default="consul",
        choices=RegistryKind,
        choice_words=("the local Consul agent", "a key on a lease in etcd"),
    ),
    # --- [etcd] -----------------------------------------------------------------------------------
    Key(
        "etcd",
        "endpoints",
        Kind.STRINGS,
        "the etcd members' client URLs (`http://host:2379`, `https://...`); from the environment comma-separated, "
        "as etcdctl reads it",
        default=(),
        default_doc='none: required with kind = "etcd"',
        env=("ETCDCTL_ENDPOINTS",),
        form='a list of URLs, e.g. ["http://127.0.0.1:2379"]',
        check=_endpoints,
    ),
    Key(
        "etcd",
        "prefix",
        Kind.STRING,
        "`grpc`: the keys' prefix (`<prefix>/<service.name>/<service.id>`)",
        default="services",
    ),
    Key(
        "etcd",
        "format",
        Kind.CHOICE,
        '`"grpc"`: the etcd endpoints manager\'s JSON (gRPC resolver, target `etcd:///<prefix>/<service.name>`); '
        '`"skydns"`: CoreDNS\'s etcd plugin (`/skydns/<reversed dns_domain>/<service.name>/<service.id>`)',
        default="grpc",
        choices=EtcdFormat,
        choice_words=("the gRPC resolver's endpoints", "CoreDNS's etcd plugin"),
    ),
    Key(
        "etcd",
        "dns_domain",
        Kind.STRING,
        '`skydns`: the DNS domain (e.g. `"skydns.local"`)',
        default="",
        check=_dns_name,
    ),
    Key(
        "etcd",
        "lease_ttl",
        Kind.DURATION,
        "the key's lease: kept alive every third of it; a sidecar that dies without a drain leaves a key that "
        "expires within it (Consul's deregister_critical_after, here)",
        default="10s",
        minimum=2.0,
    ),
    Key("etcd", "timeout", Kind.DURATION, "deadline of one request to etcd", default="2s", minimum=_POSITIVE),
    Key(
        "etcd",
        "ca_file",
        Kind.PATH,
        "CA certificate(s) of etcd's server certificate (PEM)",
        default_doc="none",
        env=("ETCDCTL_CACERT",),
        check=_readable,
    ),
    Key(
        "etcd",
        "cert_file",
        Kind.PATH,
        "client certificate (with `key_file`)",
        default_doc="none",
        env=("ETCDCTL_CERT",),
        check=_readable,
    ),
    Key(
        "etcd",
        "key_file",
        Kind.PATH,
        "the client certificate's private key",
        default_doc="none",
        env=("ETCDCTL_KEY",),
        check=_readable,
    ),
    Key("etcd", "user", Kind.STRING, "etcd auth: the user (with `password_file`)", default_doc="none"),
    Key(
        "etcd",
        "password_file",
        Kind.PATH,
        "etcd auth: a file holding the user's password (never logged)",
        default_doc="none",
        check=_readable,
    ),
    # --- [service] --------------------------------------------------------------------------------
    Key(
        "service",
        "name",
        Kind.STRING,
        "the name consumers look up (letters, digits, `-`, `_`; at most 63)",
        required=True,
        check=_service_name,
    ),
    Key(
        "service",
        "id",
        Kind.STRING,
        "unique per agent (letters, digits, `. _ : @ -`; not `.` or `..`); the address is in "
        "the default so two instances on one host that differ only in their address get two IDs (see "
        "[Duplicate IDs](../README.md#duplicate-ids))",
        default_doc='`"<name>-<hostname>-<address>-<port>"`',
    ),
    Key(
        "service",
        "address",
        Kind.STRING,
        "what DNS and the catalog hand out: an IP address or a host name (no scheme, "
        "port or path); required when the agent is reached over a unix socket",
        default_doc="this host's IP on the interface that reaches the agent",
    ),
    Key("service", "port", Kind.INTEGER, "the port the service listens on", minimum=1, maximum=65535, required=True),
    Key("service", "tags", Kind.STRINGS, "as in Consul", default=(), default_doc="none", form="a list of strings"),
    Key(
        "service",
        "meta",
        Kind.TABLE,
        "as in Consul (keys: letters, digits, `-`, `_`, not starting with `consul-`; "
        "at most 64 keys, values at most 512 characters); `consul_sidecar_owner` is reserved: the sidecar "
        "adds it to mark its own entry",
        default=(),
        default_doc="none",
        form='a table of strings, e.g. meta = { version = "1.0.0" }',
    ),
    # --- [check] ----------------------------------------------------------------------------------
    Key(
        "check",
        "http",
        Kind.URL,
        "the URL the sidecar probes and the agent polls",
        default_doc='`"http://<address>:<port>/healthz"`',
        check=_check_url,
    ),
    Key(
        "check",
        "allow_remote",
        Kind.BOOL,
        "the check URL must point at the service's own address unless this is true "
        "(the agent fetches it: an arbitrary URL would make it a request-forgery tool)",
        default=False,
    ),
    Key(
        "check",
        "interval",
        Kind.DURATION,
        "how often the agent checks; also how often the sidecar verifies its registration",
        default="1s",
        minimum=1.0,
        why_minimum=" (Consul raises shorter intervals to 1s)",
    ),
    Key("check", "timeout", Kind.DURATION, "per check, and per startup probe", default="1s", minimum=_POSITIVE),
    Key(
        "check",
        "deregister_critical_after",
        Kind.DURATION,
        'Consul removes an instance critical this long (`"0"` turns it off)',
        default="1m",
        minimum=60.0,
        off=("", "0"),
        why_minimum=' (Consul raises shorter values to 1m; "0" turns it off)',
    ),
    Key(
        "check",
        "failures_before_critical",
        Kind.INTEGER,
        "consecutive failed checks before the instance counts as critical (etcd: its key is deleted, and put "
        "back when the check passes again; Consul: sent as the check's FailuresBeforeCritical, which Consul "
        "1.9 and later follow and 1.8.7 ignores)",
        default=1,
        minimum=1,
        maximum=1000,
    ),
    # --- [startup] --------------------------------------------------------------------------------
    Key(
        "startup",
        "wait_healthy",
        Kind.BOOL,
        "probe the check URL until 2xx before registering (then registered *passing*)",
        default=True,
    ),
    Key(
        "startup",
        "timeout",
        Kind.DURATION,
        "never healthy by then: nothing is registered, the app is stopped, exit 69",
        default="60s",
        minimum=_POSITIVE,
    ),
    # --- [shutdown] -------------------------------------------------------------------------------
    Key(
        "shutdown",
        "deregister_timeout",
        Kind.DURATION,
        "how long to try to deregister *and confirm* before reporting "
        "it unconfirmed; the sidecar then keeps confirming until `deregister_timeout + propagation_delay` before it "
        "signals the app",
        default="3s",
        minimum=_POSITIVE,
    ),
    Key(
        "shutdown",
        "strategy",
        Kind.CHOICE,
        '`"fixed"`: wait `propagation_delay`. `"traffic"`: wait until nobody sends '
        "the app traffic, bounded by `min_delay` and `propagation_delay` (see "
        "[Drain by evidence](../README.md#drain-by-evidence))",
        default="fixed",
        choices=Strategy,
        choice_words=("wait propagation_delay", "wait until the app's port is quiet"),
    ),
    Key(
        "shutdown",
        "propagation_delay",
        Kind.DURATION,
        "`fixed`: from confirmed deregistration to the app's signal "
        "(monotonic clock). `traffic`: the upper bound of the wait (30s is a good value). "
        '`"learned"` (`fixed` only): the delay the fleet\'s record of drain horizons recommends, within '
        "`learned_min` .. `learned_max` (see [Learned delay](drain.md#the-learned-delay))",
        default="5s",
        word="learned",
        fields=("propagation_delay", "learned"),
    ),
    Key(
        "shutdown",
        "learned_min",
        Kind.DURATION,
        "the shortest learned delay, whatever the record says",
        default="1s",
        only_with=_LEARNED,
    ),
    Key(
        "shutdown",
        "learned_max",
        Kind.DURATION,
        "the longest learned delay; also the delay while the record holds fewer than 10 drains or cannot be "
        "read, and the upper bound in the worst case",
        default="5s",
        minimum=_POSITIVE,
        only_with=_LEARNED,
    ),
    Key(
        "shutdown",
        "learned_margin",
        Kind.DURATION,
        "added to the record's p99 horizon",
        default_doc="a fifth of the p99, at least 0.5s and at most 5s (what `consul-sidecar horizon` recommends)",
        only_with=_LEARNED,
    ),
    Key(
        "shutdown",
        "min_delay",
        Kind.DURATION,
        "never signal the app sooner than this after confirmed deregistration; at most `propagation_delay`",
        default="1s",
        only_with=_TRAFFIC,
    ),
    Key(
        "shutdown",
        "quiet_period",
        Kind.DURATION,
        "no new connection and no inbound byte on the app's port for this long",
        default="1s",
        minimum=0.1,
        only_with=_TRAFFIC,
    ),
    Key(
        "shutdown",
        "dns",
        Kind.STRINGS,
        'resolvers (`["127.0.0.1:8600"]`, IP address and port) that must stop returning '
        "the instance's address before the quiet window starts",
        default=(),
        default_doc="none",
        only_with=_TRAFFIC,
        form='a list of "host:port" strings, e.g. ["127.0.0.1:8600"]',
        check=_dns_servers,
    ),
    Key(
        "shutdown",
        "dns_name",
        Kind.STRING,
        'the name asked of `dns` (A and AAAA), e.g. with a tag or datacenter: `"v2.web.service.dc1.consul"`',
        default="",
        default_doc="`<service.name>.service.consul`; with etcd `<service.name>.<etcd.dns_domain>` (skydns)",
        only_with=_TRAFFIC,
        check=_dns_name,
    ),
    Key(
        "shutdown",
        "traffic_poll_only_accepts_misses",
        Kind.BOOL,
        "when the poll is the only view of new connections "
        "(no destroy events, a shared network namespace), end the drain on it anyway, accepting that it misses short "
        "client-closed connections; `false` waits `propagation_delay`",
        default=False,
        only_with=_TRAFFIC,
    ),
    Key(
        "shutdown",
        "budget",
        Kind.DURATION,
        "the platform's stop timeout; `check-config` and `run` warn when the "
        "worst-case shutdown exceeds it, naming the setting to lower",
        default="30s",
        minimum=_POSITIVE,
    ),
    Key(
        "shutdown",
        "app_signal",
        Kind.SIGNAL,
        "the signal that asks the app to finish in-flight work and exit (not SIGKILL or SIGSTOP)",
        default="SIGTERM",
        check=_app_signal,
    ),
    Key(
        "shutdown",
        "app_timeout",
        Kind.DURATION,
        "how long the app gets after `app_signal`; then SIGKILL",
        default="20s",
        minimum=_POSITIVE,
    ),
    # --- [app] ------------------------------------------------------------------------------------
    Key(
        "app",
        "pid_file",
        Kind.PATH,
        "alongside mode: a file holding the app's PID, signalled with `app_signal`",
        default_doc="none",
    ),
    Key(
        "app",
        "pid",
        Kind.INTEGER,
        "alongside mode: the app's PID (a shared PID namespace)",
        minimum=1,
        maximum=2**22,
        default_doc="none",
    ),
    Key(
        "app",
        "shutdown_url",
        Kind.URL,
        "alongside mode: `POST`ed to stop the app (at most one of `pid_file`, `pid`, `shutdown_url`)",
        default_doc="none",
        check=_web_url,
    ),
    # --- [status] ---------------------------------------------------------------------------------
    Key(
        "status",
        "listen",
        Kind.HOST_PORT,
        'the sidecar\'s own `/healthz`, `/ready`, `/status` and `/metrics`; `""` turns it off. Port 0 '
        "picks a free port (logged in `sidecar.status.listening`, shown in `/status`), so two sidecars on one host "
        "never "
        "collide; set a fixed port for a probe. `check-config` and `run` (`sidecar.status.listen_warning`) warn when "
        "it is the "
        "agent's address or one of Consul's ports (8500, 8501, ...)",
        default="127.0.0.1:0",
        off=("",),
        fields=("host", "port"),
        check=_listen,
    ),
    # --- [hot_restart] ----------------------------------------------------------------------------
    Key(
        "hot_restart",
        "enabled",
        Kind.BOOL,
        "wrapper mode only: the sidecar binds `service.address:service.port` itself (before the app starts) "
        "and passes it to every app generation by socket activation (fd 3, `LISTEN_FDS`, `LISTEN_PID`); "
        "`signal` then starts the next generation beside the current one (see "
        "[Hot restart](operations.md#hot-restart))",
        default=False,
    ),
    Key(
        "hot_restart",
        "signal",
        Kind.SIGNAL,
        "what starts a hot restart (no longer forwarded to the app); not SIGTERM, SIGINT, SIGKILL, SIGSTOP or SIGCHLD",
        default="SIGUSR2",
        check=_restart_signal,
    ),
    Key(
        "hot_restart",
        "ready",
        Kind.CHOICE,
        '`"notify"`: the new generation is ready when it sends `READY=1` on `NOTIFY_SOCKET`; '
        '`"warmup"`: when it has stayed alive for `warmup`; in both cases it must then be seen accepting a '
        "connection on the socket before the old generation is stopped",
        default="notify",
        choices=ReadyMode,
        choice_words=("the app sends READY=1 on NOTIFY_SOCKET", "it stays alive for warmup"),
    ),
    Key(
        "hot_restart",
        "warmup",
        Kind.DURATION,
        "how long the new generation must stay alive to count as ready",
        default="2s",
        only_with=OnlyWith("ready", ReadyMode.WARMUP),
    ),
    Key(
        "hot_restart",
        "timeout",
        Kind.DURATION,
        "the new generation is not ready (or not seen accepting on the socket) by then: it is stopped "
        "(`app_signal`, then SIGKILL after "
        "`app_timeout`) and the old one keeps serving",
        default="60s",
        minimum=_POSITIVE,
    ),
)

BY_PATH: Mapping[str, Key] = MappingProxyType({k.path: k for k in KEYS})

SECTIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {s: frozenset(k.name for k in KEYS if k.section == s) for s in dict.fromkeys(k.section for k in KEYS)}
)

SECTION_DOCS: Mapping[str, str] = MappingProxyType(
    {
        "consul": "How to reach the local Consul agent. Where the file is silent, Consul's own `CONSUL_*` "
        "variables apply, as for the consul CLI. `CONSUL_HTTP_SSL=true` (Go's boolean forms: "
        "`1 t T TRUE true True`, and their false counterparts) makes an address without a scheme "
        "(`host:port`, or the default) https.",
        "registry": "Which registry the instance is kept in.",
        "etcd": 'With `registry.kind = "etcd"`: how to reach etcd and how the key looks. `ETCDCTL_*` variables apply '
        "as for etcdctl where the file is silent. Consul-only settings (`[consul]`, "
        "`check.deregister_critical_after`) are errors with etcd.",
        "service": "What is registered.",
        "check": "The HTTP check the agent runs (and the sidecar's own startup probe).",
        "startup": "Before registering.",
        "shutdown": "The drain after SIGTERM: deregister and confirm, wait, signal the app, wait for it.",
        "app": "Alongside mode only: how to stop an app the sidecar did not start.",
        "status": "The sidecar's own status server.",
        "hot_restart": "Wrapper mode: restart the app on one host without closing its port or touching the "
        "registration.",
    }
)


def default(path: str) -> Any:
    """The parsed default of a key (seconds for a duration, a Signals, a Strategy, ...)."""
    key = BY_PATH[path]
    if key.default is None:
        raise LookupError(f"{path} has no static default")
    return key.value


def _parse_default(key: Key) -> Any:
    raw = key.default
    if key.kind is Kind.DURATION:
        assert isinstance(raw, str)
        return (parse_duration(raw), False) if key.word else parse_duration(raw)
    if key.kind is Kind.SIGNAL:
        assert isinstance(raw, str)
        return parse_signal(raw)
    if key.kind is Kind.CHOICE:
        assert key.choices is not None and isinstance(raw, str)
        return key.choices(raw)
    if key.kind is Kind.STRINGS:
        assert raw == ()
        return key.check(()) if key.check is not None else ()
    if key.kind is Kind.TABLE:
        assert raw == ()
        return MappingProxyType({})
    if key.kind is Kind.HOST_PORT:
        assert isinstance(raw, str)
        return parse_listen(raw)
    return raw
