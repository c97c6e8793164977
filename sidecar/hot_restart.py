"""Hot restart: hand the listening socket to the app's next generation, one restart at a time.

The sidecar holds the listening socket (hot_restart.enabled, wrapper mode). On hot_restart.signal,
when the lifecycle lets one start (registered, not stopping, no restart running):

    start generation N+1 with the same socket -> wait until it is ready (READY=1 from it, or warmup
    alive; it holds the socket; and it is seen accepting a probe connection on it, see
    accept_proof.py) within hot_restart.timeout -> it becomes the app -> app_signal to generation N
    -> wait app_timeout -> SIGKILL it and its descendants.

A new generation that exits or is not ready in time is stopped the same way; N keeps serving. The
registration is not touched. One restart at a time: a trigger during one is refused (logged). A
shutdown cancels the restart (``cancel``); the drain stops every generation.

The lifecycle (sidecar/lifecycle.py) decides when: it calls ``start`` before the app starts,
``app_started`` once it has, ``trigger`` for each hot_restart.signal, ``cancel`` when the drain or
the app's exit takes over, ``release_listener`` before it stops the app and ``close`` at the end.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any, Literal

from .clock import Clock
from .config import Config, ReadyMode
from .process.accept_proof import describe_others
from .process.app_control import StopResult
from .process.child import ChildApp
from .process.generations import Generation
from .process.notify import AppNotifySocket, SystemdNotifier
from .state import AppView, GenerationView, HotRestartView, Status

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


class HotRestart:
    """The app's generations (those of a ``ChildApp`` holding the sidecar's listening socket) and their restarts."""

    def __init__(
        self,
        config: Config,
        app: ChildApp,
        clock: Clock,
        status: Status,
        log: FilteringBoundLogger,
        systemd: SystemdNotifier,
        app_notify: AppNotifySocket | None = None,
    ) -> None:
        self.config = config
        self._app = app  # the app as a whole: its exit, its description
        self._gens = app.gens
        self.clock = clock
        self.status = status
        self.log = log
        self.systemd = systemd
        self._app_notify = app_notify
        self._restart: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Before the app starts: /status's hot_restart view, and the apps' NOTIFY_SOCKET."""
        self.status.hot_restart = HotRestartView()
        if self._app_notify is not None:
            self._gens.notify_socket = self._app_notify.env_value
            self._app_notify.start(self._on_app_message)

    def app_started(self) -> None:
        """The app (its first generation) has started: /status follows its generations."""
        for gen in self._gens.generations:
            gen.exited.add_done_callback(lambda _: self.show_generations())
        self.show_generations()

    def trigger(self, sig: signal.Signals, registered: bool, stopping: bool) -> None:
        """hot_restart.signal came: start a restart, or log why not."""
        refused = None
        if stopping or self._app.exited.done():
            refused = "the sidecar is stopping"
        elif self._restart is not None and not self._restart.done():
            refused = "a hot restart is in progress (at most two generations at once)"
        elif not registered:
            refused = "the app is not registered yet"
        if refused is not None:
            self.log.warning("sidecar.hot_restart.refused", signal=sig.name, reason=refused)
            return
        self._restart = asyncio.create_task(self._hot_restart(sig))

    async def cancel(self) -> None:
        """The drain (or the app's exit) takes over every generation: end the restart in progress, if any."""
        restart = self._restart
        if restart is not None:
            restart.cancel()
            await asyncio.gather(restart, return_exceptions=True)

    def release_listener(self) -> None:
        """No generation starts from here on: the socket ends with the app's copies."""
        self._gens.release_listener()

    def close(self) -> None:
        if self._app_notify is not None:
            self._app_notify.close()

    def show_generations(self) -> None:
        """/status's app view: the generations as they are now."""
        self.status.app = AppView(
            self._app.description,
            tuple(
                GenerationView(
                    g.number,
                    g.pid,
                    g.state.value,
                    g.status_text,
                    g.exited.result() if g.exited.done() and not g.exited.cancelled() else None,
                )
                for g in self._gens.generations
            ),
        )

    # --- one restart ----------------------------------------------------------------

    async def _hot_restart(self, sig: signal.Signals) -> None:
        """One hot restart, start to end (see the module docstring). Raises only CancelledError."""
        gens = self._gens
        cfg, sd = self.config.hot_restart, self.config.shutdown
        t0 = self.clock.monotonic()
        old = gens.current
        assert old is not None
        self._hot_state("restarting")
        self.systemd.notify(
            RELOADING="1",
            STATUS=f"hot restart: starting the generation after {old.number}",
            MONOTONIC_USEC=str(int(self.clock.monotonic() * 1_000_000)),
        )
        try:
            try:
                new = gens.start_next()
            except OSError as e:
                self._hot_failed(None, f"cannot start the next generation: {e.__class__.__name__}: {e}", t0)
                return
            new.exited.add_done_callback(lambda _: self.show_generations())
            self.show_generations()
            self.log.info(
                "sidecar.hot_restart.started",
                signal=sig.name,
                generation=new.number,
                pid=new.pid,
                previous_generation=old.number,
                previous_pid=old.pid,
                ready=cfg.ready.value,
                timeout_s=cfg.timeout,
            )
            ready, how, proof = await self._until_ready(new, t0 + cfg.timeout)
            if not ready:
                self._hot_failed(new, how, t0)
                self.systemd.notify(STATUS=f"hot restart failed: stopping generation {new.number}")
                t = self.clock.monotonic()
                result = await gens.stop_generation(new, sd.app_signal, sd.app_timeout)
                self._generation_stopped(new, result, t, "failed")
                gens.forget_exited()
                self.show_generations()
                self.systemd.notify(READY="1", STATUS=f"serving (generation {old.number}; hot restart failed)")
                return
            gens.promote(new)
            self.show_generations()
            (self.log.info if proof.get("accepted_by") else self.log.warning)(
                "sidecar.hot_restart.ready",
                generation=new.number,
                pid=new.pid,
                how=how,
                elapsed_ms=self._ms(t0),
                **proof,
            )
            self.systemd.notify(STATUS=f"hot restart: generation {new.number} serving, stopping {old.number}")
            t = self.clock.monotonic()
            self.log.info(
                "sidecar.hot_restart.old_signalled",
                generation=old.number,
                pid=old.pid,
                signal=sd.app_signal.name,
                app_timeout_s=sd.app_timeout,
            )
            result = await gens.stop_generation(old, sd.app_signal, sd.app_timeout)
            self._generation_stopped(old, result, t, "replaced")
            gens.forget_exited()
            self.status.hot_restarts_total += 1
            self._hot_state("idle", error=None)
            if (self.status.last_error or "").startswith("hot restart failed"):
                self.status.last_error = None  # this one succeeded: the failure is history (counted in the metrics)
            self.show_generations()
            self.log.info(
                "sidecar.hot_restart.done",
                generation=new.number,
                pid=new.pid,
                restarts=self.status.hot_restarts_total,
                elapsed_ms=self._ms(t0),
            )
            self.systemd.notify(READY="1", STATUS=f"serving (generation {new.number})")
        except asyncio.CancelledError:
            self._hot_state("interrupted")
            self.log.info("sidecar.hot_restart.interrupted", reason="the sidecar is stopping", elapsed_ms=self._ms(t0))
            raise
        except Exception as e:  # a bug: say so; the generations are left as they are, the drain ends them all
            self._hot_failed(None, f"unexpected {e.__class__.__name__}: {e}", t0)
            self.log.exception("sidecar.hot_restart.crashed", hint="this is a bug in consul-sidecar")

    async def _until_ready(self, gen: Generation, deadline: float) -> tuple[bool, str, dict[str, Any]]:
        """(True, how, the accept proof's fields) once ``gen`` is ready and seen accepting on the listening
        socket; (False, why, {}) when it exits or ``deadline`` passes first."""
        cfg = self.config.hot_restart
        wait: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(asyncio.shield(gen.exited)),
            asyncio.ensure_future(self.clock.sleep(max(0.0, deadline - self.clock.monotonic()))),
        ]
        if cfg.ready is ReadyMode.NOTIFY:
            ready: asyncio.Future[Any] = asyncio.ensure_future(gen.ready.wait())
        else:
            ready = asyncio.ensure_future(self.clock.sleep(cfg.warmup))
        try:
            await asyncio.wait({ready, *wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (ready, *wait):
                f.cancel()
        exited = f"generation {gen.number} exited with status {{}} before it was ready"
        if gen.exited.done():
            return False, exited.format(gen.exited.result()), {}
        if ready.done() and not ready.cancelled():
            how = "READY=1" if cfg.ready is ReadyMode.NOTIFY else f"alive for warmup {cfg.warmup:g}s"
            # Else the old generation would be stopped with nobody left to accept: connections would
            # queue unanswered and the check go critical.
            gens = self._gens
            if gens.holds_listener(gen) is False:
                return (
                    False,
                    (
                        f"generation {gen.number} is ready ({how}) but does not hold the listening socket (fd 3): "
                        "it could not accept a connection (does it take the socket by socket activation?)"
                    ),
                    {},
                )
            t = self.clock.monotonic()
            proof = await gens.seen_accepting(gen, deadline)
            if gen.exited.done():
                return False, exited.format(gen.exited.result()), {}
            fields: dict[str, Any] = {"probes": proof.probes, "proof_ms": self._ms(t)}
            if proof.seen is None:
                return True, f"{how}; accepting not checked: {proof.detail}", fields
            if proof.seen:
                return True, how, {**fields, "accepted_by": proof.accepted_by}
            took = describe_others(proof.by_others, gens.name_process)
            return (
                False,
                (
                    f"generation {gen.number} is ready ({how}) but was not seen accepting on the listening socket "
                    f"(fd 3) within hot_restart.timeout {cfg.timeout:g}s: {proof.probes} probe connection(s), "
                    f"{'accepted ' + took if took else 'none seen accepted'} (does it serve on fd 3, "
                    "or another port?)"
                ),
                {},
            )
        said = " (it never sent READY=1 on NOTIFY_SOCKET)" if cfg.ready is ReadyMode.NOTIFY else ""
        return False, f"generation {gen.number} was not ready within hot_restart.timeout {cfg.timeout:g}s{said}", {}

    def _hot_failed(self, gen: Generation | None, why: str, t0: float) -> None:
        self.status.hot_restart_failures_total += 1
        self.status.last_error = f"hot restart failed: {why}"
        self._hot_state("failed", error=why)
        self.log.error(
            "sidecar.hot_restart.failed",
            generation=gen.number if gen else None,
            pid=gen.pid if gen else None,
            reason=why,
            elapsed_ms=self._ms(t0),
            hint="the previous generation keeps serving",
        )

    def _generation_stopped(self, gen: Generation, result: StopResult, t: float, why: str) -> None:
        (self.log.error if result.killed else self.log.info)(
            "sidecar.hot_restart.generation_stopped",
            generation=gen.number,
            pid=gen.pid,
            why=why,
            how=result.how,
            exit_status=result.status,
            elapsed_ms=self._ms(t),
        )

    def _hot_state(self, state: str, error: str | None | Literal[False] = False) -> None:
        view = self.status.hot_restart
        if view is None:
            return
        self.status.hot_restart = HotRestartView(
            state,
            self.status.hot_restarts_total,
            self.status.hot_restart_failures_total,
            view.last_error if error is False else error,
        )

    def _on_app_message(self, pid: int, fields: dict[str, str]) -> None:
        """A message on the apps' NOTIFY_SOCKET, attributed to a generation by its sender's PID."""
        gen = self._gens.generation_of(pid)
        if gen is None:
            self.log.debug("sidecar.hot_restart.notify_unknown_sender", sender_pid=pid, fields=sorted(fields))
            return
        if "STATUS" in fields:
            gen.status_text = fields["STATUS"][:200]
        if fields.get("READY") == "1" and not gen.ready.is_set():
            gen.ready.set()
            self.log.debug("sidecar.hot_restart.notify_ready", generation=gen.number, pid=pid)
        if fields.get("STOPPING") == "1":
            self.log.debug("sidecar.hot_restart.notify_stopping", generation=gen.number, pid=pid)
        self.show_generations()

    def _ms(self, since: float) -> int:
        return round((self.clock.monotonic() - since) * 1000)
