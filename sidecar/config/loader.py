"""The loader: reads the TOML file and Consul's ``CONSUL_*`` variables, validates every key, builds a ``Config``.

Types, defaults and bounds come from the key table (keys.py); what ties keys together
(the check URL built from the service's address, min_delay against propagation_delay, one
token source) is here. Every problem found is reported as one line naming the file and the
key, all at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..durations import format_duration, parse_duration
from .addresses import (
    DEFAULT_CONSUL_ADDRESS,
    address_toward,
    parse_consul_address,
    parse_listen,
    same_host,
    server_name,
    url_problem,
    valid_address,
)
from .files import CONFIG_MAX_BYTES, FileProblem, check_readable, read_ca_dir, read_capped
from .interpolation import interpolate, variables
from .keys import BY_PATH, SECTIONS, Key, ReadyMode, Strategy, parse_signal
from .model import (
    AppSettings,
    CheckSettings,
    Config,
    ConfigError,
    ConsulSettings,
    HotRestartSettings,
    ServiceSettings,
    ShutdownSettings,
    StartupSettings,
    StatusSettings,
)
from .names import DNS_LABEL, META_KEY, SERVICE_ID, SERVICE_NAME, default_service_id
from .tokens import TokenError, TokenSource, check_token_file, token_chars_ok

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Go's strconv.ParseBool, which the consul CLI uses for CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY,
# plus the yes/no/on/off (any case) this loader always took for CONSUL_HTTP_SSL_VERIFY.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_LEGACY = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


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


def _env_bool(env: Mapping[str, str], var: str, problems: _Problems) -> bool | None:
    """A boolean CONSUL_* variable in Go's forms; None when unset or empty (as the consul CLI ignores it)."""
    raw = env.get(var, "")
    if raw == "":
        return None
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    legacy = _LEGACY.get(raw.strip().lower())
    if legacy is not None:
        return legacy
    problems.add(f"{var} (environment)", f"{raw.strip().lower()!r} is not true or false (1, t, true, 0, f, false)")
    return None


class _Section:
    """Typed access to one table of the file, by the key table; records a problem instead of raising."""

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

    def spec(self, k: str) -> Key:
        return BY_PATH[f"{self.name}.{k}"]

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def has(self, k: str) -> bool:
        return k in self.data

    def raw(self, k: str) -> Any:
        if k in self.data:
            return self.data[k]
        return self.spec(k).default

    def string(self, k: str, default: str | None = None) -> str | None:
        v = self.raw(k)
        if v is None:
            return default
        if not isinstance(v, str):
            self.problems.add(self.key(k), f"must be a string, not {_kind(v)}")
            return default
        return _interpolate(v, self.key(k), self.env, self.problems)

    def boolean(self, k: str) -> bool:
        v = self.raw(k)
        if isinstance(v, bool):
            return v
        self.problems.add(self.key(k), f"must be true or false, not {_kind(v)}")
        return bool(self.spec(k).default)

    def duration(self, k: str) -> float:
        spec = self.spec(k)
        fallback = parse_duration(str(spec.default))
        v = self.raw(k)
        if not isinstance(v, str):
            self.problems.add(self.key(k), f'must be a duration string like "5s", not {_kind(v)}')
            return fallback
        text = _interpolate(v, self.key(k), self.env, self.problems)
        try:
            seconds = parse_duration(text)
        except ValueError as e:
            self.problems.add(self.key(k), str(e))
            return fallback
        if spec.minimum is not None and seconds < spec.minimum:
            self.problems.add(
                self.key(k), f"{text!r} is shorter than {format_duration(spec.minimum)}{spec.why_minimum}"
            )
        return seconds

    def integer(self, k: str) -> int | None:
        spec = self.spec(k)
        lo, hi = int(spec.minimum or 0), int(spec.maximum or 0)
        v = self.raw(k)
        if v is None:
            return None
        if isinstance(v, str):
            if not any(variables(v)):
                # A TOML integer is written without quotes; a string only carries a variable ("${PORT}").
                hint = f"{v!r}" if not v.strip().lstrip("+-").isdigit() else f'"{v}": write {v.strip()} without quotes'
                self.problems.add(self.key(k), f"must be an integer, not a string ({hint})")
                return None
            text = _interpolate(v, self.key(k), self.env, self.problems)
            try:
                v = int(text)
            except ValueError:
                self.problems.add(self.key(k), f"{text!r} (from a variable) is not a whole number")
                return None
        if isinstance(v, float):
            whole = f" (write {int(v)})" if v.is_integer() else ""
            self.problems.add(self.key(k), f"must be a whole number, not {v!r}{whole}")
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.problems.add(self.key(k), f"must be an integer, not {_kind(v)}")
            return None
        if not lo <= v <= hi:
            self.problems.add(self.key(k), f"{v} is outside {lo}..{hi}")
            return None
        return v

    def path(self, k: str, must_read: bool = True) -> Path | None:
        text = self.string(k)
        if not text:
            return None
        return _readable(Path(text), self.key(k), self.problems) if must_read else Path(text)

    def strings(self, k: str) -> tuple[str, ...] | None:
        """A list of strings, each interpolated; None when unset or not a list of strings."""
        raw = self.raw(k)
        if raw is None:
            return None
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            return None
        return tuple(_interpolate(t, self.key(k), self.env, self.problems) for t in raw)


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


