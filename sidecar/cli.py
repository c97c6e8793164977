"""The command line: parse, validate, wire the parts together, map failures to exit codes.

    consul-sidecar run -c FILE [-- COMMAND [ARG...]]
    consul-sidecar check-config -c FILE
    consul-sidecar wait [-c FILE] --service NAME (--id ID --passing | --min-passing N | --id ID --gone)
    consul-sidecar maint -c FILE (--enable [--reason TEXT] | --disable)
    consul-sidecar horizon (-c FILE | --service NAME [--http-addr ADDRESS]) [--json]

Each command imports what it needs when it runs, not here: aiohttp alone (its client loads the
system's CA certificates twice at import) costs several times the interpreter's own start, which
``--version`` and ``check-config`` never need; ``wait``, ``maint`` and ``horizon`` speak to the agent through the
Consul client's blocking transport, without aiohttp, asyncio, structlog or the lifecycle.
tests/test_cli_imports.py holds each command to its list.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .exit_codes import EX_BAD_COMMAND_LINE, EX_CONFIG, EX_INTERRUPTED, EX_SOFTWARE, EX_UNAVAILABLE

if TYPE_CHECKING:
    from .config import Config
    from .drain.record import Learned
    from .registry.token_cache import TokenCache

PROG = "consul-sidecar"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Register an HTTP service in the local Consul agent while it is healthy, and on SIGTERM "
        "take it out of Consul before the app is asked to stop.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the sidecar (wrapper mode with a command after --, alongside mode without)",
        description="Run the sidecar. With a command after '--' it starts the app as its child (wrapper mode); "
        "without one the app runs elsewhere and [app] says how to stop it (alongside mode).",
        usage=f"{PROG} run -c FILE [--log-format auto|json|console] [--log-level LEVEL] [-- COMMAND [ARG...]]",
    )
    run.add_argument("-c", "--config", required=True, type=Path, help="the TOML configuration file")
    run.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: JSON lines unless stderr is a terminal (default)",
    )
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")

    chk = sub.add_parser(
        "check-config",
        help="validate a configuration file and print what would be registered",
        description="Validate the file, print the effective registration as JSON (token redacted) and the "
        "worst-case shutdown time. Exit 0 when valid, 78 when not.",
    )
    chk.add_argument("-c", "--config", required=True, type=Path, help="the TOML configuration file")

    wt = sub.add_parser(
        "wait",
        help="block until Consul shows a condition (for deploy scripts)",
        description="Block until Consul shows the condition, following it with blocking queries; exit 0 when it "
        "holds, 1 at --timeout. Consul settings come from --http-addr, the [consul] section of -c FILE, "
        'or the CONSUL_* environment, in that order. With registry.kind = "etcd" in -c FILE, etcd is read '
        "instead: each key under <prefix>/<service>/ is a passing instance.",
    )
    wt.add_argument(
        "-c", "--config", type=Path, help="a sidecar configuration file (only [consul], or [registry] and [etcd])"
    )
    _http_addr_argument(wt)
    wt.add_argument("--service", required=True, metavar="NAME")
    wt.add_argument("--id", metavar="ID", help="the instance (service ID), with --passing or --gone")
    what = wt.add_mutually_exclusive_group(required=True)
    what.add_argument("--passing", action="store_true", help="the instance --id is registered and all its checks pass")
    what.add_argument("--min-passing", type=int, metavar="N", help="at least N instances pass all their checks")
    what.add_argument("--gone", action="store_true", help="the instance --id is no longer in the catalog")
    wt.add_argument("--timeout", default="60s", metavar="DURATION", help='give up after this long (default "60s")')

    mt = sub.add_parser(
        "maint",
        help="put the configured instance in Consul's maintenance mode, or take it out",
        description="Turn Consul's maintenance mode on or off for the instance -c FILE registers (its service.id), "
        "through the agent, and read it back. Consumers stop routing to an instance in maintenance; the running "
        "sidecar keeps it so until --disable. Needs service:write on the service.",
        usage=f"{PROG} maint -c FILE (--enable [--reason TEXT] | --disable)",
    )
    mt.add_argument("-c", "--config", required=True, type=Path, help="the sidecar's TOML configuration file")
    on_off = mt.add_mutually_exclusive_group(required=True)
    on_off.add_argument("--enable", action="store_true", help="take the instance out of rotation")
    on_off.add_argument("--disable", action="store_true", help="put it back")
    mt.add_argument("--reason", metavar="TEXT", help="with --enable: why, shown by Consul and in /status")

    hz = sub.add_parser(
        "horizon",
        help="what the fleet's drains measured: the horizon's statistics and a recommended propagation delay",
        description="Read the record of the service's last 100 drain horizons from Consul's KV store "
        "(consul-sidecar/horizon/<service>) and print their count, p50, p90, p99 and max, the slowest peers, and "
        "a recommended propagation delay (p99 plus a margin, bounded: docs/drain.md). Exit 0 with a "
        "recommendation, 1 with too few samples for one. Consul settings as for wait.",
        usage=f"{PROG} horizon (-c FILE | --service NAME [--http-addr ADDRESS]) [--json]",
    )
    hz.add_argument("-c", "--config", type=Path, help="the sidecar's configuration file: its service.name and [consul]")
    hz.add_argument("--service", metavar="NAME", help="the service (default: service.name of -c FILE)")
    _http_addr_argument(hz)
    hz.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    return p


def _http_addr_argument(parser: argparse.ArgumentParser) -> None:
    # The consul CLI's name for it (-http-addr; Go takes --http-addr too); --consul-address is the older alias.
    parser.add_argument(
        "--http-addr",
        "-http-addr",
        "--consul-address",
        dest="consul_address",
        metavar="ADDRESS",
        help="the agent, as for the consul CLI: http://127.0.0.1:8500, host:port, unix:///path/to/consul.sock",
    )


def _split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    args = list(argv)
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, []


def _fail(lines: Sequence[str], code: int, secrets: Sequence[str] = ()) -> int:
    """Print ``lines`` (through the scrubber the logs use: no token is ever printed) and return ``code``."""
    from .redact import scrub

    for line in lines:
        print(f"{PROG}: {scrub(line, secrets)}", file=sys.stderr)
    return code


def _token_secrets(config: Config) -> Callable[[], list[str]]:
    """The configured token as a secrets source for the scrubber (``redact.read_secrets`` guards it)."""
    return lambda: [t for t in [config.consul.token.read()] if t]


def main(argv: Sequence[str] | None = None) -> int:
    own, command = _split_command(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(own)
    if extra:
        hint = (
            f" (the app's command goes after '--': {PROG} run -c FILE -- COMMAND [ARG...])"
            if args.command == "run"
            else ""
        )
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if args.command != "run" and command:
        return _fail([f"'{args.command}' takes no command after '--'"], EX_BAD_COMMAND_LINE)
    if args.command == "wait":
        return _wait(args)
    if args.command == "horizon":
        return _horizon(args)
    if args.command == "maint" and args.reason is not None and (args.disable or not args.reason.strip()):
        why = "only with --enable" if args.disable else "must not be empty"
        return _fail([f"maint: --reason: {why}"], EX_BAD_COMMAND_LINE)
    from .config import ConfigError, address_toward, load_config  # the standard library only

    unresolved: list[str] = []

    def lenient_address(host: str, port: int) -> str:
        # check-config may run where the agent's name does not resolve (CI, a laptop): say so, go on.
        try:
            return address_toward(host, port)
        except OSError as e:
            unresolved.append(
                f"service.address is not set and the address toward the Consul agent {host} could not be "
                f"found here ({e.strerror or e}); shown as 127.0.0.1, and `run` would refuse to start"
            )
            return "127.0.0.1"

    try:
        config = load_config(
            args.config, os.environ, local_address=lenient_address if args.command == "check-config" else address_toward
        )
    except ConfigError as e:
        return _fail(e.problems, EX_CONFIG)
    for warning in unresolved:
        print(f"{PROG}: warning: {args.config}: {warning}", file=sys.stderr)
    if args.command == "maint":
        if config.registry.kind.value == "etcd":
            return _fail(
                [f'{config.source}: maint: maintenance mode is Consul\'s; with registry.kind = "etcd" there is none'],
                EX_CONFIG,
            )
        return _maint(config, enable=args.enable, reason=args.reason)
    if args.command == "check-config":
        for warning in config.warnings:
            print(f"{PROG}: warning: {config.source}: {warning}", file=sys.stderr)
        return _check_config(config)
    if not command and config.hot_restart.enabled:
        return _fail(
            [
                f"{config.source}: hot_restart.enabled: needs wrapper mode (the app's command after '--'): "
                "the sidecar must start the app to hand it the listening socket"
            ],
            EX_CONFIG,
        )
    if command and config.app.configured:
        return _fail(
            [
                f"{config.source}: app: [app] is for alongside mode; "
                "with a command after '--' the sidecar starts the app itself"
            ],
            EX_CONFIG,
        )
    import asyncio

    from . import log
    from .registry.token_cache import READ_DEADLINE, TokenCache

    # The token as requests use it, read off the event loop; the log scrubber takes what it holds
    # (never a read of the file per log line).
    tokens = TokenCache(config.consul.token, min(READ_DEADLINE, config.consul.timeout / 2))
    tokens.prime()
    log.configure(fmt=args.log_format, level=args.log_level, secrets=tokens.secrets)
    if not command:
        log.start()  # no child to fork: write from the start (wrapper mode starts it after the spawn)
    for warning in config.warnings:
        log.get_logger().warning("sidecar.config.warning", source=str(config.source), warning=warning)
    from .process.early_signals import hold_shutdown

    # From here until the SignalInbox takes over, SIGINT and SIGTERM are recorded, not acted on: the
    # lifecycle then ends without starting the app, and says why. (asyncio.run would otherwise cancel
    # the start-up on a Ctrl-C at whatever await came next, after the app was spawned.)
    hold_shutdown()
    try:
        return asyncio.run(_run(config, command, tokens))
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers were installed
        return EX_INTERRUPTED
    finally:
        log.close()  # bounded: a stalled log reader loses the last lines, never the exit


def _check_config(config: Config) -> int:
    import json

    from .config import Strategy
    from .config.docs import effective
    from .durations import format_duration
    from .http.server import listen_warnings
    from .registry.registration import registration_payload

    sd = config.shutdown
    shutdown = effective(config, "shutdown")
    if sd.strategy is Strategy.TRAFFIC:
        shutdown |= {
            "dns_name": config.dns_query_name,
            "traffic_view_here": _traffic_view_here(config),
        }
    learned = _learned_now(config) if sd.learned else None
    if learned is not None:
        shutdown["learned_now"] = learned.as_json()
    doc: dict[str, Any] = {
        "consul": effective(config, "consul"),
        "registration": registration_payload(config, passing=config.startup.wait_healthy),
        "startup": effective(config, "startup"),
        "shutdown": shutdown | {"worst_case": format_duration(sd.worst_case), "budget": format_duration(sd.budget)},
        **({"app": effective(config, "app")} if config.app.configured else {}),
        "status": _status_listen(config),
    }
    if config.registry.kind.value == "etcd":  # a Consul user's output stays as it was
        # The key and value the adapter's own functions write (its import brings asyncio: ~40 ms, etcd only).
        from .registry.etcd import etcd_key, etcd_value

        doc.pop("consul")
        doc.pop("registration")  # Consul's service definition: etcd gets the key below and runs the check itself
        doc["registry"] = effective(config, "registry")
        doc["etcd"] = effective(config, "etcd") | {
            "key": etcd_key(config),
            "value": json.loads(etcd_value(config, owner="<the running sidecar's mark>")),
        }
        doc["check"] = {k: v for k, v in effective(config, "check").items() if k != "deregister_critical_after"}
    hot = config.hot_restart
    bind_warning = None
    if hot.enabled:
        from .process.listener import bind_problem

        bind_error, bind_warning = bind_problem(config.service.address, config.service.port)
        if bind_error is not None:
            return _fail([f"{config.source}: hot_restart.enabled: {bind_error}"], EX_CONFIG)
        doc["hot_restart"] = effective(config, "hot_restart") | {
            "worst_case_restart": format_duration(hot.worst_case(sd))
        }
    print(json.dumps(doc, indent=2))
    print(
        f"worst-case shutdown: {format_duration(sd.worst_case)} "
        f"(deregister_timeout + {'learned_max' if sd.learned else 'propagation_delay'} + app_timeout + 1s to reap "
        "after SIGKILL); give the platform's stop timeout at least this much",
        file=sys.stderr,
    )
    if learned is not None:
        print(
            f"learned delay: a drain now would wait {format_duration(learned.delay_s)} after the confirmed "
            f"deregistration: {learned.why}",
            file=sys.stderr,
        )
    if hot.enabled:
        ready = (
            "it sends READY=1 on NOTIFY_SOCKET"
            if hot.ready.value == "notify"
            else f"it has stayed alive for {format_duration(hot.warmup)}"
        )
        print(
            f"hot restart: {hot.signal.name} starts the next generation on the sidecar's socket "
            f"{config.service.address}:{config.service.port} (run with the app's command after '--'); it is ready "
            f"when {ready}, within {format_duration(hot.timeout)}; then the old one gets "
            f"{sd.app_signal.name}. Worst case from the signal to one generation left: "
            f"{format_duration(hot.worst_case(sd))} (timeout + app_timeout + 1s); the worst-case shutdown above "
            "holds during a restart too",
            file=sys.stderr,
        )
    if config.registry.kind.value == "etcd":
        ttl = config.etcd.lease_ttl
        print(
            f"etcd: the key lives on a lease of {format_duration(ttl)}, kept alive every {format_duration(ttl / 3)} "
            f"while check.http passes; a sidecar killed without a drain leaves it for at most {format_duration(ttl)}",
            file=sys.stderr,
        )
    if config.status is not None and config.status.port == 0:
        print(
            f"status: {config.status.host}, on a free port chosen at start (logged as sidecar.status.listening, "
            "shown in /status); set status.listen to a fixed port for a probe",
            file=sys.stderr,
        )
    warnings = [sd.over_budget(), bind_warning]
    if config.status is not None:
        warnings += listen_warnings(config.status.host, config.status.port, config.consul.address)
    for warning in warnings:
        if warning:
            print(f"{PROG}: warning: {config.source}: {warning}", file=sys.stderr)
    return 0


def _status_listen(config: Config) -> str | None:
    from .wiring import status_listen

    return status_listen(config)


def _learned_now(config: Config) -> Learned:
    """What ``propagation_delay = "learned"`` would wait now, from the fleet's record as it is: the drain's
    own rule (drain/record.py ``learned_delay``), read the blocking way within the registry's timeout."""
    from .drain import record

    sd = config.shutdown
    try:
        found, unreadable = record.samples(_read_record(config)), None
    except _RecordUnreadable as e:
        found, unreadable = None, str(e)
    return record.learned_delay(found, sd.learned_min, sd.learned_max, sd.learned_margin, unreadable)


