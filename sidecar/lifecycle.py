"""The order of operations. This module alone knows it.

    start:     start the app -> wait until its check URL answers 2xx -> register (check passing)
    running:   keep the registration (re-register if the agent forgot it, in maintenance mode again if it
               was); follow Consul's maintenance mode for /status; follow the app
    SIGTERM:   stop re-registering -> fence registration writes in flight -> deregister and confirm
               -> wait propagation_delay -> (re-read the agent while a write that went unanswered
               may still land) -> signal the app -> wait app_timeout -> SIGKILL
               -> (re-read until no such write can land) -> exit with the app's status
               (75 instead of 0 if one may still land)
    app exits: fence writes -> deregister and confirm -> end what it left -> exit with the app's status
               (a direct child that exits 0 leaving descendants on the service port has
               daemonized: the daemon is the app until it exits, see ChildApp)

A registration write counts as applied from the moment it is sent until its answer
proves otherwise, and is never cancelled mid-flight: a SIGTERM (or the app's exit)
that interrupts its sender leaves it running, and the drain first waits for its
answer (within the deregistration's deadline), so no write lands after the
deregistration. A write that ended without an answer (a timeout) may still land
later, until its window has passed (``LATE_WRITE_WINDOW``): the agent is read again
and again until a read that began after that moment finds the instance gone (before
the app is signalled, and after it if the drain's bound comes first). If the drain's
worst case ends first, its last word says the write may still land, and it exits 75.

Every step has a deadline and logs one event with its elapsed time.
Signals arrive through a queue (handlers only record); ``_on_signal`` decides
what each one means at the current step:

    SIGTERM / SIGINT   first one: start the drain. Later SIGTERMs change nothing.
    second SIGINT      (an impatient Ctrl-C) ends the propagation delay now.
    third SIGINT       SIGKILLs the app now.
    SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH   forwarded to the app (except hot_restart.signal).

Hot restart (hot_restart.enabled, wrapper mode; the sidecar holds the listening socket): the order of
one restart is in sidecar/hot_restart.py. Here: hot_restart.signal starts one once the app is registered
and not stopping; the drain (or the app's exit) cancels the restart in progress and stops every generation.
"""

from __future__ import annotations

import asyncio
import enum
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from .backoff import backoff
from .clock import Clock
from .config import Config, RegistryKind, same_host
from .drain import record as horizon_record
from .drain.horizon import PEERS_SHOWN, Horizon
from .drain.wait import DrainWait
from .exit_codes import (
    EX_CANNOT_EXECUTE,
    EX_CONFIG,
    EX_MAYBE_REGISTERED,
    EX_NOPERM,
    EX_NOT_FOUND,
    EX_UNAVAILABLE,
    by_signal,
)
from .hot_restart import HotRestart
from .process import early_signals
from .process.alongside import PidApp
from .process.app_control import App, StopResult, app_processes
from .process.child import ChildApp
from .process.notify import AppNotifySocket, SystemdNotifier
from .process.port_owner import listen_hint, verify_app_port
from .process.signals import FORWARDED, SHUTDOWN, Inbox, SignalInbox
from .registry import claim as instance_claim
from .registry.base import (
    Agent,
    DeregisterResult,
    Deregistration,
    KeyValueStore,
    RegistryError,
    RegistryPermissionDenied,
    RegistryRejected,
    RegistryUnavailable,
)
from .registry.registration import OWNER_META_KEY, registration_payload
from .registry.writes import LATE_WRITE_WINDOW, WriteLedger
from .state import AppView, DrainEnd, State, Status

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

T = TypeVar("T")

FORWARD_LOG_WINDOW = 10.0  # seconds: one info line per forwarded signal name at most, the rest at debug

SETTLE_READ_INTERVAL = 0.1  # seconds between the reads that wait out that window

_UNCONFIRMED_HINTS = {
    Deregistration.NO_LEADER: "the Consul servers have no leader (an election?): the agent removes the instance from "
    "the catalog once they have one",
    Deregistration.CATALOG_STALE: "the agent has dropped the instance; "
    "the catalog follows once the agent's sync succeeds",
    Deregistration.UNCONFIRMED: "the instance may still receive traffic",
}
_LEFT_HINTS = {
    **_UNCONFIRMED_HINTS,
    Deregistration.UNCONFIRMED: "the agent never confirmed the deregistration; "
    "Consul removes the instance once its check has been critical for check.deregister_critical_after",
}


class Startable(Protocol):
    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def own_opens(self) -> int: ...


@runtime_checkable
class Probe(Protocol):
    async def probe(self) -> tuple[bool, str]: ...


class Interruption(enum.Enum):
    """Why a step was cut short: the app ended on its own, or a shutdown signal came."""

    APP_EXITED = "app_exited"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class _Interrupted:
    reason: Interruption


