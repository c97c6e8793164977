"""The loader: reads the TOML file and Consul's ``CONSUL_*`` variables, validates every key, builds a ``Config``.

Types, defaults and bounds come from the key table (keys.py); what ties keys together
(the check URL built from the service's address, min_delay against propagation_delay, one
token source) is here. Every problem found is reported as one line naming the file and the
key, all at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import signal
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from ..durations import format_duration, parse_duration
from .addresses import address_toward, parse_consul_address, same_host, url_problem, valid_address
from .files import CONFIG_MAX_BYTES, FileProblem, read_ca_dir, read_capped
from .interpolation import interpolate, variables
from .keys import (
    BY_PATH,
    KEYS,
    SECTIONS,
    EtcdFormat,
    Invalid,
    Key,
    Kind,
    ReadyMode,
    RegistryKind,
    Strategy,
    parse_signal,
)
from .model import (
    AppSettings,
    CheckSettings,
    Config,
    ConfigError,
    ConsulSettings,
    EtcdSettings,
    HotRestartSettings,
    RegistrySettings,
    ServiceSettings,
    ShutdownSettings,
    StartupSettings,
    StatusSettings,
)
from .names import META_KEY, OWNER_META_KEY, SERVICE_ID, SERVICE_NAME, default_service_id
from .tokens import TokenError, TokenSource, check_token_file, token_chars_ok

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Go's strconv.ParseBool, which the consul CLI uses for CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY,
# plus the yes/no/on/off (any case) this loader always took for CONSUL_HTTP_SSL_VERIFY.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_LEGACY = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}

# Not a key's fallback but the consul CLI's switch for an address without a scheme (and the default one).
_HTTPS_VAR = "CONSUL_HTTP_SSL"


class _Problems:
    """What the loader found: errors (exit 78), warnings, and the variables that fed secrets."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.secret_env: set[str] = set()

    def add(self, key: str, message: str) -> None:
        self.lines.append(_one_line(f"{self.source}: {key}: {message}"))

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(_one_line(f"{key}: {message}"))


def _one_line(text: str) -> str:
    """A problem is one line, whatever a key or value in it holds (TOML keys may contain newlines)."""
    return _CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)