class _RecordUnreadable(Exception):
    """The fleet's record of horizons could not be read: one line saying why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _read_record(config: Config) -> bytes | None:
    """The record of ``config``'s service (drain/record.py), blocking; raises _RecordUnreadable."""
    from .drain import record
    from .exit_codes import EX_NOPERM
    from .registry.consul import ConsulPermissionDenied, ConsulRejected, ConsulUnavailable, read_kv

    key = record.key(config.service.name)
    if config.registry.kind.value == "etcd":
        raise _RecordUnreadable("reading the etcd record here is not supported yet", EX_CONFIG)
    try:
        return read_kv(config.consul, key)
    except ConsulPermissionDenied as e:
        raise _RecordUnreadable(f"{e}; reading the record needs key:read on {key!r}", EX_NOPERM) from None
    except ConsulRejected as e:
        raise _RecordUnreadable(str(e), EX_CONFIG) from None
    except ConsulUnavailable as e:
        raise _RecordUnreadable(str(e), EX_UNAVAILABLE) from None


def _traffic_view_here(config: Config) -> dict[str, Any]:
    """The traffic sources this host and namespace allow now (``run`` chooses again at start)."""
    from .drain.netns_counters import namespace_is_apps, read_counters
    from .drain.tcp_events import can_join
    from .drain.traffic import TrafficWatchError, available

    sources: list[str] = []
    missing: dict[str, str] = {}
    checks = {
        "destroy_events": can_join,
        "passive_opens": lambda: namespace_is_apps(config.service.port),
        "listen_drops": lambda: (True, "") if read_counters() else (False, ""),
        "poll": available,
    }
    for name, check in checks.items():
        try:
            ok, why = check()
        except TrafficWatchError as e:
            ok, why = False, str(e)
        if ok:
            sources.append(name)
        else:
            missing[name] = why
    complete = "destroy_events" in sources or "passive_opens" in sources
    if "poll" not in sources:
        verdict = "the port cannot be seen: the drain waits propagation_delay"
    elif complete:
        verdict = "complete: every connection is seen"
    elif config.shutdown.traffic_poll_only_accepts_misses:
        verdict = "the poll alone (opted in): short connections may be missed"
    else:
        verdict = "the poll alone misses short connections: the drain waits propagation_delay"
    return {"sources": sources, "missing": missing or None, "verdict": verdict}


