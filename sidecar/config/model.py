"""The validated configuration: frozen settings, one class per section, defaults from the key table."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..durations import format_duration
from .keys import EtcdFormat, ReadyMode, RegistryKind, Strategy, default
from .tokens import TokenSource

# How long the sidecar waits for the app to be reaped after SIGKILL. Not
# configurable: SIGKILL cannot be refused, so this only bounds the kernel's work.
KILL_REAP_TIMEOUT = 1.0


class ConfigError(Exception):
    """One or more problems in the configuration; each line names the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ConsulSettings:
    scheme: str  # "http", "https", or "unix" (plain HTTP over the socket at ``host``)
    host: str
    port: int  # 0 for "unix"
    token: TokenSource
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    tls_verify: bool = default("consul.tls_verify")
    timeout: float = default("consul.timeout")
    ca_path: Path | None = None  # used only without ca_file, as the consul CLI does
    tls_server_name: str | None = None  # SNI and the name the certificate must carry; None: host

    @property
    def address(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What request URLs start with: over a unix socket the host part is only the Host header."""
        return "http://localhost" if self.scheme == "unix" else self.address

    @property
    def unix_socket(self) -> str | None:
        return self.host if self.scheme == "unix" else None


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
    interval: float = default("check.interval")
    timeout: float = default("check.timeout")
    deregister_critical_after: float = default("check.deregister_critical_after")  # 0: never
    allow_remote: bool = default("check.allow_remote")
    failures_before_critical: int = default("check.failures_before_critical")


@dataclass(frozen=True)
class RegistrySettings:
    kind: RegistryKind = default("registry.kind")


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = ()
    prefix: str = default("etcd.prefix")
    format: EtcdFormat = default("etcd.format")
    dns_domain: str = default("etcd.dns_domain")
    lease_ttl: float = default("etcd.lease_ttl")
    timeout: float = default("etcd.timeout")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class StartupSettings:
    wait_healthy: bool = default("startup.wait_healthy")
    timeout: float = default("startup.timeout")


@dataclass(frozen=True)
class ShutdownSettings:
    deregister_timeout: float = default("shutdown.deregister_timeout")
    # The wait's length, or with ``learned`` its upper bound (learned_max): the worst case counts it.
    propagation_delay: float = default("shutdown.propagation_delay")[0]
    learned: bool = False  # propagation_delay = "learned": the fleet's record of horizons sets the delay
    learned_min: float = default("shutdown.learned_min")
    learned_max: float = default("shutdown.learned_max")
    learned_margin: float | None = None  # None: record.margin's rule, as consul-sidecar horizon recommends
    app_signal: signal.Signals = default("shutdown.app_signal")
    app_timeout: float = default("shutdown.app_timeout")
    budget: float = default("shutdown.budget")  # the platform's stop timeout we must fit in (Kubernetes' default: 30 s)
    strategy: Strategy = default("shutdown.strategy")
    min_delay: float = default(
        "shutdown.min_delay"
    )  # traffic: never signal the app sooner than this after confirmation
    quiet_period: float = default(
        "shutdown.quiet_period"
    )  # traffic: no new connection and no inbound byte for this long
    dns: tuple[tuple[str, int], ...] = default(
        "shutdown.dns"
    )  # traffic: resolvers that must stop returning our address
    dns_name: str = default(
        "shutdown.dns_name"
    )  # traffic: the name consumers look up ("" = <service.name>.service.consul)
    # traffic: when the poll of the socket table is the only view left (it misses short connections),
    # end the drain on it anyway instead of waiting propagation_delay.
    traffic_poll_only_accepts_misses: bool = default("shutdown.traffic_poll_only_accepts_misses")

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
            (self.propagation_delay, "shutdown.learned_max" if self.learned else "shutdown.propagation_delay"),
            (self.deregister_timeout, "shutdown.deregister_timeout"),
        )[1]
        return (
            f"worst-case shutdown {format_duration(self.worst_case)} exceeds shutdown.budget "
            f"{format_duration(self.budget)}: the platform would SIGKILL the sidecar mid-drain. Lower {biggest} "
            "(or the other shutdown durations), or raise the platform's stop timeout and shutdown.budget with it"
        )


@dataclass(frozen=True)
class AppSettings:
    pid_file: Path | None = None
    pid: int | None = None
    shutdown_url: str | None = None

    @property
    def configured(self) -> bool:
        return self.pid_file is not None or self.pid is not None or self.shutdown_url is not None


_LISTEN: tuple[str, int] = default("status.listen")


@dataclass(frozen=True)
class StatusSettings:
    host: str = _LISTEN[0]
    port: int = _LISTEN[1]

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class HotRestartSettings:
    enabled: bool = default("hot_restart.enabled")
    signal: signal.Signals = default("hot_restart.signal")
    ready: ReadyMode = default("hot_restart.ready")
    warmup: float = default("hot_restart.warmup")
    timeout: float = default("hot_restart.timeout")

    def worst_case(self, shutdown: ShutdownSettings) -> float:
        """Longest time from the signal to one generation left: the new one's ``timeout``, then the old
        one's ``app_timeout`` and the reap after SIGKILL (a failed new one is stopped the same way)."""
        return self.timeout + shutdown.app_timeout + KILL_REAP_TIMEOUT


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
    hot_restart: HotRestartSettings = HotRestartSettings()
    registry: RegistrySettings = RegistrySettings()
    etcd: EtcdSettings = EtcdSettings()
    # systemd's NOTIFY_SOCKET when the sidecar itself runs under Type=notify (never passed to the app)
    systemd_notify_socket: str | None = None
    # Environment variables that fed a secret (the token, ${VAR}s in consul.token,
    # CONSUL_HTTP_TOKEN_FILE): wrapper mode keeps them out of the app's environment.
    secret_env: frozenset[str] = frozenset()
    # "key: text" lines worth a warning at start and in check-config (not errors).
    warnings: tuple[str, ...] = ()

    @property
    def registry_timeout(self) -> float:
        """The deadline of one request to the registry in use: consul.timeout, or etcd.timeout."""
        return self.etcd.timeout if self.registry.kind is RegistryKind.ETCD else self.consul.timeout

    @property
    def dns_query_name(self) -> str:
        """The name the traffic strategy's DNS step asks the resolvers in ``shutdown.dns`` about: dns_name, else
        Consul's ``<service.name>.service.consul``, or with etcd the name CoreDNS serves the key under
        (``<service.name>.<etcd.dns_domain>``, skydns) or, without a domain (grpc), ``<service.name>``."""
        if self.shutdown.dns_name:
            return self.shutdown.dns_name
        if self.registry.kind is RegistryKind.ETCD:
            domain = self.etcd.dns_domain.rstrip(".")
            return f"{self.service.name}.{domain}" if domain else self.service.name
        return f"{self.service.name}.service.consul"
