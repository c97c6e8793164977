"""The configuration file: parsed and validated once, at the edge, into frozen objects.

This is the only module that reads the environment (``${VAR}`` interpolation and
Consul's own ``CONSUL_*`` variables). Everything downstream gets a ``Config``.
Every problem found is reported as one line naming the file and the key, all
at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .durations import format_duration, parse_duration

EX_CONFIG = 78  # sysexits.h: configuration error

# How long the sidecar waits for the app to be reaped after SIGKILL. Not
# configurable: SIGKILL cannot be refused, so this only bounds the kernel's work.
KILL_REAP_TIMEOUT = 1.0


class ConfigError(Exception):
    """One or more problems in the configuration; each line names the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TokenSource:
    """Where the ACL token comes from. Never printed: ``repr`` hides the value.

    A token file is read again on every request, so a rotated token is used by
    the next request without a restart.
    """

    value: str | None = field(default=None, repr=False)
    file: Path | None = None
    origin: str = ""  # "consul.token", "CONSUL_HTTP_TOKEN_FILE", ... for messages

    def read(self) -> str | None:
        if self.file is not None:
            return self.file.read_text(encoding="utf-8").strip() or None
        return self.value or None

    def describe(self) -> str | None:
        if self.file is not None:
            return f"file {self.file} (from {self.origin})"
        if self.value:
            return f"<redacted> (from {self.origin})"
        return None


@dataclass(frozen=True)
class ConsulSettings:
    scheme: str
    host: str
    port: int
    token: TokenSource
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    tls_verify: bool
    timeout: float

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class ServiceSettings:
    name: str
    id: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]


@dataclass(frozen=True)
class CheckSettings:
    http: str
    interval: float
    timeout: float
    deregister_critical_after: float  # 0: never
    allow_remote: bool


@dataclass(frozen=True)
class StartupSettings:
    wait_healthy: bool
    timeout: float


@dataclass(frozen=True)
class ShutdownSettings:
    deregister_timeout: float
    propagation_delay: float
    app_signal: signal.Signals
    app_timeout: float
    budget: float  # the platform's stop timeout we must fit in (Kubernetes' default grace period: 30 s)
    strategy: str = "fixed"  # "fixed": wait propagation_delay; "traffic": wait for evidence, bounded by it
    min_delay: float = 1.0  # "traffic": never signal the app sooner than this after confirmation
    quiet_period: float = 1.0  # "traffic": no new connection and no inbound byte for this long
    dns: tuple[tuple[str, int], ...] = ()  # "traffic": resolvers that must stop returning our address
    dns_name: str = ""  # "traffic": the name consumers look up ("" = <service.name>.service.consul)
    # "traffic": when the poll of the socket table is the only view left (it misses short connections),
    # end the drain on it anyway instead of waiting propagation_delay.
    traffic_poll_only_accepts_misses: bool = False

    @property
    def worst_case(self) -> float:
        """Longest time from SIGTERM to the sidecar's exit."""
        return self.deregister_timeout + self.propagation_delay + self.app_timeout + KILL_REAP_TIMEOUT

    def over_budget(self) -> str | None:
        """A warning naming what to change when the worst case exceeds the budget, else None."""
        if self.worst_case <= self.budget:
            return None
        biggest = max(
            (self.app_timeout, "shutdown.app_timeout"),
            (self.propagation_delay, "shutdown.propagation_delay"),
            (self.deregister_timeout, "shutdown.deregister_timeout"),
        )[1]
        return (
            f"worst-case shutdown {format_duration(self.worst_case)} exceeds shutdown.budget "
            f"{format_duration(self.budget)}: the platform would SIGKILL the sidecar mid-drain. Lower {biggest} "
            "(or the other shutdown durations), or raise the platform's stop timeout and shutdown.budget with it"
        )


@dataclass(frozen=True)
class AppSettings:
    pid_file: Path | None
    pid: int | None
    shutdown_url: str | None

    @property
    def configured(self) -> bool:
        return self.pid_file is not None or self.pid is not None or self.shutdown_url is not None


@dataclass(frozen=True)
class StatusSettings:
    host: str
    port: int


@dataclass(frozen=True)
class Config:
    source: Path
    consul: ConsulSettings
    service: ServiceSettings
    check: CheckSettings
    startup: StartupSettings
    shutdown: ShutdownSettings
    app: AppSettings
    status: StatusSettings | None


# --- defaults (the documented ones; README "Configuration") -------------------

