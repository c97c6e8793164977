"""One drain behind nginx following Consul DNS, with nginx's look-ups on record: what the sidecar measured
as the drain's horizon, and what nginx's resolver says it should be.

The demo's stack (examples/rollout/nginx.py: ``resolver ... valid=Ns``, ``proxy_pass http://$backend``, a new
upstream connection per request), two instances of the example app under sidecars (fixed strategy), and
open-loop load through nginx. Between nginx and Consul DNS sits testkit/dns_relay.py, which writes down
each look-up. The drain:

1. waits for one of nginx's look-ups (its cache of the answer starts anew), then after ``phase`` seconds
   SIGTERMs the first instance's sidecar;
2. reads the sidecar's ``sidecar.consul.deregistered`` (the confirmation's wall-clock time) and
   ``sidecar.drain.done`` (the horizon), and the relay's first look-up whose answer lacks the instance.

nginx keeps an answer while ``valid >= now`` in whole seconds (src/core/ngx_resolver.c: ``rn->valid =
ngx_time() + valid``, cached while ``rn->valid >= ngx_time()``): for V < life <= V + 1 seconds after the
answer, depending on where in its second the answer came. It looks again at the first request after that;
until then it sends new connections to every address of the answer. So the last new connection to the
draining instance comes just before that look-up, and the expected horizon is ``next look-up - confirmation``.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from testkit import Consul, Sidecar, app_command, free_port, private_loopback_net
from testkit.dns_relay import DnsRelay, Lookup

from .consumers import end_drain
from .loadgen import Record, run_load
from .nginx import Nginx


@dataclass(frozen=True)
class NginxDrain:
    """What one drain behind nginx showed. Times are wall-clock seconds (``time.time()``)."""

    valid: int  # nginx's resolver validity, seconds
    source: str  # nginx's address towards the instances (proxy_bind)
    draining: str  # the draining instance's address
    terminated: float  # the SIGTERM
    confirmed: float  # the sidecar's confirmed deregistration (its sidecar.consul.deregistered)
    before: Lookup  # nginx's last look-up before the drain's: its answer named the draining instance
    after: Lookup  # nginx's first look-up whose answer no longer named it
    done: dict[str, Any]  # the sidecar's sidecar.drain.done
    records: list[Record]  # the load's requests

    @property
    def horizon_ms(self) -> int:
        return int(self.done["horizon_ms"])

    @property
    def expected_ms(self) -> float:
        """From the confirmation to nginx's look-up that dropped the instance: the horizon nginx allows."""
        return (self.after.asked - self.confirmed) * 1000

    @property
    def predicted_ms(self) -> float:
        """The same from nginx's validity alone: its cache of ``before`` ends at the next whole second
        after ``valid`` (as nginx counts, in whole seconds)."""
        assert self.before.answered is not None
        return (math.floor(self.before.answered) + self.valid + 1 - self.confirmed) * 1000

    @property
    def cache_ms(self) -> float:
        """How long nginx kept the answer of ``before``: within (valid, valid + 1] s, plus a request's gap."""
        assert self.before.answered is not None
        return (self.after.asked - self.before.answered) * 1000

    @property
    def since_lookup_ms(self) -> float:
        """The horizon counted from nginx's look-up before the drain instead of the confirmation."""
        assert self.before.answered is not None
        return self.horizon_ms + (self.confirmed - self.before.answered) * 1000


def _wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


async def drain_behind_nginx(
    consul: Consul,
    workdir: Path,
    name: str,
    valid: int,
    delay: float,
    rate: float = 100.0,
    phase: float = 0.0,
) -> NginxDrain:
    """Run one drain (see the module's docstring) with ``propagation_delay = delay`` and nginx's ``valid``;
    stops everything it started before it returns, also on failure."""
    net = private_loopback_net()
    addrs, source = (f"{net}.1", f"{net}.2"), f"{net}.9"
    port = free_port()
    sidecars: list[Sidecar] = []
    relay = DnsRelay(("127.0.0.1", consul.dns_port))
    fqdn = f"{name}.service.consul"  # what nginx looks up
    nginx = Nginx(workdir / "nginx", relay.port, free_port(), port, service=name, valid=f"{valid}s", source=source)
    stop = asyncio.Event()
    load: asyncio.Task[list[Record]] | None = None
    with relay:
        try:
            for i, addr in enumerate(addrs):
                config: dict[str, dict[str, Any]] = {
                    "consul": {"address": consul.address},
                    "service": {"name": name, "id": f"{name}-{i}", "address": addr, "port": port},
                    "shutdown": {"app_timeout": "10s", "propagation_delay": f"{delay:g}s"},
                    "status": {"listen": ""},
                }
                sidecars.append(Sidecar(workdir, config, app_command(port, addr)))
            for sc in sidecars:
                await asyncio.to_thread(sc.wait_event, "sidecar.consul.registered")
            await asyncio.to_thread(nginx.start)
            answered: set[str] = set()
            both = asyncio.Event()

            def seen(r: Record) -> None:
                if r.status == 200 and r.backend:
                    answered.add(r.backend.split(":")[0])
                    if answered >= set(addrs):
                        both.set()

            load = asyncio.create_task(run_load(nginx.url, rate, stop, on_record=seen))
            waiting = asyncio.create_task(both.wait())
            await asyncio.wait({load, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if not both.is_set():
                raise AssertionError(f"both instances did not answer through nginx within 30 s: {answered}")

            def terminate() -> float:
                """Right after nginx's next look-up (plus ``phase``): SIGTERM, and its time."""
                n = len(relay.of(fqdn))
                relay.wait(lambda _: len(relay.of(fqdn)) > n, valid + 5, "nginx's next look-up")
                if phase:
                    time.sleep(phase)  # the scenario's phase in nginx's cache period, not a wait for anything
                sent = time.time()
                sidecars[0].send(signal.SIGTERM)
                return sent

            terminated = await asyncio.to_thread(terminate)
            confirmed = _wall(await asyncio.to_thread(sidecars[0].wait_event, "sidecar.consul.deregistered"))
            await asyncio.to_thread(
                relay.wait,
                lambda _: any(x.asked > terminated and addrs[0] not in x.addresses for x in relay.of(fqdn)),
                valid + delay + 10,
                "nginx's look-up that drops the draining instance",
            )
            done = await asyncio.to_thread(sidecars[0].wait_event, "sidecar.drain.done")
            exit_status = await asyncio.to_thread(sidecars[0].wait, 60)
            if exit_status != 0:
                raise AssertionError(f"the draining sidecar exited with {exit_status}:\n{sidecars[0].tail()}")
            stop.set()
            records = await load
            load = None
        finally:
            try:
                await end_drain(stop, load, sidecars)
            finally:
                nginx.stop()
    lookups = relay.of(fqdn)
    after_i = next(i for i, x in enumerate(lookups) if x.asked > terminated and addrs[0] not in x.addresses)
    before = next(x for x in reversed(lookups[:after_i]) if addrs[0] in x.addresses)
    return NginxDrain(valid, source, addrs[0], terminated, confirmed, before, lookups[after_i], done, records)
