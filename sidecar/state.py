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
    app: dict[str, Any] = field(default_factory=dict)
    drain: dict[str, Any] | None = None  # the drain's progress (which step, traffic seen)
    hot_restart: dict[str, Any] | None = None  # {state, restarts, last_error} when hot_restart.enabled
    hot_restarts_total: int = 0  # completed hot restarts
    hot_restart_failures_total: int = 0  # hot restarts whose new generation was stopped, the old one serving on
    # For /metrics (sidecar/metrics.py): counters since start, and the last drain's figures.
    registrations_total: int = 0  # registration writes the agent accepted, the keeper's included
    reregistrations_total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REREGISTRATION_REASONS, 0))
    deregistration_seconds: float | None = None  # the last confirmed deregistration took this long
    drain_seconds: float | None = None  # the last wait between the confirmation and the app's signal
    drain_end: str | None = None  # why that wait ended (a DrainEnd value)
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
            "app": self.app,
            "drain": self.drain,
            **({"hot_restart": self.hot_restart} if self.hot_restart is not None else {}),
            "maintenance": self.maintenance,
            "maintenance_reason": self.maintenance_reason,
        }