def _interpolate(value: str, key: str, env: Mapping[str, str], problems: _Problems) -> str:
    def unset(name: str) -> None:
        problems.add(key, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")

    return interpolate(value, env, unset)


def _go_bool(raw: str) -> bool | None:
    """Go's forms of a boolean (and the yes/no/on/off this loader always took); None: neither."""
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    return _LEGACY.get(raw.strip().lower())


def _env_bool(env: Mapping[str, str], var: str, problems: _Problems) -> bool | None:
    """A boolean CONSUL_* variable in Go's forms; None when unset or empty (as the consul CLI ignores it)."""
    raw = env.get(var, "")
    if raw == "":
        return None
    value = _go_bool(raw)
    if value is None:
        problems.add(f"{var} (environment)", f"{raw.strip().lower()!r} is not true or false (1, t, true, 0, f, false)")
    return value


@dataclass(frozen=True)
class _Value:
    """A key's value after the generic pass, and where it came from."""

    value: Any
    where: str  # what a problem about it names: "consul.ca_file", or "CONSUL_CACERT (environment)"
    source: str  # "file", "environment" or "default"


class _Section:
    """One table of the file, read through the key table: every key's value from the file, else from
    the first set variable of its ``env``, else its default; a problem is recorded instead of raised."""

    def __init__(self, name: str, data: Any, env: Mapping[str, str], problems: _Problems) -> None:
        self.name = name
        self.env = env
        self.problems = problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.add(name, f"must be a table ([{name}]), not {_kind(data)}")
            data = {}
        self.data: dict[str, Any] = data
        for key in data:
            if key not in SECTIONS[name]:
                known = ", ".join(sorted(SECTIONS[name]))
                problems.add(f"{name}.{key}", f"unknown key (known keys in [{name}]: {known})")
        self.values = {k.name: self._read(k) for k in KEYS if k.section == name}

    def __getitem__(self, k: str) -> Any:
        return self.values[k].value

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def has(self, k: str) -> bool:
        return k in self.data

    def _read(self, key: Key) -> _Value:
        if key.name in self.data:
            return _Value(self._parsed(key, key.path, lambda: _FILE_READERS[key.kind](self, key)), key.path, "file")
        for var in key.env:
            text = self.env.get(var, "")
            if text:  # an empty variable is unset, as for the consul CLI
                where = f"{var} (environment)"
                parse = functools.partial(_from_env, key, text, where)
                return _Value(self._parsed(key, where, parse), where, "environment")
        return _Value(key.value, key.path, "default")

    def _parsed(self, key: Key, where: str, parse: Callable[[], Any]) -> Any:
        try:
            value = parse()
            return value if key.check is None else key.check(value)
        except Invalid as e:
            for problem in e.problems:
                self.problems.add(where, problem)
            return e.keep if e.keeps else key.value

    # The readers of a file's value, one per Kind; each returns the typed value or raises Invalid.

    def text(self, key: Key) -> str:
        v = self.data[key.name]
        if not isinstance(v, str):
            raise Invalid(f"must be a string, not {_kind(v)}")
        return _interpolate(v, key.path, self.env, self.problems)

    def path(self, key: Key) -> Path | None:
        text = self.text(key)
        return Path(text) if text else None

    def boolean(self, key: Key) -> bool:
        v = self.data[key.name]
        if not isinstance(v, bool):
            raise Invalid(f"must be true or false, not {_kind(v)}")
        return v

    def duration(self, key: Key) -> float | tuple[float | None, bool]:
        v = self.data[key.name]
        if v in key.off:
            return 0.0
        if not isinstance(v, str):
            raise Invalid(f'must be a duration string like "5s"{self._or_word(key)}, not {_kind(v)}')
        text = _interpolate(v, key.path, self.env, self.problems)
        if key.word and text.strip() == key.word:
            return (None, True)
        try:
            seconds = parse_duration(text)
        except ValueError as e:
            raise Invalid(f"{e}{self._or_word(key)}") from None
        if key.minimum is not None and seconds < key.minimum:
            raise Invalid(f"{text!r} is shorter than {format_duration(key.minimum)}{key.why_minimum}", keep=seconds)
        return (seconds, False) if key.word else seconds

    @staticmethod
    def _or_word(key: Key) -> str:
        return f' or "{key.word}"' if key.word else ""

    def integer(self, key: Key) -> int:
        lo, hi = int(key.minimum or 0), int(key.maximum or 0)
        v = self.data[key.name]
        if isinstance(v, str):
            if not any(variables(v)):
                # A TOML integer is written without quotes; a string only carries a variable ("${PORT}").
                hint = f"{v!r}" if not v.strip().lstrip("+-").isdigit() else f'"{v}": write {v.strip()} without quotes'
                raise Invalid(f"must be an integer, not a string ({hint})", keep=None)
            text = _interpolate(v, key.path, self.env, self.problems)
            try:
                v = int(text)
            except ValueError:
                raise Invalid(f"{text!r} (from a variable) is not a whole number", keep=None) from None
        if isinstance(v, float):
            whole = f" (write {int(v)})" if v.is_integer() else ""
            raise Invalid(f"must be a whole number, not {v!r}{whole}", keep=None)
        if isinstance(v, bool) or not isinstance(v, int):
            raise Invalid(f"must be an integer, not {_kind(v)}", keep=None)
        if not lo <= v <= hi:
            raise Invalid(f"{v} is outside {lo}..{hi}", keep=None)
        return v

    def strings(self, key: Key) -> tuple[str, ...]:
        raw = self.data[key.name]
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise Invalid(f"must be {key.form}")
        return tuple(_interpolate(t, key.path, self.env, self.problems) for t in raw)

    def table(self, key: Key) -> Mapping[str, str]:
        raw = self.data[key.name]
        if not isinstance(raw, dict):
            raise Invalid(f"must be {key.form}")
        table: dict[str, str] = {}
        for k, v in raw.items():
            mk = f"{key.path}.{k}"
            if not META_KEY.match(k) or k.startswith("consul-"):
                self.problems.add(
                    mk, "meta keys use letters, digits, '-' and '_' (at most 128) and must not start with 'consul-'"
                )
            elif k == OWNER_META_KEY:
                self.problems.add(mk, "is reserved: the sidecar marks its own entry with it")
            elif not isinstance(v, str):
                self.problems.add(mk, f"must be a string, not {_kind(v)}")
            else:
                table[k] = _interpolate(v, mk, self.env, self.problems)
                if len(table[k]) > 512:
                    self.problems.add(mk, "longer than 512 characters (Consul's limit)")
        if len(raw) > 64:
            self.problems.add(key.path, "more than 64 keys (Consul's limit)")
        return MappingProxyType(table)

    def signal(self, key: Key) -> signal.Signals:
        text = self.text(key)
        if not text:
            return cast(signal.Signals, key.value)
        try:
            return parse_signal(text)
        except ValueError as e:
            raise Invalid(str(e)) from None

    def choice(self, key: Key) -> enum.StrEnum:
        assert key.choices is not None
        text = self.text(key)
        if not text:
            return cast(enum.StrEnum, key.value)
        try:
            return key.choices(text)
        except ValueError:
            words = " or ".join(f'"{c.value}" ({w})' for c, w in zip(key.choices, key.choice_words, strict=True))
            raise Invalid(f"{text!r}: use {words}") from None

    def listen(self, key: Key) -> str | None:
        text = self.text(key)
        return None if text in key.off else text


_FILE_READERS: Mapping[Kind, Callable[[_Section, Key], Any]] = MappingProxyType(
    {
        Kind.STRING: _Section.text,
        Kind.URL: _Section.text,
        Kind.PATH: _Section.path,
        Kind.BOOL: _Section.boolean,
        Kind.DURATION: _Section.duration,
        Kind.INTEGER: _Section.integer,
        Kind.STRINGS: _Section.strings,
        Kind.TABLE: _Section.table,
        Kind.SIGNAL: _Section.signal,
        Kind.CHOICE: _Section.choice,
        Kind.HOST_PORT: _Section.listen,
    }
)


def _from_env(key: Key, text: str, where: str) -> Any:
    """A CONSUL_* variable's text as the consul CLI reads it (taken literally: no ${VAR} in it)."""
    if key.kind is Kind.BOOL:
        value = _go_bool(text)
        if value is None:
            raise Invalid(f"{text.strip().lower()!r} is not true or false (1, t, true, 0, f, false)")
        return value
    if key.kind is Kind.PATH:
        return Path(text)
    if key.kind in (Kind.STRING, Kind.URL):
        return text
    if key.kind is Kind.STRINGS:  # comma-separated, as etcdctl reads ETCDCTL_ENDPOINTS
        return tuple(t.strip() for t in text.split(",") if t.strip())
    raise AssertionError(f"{key.path}: no reader for {key.kind} from the environment ({where})")


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "a number"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def load_config(
    path: Path,
    env: Mapping[str, str],
    hostname: Callable[[], str] = socket.gethostname,
    local_address: Callable[[str, int], str] = address_toward,
) -> Config:
    """Read and validate ``path``; raise ConfigError listing every problem."""
    problems = _Problems(path)
    doc = _read_toml(path)
    for top in doc:
        if top not in SECTIONS:
            problems.add(top, f"unknown section or key (known sections: {', '.join(SECTIONS)})")
    s = {name: _Section(name, doc.get(name), env, problems) for name in SECTIONS}

    consul = _consul_settings(s["consul"], env, problems)
    service = _service_settings(s["service"], consul, hostname, local_address, problems)
    check = _check_settings(s["check"], service, problems)
    startup = StartupSettings(**_simple(s["startup"], StartupSettings))
    shutdown = _shutdown_settings(s["shutdown"], problems)
    app = _app_settings(s["app"], problems)
    status = _status_settings(s["status"])
    hot_restart = _hot_restart_settings(s["hot_restart"], problems)
    if hot_restart.enabled and app.configured:
        problems.add(
            "hot_restart.enabled",
            "needs wrapper mode (the app started after '--'); [app] is for alongside mode, where the sidecar "
            "holds no socket to hand over",
        )

    registry = RegistrySettings(**_simple(s["registry"], RegistrySettings))
    etcd = _etcd_settings(s["etcd"], registry, s, doc, problems)

    if problems.lines:
        raise ConfigError(problems.lines)
    return Config(
        path,
        consul,
        service,
        check,
        startup,
        shutdown,
        app,
        status,
        hot_restart=hot_restart,
        registry=registry,
        etcd=etcd,
        systemd_notify_socket=env.get("NOTIFY_SOCKET") or None,
        secret_env=frozenset(problems.secret_env),
        warnings=tuple(problems.warnings),
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data, _ = read_capped(path, CONFIG_MAX_BYTES)
        text = data.decode("utf-8")
    except FileProblem as e:
        raise ConfigError([_one_line(f"{path}: cannot use the configuration file: {e}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the configuration file is not UTF-8 text"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_one_line(f"{path}: not valid TOML: {e}")]) from None


def load_consul_settings(path: Path | None, env: Mapping[str, str], address: str | None = None) -> ConsulSettings:
    """Only the [consul] section (for commands that need no service, like ``wait``).

    ``address`` (a command-line flag) wins over the file, which wins over CONSUL_HTTP_ADDR.
    """
    source = path or Path("<command line>")
    problems = _Problems(source)
    doc = _read_toml(path) if path is not None else {}
    data = doc.get("consul", {})
    if address is not None and isinstance(data, dict):
        data = {**data, "address": address}
    settings = _consul_settings(_Section("consul", data, env, problems), env, problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    return settings


def _consul_settings(sec: _Section, env: Mapping[str, str], problems: _Problems) -> ConsulSettings:
    address = sec.values["address"]
    # As the consul CLI: CONSUL_HTTP_SSL=true means https for an address that names no scheme.
    ssl_on = _env_bool(env, _HTTPS_VAR, problems)
    try:
        scheme, host, port = parse_consul_address(address.value or "", "https" if ssl_on else "http")
    except ValueError as e:
        problems.add(address.where, str(e))
        scheme, host, port = "http", "127.0.0.1", 8500
    token = _token_source(sec, problems)
    ca_file, cert_file, key_file = sec["ca_file"], sec["cert_file"], sec["key_file"]
    if (cert_file is None) != (key_file is None):
        problems.add(sec.key("cert_file"), "cert_file and key_file go together: set both or neither")
    return ConsulSettings(
        scheme,
        host,
        port,
        token,
        ca_file,
        cert_file,
        key_file,
        sec["tls_verify"],
        sec["timeout"],
        ca_path=_ca_path(sec.values["ca_path"], ca_file, problems),
        tls_server_name=sec["tls_server_name"],
    )


def _ca_path(ca_path: _Value, ca_file: Path | None, problems: _Problems) -> Path | None:
    if ca_path.value is None:
        return None
    if ca_file is not None:
        # The consul CLI (rootcerts.LoadCACerts) uses the CA file alone when both are set.
        problems.warn(
            ca_path.where, f"ignored: a CA file is set ({ca_file}), and it alone is used, as the consul CLI does"
        )
        return None
    try:
        read_ca_dir(ca_path.value)  # what the transport will read: a bad file must fail here, not at the first request
    except FileProblem as e:
        problems.add(ca_path.where, f"CA directory: {e}")
    return cast(Path, ca_path.value)


def _token_source(sec: _Section, problems: _Problems) -> TokenSource:
    """One token source: the file's token_file, else its token, else CONSUL_HTTP_TOKEN_FILE, else CONSUL_HTTP_TOKEN."""
    if sec.has("token") and sec.has("token_file"):
        problems.add(sec.key("token"), "set token or token_file, not both")
    # Consul's own variables hold the sidecar's token whichever source wins: never the app's.
    problems.secret_env.update(BY_PATH["consul.token"].env + BY_PATH["consul.token_file"].env)
    token, token_file = sec.values["token"], sec.values["token_file"]
    if token_file.source == "file" or token_file.source == "environment" and token.source != "file":
        if token_file.value is None:
            return TokenSource()
        origin = sec.key("token_file") if token_file.source == "file" else token_file.where.split()[0]
        src = TokenSource(file=token_file.value, origin=origin)
    elif token.source == "default":
        return TokenSource()
    else:
        raw = sec.data.get("token")
        if isinstance(raw, str):  # every ${VAR} in it carries (part of) the secret
            problems.secret_env.update(variables(raw))
        value = token.value or None
        if value is not None and not token_chars_ok(value):
            why = "(a line break from ${VAR}?)" if token.source == "file" else "(a trailing line break?)"
            problems.add(
                token.where,
                f"the token contains a line break, control character, space or non-ASCII character {why}; "
                "it goes into an HTTP header",
            )
        origin = sec.key("token") if token.source == "file" else token.where.split()[0]
        return TokenSource(value=value, origin=origin)
    assert src.file is not None
    problem, warning = check_token_file(src.file)
    if warning is not None:
        problems.warn(token_file.where, warning)
    if problem is not None:
        problems.add(token_file.where, problem)
    else:
        try:  # what every request will do: it must not fail later where a config error belongs now
            if src.read() is None:
                problems.add(token_file.where, f"token file {src.file} is empty")
        except TokenError as e:
            problems.add(token_file.where, str(e))
    return src


def _service_settings(
    sec: _Section,
    consul: ConsulSettings,
    hostname: Callable[[], str],
    local_address: Callable[[str, int], str],
    problems: _Problems,
) -> ServiceSettings:
    name = sec["name"]
    if not name:
        problems.add(sec.key("name"), "required: the service name consumers look up")
        name = "invalid"
    if not sec.has("port"):
        problems.add(sec.key("port"), "required: the port the service listens on (1..65535)")
    port = sec["port"] or 0
    address = sec["address"] or ""
    if not address and consul.unix_socket is not None:
        problems.add(
            sec.key("address"),
            f"not set, and the agent is reached over a unix socket ({consul.address}), which "
            "tells nothing about this host's address: set service.address",
        )
        address = "127.0.0.1"
    elif not address:
        try:
            address = local_address(consul.host, consul.port)
        except OSError as e:
            problems.add(
                sec.key("address"),
                f"not set, and the address toward the Consul agent {consul.host} could not be found "
                f"({e.strerror or e}): set service.address",
            )
            address = "127.0.0.1"
    if not valid_address(address):
        problems.add(sec.key("address"), f"{address!r}: give an IP address or host name, without scheme, port or path")
    given_id = sec["id"]
    sid = given_id or default_service_id(name, hostname(), address, port)
    if not given_id and not SERVICE_NAME.match(name):
        pass  # the default ID is built from the name, whose problem is reported already
    elif not SERVICE_ID.match(sid):
        problems.add(
            sec.key("id"), f"{sid!r}: use letters, digits and . _ : @ - (at most 256; it goes into agent API paths)"
        )
    elif sid in (".", ".."):
        problems.add(
            sec.key("id"), f"{sid!r} is a dot segment: URL libraries rewrite it, so the agent would never see this ID"
        )
    return ServiceSettings(name, sid, address, port, sec["tags"], sec["meta"])


def _check_settings(sec: _Section, service: ServiceSettings, problems: _Problems) -> CheckSettings:
    host = f"[{service.address}]" if ":" in service.address else service.address
    http = sec["http"] or f"http://{host}:{service.port}/healthz"
    # A bad URL is reported already (given), or comes from a bad service.address (built), reported too.
    target = urllib.parse.urlsplit(http).hostname if url_problem(http) is None else None
    if target is not None and not sec["allow_remote"] and not same_host(target, service.address):
        problems.add(
            sec.key("http"),
            f"{http!r} points at {target}, not at the service's address {service.address}; "
            "the agent fetches this URL, so set check.allow_remote = true only if that is intended",
        )
    return CheckSettings(http, **_simple(sec, CheckSettings, "http"))


def _simple(sec: _Section, settings: type, *besides: str) -> dict[str, Any]:
    """The section's values for the settings' fields that are exactly one key each (all but ``besides``)."""
    return {f.name: sec[f.name] for f in dataclasses.fields(settings) if f.name not in besides}


def _shutdown_settings(sec: _Section, problems: _Problems) -> ShutdownSettings:
    seconds, learned = sec["propagation_delay"]
    if learned:  # the wait's upper bound, in the worst case and every rule that needs one, is learned_max
        seconds = sec["learned_max"]
        if sec["strategy"] is Strategy.TRAFFIC:
            problems.add(
                sec.key("propagation_delay"),
                '"learned" works with strategy = "fixed": the traffic strategy ends each drain on its own '
                "evidence; give it a duration, the upper bound of its wait",
            )
        if sec["learned_min"] > sec["learned_max"]:
            problems.add(sec.key("learned_min"), "is longer than shutdown.learned_max")
    fields = _simple(sec, ShutdownSettings, "propagation_delay", "learned")
    settings = ShutdownSettings(propagation_delay=seconds, learned=learned, **fields)
    if settings.strategy is Strategy.TRAFFIC and settings.min_delay > settings.propagation_delay:
        problems.add(sec.key("min_delay"), "is longer than shutdown.propagation_delay, the upper bound of the wait")
    return settings


def _app_settings(sec: _Section, problems: _Problems) -> AppSettings:
    settings = AppSettings(**_simple(sec, AppSettings))
    if sum(x is not None for x in (settings.pid_file, settings.pid, settings.shutdown_url)) > 1:
        problems.add("app", "set one of pid_file, pid or shutdown_url")
    return settings


def _status_settings(sec: _Section) -> StatusSettings | None:
    listen = sec["listen"]
    return None if listen is None else StatusSettings(*listen)


def _hot_restart_settings(sec: _Section, problems: _Problems) -> HotRestartSettings:
    settings = HotRestartSettings(**_simple(sec, HotRestartSettings))
    if settings.ready is ReadyMode.WARMUP and settings.warmup <= 0:
        problems.add(
            sec.key("warmup"),
            'must be more than 0s with ready = "warmup": the old generation would be stopped before the new one '
            "has shown it stays up",
        )
    elif settings.ready is ReadyMode.WARMUP and settings.warmup >= settings.timeout:
        problems.add(sec.key("warmup"), "is not shorter than hot_restart.timeout: every hot restart would fail")
    return settings


def _etcd_settings(
    sec: _Section, registry: RegistrySettings, s: Mapping[str, _Section], doc: Mapping[str, Any], problems: _Problems
) -> EtcdSettings:
    settings = EtcdSettings(**_simple(sec, EtcdSettings))
    if registry.kind is not RegistryKind.ETCD:
        return settings
    if "consul" in doc:
        problems.add("consul", 'is Consul\'s: remove it with registry.kind = "etcd"')
    if s["check"].has("deregister_critical_after"):
        problems.add(
            "check.deregister_critical_after",
            'is Consul\'s: with registry.kind = "etcd" a key outlives its sidecar by at most etcd.lease_ttl',
        )
    if not settings.endpoints:
        problems.add(
            sec.values["endpoints"].where,
            'empty: give the etcd members\' client URLs (e.g. ["http://127.0.0.1:2379"]) or ETCDCTL_ENDPOINTS',
        )
    if settings.format is EtcdFormat.SKYDNS and not settings.dns_domain:
        problems.add(sec.key("dns_domain"), 'required with format = "skydns": the domain CoreDNS serves')
    if (settings.cert_file is None) != (settings.key_file is None):
        problems.add(sec.key("cert_file"), "cert_file and key_file go together: set both or neither")
    if (settings.user is None) != (settings.password_file is None):
        problems.add(sec.key("user"), "user and password_file go together: set both or neither")
    return settings


def load_etcd_settings(path: Path, env: Mapping[str, str]) -> EtcdSettings | None:
    """``[registry]`` and ``[etcd]`` of a sidecar file alone (for ``wait -c FILE``): None when its
    ``registry.kind`` is not etcd. Validated as ``load_config`` validates them."""
    problems = _Problems(path)
    doc = _read_toml(path)
    s = {"registry": _Section("registry", doc.get("registry"), env, problems)}
    registry = RegistrySettings(**_simple(s["registry"], RegistrySettings))
    if problems.lines:
        raise ConfigError(problems.lines)
    if registry.kind is not RegistryKind.ETCD:
        return None  # a Consul file: wait reads its [consul] alone, as before
    s |= {name: _Section(name, doc.get(name), env, problems) for name in ("etcd", "check")}
    settings = _etcd_settings(s["etcd"], registry, s, doc, problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    return settings
