"""The order of operations. This module alone knows it.

    start:     start the app -> wait until its check URL answers 2xx -> register (check passing)
    running:   keep the registration (re-register if the agent forgot it); follow the app
    SIGTERM:   stop re-registering -> deregister and confirm -> wait propagation_delay
               -> signal the app -> wait app_timeout -> SIGKILL -> exit with the app's status
    app exits: deregister and confirm -> exit with the app's status

Every step has a deadline and logs one event with its elapsed time.
Signals arrive through a queue (handlers only record); ``_on_signal`` decides
what each one means at the current step:

    SIGTERM / SIGINT   first one: start the drain. Later SIGTERMs change nothing.
    second SIGINT      (an impatient Ctrl-C) ends the propagation delay now.
    third SIGINT       SIGKILLs the app now.
    SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH   forwarded to the app.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .app_control import App, StopResult
from .backoff import backoff
from .clock import Clock
from .config import Config
from .drain_wait import DrainWait
from .consul_client import Agent, ConsulError, ConsulPermissionDenied, ConsulRejected, ConsulUnavailable, Deregistration
from .port_owner import verify_app_port
from .registration import registration_payload
from .signals import FORWARDED, SHUTDOWN, SignalInbox
from .status import State, Status

T = TypeVar("T")

EX_UNAVAILABLE = 69  # the app never became healthy
EX_SOFTWARE = 70  # a bug in the sidecar
EX_NOPERM = 77  # Consul's ACLs refused the registration
EX_CONFIG = 78  # the agent rejected the registration as malformed


class Startable(Protocol):
    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Probe(Protocol):
    async def probe(self) -> tuple[bool, str]: ...


@dataclass(frozen=True)
class _Interrupted:
    reason: str  # "app_exited" or "shutdown"


class Sidecar:
    def __init__(
        self,
        config: Config,
        agent: Agent,
        app: App,
        start_app: Callable[[], object],
        prober: Probe,
        clock: Clock,
        status: Status,
        log: Any,
        status_server: Startable | None = None,
        inbox: SignalInbox | None = None,
        drain_wait: DrainWait | None = None,
    ) -> None:
        self.config = config
        self.agent = agent
        self.app = app
        self._start_app = start_app
        self.prober = prober
        self.clock = clock
        self.status = status
        self.log = log.bind(service_id=config.service.id)
        self.status_server = status_server
        self.inbox = inbox or SignalInbox()
        self.drain_wait = drain_wait or DrainWait(config, agent, clock, self.log, status)
        self._shutdown = asyncio.Event()
        self._skip_delay = asyncio.Event()
        self._sigints = 0
        self._registration_attempted = False
        self._consul_ok: bool | None = None

    # --- the whole life ---------------------------------------------------------

    async def run(self) -> int:
        """Run until the app is gone; return the exit status to pass on."""
        t0 = self.clock.monotonic()
        over = self.config.shutdown.over_budget()
        if over:
            self.log.warning("sidecar.config.over_budget", warning=over)
        self.inbox.install()  # before the app exists: no signal may find us unprepared
        dispatcher = asyncio.create_task(self._dispatch_signals())
        try:
            try:
                self._start_app()
            except OSError as e:
                self.log.error("sidecar.app.start_failed", error=f"{e.__class__.__name__}: {e}")
                return 127 if isinstance(e, FileNotFoundError) else 126
            self.status.app = {"description": self.app.description}
            self.log.info("sidecar.app.started", app=self.app.description, elapsed_ms=self._ms(t0))
            if self.status_server is not None:
                await self.status_server.start()
                self.log.info("sidecar.status.listening", address=self.status_server.address)
            try:
                return await self._live()
            except Exception:
                # A bug: the caller kills the app. Take the instance out of Consul first.
                if self._registration_attempted:
                    await self._deregister()
                raise
        finally:
            dispatcher.cancel()
            self.drain_wait.close()
            self.status.enter(State.STOPPED)
            if self.status_server is not None:
                await self.status_server.stop()
            await self.agent.close()
            self.inbox.uninstall()

    async def _live(self) -> int:
        started = await self._race(self._startup())
        if isinstance(started, _Interrupted):
            return await self._end(started.reason)
        if started != 0:
            return await self._abort_startup(started)
        keeper = asyncio.create_task(self._keep_registration())
        try:
            ended = await self._race(asyncio.Event().wait())  # until the app exits or a signal
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        assert isinstance(ended, _Interrupted)
        return await self._end(ended.reason)

    async def _end(self, reason: str) -> int:
        if reason == "app_exited":
            return await self._after_app_exit()
        return await self._drain()

    # --- start --------------------------------------------------------------------

    async def _startup(self) -> int:
        """Wait for the app to be healthy, then register. 0, or an exit status to abort with."""
        cfg = self.config
        if cfg.startup.wait_healthy:
            t = self.clock.monotonic()
            healthy, detail = await self._wait_healthy(t + cfg.startup.timeout)
            if not healthy:
                self.log.error(
                    "sidecar.startup.unhealthy",
                    url=cfg.check.http,
                    last_answer=detail,
                    timeout_s=cfg.startup.timeout,
                    elapsed_ms=self._ms(t),
                )
                self.status.last_error = f"app not healthy within {cfg.startup.timeout:g}s: {detail}"
                return EX_UNAVAILABLE
            self.status.last_error = None
            self.log.info("sidecar.startup.healthy", url=cfg.check.http, elapsed_ms=self._ms(t))
        refused = verify_app_port(cfg.service.address, cfg.service.port, self.app, self.log)
        if refused is not None:  # someone else answers on the app's port: register nothing
            self.status.last_error = refused
            return EX_UNAVAILABLE
        return await self._register_until_done()

    async def _wait_healthy(self, deadline: float) -> tuple[bool, str]:
        t = self.clock.monotonic()
        detail, said = "no probe yet", t
        while True:
            healthy, detail = await self.prober.probe()
            if healthy:
                return True, detail
            self.status.last_error = f"health check: {detail}"
            now = self.clock.monotonic()
            if now >= deadline:
                return False, detail
            if now - said >= 5.0:  # progress for a slow or misconfigured app, not one line per probe
                said = now
                self.log.info("sidecar.startup.waiting", url=self.config.check.http, last_answer=detail,
                              elapsed_ms=self._ms(t), gives_up_in_s=round(deadline - now, 1))
            await self.clock.sleep(min(0.1, max(0.0, deadline - self.clock.monotonic())))

    async def _register_until_done(self) -> int:
        """Register, retrying with backoff (1 s to 30 s, jittered) while the agent is unreachable."""
        t = self.clock.monotonic()
        delays = backoff(1.0, 30.0)
        attempts = 0
        stale_checked = False
        while True:
            attempts += 1
            try:
                if not stale_checked:
                    await self._drop_stale_registration()
                    stale_checked = True
                await self._register()
                self._consul_state(True, None)
                self.status.enter(State.REGISTERED)
                self.log.info("sidecar.consul.registered", attempts=attempts, elapsed_ms=self._ms(t))
                await self._check_catalog_visibility()
                self.drain_wait.prepare()
                return 0
            except ConsulPermissionDenied as e:
                self.status.last_error = str(e)
                self.log.error("sidecar.consul.permission_denied", error=str(e), hint=self._acl_hint())
                return EX_NOPERM
            except ConsulRejected as e:
                self.status.last_error = str(e)
                self.log.error("sidecar.consul.registration_rejected", error=str(e))
                return EX_CONFIG
            except ConsulError as e:
                self._consul_state(False, str(e), retrying=True)
            await self.clock.sleep(next(delays))

    async def _drop_stale_registration(self) -> None:
        """A registration with our ID left by a sidecar that died (SIGKILL, OOM) is removed first.

        Registering over it would keep its check's status (Consul keeps the status of an
        unchanged check), which is critical once the old app has gone, so the new instance
        would wait a check interval for traffic. Its address is ours, so the gap is harmless.
        """
        svc = self.config.service
        if await self.agent.registered(svc.id) is None:
            return
        t = self.clock.monotonic()
        result = await self.agent.deregister_confirmed(svc.name, svc.id, t + self.config.shutdown.deregister_timeout)
        self.log.warning("sidecar.consul.stale_registration_replaced", deregistration=result.outcome.value, elapsed_ms=self._ms(t))

    async def _check_catalog_visibility(self) -> None:
        svc = self.config.service
        try:
            visible = await self.agent.check_catalog_visibility(svc.name, svc.id)
        except ConsulError as e:
            self.log.warning("sidecar.consul.catalog_unreadable", error=str(e))
            return
        if not visible:
            self.log.warning(
                "sidecar.consul.catalog_unreadable",
                hint=f"the token cannot read {svc.name!r} in the catalog (it needs service:read and node:read, e.g. "
                'node_prefix "" { policy = "read" }): deregistrations are confirmed by the agent alone, and one '
                "blocked by ACLs cannot be detected",
            )

    async def _register(self) -> None:
        # Passing at once only if the app answers right now, as the agent will see it.
        healthy, _ = await self.prober.probe()
        try:
            await self.agent.register(registration_payload(self.config, passing=healthy))
        except ConsulUnavailable as e:
            # A timeout may still be applied later; a refused connection cannot have been.
            self._registration_attempted |= e.maybe_applied
            raise
        self._registration_attempted = True

    async def _abort_startup(self, code: int) -> int:
        """Startup failed: nothing stays registered, the app is stopped, exit non-zero."""
        if self._registration_attempted:
            await self._deregister()
        result = await self._stop_app()
        self.log.info("sidecar.stopped", exit_status=code, app_status=result.status)
        return code

    # --- running ------------------------------------------------------------------

    async def _keep_registration(self) -> None:
        """Every check interval, ask the agent whether it still holds us; re-register if not.

        An agent restarted without its data directory forgets every service;
        this brings the registration back within one interval of its return.
        """
        interval = self.config.check.interval
        sid = self.config.service.id
        while True:
            await self.clock.sleep(interval)
            t = self.clock.monotonic()
            try:
                if await self.agent.registered(sid) is None:
                    await self._register()
                    self.log.warning("sidecar.consul.reregistered", reason="the agent no longer held the service", elapsed_ms=self._ms(t))
                elif self.agent.token_rotated():
                    # The agent keeps the registering token for its catalog syncs (and
                    # for a later deregistration): hand it the new one before the old
                    # one is deleted.
                    await self._register()
                    self.log.info("sidecar.consul.reregistered", reason="the ACL token changed", elapsed_ms=self._ms(t))
                self._consul_state(True, None)
            except ConsulPermissionDenied as e:
                self._consul_state(False, str(e), level="error")
            except ConsulError as e:
                self._consul_state(False, str(e))

    # --- stop ---------------------------------------------------------------------

    async def _drain(self) -> int:
        """SIGTERM/SIGINT: deregister, confirm, wait, then stop the app."""
        cfg = self.config.shutdown
        t0 = self.clock.monotonic()
        self.status.enter(State.DRAINING)
        self.log.info("sidecar.drain.started", propagation_delay_s=cfg.propagation_delay, app_timeout_s=cfg.app_timeout)
        if not self._registration_attempted:
            # Nothing ever reached the agent: nothing to take out, nobody to wait for.
            self.log.info("sidecar.drain.nothing_registered")
            result = await self._stop_app()
            self.log.info("sidecar.stopped", exit_status=result.status, elapsed_ms=self._ms(t0))
            return result.status
        outcome = await self._deregister()
        # Unconfirmed (agent frozen or down): keep trying in the background for
        # as long as the drain lasts; a frozen agent that resumes is cleaned up.
        late = None
        if outcome is Deregistration.UNCONFIRMED:
            late = asyncio.create_task(self._deregister(deadline=t0 + cfg.worst_case, late=True))

        if self.app.exited.done():
            pass  # nothing left to protect
        else:
            confirmed_at = self.clock.monotonic()
            _, ended = await self._first(self.drain_wait.wait(confirmed_at), self._skip_delay.wait())
            self.log.info(
                "sidecar.drain.delay_done",
                strategy=cfg.strategy,
                reason=ended if ended is not None else ("second SIGINT" if self._skip_delay.is_set() else "the app exited"),
                bound_s=cfg.propagation_delay,
                deregistration=outcome.value,
                cpu_ms=self.drain_wait.cpu_ms,
                elapsed_ms=self._ms(confirmed_at),
            )
        result = await self._stop_app()
        if late is not None:
            if late.done():
                late.result()
            else:
                late.cancel()
                await asyncio.gather(late, return_exceptions=True)
                self.log.error(
                    "sidecar.consul.left_registered",
                    hint="the agent never confirmed the deregistration; Consul removes the instance once its check "
                    "has been critical for check.deregister_critical_after",
                )
        self.log.info("sidecar.stopped", exit_status=result.status, elapsed_ms=self._ms(t0))
        return result.status

    async def _after_app_exit(self) -> int:
        """The app ended on its own: take it out of discovery at once, pass its status on."""
        status = self.app.exited.result()
        level = "error" if status == 128 + signal.SIGKILL else ("info" if status == 0 else "warning")
        hint = "killed by SIGKILL: out of memory?" if status == 128 + signal.SIGKILL else None
        getattr(self.log, level)("sidecar.app.exited", exit_status=status, hint=hint)
        t = self.clock.monotonic()
        self.status.enter(State.DRAINING)
        if self._registration_attempted:
            await self._deregister()
        await self.app.stop(self.config.shutdown.app_signal, self.config.shutdown.app_timeout)  # what it left behind
        self.log.info("sidecar.stopped", exit_status=status, elapsed_ms=self._ms(t))
        return status

    async def _deregister(self, deadline: float | None = None, late: bool = False) -> Deregistration:
        cfg = self.config
        t = self.clock.monotonic()
        if deadline is None:
            deadline = t + cfg.shutdown.deregister_timeout
        result = await self.agent.deregister_confirmed(cfg.service.name, cfg.service.id, deadline)
        if result.outcome is Deregistration.CONFIRMED:
            self.log.info("sidecar.consul.deregistered", attempts=result.attempts, late=late or None, elapsed_ms=self._ms(t))
        elif late:
            pass  # the caller reports what is left
        elif result.outcome is Deregistration.BLOCKED:
            self.status.last_error = result.error
            self.log.error("sidecar.consul.deregister_blocked", error=result.error, attempts=result.attempts, elapsed_ms=self._ms(t), hint=self._acl_hint())
        else:
            self.status.last_error = result.error
            self.log.error(
                "sidecar.consul.deregister_unconfirmed",
                error=result.error,
                attempts=result.attempts,
                elapsed_ms=self._ms(t),
                hint="the instance may still receive traffic; the app is stopped anyway after the delay",
            )
        return result.outcome

    async def _stop_app(self) -> StopResult:
        cfg = self.config.shutdown
        self.status.enter(State.STOPPING)
        t = self.clock.monotonic()
        result = await self.app.stop(cfg.app_signal, cfg.app_timeout)
        extra = {"orphans_reaped": getattr(self.app, "orphans_reaped", None) or None}
        if result.killed:
            self.log.error("sidecar.app.killed", app=self.app.description, how=result.how, exit_status=result.status, elapsed_ms=self._ms(t), **extra)
        else:
            self.log.info("sidecar.app.stopped", app=self.app.description, how=result.how, exit_status=result.status, elapsed_ms=self._ms(t), **extra)
        return result

    # --- signals ------------------------------------------------------------------

    async def _dispatch_signals(self) -> None:
        while True:
            self._on_signal(await self.inbox.queue.get())

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig in FORWARDED:
            self.app.forward(sig)
            self.log.debug("sidecar.signal.forwarded", signal=sig.name)
            return
        assert sig in SHUTDOWN
        if sig == signal.SIGINT:
            self._sigints += 1
        if not self._shutdown.is_set():
            self._shutdown.set()
            self.log.info("sidecar.signal.received", signal=sig.name, action="drain")
        elif sig == signal.SIGINT and self._sigints == 2:
            self._skip_delay.set()
            self.log.warning("sidecar.signal.received", signal=sig.name, action="end the propagation delay now")
        elif sig == signal.SIGINT and self._sigints >= 3:
            self.app.kill()
            self.log.warning("sidecar.signal.received", signal=sig.name, action="SIGKILL the app now")
        else:
            self.log.debug("sidecar.signal.received", signal=sig.name, action="none: already draining")

    # --- helpers ------------------------------------------------------------------

    async def _race(self, work: Awaitable[T]) -> T | _Interrupted:
        """Run ``work`` until it finishes, the app exits or a shutdown signal comes."""
        finished, result = await self._first(work, self._shutdown.wait())
        if finished:
            return result  # type: ignore[return-value]  # finished: result is work's
        return _Interrupted("app_exited" if self.app.exited.done() else "shutdown")

    async def _first(self, work: Awaitable[T], interrupt: Awaitable[Any]) -> tuple[bool, T | None]:
        """Run ``work`` unless ``interrupt`` or the app's exit comes first: (finished, its result)."""
        task: asyncio.Future[Any] = asyncio.ensure_future(work)
        others: list[asyncio.Future[Any]] = [asyncio.ensure_future(interrupt), asyncio.ensure_future(asyncio.shield(self.app.exited))]
        try:
            await asyncio.wait({task, *others}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in others:
                f.cancel()
        if task.done():
            result: T = task.result()
            return True, result
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False, None

    def _consul_state(self, reachable: bool, error: str | None, level: str = "warning", retrying: bool = False) -> None:
        """Log Consul reachability changes, not every failed request."""
        if error is not None:
            self.status.last_error = error
        self.status.consul_reachable = reachable
        if reachable == self._consul_ok:
            return
        self._consul_ok = reachable
        if reachable:
            self.log.info("sidecar.consul.reachable", address=self.agent.address)
        else:
            getattr(self.log, level)(
                "sidecar.consul.unreachable",
                address=self.agent.address,
                error=error,
                retrying="with jittered backoff, 1s to 30s" if retrying else f"every {self.config.check.interval:g}s",
            )

    def _acl_hint(self) -> str | None:
        if self.config.consul.token.describe() is None:
            return "no ACL token is configured: set consul.token_file (or CONSUL_HTTP_TOKEN_FILE)"
        return f"the token needs service:write on {self.config.service.name!r}"

    def _ms(self, since: float) -> int:
        return round((self.clock.monotonic() - since) * 1000)
