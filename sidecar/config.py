"""The configuration file: parsed and validated once, at the edge, into frozen objects.

This is the only module that reads the environment (``${VAR}`` interpolation and
Consul's own ``CONSUL_*`` variables). Everything downstream gets a ``Config``.
Every problem found is reported as one line naming the file and the key, all
at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import re
import signal
import socket
import stat
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .durations import format_duration, parse_duration

# How long the sidecar waits for the app to be reaped after SIGKILL. Not
# configurable: SIGKILL cannot be refused, so this only bounds the kernel's work.
KILL_REAP_TIMEOUT = 1.0


class ConfigError(Exception):
    """One or more problems in the configuration; each line names the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class TokenError(Exception):
    """The token source cannot give a usable token. The message names the file, never the value."""


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
        """The token, or None if none is configured. Raises TokenError, whose message never holds the token."""
        if self.file is not None:
            # Capped, regular files only: a token file swapped for a FIFO or /dev/zero must not hang
            # or exhaust the sidecar on its next request.
            try:
                data, _ = _read_capped(self.file, TOKEN_MAX_BYTES)
                token = data.decode("utf-8").strip() or None
            except _FileProblem as e:
                raise TokenError(f"cannot use the ACL token file: {e}") from None
            except UnicodeDecodeError:
                raise TokenError(f"cannot use the ACL token file {self.file}: not UTF-8") from None
            where = f"the ACL token file {self.file}"
        else:
            token, where = self.value or None, f"the ACL token from {self.origin}"
        # A token goes into an HTTP header: a line break or control character inside it
        # (two tokens pasted into one file) would make every request fail, so it is refused here.
        if token is not None and not _token_chars_ok(token):
            raise TokenError(f"{where} holds a line break, space, control or non-ASCII character inside the token "
                             "(only leading and trailing whitespace is ignored): it must hold exactly one token")
        return token

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
    # Environment variables that fed a secret (the token, ${VAR}s in consul.token,
    # CONSUL_HTTP_TOKEN_FILE): wrapper mode keeps them out of the app's environment.
    secret_env: frozenset[str] = frozenset()
    # "key: text" lines worth a warning at start and in check-config (not errors).
    warnings: tuple[str, ...] = ()


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
        "status": {"listen": "127.0.0.1:0"},  # any free port: a fixed default collides (see status.py)
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