def _readable(p: Path, key: str, problems: _Problems) -> Path:
    try:
        check_readable(p)
    except FileProblem as e:
        problems.add(key, str(e))
    return p


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
    startup = StartupSettings(
        wait_healthy=s["startup"].boolean("wait_healthy"), timeout=s["startup"].duration("timeout")
    )
    shutdown = _shutdown_settings(s["shutdown"], problems)
    app = _app_settings(s["app"], problems)
    status = _status_settings(s["status"], problems)
    hot_restart = _hot_restart_settings(s["hot_restart"], problems)
    if hot_restart.enabled and app.configured:
        problems.add(
            "hot_restart.enabled",
            "needs wrapper mode (the app started after '--'); [app] is for alongside mode, where the sidecar "
            "holds no socket to hand over",
        )

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
    if sec.has("address"):
        addr_text, addr_key = sec.string("address") or "", sec.key("address")
    elif env.get("CONSUL_HTTP_ADDR"):
        addr_text, addr_key = env["CONSUL_HTTP_ADDR"], "CONSUL_HTTP_ADDR (environment)"
    else:
        addr_text, addr_key = DEFAULT_CONSUL_ADDRESS, sec.key("address")
    # As the consul CLI: CONSUL_HTTP_SSL=true means https for an address that names no scheme.
    ssl_on = _env_bool(env, "CONSUL_HTTP_SSL", problems)
    try:
        scheme, host, port = parse_consul_address(addr_text, "https" if ssl_on else "http")
    except ValueError as e:
        problems.add(addr_key, str(e))
        scheme, host, port = "http", "127.0.0.1", 8500

    token = _token_source(sec, env, problems)

    def tls_path(key: str, var: str) -> Path | None:
        if sec.has(key):
            return sec.path(key)
        if env.get(var):
            return _readable(Path(env[var]), f"{var} (environment)", problems)
        return None

    ca_file = tls_path("ca_file", "CONSUL_CACERT")
    cert_file = tls_path("cert_file", "CONSUL_CLIENT_CERT")
    key_file = tls_path("key_file", "CONSUL_CLIENT_KEY")
    if (cert_file is None) != (key_file is None):
        problems.add(sec.key("cert_file"), "cert_file and key_file go together: set both or neither")
    ca_path = _ca_path(sec, env, ca_file, problems)

    if sec.has("tls_server_name"):
        name_text, name_key = sec.string("tls_server_name") or "", sec.key("tls_server_name")
    else:
        name_text, name_key = env.get("CONSUL_TLS_SERVER_NAME", ""), "CONSUL_TLS_SERVER_NAME (environment)"
    tls_server_name = server_name(name_text) or None
    if tls_server_name is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,253}", tls_server_name):
        problems.add(name_key, f"{tls_server_name!r} is not a host name or IP address")

    if sec.has("tls_verify"):
        tls_verify = sec.boolean("tls_verify")
    else:
        verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY", problems)
        tls_verify = True if verify is None else verify
    timeout = sec.duration("timeout")
    return ConsulSettings(
        scheme,
        host,
        port,
        token,
        ca_file,
        cert_file,
        key_file,
        tls_verify,
        timeout,
        ca_path=ca_path,
        tls_server_name=tls_server_name,
    )


