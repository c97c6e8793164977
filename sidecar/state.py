"""The record everyone reads: the lifecycle's state, what /status, /ready and /metrics show, why a drain's
wait ended. It imports nothing of ours, so every room may read it and none is tied to another through it.
The lifecycle (and the drain's wait, for its progress) are its only writers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol


class Clock(Protocol):
    """What the record needs of sidecar.clock.Clock (structurally the same)."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class DrainEnd(enum.Enum):
    """Why the wait before the app's signal ended: ``reason`` in ``sidecar.drain.delay_done``.

    The values are logged as they stand and documented: operators match on them.
    """

    FIXED = "fixed delay"
    FIXED_VIEW_UNAVAILABLE = "fixed delay (traffic view unavailable)"
    TRAFFIC_QUIET = "traffic quiet"
    UPPER_BOUND = "upper bound (propagation_delay)"
    UPPER_BOUND_BLIND = "upper bound (traffic view blind to short connections)"
    UPPER_BOUND_VIEW_LOST = "upper bound (traffic view lost)"
    # Decided by the lifecycle, which cuts the wait short:
    SECOND_SIGINT = "second SIGINT"
    APP_EXITED = "the app exited"
    DRAIN_BOUND = "the drain's bound (deregister_timeout + propagation_delay)"


# The ``reason`` label of consul_sidecar_reregistrations_total: the agent no longer held the
# service (restarted without its data), or the ACL token changed.
REREGISTRATION_REASONS = ("service_missing", "token_rotated")


class State(enum.Enum):
    STARTING = "starting"
    REGISTERED = "registered"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class GenerationView:
    """One app generation as /status shows it (hot restart)."""

    generation: int
    pid: int
    state: str  # starting, serving, stopping, exited
    status: str | None = None  # the generation's last STATUS= on NOTIFY_SOCKET
    exit_status: int | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"generation": self.generation, "pid": self.pid, "state": self.state}
        if self.status is not None:
            out["status"] = self.status
        if self.exit_status is not None:
            out["exit_status"] = self.exit_status
        return out


@dataclass(frozen=True)
class AppView:
    """The app as /status shows it: what runs, and its generations under hot restart."""

    description: str
    generations: tuple[GenerationView, ...] | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"description": self.description}
        if self.generations is not None:
            out["generations"] = [g.as_json() for g in self.generations]
        return out


@dataclass(frozen=True)
class DrainProgress:
    """Where the wait before the app's signal is: its strategy, its step, what it sees (traffic)."""

    strategy: str  # fixed, traffic
    step: str  # not started, delay, catalog, dns, traffic, ...
    sources: tuple[str, ...] | None = None  # the traffic view's sources
    complete: bool | None = None  # whether those sources see short connections
    seen: dict[str, Any] = field(default_factory=dict)  # the step's own figures (blind, open connections, ...)

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"strategy": self.strategy, "step": self.step}
        if self.sources is not None:
            out["sources"] = list(self.sources)
        if self.complete is not None:
            out["complete"] = self.complete
        return out | {k: v for k, v in self.seen.items() if v is not None}


@dataclass(frozen=True)
class HotRestartView:
    """Hot restart as /status shows it (when hot_restart.enabled)."""

    state: str = "idle"  # idle, restarting, failed, interrupted
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "failures": self.failures,
            "last_error": self.last_error,
        }


@dataclass
class Status:
    """What the lifecycle reports; the lifecycle is its only writer."""

    clock: Clock
    service_id: str
    state: State = State.STARTING
    since_wall: float = 0.0
    since_mono: float = 0.0
    consul_reachable: bool | None = None
    last_error: str | None = None
    app: AppView | None = None  # once the app has started
    drain: DrainProgress | None = None  # the drain's progress (which step, traffic seen)
    hot_restart: HotRestartView | None = None  # when hot_restart.enabled
    hot_restarts_total: int = 0  # completed hot restarts
    hot_restart_failures_total: int = 0  # hot restarts whose new generation was stopped, the old one serving on
    # For /metrics (sidecar/metrics.py): counters since start, and the last drain's figures.
    registrations_total: int = 0  # registration writes the agent accepted, the keeper's included
    reregistrations_total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REREGISTRATION_REASONS, 0))
    deregistration_seconds: float | None = None  # the last confirmed deregistration took this long
    drain_seconds: float | None = None  # the last wait between the confirmation and the app's signal
    drain_end: str | None = None  # why that wait ended (a DrainEnd value)
    drain_horizon_seconds: float | None = None  # the last measured drain's horizon (0: no new connection)
    drain_new_connections_total: int = 0  # new connections on the app's port after confirmed deregistrations
    maintenance: bool = False  # Consul's maintenance mode, as the keeper last read it
    maintenance_reason: str | None = None

    def __post_init__(self) -> None:
        self.since_wall = self.clock.wall()
        self.since_mono = self.clock.monotonic()

    def enter(self, state: State) -> None:
        self.state = state
        self.since_wall = self.clock.wall()
        self.since_mono = self.clock.monotonic()

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "since": datetime.fromtimestamp(self.since_wall, UTC).isoformat(),
            "seconds_in_state": round(self.clock.monotonic() - self.since_mono, 3),
            "service_id": self.service_id,
            "consul_reachable": self.consul_reachable,
            "last_error": self.last_error,
            "app": self.app.as_json() if self.app is not None else {},
            "drain": self.drain.as_json() if self.drain is not None else None,
            **({"hot_restart": self.hot_restart.as_json()} if self.hot_restart is not None else {}),
            "maintenance": self.maintenance,
            "maintenance_reason": self.maintenance_reason,
        }