class Sidecar:
    def __init__(
        self,
        config: Config,
        agent: Agent,
        app: App,
        prober: Probe,
        clock: Clock,
        status: Status,
        log: FilteringBoundLogger,
        status_server: Startable | None = None,
        inbox: Inbox | None = None,
        drain_wait: DrainWait | None = None,
        after_start: Callable[[], None] = lambda: None,
        systemd: SystemdNotifier | None = None,
        app_notify: AppNotifySocket | None = None,
    ) -> None:
        """``after_start`` runs right after ``app.start()``, even if it failed: what the caller
        may only do once the app has been spawned (threads, descriptor limits; see ``PosixLauncher``)."""
        self.config = config
        self.agent = agent
        self.app = app
        self._after_start = after_start
        self.prober = prober
        self.clock = clock
        self.status = status
        self.log = log.bind(service_id=config.service.id)
        self.status_server = status_server
        hot = config.hot_restart
        self.systemd = systemd or SystemdNotifier(None)
        # Hot restart needs generations to run: the app started by us, holding our socket.
        self._hot = (
            HotRestart(config, app, clock, status, self.log, self.systemd, app_notify)
            if hot.enabled and isinstance(app, ChildApp) and app.listener is not None
            else None
        )
        if self._hot is None and app_notify is not None:
            app_notify.close()  # no generations to hear from
        self.inbox: Inbox = inbox or SignalInbox(frozenset({hot.signal}) if self._hot is not None else frozenset())
        self.drain_wait = drain_wait or DrainWait(
            config, agent, clock, self.log, status, own_opens=status_server.own_opens if status_server else None
        )
        self._shutdown = asyncio.Event()
        self._skip_delay = asyncio.Event()
        self._sigints = 0
        self._forwarded: dict[signal.Signals, tuple[float, int]] = {}  # signal -> (last info line, passed on since)
        # What may be registered: every registration write, maybe applied until an answer says otherwise.
        self.writes = WriteLedger(
            clock, config.registry_timeout, fenced_error=getattr(agent, "unavailable_error", None)
        )
        self._consul_ok: bool | None = None
        self._consul_error: str | None = None  # the agent's last error, shown as /status's last_error
        # Consul's maintenance mode as the keeper last read it (its reason), and whether the agent lost it
        # with the service: a re-registration must not put back in rotation an instance taken out by hand.
        self._maintenance: str | None = None
        self._maintenance_lost = False
        self._reapply_failed = False
        # Duplicate IDs: our mark in the entry's meta; the claim on the ID (instance_claim); whether another
        # live sidecar held it at start (then nothing is ours: the app, if not our child, is left alone); and
        # whether the keeper found our entry replaced by another's (never re-registered over, never removed).
        self._owner = f"{os.getpid()}-{secrets.token_hex(8)}"
        self._claim: instance_claim.Claim | None = None
        self._claim_refused = False
        self._displaced = False
        # The fleet's record of horizons, read during the drain's wait (drain/record.py).
        self._record_read: asyncio.Future[tuple[int, bytes | None]] | None = None
        self._delay_s = config.shutdown.propagation_delay  # the drain's wait: propagation_delay, or the learned one

    # --- the whole life ---------------------------------------------------------

    async def run(self) -> int:
        """Run until the app is gone; return the exit status to pass on."""
        t0 = self.clock.monotonic()
        over = self.config.shutdown.over_budget()
        if over:
            self.log.warning("sidecar.config.over_budget", warning=over)
        self.inbox.install()  # before the app exists: no signal may find us unprepared
        stop: signal.Signals | None = None
        for sig in early_signals.take():  # came while Python started: no app to pass it to, nothing to restart
            if sig in SHUTDOWN:
                stop = stop or sig
                continue
            self.log.warning(
                "sidecar.signal.ignored", signal=sig.name, reason="it came during start-up, before the app existed"
            )
        dispatcher = asyncio.create_task(self._dispatch_signals())
        if self._hot is not None:
            self._hot.start()
        try:
            if stop is not None:  # a Ctrl-C or SIGTERM while the sidecar started: the app is not started at all
                self._after_start()
                self.log.info(
                    "sidecar.signal.received", signal=stop.name, action="exit: it came before the app was started"
                )
                return by_signal(stop)
            try:
                try:
                    self.app.start()
                finally:
                    self._after_start()
            except OSError as e:
                self.log.error("sidecar.app.start_failed", error=f"{e.__class__.__name__}: {e}")
                return EX_NOT_FOUND if isinstance(e, FileNotFoundError) else EX_CANNOT_EXECUTE
            self.status.app = AppView(self.app.description)
            if self._hot is not None:
                self._hot.app_started()
            self.log.info("sidecar.app.started", app=self.app.description, elapsed_ms=self._ms(t0))
            if self.status_server is not None:
                await self.status_server.start()
                self.log.info("sidecar.status.listening", address=self.status_server.address)
            try:
                return await self._live()
            except Exception:
                # A bug: the caller kills the app. Take the instance out of Consul first.
                deadline = self.clock.monotonic() + self.config.shutdown.deregister_timeout
                await self._fence_writes(deadline)
                if await self._ours_may_be_registered(deadline):
                    await self._deregister(deadline)
                raise
        finally:
            dispatcher.cancel()
            if self._hot is not None:
                self._hot.close()
            self.systemd.close()
            self.drain_wait.close()
            self.status.enter(State.STOPPED)
            if self.status_server is not None:
                await self.status_server.stop()
            await self.writes.abandon()  # only one the fence gave up on: nobody waits for its answer now
            await self.agent.close()
            self.inbox.uninstall()

    async def _live(self) -> int:
        started = await self._race(self._startup())
        if isinstance(started, _Interrupted):
            return await self._end(started.reason)
        if started != 0:
            return await self._abort_startup(started)
        keeper = asyncio.create_task(self._keep_registration())
        self.systemd.notify(READY="1", STATUS="registered in Consul, serving")
        try:
            ended = await self._race(asyncio.Event().wait())  # until the app exits or a signal
        finally:
            keeper.cancel()
            if self._hot is not None:  # the drain (or the app's exit) takes over every generation
                await self._hot.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        assert isinstance(ended, _Interrupted)
        return await self._end(ended.reason)

    async def _end(self, reason: Interruption) -> int:
        if reason is Interruption.APP_EXITED:
            return await self._after_app_exit()
        return await self._drain()

    # --- start --------------------------------------------------------------------

    async def _startup(self) -> int:
        """Claim the ID, wait for the app to be healthy, then register. 0, or an exit status to abort with."""
        cfg = self.config
        if not await self._take_claim():
            return EX_CONFIG
        pid_app = isinstance(self.app, PidApp)  # its PID must also prove to be the app's (listen on the port)
        if cfg.startup.wait_healthy or pid_app:
            t = self.clock.monotonic()
            healthy, detail, why = await self._wait_healthy(t + cfg.startup.timeout, probe=cfg.startup.wait_healthy)
            if not healthy:
                self.log.error(
                    "sidecar.startup.unhealthy",
                    url=cfg.check.http,
                    last_answer=detail,
                    timeout_s=cfg.startup.timeout,
                    elapsed_ms=self._ms(t),
                    **why,
                )
                self.status.last_error = "; ".join(
                    [f"app not healthy within {cfg.startup.timeout:g}s: {detail}", *why.values()]
                )
                return EX_UNAVAILABLE
            self.status.last_error = None
            if cfg.startup.wait_healthy:
                self.log.info("sidecar.startup.healthy", url=cfg.check.http, elapsed_ms=self._ms(t))
        tree, unknown = app_processes(self.app)
        refused = verify_app_port(cfg.service.address, cfg.service.port, tree, unknown, self.log)
        if refused is not None:  # someone else answers on the app's port: register nothing
            self.status.last_error = refused
            return EX_UNAVAILABLE
        return await self._register_until_done()

    async def _wait_healthy(self, deadline: float, probe: bool = True) -> tuple[bool, str, dict[str, str]]:
        """Until the check URL answers 2xx (``probe``) and, alongside mode with a PID, the PID is the
        app's: (done, the last answer, why not: ``pid_check`` and/or ``hint``)."""
        t = self.clock.monotonic()
        detail, said = "no probe yet", t
        while True:
            healthy, detail = await self.prober.probe() if probe else (True, "not probed (startup.wait_healthy off)")
            pid_check = self.app.verify(healthy) if isinstance(self.app, PidApp) else None
            if healthy and pid_check is None:
                return True, detail, {}
            self.status.last_error = f"health check: {detail}" if pid_check is None else pid_check
            now = self.clock.monotonic()
            if now >= deadline or now - said >= 5.0:  # progress for a slow or misconfigured app, not one per probe
                why = {"pid_check": pid_check} if pid_check is not None else {}
                if not healthy and (
                    hint := listen_hint(
                        app_processes(self.app)[0], self.config.service.address, self.config.service.port
                    )
                ):
                    why["hint"] = hint
                if now >= deadline:
                    return False, detail, why
                said = now
                self.log.info(
                    "sidecar.startup.waiting",
                    url=self.config.check.http,
                    last_answer=detail,
                    elapsed_ms=self._ms(t),
                    gives_up_in_s=round(deadline - now, 1),
                    **why,
                )
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
                await self.drain_wait.prepare()
                return 0
            except RegistryPermissionDenied as e:
                self.status.last_error = str(e)
                self.log.error("sidecar.consul.permission_denied", error=str(e), hint=self._acl_hint())
                return EX_NOPERM
            except RegistryRejected as e:
                self.status.last_error = str(e)
                self.log.error("sidecar.consul.registration_rejected", error=str(e))
                return EX_CONFIG
            except RegistryError as e:
                self._consul_state(False, str(e), retrying=True)
            await self.clock.sleep(next(delays))

    async def _take_claim(self) -> bool:
        """Claim the service ID at our agent before the agent is read or written (instance_claim).

        False (logged, /status says why) when a live sidecar holds it: this one must then register
        nothing and touch nothing it does not own, whatever the agent shows at this moment (the
        holder may not have registered yet). None from the claim (no trustworthy runtime
        directory) is warned about and start-up goes on, as without a claim.
        """
        svc = self.config.service
        self._claim = instance_claim.claim(self, self.agent.address, svc.id, f"{svc.address}:{svc.port}")
        if self._claim.held is None:
            self.log.warning(
                "sidecar.consul.claim_unavailable",
                error=self._claim.detail,
                hint="a second sidecar with this service.id cannot be detected before it registers",
            )
            return True
        if self._claim.held:
            return True
        holder = self._claim.holder()
        give_up = self.clock.monotonic() + 1.0
        while (holder is None or "address" not in holder) and self.clock.monotonic() < give_up:
            await self.clock.sleep(0.02)  # the holder writes its note right after taking the lock
            holder = self._claim.holder()
        theirs = str(holder.get("address")) if holder and "address" in holder else "an address it has not written yet"
        pid = holder.get("pid") if holder else None
        message = (
            f"service.id {svc.id!r} is held by a live consul-sidecar on this host (pid {pid or 'unknown'}, "
            f"registering {theirs}); this one ({svc.address}:{svc.port}) would take over its entry. Run one "
            "sidecar per instance, or give each its own service.id (the default, "
            "<name>-<hostname>-<address>-<port>, is unique per address)"
        )
        self._claim_refused = True
        self.status.last_error = message
        self.log.error("sidecar.consul.registration_rejected", error=message, claim=str(self._claim.path))
        return False

    async def _drop_stale_registration(self) -> None:
        """A registration with our ID is replaced only if its owner is provably gone; else refuse.

        Registering over a registration left by a sidecar that died (SIGKILL, OOM) would keep
        its check's status (Consul keeps the status of an unchanged check), critical once the
        old app has gone, so the new instance would wait a check interval for traffic: it is
        removed first. We hold the claim on the ID already (``_take_claim``), so no live sidecar
        on this host owns the entry. Its owner is provably gone when

          - it is registered for our address and port (its sidecar, on this host, is gone), or
          - it is registered for another address or port (perhaps by a sidecar elsewhere that
            registers into this agent), and the agent's check of it is critical.

        Otherwise: RegistryRejected (nothing registered, the app stopped, exit 78).
        """
        svc = self.config.service
        existing = await self.agent.registered(svc.id)
        if existing is None:
            return
        address, port = str(existing.get("Address") or ""), existing.get("Port")
        theirs = f"{address or '<the node address>'}:{port}"
        if same_host(address, svc.address) and port == svc.port:
            reason = "its sidecar is gone (no live process on this host holds the service ID)"
        else:
            status = await self.agent.check_status(svc.id)
            if status != "critical":
                raise RegistryRejected(
                    f"service.id {svc.id!r} is already registered for {theirs} (check {status or 'absent'}): a live "
                    f"instance; this sidecar would register {svc.address}:{svc.port} "
                    "under the same ID and take over its entry. Give each instance its own service.id "
                    "(the default, <name>-<hostname>-<address>-<port>, is unique per address)"
                )
            reason = "its check is critical"
        self.writes.holds_entry()  # it carries our ID: a drain from here on must remove it
        t = self.clock.monotonic()
        result = await self.agent.deregister_confirmed(svc.name, svc.id, t + self.config.shutdown.deregister_timeout)
        self.log.warning(
            "sidecar.consul.stale_registration_replaced",
            previous=theirs,
            reason=reason,
            deregistration=result.outcome.value,
            elapsed_ms=self._ms(t),
        )
        if result.outcome is Deregistration.CONFIRMED:
            self.writes.entry_gone()  # proven gone: nothing of ours is registered now

    async def _check_catalog_visibility(self) -> None:
        svc = self.config.service
        try:
            visible = await self.agent.check_catalog_visibility(svc.name, svc.id)
        except RegistryError as e:
            self.log.warning("sidecar.consul.catalog_unreadable", error=str(e))
            return
        if not visible:
            self.log.warning(
                "sidecar.consul.catalog_unreadable",
                hint=f"the token cannot read {svc.name!r} in the catalog (it needs service:read and node:read, e.g. "
                'node_prefix "" { policy = "read" }): deregistrations are confirmed by the agent alone, and one '
                "blocked by ACLs cannot be detected",
            )

    async def _register(self, out_of_rotation: bool = False) -> None:
        # Passing at once only if the app answers right now, as the agent will see it; never for an
        # instance in maintenance: it must not pass for the moment before maintenance is applied again.
        healthy = False
        if not out_of_rotation:
            healthy, _ = await self.prober.probe()
        payload = registration_payload(self.config, passing=healthy, owner=self._owner)
        await self.writes.write(self.agent.register(payload))
        self.status.registrations_total += 1

    async def _fence_writes(self, deadline: float) -> bool:
        """Allow no new registration write; wait (until ``deadline``) for those in flight (the ledger's
        fence). True when none is left in flight."""
        t = self.clock.monotonic()
        fenced = await self.writes.fence(deadline)
        if fenced is None:
            return True
        self.log.info(
            "sidecar.consul.write_fenced", in_flight=fenced.in_flight, settled=fenced.settled, elapsed_ms=self._ms(t)
        )
        return fenced.settled

    async def _verify_gone(self, bound: float, wait_again: bool) -> DeregisterResult | None:
        """After the deregistration: can a write that went unanswered still land? Read the agent until it cannot.

        Each such write may reach the agent until its window has passed (the ledger's ``settle_by``). The agent
        is read every ``SETTLE_READ_INTERVAL`` until a read that began after the last of those moments
        finds the instance gone: then no write can land any more. If the instance is back, it is
        deregistered again and (``wait_again``: the app has not been signalled yet) consumers get the
        propagation delay again. Everything here ends by ``bound`` (monotonic), so the worst case
        still holds; writes that may still land then stay in the ledger for the caller. Returns
        what the caller must report as unconfirmed (the last read failed, or the second
        deregistration did not confirm), else None.
        """
        if not self.writes.may_land:
            return None  # every write was answered before the deregistration: none can land later
        cfg = self.config
        t0 = self.clock.monotonic()
        error: str | None = None
        while True:
            t = self.clock.monotonic()
            try:
                # A loopback read takes milliseconds: the floor only spares a bound already reached.
                async with asyncio.timeout(max(0.25, min(cfg.registry_timeout, bound - t))):
                    back = self._is_own(await self.agent.registered(cfg.service.id))
            except (RegistryError, TimeoutError) as e:
                error = str(e) or "timeout"
            else:
                error = None
                if back:
                    self.log.error(
                        "sidecar.consul.reappeared",
                        hint="a registration write that went unanswered landed after the deregistration; "
                        "deregistering again" + (" and waiting the propagation delay again" if wait_again else ""),
                    )
                    self.writes.landed()  # if one write alone could land, it has: it cannot again
                    result = await self._deregister(deadline=max(bound, self.clock.monotonic() + 0.25))
                    if result.outcome is not Deregistration.CONFIRMED:
                        return result
                    if wait_again and not self.app.exited.done():
                        again = min(cfg.shutdown.propagation_delay, max(0.0, bound - self.clock.monotonic()))
                        await self._first(self.clock.sleep(again), self._skip_delay.wait())
                    if not self.writes.may_land:
                        return None
                elif t >= self.writes.settle_by:
                    self.writes.settled()  # gone, read after every unanswered write's window: none can land
                    self.log.debug("sidecar.consul.final_read", registered=False, elapsed_ms=self._ms(t0))
                    return None
            now = self.clock.monotonic()
            if now >= bound or (wait_again and self._skip_delay.is_set()):
                break
            await self.clock.sleep(min(SETTLE_READ_INTERVAL, bound - now))
        if error is not None:
            self.log.warning("sidecar.consul.final_read_failed", error=error, elapsed_ms=self._ms(t0))
            return DeregisterResult(Deregistration.UNCONFIRMED, 0, f"the final read failed: {error}", answered=False)
        return None  # gone so far; a write may still land after ``bound``: the ledger says until when

    async def _abort_startup(self, code: int) -> int:
        """Startup failed: nothing stays registered, the app is stopped, exit non-zero."""
        deadline = self.clock.monotonic() + self.config.shutdown.deregister_timeout
        await self._fence_writes(deadline)
        if await self._ours_may_be_registered(deadline):
            await self._deregister(deadline)
            await self._verify_gone(deadline + self.config.registry_timeout, wait_again=False)
        if self._claim_refused and not isinstance(self.app, ChildApp):
            # Alongside mode: the app is the live holder's (or another's), never ours to signal.
            self.log.info("sidecar.stopped", exit_status=code, app_status=None, app="left alone: not ours")
            return code
        result = await self._stop_app()
        self.log.info("sidecar.stopped", exit_status=code, app_status=result.status)
        return code

    # --- running ------------------------------------------------------------------

    async def _keep_registration(self) -> None:
        """Every check interval, ask the agent whether it still holds us; re-register if not.

        An agent restarted without its data directory forgets every service;
        this brings the registration back within one interval of its return.
        """
        failures = 0
        while True:
            try:
                await self._keep_registration_rounds()
                return  # our entry was replaced by another's: nothing of ours is left to keep
            except Exception as e:  # noqa: BLE001 - a keeper that dies silently leaves the instance unguarded
                failures += 1
                error = f"{e.__class__.__name__}: {e}"
                self.status.last_error = f"the registration keeper failed ({failures}x): {error}"
                self.log.exception(
                    "sidecar.consul.keeper_failed",
                    error=error,
                    failures=failures,
                    action=f"restarting it in {self.config.check.interval:g}s",
                )

    async def _keep_registration_rounds(self) -> None:
        interval = self.config.check.interval
        sid = self.config.service.id
        while True:
            await self.clock.sleep(interval)
            t = self.clock.monotonic()
            try:
                entry = await self.agent.registered(sid)
                if entry is not None and not self._is_own(entry):
                    self._report_displaced(entry)
                    return
                if entry is None:
                    # Consul 1.8.7 keeps maintenance mode over a re-registration of a service it holds, but
                    # an agent that forgot the service forgot its maintenance check too: apply it again.
                    self._maintenance_lost = self._maintenance is not None
                    await self._register(out_of_rotation=self._maintenance_lost)
                    self._count_reregistration("service_missing")
                    self.log.warning(
                        "sidecar.consul.reregistered",
                        reason="the agent no longer held the service",
                        maintenance=self._maintenance_lost or None,
                        elapsed_ms=self._ms(t),
                    )
                elif self.agent.token_rotated():
                    # The agent keeps the registering token for its catalog syncs (and
                    # for a later deregistration): hand it the new one before the old
                    # one is deleted.
                    await self._register()
                    self._count_reregistration("token_rotated")
                    self.log.info("sidecar.consul.reregistered", reason="the ACL token changed", elapsed_ms=self._ms(t))
                if self._maintenance_lost:
                    await self._reapply_maintenance(sid, t)
                await self._follow_maintenance(sid)
                self._consul_state(True, None)
            except RegistryPermissionDenied as e:
                self._consul_state(False, str(e), level="error")
            except RegistryError as e:
                self._consul_state(False, str(e))

    def _is_own(self, entry: dict[str, Any] | None) -> bool:
        """Whether the agent's entry is this process's: our address, port and owner mark."""
        if entry is None:
            return False
        svc, meta = self.config.service, entry.get("Meta")
        return (
            same_host(str(entry.get("Address") or ""), svc.address)
            and entry.get("Port") == svc.port
            and isinstance(meta, dict)
            and meta.get(OWNER_META_KEY) == self._owner
        )

    def _report_displaced(self, entry: dict[str, Any]) -> None:
        self._displaced = True
        meta = entry.get("Meta")
        mark = meta.get(OWNER_META_KEY) if isinstance(meta, dict) else None
        theirs = f"{entry.get('Address') or '<the node address>'}:{entry.get('Port')}"
        sid = self.config.service.id
        self.status.last_error = f"service.id {sid!r} is now registered for {theirs} by another owner"
        self.log.error(
            "sidecar.consul.registration_taken",
            registered=theirs,
            owner=mark,
            hint="another registration replaced ours under the same service.id: it is not re-registered over, "
            "kept or deregistered by this sidecar. Give each instance its own service.id",
        )

    async def _ours_may_be_registered(self, deadline: float) -> bool:
        """Whether the agent may hold an entry of ours (a drain must then deregister it).

        After the keeper found our entry replaced by another's, one read decides: a write of ours
        that went unanswered may have landed over it since (ours again), else the entry is not ours.
        """
        if not self.writes.attempted:
            return False
        if not self._displaced:
            return True
        try:
            async with asyncio.timeout(max(0.25, min(self.config.registry_timeout, deadline - self.clock.monotonic()))):
                return self._is_own(await self.agent.registered(self.config.service.id))
        except (RegistryError, TimeoutError):
            return self.writes.may_land  # unreadable: ours only if a write of ours may have landed

    async def _reapply_maintenance(self, sid: str, t: float) -> None:
        """Maintenance mode again, with the reason last read, after the agent lost it with the service.
        A failure raises RegistryError and leaves it to the next round (the instance's own check starts
        critical meanwhile: it is not routed to)."""
        reason = self._maintenance
        try:
            applied = await self.agent.set_maintenance(sid, True, reason)
        except RegistryError as e:
            if not self._reapply_failed:  # once per episode, not every round
                self.log.error(
                    "sidecar.maintenance.reapply_failed",
                    reason=reason,
                    error=str(e),
                    action=f"retrying every {self.config.check.interval:g}s",
                )
            self._reapply_failed = True
            raise
        if not applied:  # forgotten again in between: the next round registers it again
            raise RegistryUnavailable(f"maintenance mode for {sid!r}: the agent no longer holds the service")
        self._maintenance_lost = self._reapply_failed = False
        self.log.warning("sidecar.maintenance.reapplied", reason=reason, elapsed_ms=self._ms(t))

    async def _follow_maintenance(self, sid: str) -> None:
        """Read Consul's maintenance mode (set by hand with ``consul-sidecar maint`` or ``consul maint``)."""
        reason = await self.agent.maintenance(sid)
        if reason != self._maintenance:
            if reason is None:
                self.log.info("sidecar.maintenance.disabled", previous_reason=self._maintenance)
            else:
                self.log.warning("sidecar.maintenance.enabled", reason=reason)
        self._maintenance = reason
        self.status.maintenance = reason is not None
        self.status.maintenance_reason = reason

    # --- stop ---------------------------------------------------------------------

    async def _drain(self) -> int:
        """SIGTERM/SIGINT: deregister, confirm, wait, then stop the app."""
        cfg = self.config.shutdown
        t0 = self.clock.monotonic()
        self.status.enter(State.DRAINING)
        self.systemd.notify(STOPPING="1", STATUS="draining: deregistering")
        self.log.info("sidecar.drain.started", propagation_delay_s=cfg.propagation_delay, app_timeout_s=cfg.app_timeout)
        # The deregistration's deadline covers waiting for a write in flight: the worst case holds.
        deadline = t0 + cfg.deregister_timeout
        await self._fence_writes(deadline)
        if not await self._ours_may_be_registered(deadline):
            # Nothing ever reached the agent (or our entry was replaced by another's, which is not
            # ours to remove): nothing to take out, nobody to wait for.
            self.log.info("sidecar.drain.nothing_registered")
            result = await self._stop_app()
            self.log.info("sidecar.stopped", exit_status=result.status, elapsed_ms=self._ms(t0))
            return result.status
        # The latest moment the app may be signalled and still get its whole app_timeout within
        # the worst case: until then it is signalled only once the catalog is proven clear.
        bound = t0 + cfg.deregister_timeout + cfg.propagation_delay
        last = await self._deregister(deadline, retry_until=None if self.app.exited.done() else bound)
        outcome = last.outcome
        self.systemd.notify(STATUS=f"deregistration {outcome.value}: waiting before stopping the app")
        saving: tuple[asyncio.Task[int], float, float, bool] | None = None
        if self.app.exited.done():
            pass  # nothing left to protect
        else:
            if outcome is not Deregistration.CONFIRMED:
                # No leader, a lagging catalog, a frozen agent: keep confirming rather than
                # signal an app that consumers may still be sent to.
                finished, late = await self._first(self._deregister(deadline=bound, late=True), self._skip_delay.wait())
                if finished and late is not None and late.answered:
                    last, outcome = late, late.outcome
            ended: DrainEnd | None = None
            confirmed_at = self.clock.monotonic()
            self._delay_s = cfg.propagation_delay  # the wait's bound: a learned delay replaces it (_wait)
            if outcome is Deregistration.CONFIRMED:
                self.drain_wait.measure_from(confirmed_at)  # the horizon, whatever the strategy
                self._read_record()  # during the wait: the write after it is then one round trip
                # A late confirmation shortens the delay rather than push the app past the worst case.
                _, ended = await self._first(self._wait(confirmed_at), self._skip_or_bound(bound))
            if ended is None:
                ended = (
                    DrainEnd.SECOND_SIGINT
                    if self._skip_delay.is_set()
                    else DrainEnd.APP_EXITED
                    if self.app.exited.done()
                    else DrainEnd.DRAIN_BOUND
                )
            unconfirmed = outcome is not Deregistration.CONFIRMED
            self.status.drain_seconds = self.clock.monotonic() - confirmed_at
            self.status.drain_end = ended.value
            (self.log.error if unconfirmed else self.log.info)(
                "sidecar.drain.delay_done",
                strategy=cfg.strategy,
                reason=ended.value,
                bound_s=self._delay_s,
                deregistration=outcome.value,
                cpu_ms=self.drain_wait.cpu_ms,
                elapsed_ms=self._ms(confirmed_at),
                hint=(
                    "the app is signalled although "
                    + (
                        "etcd may still hold the key"
                        if self.config.registry.kind is RegistryKind.ETCD
                        else "the catalog may still list the instance"
                    )
                )
                if unconfirmed
                else None,
            )
            if outcome is Deregistration.CONFIRMED:
                again = await self._verify_gone(bound, wait_again=True)
                if again is not None:  # a landed write could not be taken out again: report it at the end
                    last, outcome = again, again.outcome
            saving = self._save_horizon(self._drain_done(outcome is Deregistration.CONFIRMED), t0)
        result = await self._stop_app()
        if saving is not None:
            await self._horizon_saved(*saving)
        status = await self._last_word(last, t0 + cfg.worst_case, result.status)
        self.log.info("sidecar.stopped", exit_status=status, app_status=result.status, elapsed_ms=self._ms(t0))
        return status

    def _drain_done(self, confirmed: bool) -> Horizon | None:
        """The drain's last event before the app's signal: its horizon (drain/horizon.py), returned."""
        seen = self.drain_wait.measured()
        if seen is None:
            why = (
                self.drain_wait.horizon_unavailable or "not measured"
                if confirmed
                else "the deregistration was not confirmed: no moment to measure from"
            )
            self.log.info("sidecar.drain.done", reason=why)  # no figure rather than an invented one
            return None
        self.status.drain_horizon_seconds = (seen.horizon_ms or 0) / 1000
        self.status.drain_new_connections_total += seen.new_connections
        (self.log.warning if seen.lost else self.log.info)(
            "sidecar.drain.done",
            horizon_ms=seen.horizon_ms or 0,  # 0 with new_connections 0: none came
            new_connections=seen.new_connections,
            slowest_peers=seen.slowest(),
            peers=len(seen.peers),
            unnamed_connections=seen.peers_unnamed or None,  # of peers beyond the 10,000 tracked
            window_ms=seen.window_ms,
            lost=seen.lost,
        )
        return seen

    async def _wait(self, confirmed_at: float) -> DrainEnd:
        """The wait after the confirmed deregistration: with ``propagation_delay = "learned"``, first the delay
        the fleet's record recommends (read since the confirmation: the read counts within the delay)."""
        if self.config.shutdown.learned:
            self._delay_s = await self._learned_delay(confirmed_at)
            return await self.drain_wait.wait(confirmed_at, self._delay_s)
        return await self.drain_wait.wait(confirmed_at)

    async def _learned_delay(self, confirmed_at: float) -> float:
        """The learned delay (drain/record.py ``learned_delay``) from the record read at the confirmation
        (``_read_record``), within a deadline: the registry's timeout, at most learned_max. A record that
        cannot be read (no answer, a refusal, garbage) means learned_max, the safe side; one event either way."""
        sd = self.config.shutdown
        read = self._record_read
        found: list[dict[str, Any]] | None = None
        unreadable: str | None = None
        deadline = min(self.config.registry_timeout, sd.learned_max)
        if read is None:
            unreadable = "this registry keeps no record"
        else:
            try:
                async with asyncio.timeout(max(0.0, confirmed_at + deadline - self.clock.monotonic())):
                    _, value = await asyncio.shield(read)  # the record's write after the wait reuses this read
                found = horizon_record.samples(value)
            except TimeoutError:
                unreadable = f"no answer within {deadline:g}s"
            except RegistryPermissionDenied as e:
                unreadable = f"{e} (the token needs key:read on the record)"
            except Exception as e:  # noqa: BLE001 - whatever the read met, the drain waits learned_max
                unreadable = str(e) or type(e).__name__
        learned = horizon_record.learned_delay(found, sd.learned_min, sd.learned_max, sd.learned_margin, unreadable)
        (
            self.log.warning
            if learned.reason == "record_unreadable" or learned.clamped == "learned_max"
            else self.log.info
        )(
            "sidecar.drain.learned_delay",
            delay_s=learned.delay_s,
            reason=learned.reason,
            why=learned.why,
            samples=learned.count,
            p99_ms=learned.p99_ms,
            margin_ms=learned.margin_ms,
            clamped=learned.clamped,
            key=horizon_record.key(self.config.service.name),
            elapsed_ms=self._ms(confirmed_at),
            hint="raise shutdown.learned_max (and shutdown.budget with it): consumers kept sending longer"
            if learned.clamped == "learned_max"
            else None,
        )
        return learned.delay_s

    def _read_record(self) -> None:
        """Read the fleet's record of horizons while the drain waits anyway, so that appending to it after
        the wait takes one check-and-set (one round trip) when no other instance wrote meanwhile."""
        if isinstance(self.agent, KeyValueStore):
            self._record_read = asyncio.ensure_future(self.agent.read_kv(horizon_record.key(self.config.service.name)))

    def _save_horizon(self, seen: Horizon | None, t0: float) -> tuple[asyncio.Task[int], float, float, bool] | None:
        """Start appending the drain's horizon to the fleet's record (drain/record.py) and return the
        write, when it started and its deadline; None when there is nothing to save or nowhere to save it.

        The write runs while the app is signalled and exits (``_horizon_saved`` waits for what is left
        of it after): only its part beyond the app's own exit lengthens the drain. The record was read
        during the wait (``_read_record``), so an app that exits at once leaves one check-and-set, one
        round trip, unless another instance wrote since (then a read and a write more). Its deadline:
        two requests (consul.timeout each), within the worst case less the exit's own margin (a last
        read and the log's flush)."""
        read, self._record_read = self._record_read, None
        if read is not None and not read.done():
            read.cancel()  # not back yet: the write reads again
        ok = read is not None and read.done() and not read.cancelled() and read.exception() is None
        known = read.result() if ok and read is not None else None  # a failed read: the write reads again
        if seen is None or seen.lost or not isinstance(self.agent, KeyValueStore):
            return None  # a floor is no sample
        sample: dict[str, Any] = {
            "time": round(self.clock.wall(), 3),
            "service_id": self.config.service.id,
            "horizon_ms": seen.horizon_ms or 0,
            "new_connections": seen.new_connections,
            "slowest_peers": [{"peer": p.peer, "last_ms": p.last_ms} for p in seen.peers[:PEERS_SHOWN]],
        }
        t = self.clock.monotonic()
        deadline = min(t + 2 * self.config.registry_timeout, t0 + self.config.shutdown.worst_case - 0.75)
        key = horizon_record.key(self.config.service.name)
        write = self.agent.update_kv(key, lambda value: horizon_record.merge(value, sample), known)
        return asyncio.ensure_future(write), t, deadline, known is not None

    async def _horizon_saved(self, write: asyncio.Task[int], started: float, deadline: float, read_ahead: bool) -> None:
        """After the app's exit: wait for the horizon's write until its deadline; one event either way. A
        refusal (no key:write) or a failure is a warning, never a failed drain: the record is the fleet's
        evidence, not the drain's work."""
        t = self.clock.monotonic()
        key = horizon_record.key(self.config.service.name)
        try:
            async with asyncio.timeout(max(0.0, deadline - t)):
                writes = await asyncio.shield(write)
        except TimeoutError:
            write.cancel()  # a check-and-set that lands later still holds a whole, valid record
            why, error, hint = "deadline", f"no answer within {deadline - started:.1f}s", None
        except RegistryPermissionDenied as e:
            why, error = "permission_denied", str(e)
            hint = (
                f"the etcd user needs a readwrite role on the record's key ({key} beside etcd.prefix)"
                if self.config.registry.kind is RegistryKind.ETCD
                else f'the token needs key:write on "{key}" (key_prefix "{horizon_record.KEY_PREFIX}")'
            )
        except RegistryError as e:
            why, error, hint = "registry_error", str(e), None
        else:
            self.log.info(
                "sidecar.drain.horizon_saved",
                key=key,
                writes=writes,
                read_during_wait=read_ahead,  # the record was read while the drain waited: one round trip after
                elapsed_ms=self._ms(started),
                after_app_ms=self._ms(t),  # what it added to the drain
            )
            return
        self.log.warning(
            "sidecar.drain.horizon_not_saved",
            key=key,
            reason=why,
            error=error,
            elapsed_ms=self._ms(started),
            after_app_ms=self._ms(t),
            hint=hint,
        )

    async def _after_app_exit(self) -> int:
        """The app ended on its own: take it out of discovery at once, pass its status on."""
        status = self.app.exited.result()
        oom = status == by_signal(signal.SIGKILL)
        emit = self.log.error if oom else self.log.info if status == 0 else self.log.warning
        hint = "killed by SIGKILL: out of memory?" if oom else None
        if hint is None and status != 0 and self._hot is not None and not self.writes.attempted:
            hint = (
                "with hot_restart the sidecar holds service.port and hands it to the app as fd 3 (LISTEN_FDS): "
                "an app that binds the port itself fails with 'address already in use'"
            )
        emit(
            "sidecar.app.exited",
            exit_status=status,
            hint=hint,
            daemon_pids=sorted(self.app.followed) or None,
        )
        t = self.clock.monotonic()
        self.status.enter(State.DRAINING)
        self.systemd.notify(STOPPING="1", STATUS=f"the app exited ({status}): deregistering")
        deadline = t + self.config.shutdown.deregister_timeout
        await self._fence_writes(deadline)
        last = DeregisterResult(Deregistration.CONFIRMED, 0, None)  # nothing registered: nothing to report
        if await self._ours_may_be_registered(deadline):
            last = await self._deregister(deadline)
            if last.outcome is not Deregistration.UNCONFIRMED:
                again = await self._verify_gone(deadline + self.config.registry_timeout, wait_again=False)
                last = again or last
        await self._stop_app()  # what it left behind: app_signal, then SIGKILL
        code = await self._last_word(last, t + self.config.shutdown.worst_case, status)  # as the drain gives it
        self.log.info("sidecar.stopped", exit_status=code, app_status=status, elapsed_ms=self._ms(t))
        return code

    async def _deregister(
        self, deadline: float | None = None, late: bool = False, retry_until: float | None = None
    ) -> DeregisterResult:
        """Deregister and confirm until ``deadline`` (default: deregister_timeout from now).

        ``late``: a retry of an unconfirmed one; only success is logged (the caller reports the rest).
        ``retry_until``: when the caller keeps confirming after this attempt, and until when.
        """
        cfg = self.config
        t = self.clock.monotonic()
        if deadline is None:
            deadline = t + cfg.shutdown.deregister_timeout
        result = await self.agent.deregister_confirmed(cfg.service.name, cfg.service.id, deadline)
        if result.outcome is Deregistration.CONFIRMED:
            self.status.deregistration_seconds = self.clock.monotonic() - t
            self.log.info(
                "sidecar.consul.deregistered", attempts=result.attempts, late=late or None, elapsed_ms=self._ms(t)
            )
            return result
        if late:
            return result
        self.status.last_error = result.error
        retrying = None if retry_until is None else round(max(0.0, retry_until - self.clock.monotonic()), 3)
        if result.outcome is Deregistration.BLOCKED:
            self.log.error(
                "sidecar.consul.deregister_blocked",
                error=result.error,
                attempts=result.attempts,
                elapsed_ms=self._ms(t),
                retrying_for_s=retrying,
                hint=self._acl_hint(),
            )
        else:
            self.log.error(
                "sidecar.consul.deregister_unconfirmed",
                reason=result.outcome.value,
                error=result.error,
                attempts=result.attempts,
                elapsed_ms=self._ms(t),
                retrying_for_s=retrying,
                hint=result.hint or _UNCONFIRMED_HINTS[result.outcome],
            )
        return result

    async def _last_word(self, last: DeregisterResult, bound: float, app_status: int) -> int:
        """After the app has stopped: wait out the writes that may still land (until ``bound``), give
        the drain's last word and return the exit status: the app's, or EX_MAYBE_REGISTERED instead of
        a 0 while an unanswered registration write may still land. (A non-zero status of the app's
        wins: it is no success either, and it tells why the app ended.)"""
        if self.writes.may_land:
            # Kept from the worst case: a last read's floor (0.25 s) and the log's flush at exit (0.5 s).
            again = await self._verify_gone(bound - 0.75, wait_again=False)
            if again is not None:
                last = again
        if last.outcome is not Deregistration.CONFIRMED and await self._final_check(last, bound):
            pass  # said: left_registered
        elif self.writes.may_land:
            t = self.clock.monotonic()
            self.log.error(
                "sidecar.consul.left_registered",
                reason="write_unanswered",
                agent_dropped=None,
                error=f"a registration write got no answer; it may still reach the agent for "
                f"{self.writes.settle_by - t:.1f}s (its deadline, consul.timeout, plus "
                f"{LATE_WRITE_WINDOW:g}s for a hop that still holds it), longer than the drain's worst case",
                hint="the agent did not list the instance at the last read; if the write lands, Consul removes the "
                "instance once its check has been critical for check.deregister_critical_after",
            )
        if self.writes.may_land and app_status == 0:
            return EX_MAYBE_REGISTERED
        return app_status

    async def _final_check(self, last: DeregisterResult, bound: float) -> bool:
        """After the app has stopped: one more look, so that the last word is what the agent shows now
        (a deregistration may have landed late); ``last`` is what the drain knew before. True when the
        last word is that the instance stays registered."""
        t = self.clock.monotonic()
        deadline = min(t + max(1.0, 2 * self.config.registry_timeout), bound)
        result = await self._deregister(deadline=max(deadline, t + 0.001), late=True)
        if not result.answered:
            result = last
        if result.outcome is Deregistration.CONFIRMED:
            return False
        hint = (
            self._acl_hint() if result.outcome is Deregistration.BLOCKED else result.hint or _LEFT_HINTS[result.outcome]
        )
        self.log.error(
            "sidecar.consul.left_registered",
            reason=result.outcome.value,
            agent_dropped=result.agent_dropped,
            error=result.error,
            hint=hint,
        )
        return True

    async def _skip_or_bound(self, bound: float) -> None:
        """Until a second SIGINT or the monotonic time ``bound``, whichever comes first."""
        sleep = asyncio.ensure_future(self.clock.sleep(max(0.0, bound - self.clock.monotonic())))
        skip = asyncio.ensure_future(self._skip_delay.wait())
        try:
            await asyncio.wait({sleep, skip}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleep.cancel()
            skip.cancel()

    async def _stop_app(self) -> StopResult:
        cfg = self.config.shutdown
        self.status.enter(State.STOPPING)
        self.systemd.notify(STATUS="stopping the app")
        t = self.clock.monotonic()
        if self._hot is not None:  # no generation starts from here on: the socket ends with the app's copies
            self._hot.release_listener()
        result = await self.app.stop(cfg.app_signal, cfg.app_timeout)
        app = self.app
        extra = {
            "orphans_reaped": app.orphans_reaped or None,
            "leftovers_signalled": app.leftovers_signalled or None,
            "leftovers_killed": app.leftovers_killed or None,
        }
        if result.killed:
            self.log.error(
                "sidecar.app.killed",
                app=self.app.description,
                how=result.how,
                exit_status=result.status,
                elapsed_ms=self._ms(t),
                **extra,
            )
        else:
            self.log.info(
                "sidecar.app.stopped",
                app=self.app.description,
                how=result.how,
                exit_status=result.status,
                elapsed_ms=self._ms(t),
                **extra,
            )
        return result

    # --- signals ------------------------------------------------------------------

    async def _dispatch_signals(self) -> None:
        while True:
            self._on_signal(await self.inbox.queue.get())

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._hot is not None and sig == self.config.hot_restart.signal:
            self._hot.trigger(
                sig,
                registered=self.status.state is State.REGISTERED,
                stopping=self._shutdown.is_set(),
            )
            return
        if sig in FORWARDED:
            self.app.forward(sig)
            # At info, but not a line per signal of a storm: a flood of info lines would push the drain's
            # own events out of the bounded log queue. The first of each signal in FORWARD_LOG_WINDOW says
            # how many were passed on since its last line; the rest are debug lines (expendable).
            now = self.clock.monotonic()
            last, count = self._forwarded.get(sig, (float("-inf"), 0))
            if now - last >= FORWARD_LOG_WINDOW:
                self._forwarded[sig] = (now, 0)
                self.log.info("sidecar.signal.forwarded", signal=sig.name, since_last_line=count or None)
            else:
                self._forwarded[sig] = (last, count + 1)
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
        return _Interrupted(Interruption.APP_EXITED if self.app.exited.done() else Interruption.SHUTDOWN)

    async def _first(self, work: Awaitable[T], interrupt: Awaitable[Any]) -> tuple[bool, T | None]:
        """Run ``work`` unless ``interrupt`` or the app's exit comes first: (finished, its result)."""
        task: asyncio.Future[Any] = asyncio.ensure_future(work)
        others: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(interrupt),
            asyncio.ensure_future(asyncio.shield(self.app.exited)),
        ]
        try:
            await asyncio.wait({task, *others}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # The wait itself was cancelled: ``work`` (the start-up, a write) must not run on unwatched.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            for f in others:
                f.cancel()
        if task.done():
            result: T = task.result()
            return True, result
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False, None

    def _consul_state(
        self, reachable: bool, error: str | None, level: Literal["warning", "error"] = "warning", retrying: bool = False
    ) -> None:
        """Log Consul reachability changes, not every failed request. An agent that answers again
        clears /status's last_error when it is still the agent's error."""
        if error is not None:
            self.status.last_error = self._consul_error = error
        elif reachable and self._consul_error is not None:
            if self.status.last_error == self._consul_error:
                self.status.last_error = None
            self._consul_error = None
        self.status.consul_reachable = reachable
        if reachable == self._consul_ok:
            return
        self._consul_ok = reachable
        if reachable:
            self.log.info("sidecar.consul.reachable", address=self.agent.address)
        else:
            (self.log.error if level == "error" else self.log.warning)(
                "sidecar.consul.unreachable",
                address=self.agent.address,
                error=error,
                retrying="with jittered backoff, 1s to 30s" if retrying else f"every {self.config.check.interval:g}s",
            )

    def _count_reregistration(self, reason: str) -> None:
        counts = self.status.reregistrations_total
        counts[reason] = counts.get(reason, 0) + 1

    def _acl_hint(self) -> str | None:
        own = getattr(self.agent, "permission_hint", None)  # a registry with access control of its own (etcd)
        if own is not None:
            return str(own())
        if self.config.consul.token.describe() is None:
            return "no ACL token is configured: set consul.token_file (or CONSUL_HTTP_TOKEN_FILE)"
        return f"the token needs service:write on {self.config.service.name!r}"

    def _ms(self, since: float) -> int:
        return round((self.clock.monotonic() - since) * 1000)