def _ca_path(sec: _Section, env: Mapping[str, str], ca_file: Path | None, problems: _Problems) -> Path | None:
    if sec.has("ca_path"):
        text, key = sec.string("ca_path") or "", sec.key("ca_path")
    else:
        text, key = env.get("CONSUL_CAPATH", ""), "CONSUL_CAPATH (environment)"
    if not text:
        return None
    if ca_file is not None:
        # The consul CLI (rootcerts.LoadCACerts) uses the CA file alone when both are set.
        problems.warn(key, f"ignored: a CA file is set ({ca_file}), and it alone is used, as the consul CLI does")
        return None
    try:
        read_ca_dir(Path(text))  # what the transport will read: a bad file must fail here, not at the first request
    except FileProblem as e:
        problems.add(key, f"CA directory: {e}")
    return Path(text)


def _token_source(sec: _Section, env: Mapping[str, str], problems: _Problems) -> TokenSource:
    if sec.has("token") and sec.has("token_file"):
        problems.add(sec.key("token"), "set token or token_file, not both")
    # Consul's own variables hold the sidecar's token whichever source wins: never the app's.
    problems.secret_env.update({"CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"})
    if sec.has("token_file"):
        text = sec.string("token_file")
        if not text:
            return TokenSource()
        src, key = TokenSource(file=Path(text), origin=sec.key("token_file")), sec.key("token_file")
    elif sec.has("token"):
        raw = sec.raw("token")
        if isinstance(raw, str):  # every ${VAR} in it carries (part of) the secret
            problems.secret_env.update(variables(raw))
        value = sec.string("token") or None
        if value is not None and not token_chars_ok(value):
            problems.add(
                sec.key("token"),
                "the token contains a line break, control character, space or non-ASCII character "
                "(a line break from ${VAR}?); it goes into an HTTP header",
            )
        return TokenSource(value=value, origin=sec.key("token"))
    elif env.get("CONSUL_HTTP_TOKEN_FILE"):
        src = TokenSource(file=Path(env["CONSUL_HTTP_TOKEN_FILE"]), origin="CONSUL_HTTP_TOKEN_FILE")
        key = "CONSUL_HTTP_TOKEN_FILE (environment)"
    elif env.get("CONSUL_HTTP_TOKEN"):
        if not token_chars_ok(env["CONSUL_HTTP_TOKEN"]):
            problems.add(
                "CONSUL_HTTP_TOKEN (environment)",
                "the token contains a line break, control character, space or "
                "non-ASCII character (a trailing line break?); it goes into an HTTP header",
            )
        return TokenSource(value=env["CONSUL_HTTP_TOKEN"], origin="CONSUL_HTTP_TOKEN")
    else:
        return TokenSource()
    assert src.file is not None
    problem, warning = check_token_file(src.file)
    if warning is not None:
        problems.warn(key, warning)
    if problem is not None:
        problems.add(key, problem)
    else:
        try:  # what every request will do: it must not fail later where a config error belongs now
            if src.read() is None:
                problems.add(key, f"token file {src.file} is empty")
        except TokenError as e:
            problems.add(key, str(e))
    return src