DEFAULT_CONSUL_ADDRESS = "http://127.0.0.1:8500"
DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "consul": {"timeout": "2s", "tls_verify": True},
        "check": {"interval": "1s", "timeout": "1s", "deregister_critical_after": "1m", "allow_remote": False},
        "startup": {"wait_healthy": True, "timeout": "60s"},
        "shutdown": {
            "deregister_timeout": "3s",
            "propagation_delay": "5s",
            "app_signal": "SIGTERM",
            "app_timeout": "20s",
            "budget": "30s",
            "strategy": "fixed",
            "min_delay": "1s",
            "quiet_period": "1s",
            "dns_name": "",
            "traffic_poll_only_accepts_misses": False,
        },
        "status": {"listen": "127.0.0.1:8501"},
    }
)

_SECTIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "consul": frozenset({"address", "token", "token_file", "ca_file", "cert_file", "key_file", "tls_verify", "timeout"}),
        "service": frozenset({"name", "id", "address", "port", "tags", "meta"}),
        "check": frozenset({"http", "interval", "timeout", "deregister_critical_after", "allow_remote"}),
        "startup": frozenset({"wait_healthy", "timeout"}),
        "shutdown": frozenset(
            {"deregister_timeout", "propagation_delay", "app_signal", "app_timeout", "budget", "strategy", "min_delay", "quiet_period", "dns",
             "dns_name", "traffic_poll_only_accepts_misses"}
        ),
        "app": frozenset({"pid_file", "pid", "shutdown_url"}),
        "status": frozenset({"listen"}),
    }
)

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_SERVICE_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,256}$")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Problems:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{self.source}: {key}: {message}")


def _interpolate(value: str, key: str, env: Mapping[str, str], problems: _Problems) -> str:
    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        found = env.get(name)
        if found is not None and (found != "" or default is None):
            return found
        if default is not None:
            return default
        problems.add(key, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return ""

    return _VAR.sub(repl, value)


class _Section:
    """Typed access to one table of the file; records a problem instead of raising."""

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
            if key not in _SECTIONS[name]:
                known = ", ".join(sorted(_SECTIONS[name]))
                problems.add(f"{name}.{key}", f"unknown key (known keys in [{name}]: {known})")

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def has(self, k: str) -> bool:
        return k in self.data

    def raw(self, k: str) -> Any:
        if k in self.data:
            return self.data[k]
        return DEFAULTS.get(self.name, {}).get(k)

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
        return bool(DEFAULTS[self.name][k])

    def duration(self, k: str, minimum: float = 0.0, why: str = "") -> float:
        v = self.raw(k)
        if not isinstance(v, str):
            self.problems.add(self.key(k), f'must be a duration string like "5s", not {_kind(v)}')
            return parse_duration(DEFAULTS[self.name][k])
        text = _interpolate(v, self.key(k), self.env, self.problems)
        try:
            seconds = parse_duration(text)
        except ValueError as e:
            self.problems.add(self.key(k), str(e))
            return parse_duration(DEFAULTS[self.name][k])
        if seconds < minimum:
            self.problems.add(self.key(k), f"{text!r} is shorter than {format_duration(minimum)}{why}")
        return seconds

    def integer(self, k: str, lo: int, hi: int) -> int | None:
        v = self.raw(k)
        if v is None:
            return None
        if isinstance(v, str):
            text = _interpolate(v, self.key(k), self.env, self.problems)
            try:
                v = int(text)
            except ValueError:
                self.problems.add(self.key(k), f"{text!r} is not a whole number")
                return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.problems.add(self.key(k), f"must be a whole number, not {_kind(v)}")
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
        with p.open("rb"):
            pass
    except OSError as e:
        problems.add(key, f"cannot read {p}: {e.strerror or e}")
    return p


def parse_consul_address(text: str) -> tuple[str, str, int]:
    """"http://h:p", "https://h:p", "h:p" or "h" -> (scheme, host, port). ValueError if malformed."""
    t = text.strip()
    if "://" not in t:
        t = "http://" + t
    u = urllib.parse.urlsplit(t)
    if u.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: scheme must be http or https")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ValueError(f"{text!r}: give only scheme, host and port")
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"{text!r}: port is not in 1..65535") from None
    if not u.hostname:
        raise ValueError(f"{text!r}: no host")
    return u.scheme, u.hostname, port or (8501 if u.scheme == "https" else 8500)


