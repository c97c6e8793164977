"""What the lifecycle knows of a registry, whichever one it is (Consul, etcd): the protocol it speaks to,
the outcome of a deregistration, and the errors it can act on.

The lifecycle imports this module and no registry client: wiring.py picks the adapter
(registry/consul.py or registry/etcd.py) by ``registry.kind``. Each adapter's errors subclass
these three, so the lifecycle's decisions (retry, exit 77, exit 78, "maybe applied") are one set.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class RegistryError(Exception):
    """A request to the registry failed. Its message never carries a secret (a token, a password)."""


class RegistryUnavailable(RegistryError):
    """No answer, a timeout or a server error: retrying may help.

    ``maybe_applied`` is False only when the request cannot have reached the registry (the
    connection was refused or the name did not resolve): then a write is known not to be done.
    """

    def __init__(self, message: str, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class RegistryPermissionDenied(RegistryError):
    """Refused by the registry's access control (ACLs, auth): retrying with the same credentials will not help."""


class RegistryRejected(RegistryError):
    """The registry refused the request as malformed, or the configuration cannot work with it."""


class Deregistration(enum.Enum):
    CONFIRMED = "confirmed"  # the agent and the catalog (or etcd, by a linearizable read) no longer list the instance
    # The agent dropped it; the servers cannot answer a catalog read (no cluster leader, an election
    # under way): the agent syncs the removal once they can.
    NO_LEADER = "no_leader"
    # The agent dropped it; a leader answers and its catalog still lists it, on an agent that does
    # not enforce ACLs: the agent's sync to the servers has not succeeded yet.
    CATALOG_STALE = "catalog_stale"
    # The agent dropped it; a leader answers and its catalog still lists it, on an agent that
    # enforces ACLs: its sync is most likely refused (the registering token is gone).
    BLOCKED = "blocked"
    UNCONFIRMED = "unconfirmed"  # the agent still holds it, or never answered before the deadline


@dataclass(frozen=True)
class DeregisterResult:
    outcome: Deregistration
    attempts: int
    error: str | None
    answered: bool = True  # False: no round finished before the deadline, the outcome says nothing new
    agent_dropped: bool = False  # the agent's own answer showed it no longer holds the instance
    # What the instance's fate is when it stays unconfirmed, in the registry's own terms (etcd: its
    # lease's TTL); None: the lifecycle's words for Consul.
    hint: str | None = None


@runtime_checkable
class Agent(Protocol):
    """What the lifecycle needs from a registry; tests of pure logic may pass a fake.

    Entries are read back in one shape whatever the registry: a dict with ``Address``, ``Port`` and
    ``Meta`` (the owner mark under OWNER_META_KEY), as Consul's agent answers.
    """

    address: str

    async def register(self, payload: dict[str, Any]) -> None: ...

    def token_rotated(self) -> bool: ...

    async def registered(self, service_id: str) -> dict[str, Any] | None: ...

    async def check_status(self, service_id: str) -> str | None: ...

    async def maintenance(self, service_id: str) -> str | None: ...

    async def set_maintenance(self, service_id: str, enable: bool, reason: str | None) -> bool: ...

    async def catalog_lists(self, name: str, service_id: str, consistent: bool = False) -> bool: ...

    async def check_catalog_visibility(self, name: str, service_id: str) -> bool: ...

    async def deregister_confirmed(self, name: str, service_id: str, deadline: float) -> DeregisterResult: ...

    async def close(self) -> None: ...


@runtime_checkable
class KeyValueStore(Protocol):
    """A registry with a key-value store written with check-and-set (Consul's KV): where the fleet's record
    of drain horizons is kept (drain/record.py)."""

    async def read_kv(self, key: str) -> tuple[int, bytes | None]: ...

    async def update_kv(
        self, key: str, change: Callable[[bytes | None], bytes], read: tuple[int, bytes | None] | None = None
    ) -> int: ...