def _service_settings(
    sec: _Section,
    consul: ConsulSettings,
    hostname: Callable[[], str],
    local_address: Callable[[str, int], str],
    problems: _Problems,
) -> ServiceSettings:
    name = sec.string("name")
    if not name:
        problems.add(sec.key("name"), "required: the service name consumers look up")
        name = "invalid"
    elif not SERVICE_NAME.match(name):
        problems.add(
            sec.key("name"), f"{name!r}: use letters, digits, '-' and '_' (at most 63), so Consul DNS can answer for it"
        )
    if not sec.has("port"):
        problems.add(sec.key("port"), "required: the port the service listens on (1..65535)")
    port = sec.integer("port") or 0
    address = sec.string("address") or ""
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
    given_id = sec.string("id")
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

    tags: tuple[str, ...] = ()
    if sec.raw("tags") is not None:
        given_tags = sec.strings("tags")
        if given_tags is None:
            problems.add(sec.key("tags"), "must be a list of strings")
        else:
            tags = given_tags
    meta: dict[str, str] = {}
    raw_meta = sec.raw("meta")
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            problems.add(sec.key("meta"), 'must be a table of strings, e.g. meta = { version = "1.0.0" }')
        else:
            for k, v in raw_meta.items():
                mk = f"{sec.key('meta')}.{k}"
                if not META_KEY.match(k) or k.startswith("consul-"):
                    problems.add(
                        mk, "meta keys use letters, digits, '-' and '_' (at most 128) and must not start with 'consul-'"
                    )
                elif k == "consul_sidecar_owner":
                    problems.add(mk, "is reserved: the sidecar marks its own entry with it")
                elif not isinstance(v, str):
                    problems.add(mk, f"must be a string, not {_kind(v)}")
                else:
                    meta[k] = _interpolate(v, mk, sec.env, problems)
                    if len(meta[k]) > 512:
                        problems.add(mk, "longer than 512 characters (Consul's limit)")
            if len(raw_meta) > 64:
                problems.add(sec.key("meta"), "more than 64 keys (Consul's limit)")
    return ServiceSettings(name, sid, address, port, tags, MappingProxyType(meta))


def _check_settings(sec: _Section, service: ServiceSettings, problems: _Problems) -> CheckSettings:
    host = f"[{service.address}]" if ":" in service.address else service.address
    given = sec.string("http")
    http = given or f"http://{host}:{service.port}/healthz"
    allow_remote = sec.boolean("allow_remote")
    bad_url = url_problem(http)
    if bad_url is not None:
        if given:  # a default built from a bad service.address: that key is already reported
            problems.add(sec.key("http"), bad_url)
    elif not allow_remote and not same_host(urllib.parse.urlsplit(http).hostname or "", service.address):
        problems.add(
            sec.key("http"),
            f"{http!r} points at {urllib.parse.urlsplit(http).hostname}, not at the service's address "
            f"{service.address}; "
            "the agent fetches this URL, so set check.allow_remote = true only if that is intended",
        )
    interval = sec.duration("interval")
    timeout = sec.duration("timeout")
    if sec.raw("deregister_critical_after") in sec.spec("deregister_critical_after").off:
        deregister_after = 0.0
    else:
        deregister_after = sec.duration("deregister_critical_after")
    return CheckSettings(http, interval, timeout, deregister_after, allow_remote)


def _strategy(sec: _Section, problems: _Problems) -> Strategy:
    text = sec.string("strategy") or Strategy.FIXED.value
    try:
        return Strategy(text)
    except ValueError:
        problems.add(
            sec.key("strategy"),
            f'{text!r}: use "fixed" (wait propagation_delay) or "traffic" (wait until the app\'s port is quiet)',
        )
        return Strategy.FIXED


