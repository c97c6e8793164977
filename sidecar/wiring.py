"""The composition root of `consul-sidecar run`: every part built once, from the validated config, and
handed to the lifecycle. Nothing else constructs the real clock, agent, app, prober or status server.

    build_sidecar(config, command, tokens) -> Wired      (inside the running event loop)

The lifecycle (sidecar/lifecycle.py) receives its collaborators and knows the order; this module knows
which concrete part plays each role in this mode (wrapper or alongside, hot restart or not) and what
must be bound before anything starts (the status port, the service port under hot restart), failing
with a `WiringError` (exit 78, one line naming the key) while nothing has started yet.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config
    from .lifecycle import Sidecar
    from .registry.token_cache import TokenCache


class WiringError(Exception):
    """A part that could not be had before anything started (a port that cannot be bound)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass
class Wired:
    sidecar: Sidecar
    _close_prober: Callable[[], Awaitable[None]]
    _kill_descendants: Callable[[], object]

    async def close(self) -> None:
        """After the lifecycle, whatever its end: the prober's session, and every descendant of the app
        (a crash, or a process forked after the lifecycle's last sweep must not outlive the sidecar)."""
        await self._close_prober()
        self._kill_descendants()


def status_listen(config: Config) -> str | None:
    """``status.listen`` as it is bound (IPv6 in brackets); None without a status server."""
    if config.status is None:
        return None
    host = f"[{config.status.host}]" if ":" in config.status.host else config.status.host
    return f"{host}:{config.status.port}"


def build_sidecar(config: Config, command: list[str], tokens: TokenCache) -> Wired:
    """Build the sidecar for ``run``: wrapper mode with ``command``, alongside mode without."""
    if config.registry.kind.value == "consul":
        # First, before the lifecycle's imports, as when the lifecycle imported the Consul client itself:
        # the same modules loaded later leave the heap 1.7 MB larger (measured: 42.2 against 40.4 MB
        # resident after registration, with 90 KB more of Python objects: glibc cannot give back memory
        # freed under later allocations). bench/lifecycle.py's memory figure is this one.
        from .registry import consul as _consul_first  # noqa: F401
    import asyncio

    from . import log
    from .clock import SystemClock
    from .executor import DaemonThreadExecutor
    from .http.server import StatusServer, bind, listen_warnings, raise_nofile_limit
    from .lifecycle import Sidecar
    from .process.alongside import ExternalApp, PidApp, UrlApp
    from .process.app_control import App
    from .process.child import ChildApp
    from .process.health import Prober
    from .process.launcher import PosixLauncher
    from .process.notify import SystemdNotifier
    from .process.reaper import become_subreaper
    from .registry.base import Agent
    from .registry.consul import ConsulAgent
    from .state import Status

    # Blocking calls (host-name look-ups) in daemon threads: a resolver that does not answer must
    # not keep the sidecar alive past its drain (asyncio.run waits for a pool's threads).
    asyncio.get_running_loop().set_default_executor(DaemonThreadExecutor())
    clock = SystemClock()
    logger = log.get_logger()
    sock = None
    if config.status is not None:
        conflicts = listen_warnings(config.status.host, config.status.port, config.consul.address)
        try:
            sock = bind(config.status.host, config.status.port)
        except OSError as e:
            why = f" ({conflicts[0]})" if conflicts else ""
            raise WiringError(
                f"{config.source}: status.listen: cannot listen on {status_listen(config)}: {e.strerror or e}{why}"
            ) from None
        for warning in conflicts:
            logger.warning("sidecar.status.listen_warning", warning=warning)

    listener = None
    app_notify = None
    if command and config.hot_restart.enabled:
        from .process.listener import bind_listener
        from .process.notify import AppNotifySocket

        svc = config.service
        try:
            # Before the app starts: a port that cannot be had fails with nothing started.
            listener = bind_listener(svc.address, svc.port)
            app_notify = AppNotifySocket(logger)
        except OSError as e:
            if sock is not None:
                sock.close()
            raise WiringError(
                f"{config.source}: hot_restart.enabled: the sidecar cannot listen on service.address:service.port "
                f"{svc.address}:{svc.port}: {e.strerror or e}"
            ) from None
    app: App
    child: ChildApp | None = None
    if command:
        # The app inherits our environment, except what fed the ACL token (CONSUL_HTTP_TOKEN,
        # CONSUL_HTTP_TOKEN_FILE, every ${VAR} in consul.token): it is the sidecar's secret. Nor
        # systemd's NOTIFY_SOCKET (the sidecar is the unit's main process) or socket-activation
        # variables meant for the sidecar.
        mine = {"NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
        app_env = {k: v for k, v in os.environ.items() if k not in config.secret_env and k not in mine}
        child = ChildApp(
            command,
            PosixLauncher(),
            clock,
            app_env,
            follow_port=config.service.port,
            log=logger.bind(service_id=config.service.id),
            listener=listener,
            fd_name=config.service.name,
        )
        app = child
        # Orphans of the app become our children (PID 1 gets them anyway), so
        # the reaper in ChildApp collects them and no zombie piles up.
        become_subreaper()
    elif config.app.pid is not None or config.app.pid_file is not None:
        app = PidApp(
            config.app.pid,
            config.app.pid_file,
            clock,
            config.service.address,
            config.service.port,
            logger.bind(service_id=config.service.id),
        )
    elif config.app.shutdown_url is not None:
        app = UrlApp(config.app.shutdown_url, config.check.http, clock)
    else:
        app = ExternalApp()

    def own_io() -> None:
        # Only once the app is spawned: the launcher's preexec_fn must run in a process with one
        # thread, and the app keeps the platform's descriptor limit (select()-based code relies on 1024).
        before, after = raise_nofile_limit()
        log.start()
        logger.debug("sidecar.limits.nofile", soft_before=before, soft=after)

    status = Status(clock, config.service.id)
    prober = Prober(config.check.http, config.check.timeout)
    server = None
    agent: Agent
    consul_agent: ConsulAgent | None = None
    if config.registry.kind.value == "etcd":
        from .registry.base import RegistryRejected
        from .registry.etcd import EtcdRegistry

        etcd = config.etcd
        try:
            agent = etcd_agent = EtcdRegistry(config, clock, prober, logger.bind(service_id=config.service.id))
        except RegistryRejected as e:  # a TLS file that is no certificate or key
            raise WiringError(f"{config.source}: {e}") from None
        if sock is not None:
            from .http import etcd_view
            from .http.readiness import READ_TIMEOUT

            ready = etcd_view.readiness(status, etcd_agent, timeout=min(READ_TIMEOUT, etcd.timeout))
            server = StatusServer(status, sock, logger, readiness=ready, secrets=tokens.secrets, etcd=etcd_agent)
    else:
        agent = consul_agent = ConsulAgent(config.consul, clock, tokens=tokens)
    if sock is not None and consul_agent is not None:
        from .http.readiness import READ_TIMEOUT, Readiness

        readiness = Readiness(status, consul_agent.service_health, timeout=min(READ_TIMEOUT, config.consul.timeout))
        server = StatusServer(
            status,
            sock,
            logger,
            readiness=readiness,
            request_errors=consul_agent.request_errors,
            secrets=tokens.secrets,
        )
    sidecar = Sidecar(
        config,
        agent=agent,
        app=app,
        prober=prober,
        clock=clock,
        status=status,
        log=logger,
        status_server=server,
        after_start=own_io,
        systemd=SystemdNotifier(config.systemd_notify_socket, logger),
        app_notify=app_notify,
    )
    return Wired(sidecar, prober.close, child.kill_descendants if child is not None else lambda: None)