def parse_listen(text: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port). ValueError if malformed."""
    u = urllib.parse.urlsplit("//" + text.strip())
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"{text!r}: port is not in 0..65535") from None
    if port is None or not u.hostname:
        raise ValueError(f'{text!r} is not "host:port"')
    return u.hostname, port


def address_toward(host: str, port: int) -> str:
    """This host's IP on the interface that routes to (host, port); no packet is sent.

    Raises OSError when there is no route (or the agent's name does not resolve).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(infos[0][4])
        return str(s.getsockname()[0])


def _url_host(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


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
        if top not in _SECTIONS:
            problems.add(top, f"unknown section or key (known sections: {', '.join(_SECTIONS)})")
    s = {name: _Section(name, doc.get(name), env, problems) for name in _SECTIONS}

    consul = _consul_settings(s["consul"], env, problems)
    service = _service_settings(s["service"], consul, hostname, local_address, problems)
    check = _check_settings(s["check"], service, problems)
    startup = StartupSettings(wait_healthy=s["startup"].boolean("wait_healthy"), timeout=s["startup"].duration("timeout", 0.001))
    shutdown = _shutdown_settings(s["shutdown"], problems)
    app = _app_settings(s["app"], problems)
    status = _status_settings(s["status"], problems)

    if problems.lines:
        raise ConfigError(problems.lines)
    return Config(path, consul, service, check, startup, shutdown, app, status)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration file: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the configuration file is not UTF-8 text"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None


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
    try:
        scheme, host, port = parse_consul_address(addr_text)
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

    if sec.has("tls_verify"):
        tls_verify = sec.boolean("tls_verify")
    elif "CONSUL_HTTP_SSL_VERIFY" in env:
        v = env["CONSUL_HTTP_SSL_VERIFY"].strip().lower()
        if v in ("1", "true", "yes", "on"):
            tls_verify = True
        elif v in ("0", "false", "no", "off"):
            tls_verify = False
        else:
            problems.add("CONSUL_HTTP_SSL_VERIFY (environment)", f"{v!r} is not true or false")
            tls_verify = True
    else:
        tls_verify = True
    timeout = sec.duration("timeout", 0.001)
    return ConsulSettings(scheme, host, port, token, ca_file, cert_file, key_file, tls_verify, timeout)


def _token_source(sec: _Section, env: Mapping[str, str], problems: _Problems) -> TokenSource:
    if sec.has("token") and sec.has("token_file"):
        problems.add(sec.key("token"), "set token or token_file, not both")
    if sec.has("token_file"):
        p = sec.path("token_file")
        src = TokenSource(file=p, origin=sec.key("token_file")) if p else TokenSource()
    elif sec.has("token"):
        src = TokenSource(value=sec.string("token") or None, origin=sec.key("token"))
    elif env.get("CONSUL_HTTP_TOKEN_FILE"):
        p = _readable(Path(env["CONSUL_HTTP_TOKEN_FILE"]), "CONSUL_HTTP_TOKEN_FILE (environment)", problems)
        src = TokenSource(file=p, origin="CONSUL_HTTP_TOKEN_FILE")
    elif env.get("CONSUL_HTTP_TOKEN"):
        src = TokenSource(value=env["CONSUL_HTTP_TOKEN"], origin="CONSUL_HTTP_TOKEN")
    else:
        src = TokenSource()
    if src.file is not None and not problems.lines:
        try:
            if src.read() is None:
                problems.add(src.origin, f"token file {src.file} is empty")
        except (OSError, UnicodeDecodeError) as e:
            problems.add(src.origin, f"cannot read token file {src.file}: {e}")
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
    elif not _SERVICE_NAME.match(name):
        problems.add(sec.key("name"), f"{name!r}: use letters, digits, '-' and '_' (at most 63), so Consul DNS can answer for it")
    if not sec.has("port"):
        problems.add(sec.key("port"), "required: the port the service listens on (1..65535)")
    port = sec.integer("port", 1, 65535) or 0
    address = sec.string("address") or ""
    if not address:
        try:
            address = local_address(consul.host, consul.port)
        except OSError as e:
            problems.add(sec.key("address"), f"not set, and the address toward the Consul agent {consul.host} could not be found "
                         f"({e.strerror or e}): set service.address")
            address = "127.0.0.1"
    if any(c in address for c in "/ ") or "://" in address:
        problems.add(sec.key("address"), f"{address!r}: give an IP address or host name, without scheme or path")
    sid = sec.string("id") or f"{name}-{hostname()}-{port}"
    if not _SERVICE_ID.match(sid):
        problems.add(sec.key("id"), f"{sid!r}: use letters, digits and . _ : @ - (it goes into agent API paths)")

    tags: tuple[str, ...] = ()
    raw_tags = sec.raw("tags")
    if raw_tags is not None:
        if not isinstance(raw_tags, list) or not all(isinstance(t, str) for t in raw_tags):
            problems.add(sec.key("tags"), "must be a list of strings")
        else:
            tags = tuple(_interpolate(t, sec.key("tags"), sec.env, problems) for t in raw_tags)
    meta: dict[str, str] = {}
    raw_meta = sec.raw("meta")
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            problems.add(sec.key("meta"), "must be a table of strings, e.g. meta = { version = \"1.0.0\" }")
        else:
            for k, v in raw_meta.items():
                mk = f"{sec.key('meta')}.{k}"
                if not _META_KEY.match(k) or k.startswith("consul-"):
                    problems.add(mk, "meta keys use letters, digits, '-' and '_' (at most 128) and must not start with 'consul-'")
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
    http = sec.string("http") or f"http://{host}:{service.port}/healthz"
    allow_remote = sec.boolean("allow_remote")
    u = urllib.parse.urlsplit(http)
    if u.scheme not in ("http", "https") or not u.hostname:
        problems.add(sec.key("http"), f"{http!r} is not an http:// or https:// URL")
    elif not allow_remote and not _same_host(u.hostname, service.address):
        problems.add(
            sec.key("http"),
            f"{http!r} points at {u.hostname}, not at the service's address {service.address}; "
            "the agent fetches this URL, so set check.allow_remote = true only if that is intended",
        )
    interval = sec.duration("interval", 1.0, " (Consul raises shorter intervals to 1s)")
    timeout = sec.duration("timeout", 0.001)
    dca = sec.raw("deregister_critical_after")
    if dca in ("", "0"):
        deregister_after = 0.0
    else:
        deregister_after = sec.duration("deregister_critical_after", 60.0, ' (Consul raises shorter values to 1m; "0" turns it off)')
    return CheckSettings(http, interval, timeout, deregister_after, allow_remote)


def parse_signal(text: str) -> signal.Signals:
    name = text.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"{text!r} is not a signal name like SIGTERM, SIGINT or SIGQUIT") from None


def _shutdown_settings(sec: _Section, problems: _Problems) -> ShutdownSettings:
    sig_text = sec.string("app_signal") or "SIGTERM"
    try:
        sig = parse_signal(sig_text)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            problems.add(sec.key("app_signal"), f"{sig.name} cannot be caught, so the app could not drain; use SIGTERM")
    except ValueError as e:
        problems.add(sec.key("app_signal"), str(e))
        sig = signal.SIGTERM
    strategy = sec.string("strategy") or "fixed"
    if strategy not in ("fixed", "traffic"):
        problems.add(sec.key("strategy"), f'{strategy!r}: use "fixed" (wait propagation_delay) or "traffic" (wait until the app\'s port is quiet)')
    propagation_delay = sec.duration("propagation_delay")
    min_delay = sec.duration("min_delay")
    quiet_period = sec.duration("quiet_period", 0.1)
    if strategy == "traffic" and min_delay > propagation_delay:
        problems.add(sec.key("min_delay"), "is longer than shutdown.propagation_delay, the upper bound of the wait")
    dns: list[tuple[str, int]] = []
    raw_dns = sec.raw("dns")
    if raw_dns is not None:
        if not isinstance(raw_dns, list) or not all(isinstance(d, str) for d in raw_dns):
            problems.add(sec.key("dns"), 'must be a list of "host:port" strings, e.g. ["127.0.0.1:8600"]')
        else:
            for d in raw_dns:
                try:
                    host, port = parse_listen(_interpolate(d, sec.key("dns"), sec.env, problems))
                    if port == 0:
                        raise ValueError(f"{d!r}: port 0")
                    ipaddress.ip_address(host)
                    dns.append((host, port))
                except ValueError as e:
                    problems.add(sec.key("dns"), f"{e} (give an IP address and port, e.g. \"127.0.0.1:8600\")")
    dns_name = (sec.string("dns_name") or "").rstrip(".")
    if dns_name and (len(dns_name) > 253 or not all(_DNS_LABEL.match(label) for label in dns_name.split("."))):
        problems.add(sec.key("dns_name"), f"{dns_name!r} is not a DNS name (labels of letters, digits, '-' and '_', "
                     'e.g. "v2.web.service.dc1.consul")')
    return ShutdownSettings(
        deregister_timeout=sec.duration("deregister_timeout", 0.001),
        propagation_delay=propagation_delay,
        app_signal=sig,
        app_timeout=sec.duration("app_timeout", 0.001),
        budget=sec.duration("budget", 0.001),
        strategy=strategy,
        min_delay=min_delay,
        quiet_period=quiet_period,
        dns=tuple(dns),
        dns_name=dns_name,
        traffic_poll_only_accepts_misses=sec.boolean("traffic_poll_only_accepts_misses"),
    )


def _app_settings(sec: _Section, problems: _Problems) -> AppSettings:
    pid_file = sec.path("pid_file", must_read=False)
    pid = sec.integer("pid", 1, 2**22)
    url = sec.string("shutdown_url") or None
    if url is not None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            problems.add(sec.key("shutdown_url"), f"{url!r} is not an http:// or https:// URL")
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