def _wait(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_consul_settings, load_etcd_settings
    from .durations import format_duration, parse_duration
    from .registry import wait

    if TYPE_CHECKING:
        from .registry.consul import BlockingHealth

    if (args.passing or args.gone) and not args.id:
        return _fail(["wait: --passing and --gone need --id ID"], EX_BAD_COMMAND_LINE)
    if args.min_passing is not None and args.min_passing < 1:
        return _fail([f"wait: --min-passing {args.min_passing}: must be at least 1"], EX_BAD_COMMAND_LINE)
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as e:
        return _fail([f"wait: --timeout: {e}"], EX_BAD_COMMAND_LINE)
    try:
        etcd = load_etcd_settings(args.config, os.environ) if args.config is not None else None
        settings = None if etcd is not None else load_consul_settings(args.config, os.environ, args.consul_address)
    except ConfigError as e:
        return _fail(e.problems, EX_CONFIG)
    if etcd is not None and args.consul_address is not None:
        return _fail(
            [f'wait: --http-addr is the Consul agent\'s; {args.config} has registry.kind = "etcd" (etcd.endpoints)'],
            EX_BAD_COMMAND_LINE,
        )
    tls = None
    if etcd is not None:
        try:
            tls = wait.tls_context(etcd)
        except wait.TlsFileProblem as e:
            return _fail([f"{args.config}: {e}"], EX_CONFIG)
    password = None
    if etcd is not None and etcd.password_file is not None:
        from .config.files import FileProblem, read_capped

        try:
            password = read_capped(etcd.password_file, 4096)[0].decode().rstrip("\r\n")
        except (FileProblem, UnicodeDecodeError) as e:
            why = e if isinstance(e, FileProblem) else f"{etcd.password_file} is not UTF-8 text"
            return _fail([f"{args.config}: etcd.password_file: {why}"], EX_CONFIG)
    if args.passing:
        cond = wait.instance_passing(args.service, args.id)
    elif args.gone:
        cond = wait.instance_gone(args.service, args.id)
    else:
        cond = wait.min_passing(args.service, args.min_passing)

    agent: BlockingHealth | wait.EtcdHealth
    if etcd is not None:
        agent, registry = wait.EtcdHealth(etcd, password, tls), "etcd"
        where = f"etcd {agent.address}, keys under {wait.service_prefix(etcd, args.service)}"
    else:
        from .registry.consul import BlockingHealth

        assert settings is not None
        agent, registry = BlockingHealth(settings), "Consul"
        where = f"Consul {settings.address}"
    print(f"waiting for {cond.description} ({where}, timeout {format_duration(timeout)})", file=sys.stderr)
    try:
        result = wait.wait_for_condition(agent, args.service, cond, timeout, wait.SystemWaitClock(), registry)
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    finally:
        agent.close()
    if result.ok:
        print(f"{cond.description}: after {result.elapsed:.2f}s ({result.last_seen})")
        return 0
    why = result.error or f"timed out after {result.elapsed:.2f}s"
    return _fail([f"wait: {cond.description}: {why}; last seen: {result.last_seen}"], 1, [password] if password else ())


def _horizon(args: argparse.Namespace) -> int:
    """The fleet's record of horizons (drain/record.py): statistics, slowest peers, a recommended delay."""
    import json

    from .config import ConfigError, load_config, load_consul_settings
    from .drain import record
    from .exit_codes import EX_NOPERM

    if args.config is None and not args.service:
        return _fail(["horizon: -c FILE or --service NAME"], EX_BAD_COMMAND_LINE)
    name = args.service
    try:
        if args.config is not None:
            config = load_config(args.config, os.environ, local_address=lambda host, port: "127.0.0.1")
            if config.registry.kind.value == "etcd":
                return _fail(
                    [
                        f'{config.source}: horizon: reads Consul\'s KV store; with registry.kind = "etcd" the '
                        "record is beside etcd.prefix (docs/drain.md): read it with etcdctl get"
                    ],
                    EX_CONFIG,
                )
            name = name or config.service.name
        settings = load_consul_settings(args.config, os.environ, args.consul_address)
    except ConfigError as e:
        return _fail(e.problems, EX_CONFIG)
    from .registry.consul import ConsulPermissionDenied, ConsulRejected, ConsulUnavailable, read_kv

    key = record.key(name)
    try:
        found = record.samples(read_kv(settings, key))
    except ConsulPermissionDenied as e:
        return _fail([f"horizon: {e}; reading the record needs key:read on {key!r}"], EX_NOPERM)
    except ConsulRejected as e:
        return _fail([f"horizon: {e}"], EX_CONFIG)
    except ConsulUnavailable as e:
        return _fail([f"horizon: {e}"], EX_UNAVAILABLE)
    summary = record.summarise(found)
    if args.json:
        print(json.dumps({"service": name, "key": key, **summary.as_json()}, indent=2))
    else:
        print(record.table(name, summary))
    if summary.needed:
        return _fail(
            [
                f"horizon: {summary.count} sample{'s' if summary.count != 1 else ''} of {name!r} under {key!r}; "
                f"a recommendation needs {record.MIN_SAMPLES} ({summary.needed} more drain"
                f"{'s' if summary.needed != 1 else ''} with a measured horizon)"
            ],
            1,
        )
    return 0


def _maint(config: Config, enable: bool, reason: str | None) -> int:
    """Maintenance mode on or off, then read back: only the agent's answer to a read says it holds."""
    from .exit_codes import EX_NOPERM, EX_NOT_REGISTERED
    from .redact import read_secrets
    from .registry.consul import BlockingMaintenance, ConsulError, ConsulPermissionDenied, ConsulRejected

    def fail(lines: Sequence[str], code: int) -> int:
        return _fail(lines, code, read_secrets(_token_secrets(config)))  # an error may carry an echoed token

    svc = config.service
    agent = BlockingMaintenance(config.consul)
    not_registered = (
        f"maint: service {svc.id!r} is not registered in the Consul agent at {agent.address} "
        "(is its sidecar running, against this agent? check-config prints the service.id)"
    )
    what = "maintenance mode on" if enable else "maintenance mode off"
    try:
        if not agent.registered(svc.id):
            return fail([not_registered], EX_NOT_REGISTERED)
        before = agent.maintenance(svc.id)
        if (before is not None) == enable:
            note = ""
            if enable and reason is not None and reason != before:
                note = f"; the reason stays {before!r} (--disable, then --enable, to change it)"
            state = f"in maintenance mode (reason: {before!r})" if enable else "not in maintenance mode"
            print(f"{svc.id}: already {state}{note}")
            return 0
        write_error: ConsulError | None = None
        try:
            if not agent.set(svc.id, enable, reason):
                return fail([not_registered], EX_NOT_REGISTERED)
        except (ConsulPermissionDenied, ConsulRejected):
            raise  # answered: nothing was applied
        except ConsulError as e:  # no answer: maybe applied; the read below decides
            write_error = e
        after = agent.maintenance(svc.id)
    except ConsulPermissionDenied as e:
        return fail(
            [
                f"maint: {e}; maintenance mode needs service:write on {svc.name!r} "
                "(the token from consul.token_file, CONSUL_HTTP_TOKEN_FILE or CONSUL_HTTP_TOKEN)"
            ],
            EX_NOPERM,
        )
    except ConsulRejected as e:
        return fail([f"maint: {e}"], EX_CONFIG)
    except ConsulError as e:
        return fail([f"maint: {what} for {svc.id!r} not done or not confirmed: {e}"], EX_UNAVAILABLE)
    finally:
        agent.close()
    if (after is not None) != enable:
        why = f" (the request: {write_error})" if write_error is not None else ""
        return fail(
            [f"maint: {what} for {svc.id!r} not confirmed: the agent still shows it {'off' if enable else 'on'}{why}"],
            EX_UNAVAILABLE,
        )
    if enable:
        print(
            f"{svc.id}: maintenance mode on (reason: {after!r}): consumers no longer see it; "
            "`maint --disable` puts it back"
        )
    else:
        print(f"{svc.id}: maintenance mode off: consumers see it again once its own check passes")
    return 0


async def _run(config: Config, command: list[str], tokens: TokenCache) -> int:
    from . import log
    from .wiring import WiringError, build_sidecar

    try:
        wired = build_sidecar(config, command, tokens)
    except WiringError as e:
        return _fail([e.problem], EX_CONFIG)
    try:
        return await wired.sidecar.run()
    except Exception:
        log.get_logger().exception("sidecar.crashed", hint="this is a bug in consul-sidecar; the app is being killed")
        return EX_SOFTWARE
    finally:
        await wired.close()