# \Z, not $: "$" also matches before a trailing newline, which a ${VAR} read from a file often has.
_SERVICE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")
_SERVICE_ID = re.compile(r"\A[A-Za-z0-9._:@-]{1,256}\Z")
_ID_PART = re.compile(r"\A[A-Za-z0-9._:-]{1,64}\Z")
_DNS_LABEL = re.compile(r"\A[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_META_KEY = re.compile(r"\A[A-Za-z0-9_-]{1,128}\Z")
_HOST_NAME = re.compile(r"\A(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?\Z")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Size caps for the files the loader reads: /dev/zero or a huge file must be a
# clear error, not a MemoryError.
CONFIG_MAX_BYTES = 1 << 20
TOKEN_MAX_BYTES = 64 << 10


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


class _FileProblem(Exception):
    """Why a file the configuration names cannot be used (a one-line reason)."""


def _open_regular(p: Path) -> tuple[int, os.stat_result]:
    """An fd for a regular file, opened without blocking: a FIFO with no writer must not hang the loader."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise _FileProblem(f"cannot read {p}: {e.strerror or e}") from None
    except ValueError as e:  # an embedded NUL in the path
        raise _FileProblem(f"cannot read {p!r}: {e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise _FileProblem(f"cannot read {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _FileProblem(f"{p} is {_file_kind(st.st_mode)}, not a regular file")
    return fd, st


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def _read_capped(p: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """The contents of a small regular file (at most ``limit`` bytes) and its status; _FileProblem otherwise."""
    fd, st = _open_regular(p)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            try:
                chunk = os.read(fd, limit + 1 - size)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                raise _FileProblem(f"cannot read {p}: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise _FileProblem(f"{p} is larger than {limit} bytes")
    return b"".join(chunks), st


def _readable(p: Path, key: str, problems: _Problems) -> Path:
    try:
        fd, _ = _open_regular(p)
        os.close(fd)
    except _FileProblem as e:
        problems.add(key, str(e))
    return p


def parse_consul_address(text: str) -> tuple[str, str, int]:
    """"http://h:p", "https://h:p", "h:p" or "h" -> (scheme, host, port). ValueError if malformed."""
    t = text.strip()
    if "://" not in t:
        t = "http://" + t
    try:
        u = urllib.parse.urlsplit(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a URL like \"http://127.0.0.1:8500\"") from None
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
    try:
        u = urllib.parse.urlsplit("//" + text.strip())
    except ValueError:
        raise ValueError(f'{text!r} is not "host:port"') from None
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


def same_host(a: str, b: str) -> bool:
    """Whether two addresses name the same host (IPs compared as addresses: ::1 == 0:0::1)."""
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
    return Config(path, consul, service, check, startup, shutdown, app, status,
                  secret_env=frozenset(problems.secret_env), warnings=tuple(problems.warnings))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data, _ = _read_capped(path, CONFIG_MAX_BYTES)
        text = data.decode("utf-8")
    except _FileProblem as e:
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
            problems.secret_env.update(m.group(1) for m in _VAR.finditer(raw) if m.group(1))
        value = sec.string("token") or None
        if value is not None and not _token_chars_ok(value):
            problems.add(sec.key("token"), "the token contains a line break, control character, space or non-ASCII character "
                         "(a line break from ${VAR}?); it goes into an HTTP header")
        return TokenSource(value=value, origin=sec.key("token"))
    elif env.get("CONSUL_HTTP_TOKEN_FILE"):
        src = TokenSource(file=Path(env["CONSUL_HTTP_TOKEN_FILE"]), origin="CONSUL_HTTP_TOKEN_FILE")
        key = "CONSUL_HTTP_TOKEN_FILE (environment)"
    elif env.get("CONSUL_HTTP_TOKEN"):
        if not _token_chars_ok(env["CONSUL_HTTP_TOKEN"]):
            problems.add("CONSUL_HTTP_TOKEN (environment)", "the token contains a line break, control character, space or "
                         "non-ASCII character (a trailing line break?); it goes into an HTTP header")
        return TokenSource(value=env["CONSUL_HTTP_TOKEN"], origin="CONSUL_HTTP_TOKEN")
    else:
        return TokenSource()
    assert src.file is not None
    if _token_file_ok(src.file, key, problems):
        try:  # what every request will do: it must not fail later where a config error belongs now
            if src.read() is None:
                problems.add(key, f"token file {src.file} is empty")
        except TokenError as e:
            problems.add(key, str(e))
    return src


def _token_chars_ok(token: str) -> bool:
    return all("!" <= c <= "~" for c in token)


def _token_file_ok(path: Path, key: str, problems: _Problems) -> bool:
    """Check a token file as the loader sees it; never put its content in a message."""
    try:
        data, st = _read_capped(path, TOKEN_MAX_BYTES)
    except _FileProblem as e:
        problems.add(key, f"token file: {e}")
        return False
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.warn(key, f"token file {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}): whoever "
                      "can write it chooses the sidecar's ACL token; chmod 600 it")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        problems.add(key, f"token file {path} is not UTF-8 text")
        return False
    if not token:
        problems.add(key, f"token file {path} is empty")
        return False
    if not _token_chars_ok(token):
        problems.add(key, f"token file {path}: the token contains a line break, control character, space or non-ASCII character "
                     "(two lines in the file?); it goes into an HTTP header")
        return False
    return True


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
    if not _valid_address(address):
        problems.add(sec.key("address"), f"{address!r}: give an IP address or host name, without scheme, port or path")
    given_id = sec.string("id")
    sid = given_id or default_service_id(name, hostname(), address, port)
    if not given_id and not _SERVICE_NAME.match(name):
        pass  # the default ID is built from the name, whose problem is reported already
    elif not _SERVICE_ID.match(sid):
        problems.add(sec.key("id"), f"{sid!r}: use letters, digits and . _ : @ - (at most 256; it goes into agent API paths)")
    elif sid in (".", ".."):
        problems.add(sec.key("id"), f"{sid!r} is a dot segment: URL libraries rewrite it, so the agent would never see this ID")

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


def _valid_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(address))


def default_service_id(name: str, hostname: str, address: str, port: int) -> str:
    """``<name>-<hostname>-<address>-<port>``: two sidecars on one host that differ only in
    their address (one loopback alias or interface each) must not share an ID.

    A part that is long or holds characters an ID may not (an IPv6 zone's ``%``) is
    shortened and given a digest of the original, so the ID stays valid and unique.
    """

    def part(text: str) -> str:
        if _ID_PART.match(text):
            return text
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9._:-]", "_", text)[:40] + "-" + digest

    return f"{name}-{part(hostname)}-{part(address)}-{port}"


def _url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable http(s) URL, or None."""
    if any(c.isspace() or _CONTROL.match(c) for c in url):
        return f"{url!r} contains whitespace or a control character"
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError as e:
        return f"{url!r} is not a valid URL ({e})"
    if u.scheme not in ("http", "https") or not u.hostname:
        return f"{url!r} is not an http:// or https:// URL"
    return None


def _check_settings(sec: _Section, service: ServiceSettings, problems: _Problems) -> CheckSettings:
    host = f"[{service.address}]" if ":" in service.address else service.address
    given = sec.string("http")
    http = given or f"http://{host}:{service.port}/healthz"
    allow_remote = sec.boolean("allow_remote")
    bad_url = _url_problem(http)
    if bad_url is not None:
        if given:  # a default built from a bad service.address: that key is already reported
            problems.add(sec.key("http"), bad_url)
    elif not allow_remote and not same_host(urllib.parse.urlsplit(http).hostname or "", service.address):
        problems.add(
            sec.key("http"),
            f"{http!r} points at {urllib.parse.urlsplit(http).hostname}, not at the service's address {service.address}; "
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
        bad_url = _url_problem(url)
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