def _shutdown_settings(sec: _Section, problems: _Problems) -> ShutdownSettings:
    sig_text = sec.string("app_signal") or "SIGTERM"
    try:
        sig = parse_signal(sig_text)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            problems.add(sec.key("app_signal"), f"{sig.name} cannot be caught, so the app could not drain; use SIGTERM")
    except ValueError as e:
        problems.add(sec.key("app_signal"), str(e))
        sig = signal.SIGTERM
    strategy = _strategy(sec, problems)
    propagation_delay = sec.duration("propagation_delay")
    min_delay = sec.duration("min_delay")
    quiet_period = sec.duration("quiet_period")
    if strategy is Strategy.TRAFFIC and min_delay > propagation_delay:
        problems.add(sec.key("min_delay"), "is longer than shutdown.propagation_delay, the upper bound of the wait")
    dns: list[tuple[str, int]] = []
    if sec.raw("dns") is not None:
        given_dns = sec.strings("dns")
        if given_dns is None:
            problems.add(sec.key("dns"), 'must be a list of "host:port" strings, e.g. ["127.0.0.1:8600"]')
        else:
            for d in given_dns:
                try:
                    host, port = parse_listen(d)
                    if port == 0:
                        raise ValueError(f"{d!r}: port 0")
                    ipaddress.ip_address(host)
                    dns.append((host, port))
                except ValueError as e:
                    problems.add(sec.key("dns"), f'{e} (give an IP address and port, e.g. "127.0.0.1:8600")')
    dns_name = (sec.string("dns_name") or "").rstrip(".")
    if dns_name and (len(dns_name) > 253 or not all(DNS_LABEL.match(label) for label in dns_name.split("."))):
        problems.add(
            sec.key("dns_name"),
            f"{dns_name!r} is not a DNS name (labels of letters, digits, '-' and '_', "
            'e.g. "v2.web.service.dc1.consul")',
        )
    return ShutdownSettings(
        deregister_timeout=sec.duration("deregister_timeout"),
        propagation_delay=propagation_delay,
        app_signal=sig,
        app_timeout=sec.duration("app_timeout"),
        budget=sec.duration("budget"),
        strategy=strategy,
        min_delay=min_delay,
        quiet_period=quiet_period,
        dns=tuple(dns),
        dns_name=dns_name,
        traffic_poll_only_accepts_misses=sec.boolean("traffic_poll_only_accepts_misses"),
    )


def _app_settings(sec: _Section, problems: _Problems) -> AppSettings:
    pid_file = sec.path("pid_file", must_read=False)
    pid = sec.integer("pid")
    url = sec.string("shutdown_url") or None
    if url is not None:
        bad_url = url_problem(url)
        if bad_url is not None:
            problems.add(sec.key("shutdown_url"), bad_url)
    if sum(x is not None for x in (pid_file, pid, url)) > 1:
        problems.add("app", "set one of pid_file, pid or shutdown_url")
    return AppSettings(pid_file, pid, url)


def _status_settings(sec: _Section, problems: _Problems) -> StatusSettings | None:
    listen = sec.string("listen")
    if not listen:
        return None
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        problems.add(sec.key("listen"), str(e))
        return None
    return StatusSettings(host, port)


# Signals that already mean something to the sidecar, or that cannot be caught.
_NOT_A_RESTART_SIGNAL = {
    signal.SIGTERM: "starts the drain",
    signal.SIGINT: "starts the drain",
    signal.SIGKILL: "cannot be caught",
    signal.SIGSTOP: "cannot be caught",
    signal.SIGCHLD: "is how the sidecar learns that a child exited",
}


def _hot_restart_settings(sec: _Section, problems: _Problems) -> HotRestartSettings:
    enabled = sec.boolean("enabled")
    sig_text = sec.string("signal") or "SIGUSR2"
    try:
        sig = parse_signal(sig_text)
        why = _NOT_A_RESTART_SIGNAL.get(sig)
        if why is not None:
            problems.add(sec.key("signal"), f"{sig.name} {why}; use SIGUSR2 (the default), SIGHUP or SIGUSR1")
    except ValueError as e:
        problems.add(sec.key("signal"), str(e))
        sig = signal.SIGUSR2
    text = sec.string("ready") or ReadyMode.NOTIFY.value
    try:
        ready = ReadyMode(text)
    except ValueError:
        problems.add(
            sec.key("ready"),
            f'{text!r}: use "notify" (the app sends READY=1 on NOTIFY_SOCKET) or "warmup" (it stays alive for warmup)',
        )
        ready = ReadyMode.NOTIFY
    warmup, timeout = sec.duration("warmup"), sec.duration("timeout")
    if ready is ReadyMode.WARMUP and warmup <= 0:
        problems.add(
            sec.key("warmup"),
            'must be more than 0s with ready = "warmup": the old generation would be stopped before the new one '
            "has shown it stays up",
        )
    elif ready is ReadyMode.WARMUP and warmup >= timeout:
        problems.add(sec.key("warmup"), "is not shorter than hot_restart.timeout: every hot restart would fail")
    return HotRestartSettings(enabled=enabled, signal=sig, ready=ready, warmup=warmup, timeout=timeout)
