"""Static checks of the Docker Compose demo: everything that can be checked without a Docker engine.

(a) docker-compose.yml is valid against the Compose Specification's JSON schema
    (tests/data/compose-spec.json, see tests/data/README.md);
(b) every container that runs the sidecar has a stop_grace_period above the worst-case
    shutdown of the configuration file it really runs with;
(c) ``nginx -t`` accepts config/nginx-compose.conf, and nginx's resolver is the consul
    service, by name (no fixed address or subnet: two copies of the stack fit on one daemon);
(d) the sidecar configurations pass ``consul-sidecar check-config``;
plus the Dockerfile's essentials, what lets two copies run side by side (host ports from the
environment, no fixed subnet or address, one version variable per rollout unit), and the
scripts' syntax (bash -n, shellcheck).

Needs jsonschema and PyYAML, and nginx on the machine (the nginx test fails, not skips,
without it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sidecar.config import load_config
from sidecar.durations import parse_duration

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
NGINX_CONF = ROOT / "config" / "nginx-compose.conf"
DOCKERFILE = ROOT / "Dockerfile"
ROLLOUT_SCRIPT = ROOT / "scripts" / "compose-rollout"
SHELL_SCRIPTS = ("compose-rollout", "compose-demo", "compose-images", "install-docker")
SIDECAR_CONFIGS = ("config/compose-web.toml", "config/compose-alongside.toml")

DOCKER_DEFAULT_STOP_TIMEOUT = 10.0  # seconds, when a service sets no stop_grace_period
NGINX_PLACES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
# What the sidecar would see in a container: its hostname and its IP on the compose network.
CONTAINER_HOSTNAME = "0123456789ab"
CONTAINER_IP = "172.30.53.130"


# --- reading the files ------------------------------------------------------------------


def compose_file() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)  # merge keys (<<: *anchor) are resolved here, as compose does
    assert isinstance(doc, dict), f"{COMPOSE_FILE}: not a mapping"
    return doc


_COMPOSE_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's variable interpolation (the forms this project uses: $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, $$)."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        value = variables.get(name)
        if m.group(2) == ":-" and not value:
            return m.group(3)
        if m.group(2) == "-" and value is None:
            return m.group(3)
        return value or ""

    return _COMPOSE_VAR.sub(repl, text)


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """The service's `environment`, interpolated as with no variables set on the host (the defaults)."""
    raw = service.get("environment") or {}
    pairs = raw.items() if isinstance(raw, dict) else (item.partition("=")[::2] for item in raw)
    return {str(k): interpolate("" if v is None else str(v), {}) for k, v in pairs}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def image_defaults() -> tuple[list[str], list[str], dict[str, str]]:
    """The project image's ENTRYPOINT, CMD and {container path: project file} of its COPYs."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    copies: dict[str, str] = {}
    for op, rest in dockerfile_instructions():
        if op == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif op == "CMD":
            cmd = json.loads(rest)
        elif op == "COPY":
            parts = rest.split()
            if len(parts) == 2 and not parts[0].startswith("--"):
                copies[parts[1]] = parts[0]
    return entrypoint, cmd, copies


def builds_project_image(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (ROOT / context).resolve() == ROOT and dockerfile == "Dockerfile"


def as_argv(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def sidecar_config_of(name: str, service: Mapping[str, Any]) -> Path | None:
    """The project file holding the sidecar configuration this service's containers run with,
    or None when they do not run the sidecar (another image, or the entrypoint overridden)."""
    if not builds_project_image(service):
        return None
    entrypoint, cmd, copies = image_defaults()
    if "entrypoint" in service and as_argv(service["entrypoint"]) != entrypoint:
        return None
    argv = as_argv(service["command"]) if "command" in service else cmd
    own = argv[: argv.index("--")] if "--" in argv else argv
    if not own or own[0] != "run":
        return None
    path = None
    for i, arg in enumerate(own):
        if arg in ("-c", "--config") and i + 1 < len(own):
            path = own[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    assert path is not None, f"service {name}: 'consul-sidecar run' without -c"
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if target == path and source.startswith((".", "/")):
            return (ROOT / source).resolve()
    if path in copies:
        return (ROOT / copies[path]).resolve()
    pytest.fail(f"service {name}: the sidecar reads {path}, which is neither bind-mounted nor copied into the image")


def sidecar_services() -> dict[str, Path]:
    services = compose_file()["services"]
    found = {name: sidecar_config_of(name, svc) for name, svc in services.items()}
    return {name: path for name, path in found.items() if path is not None}


def load(config: Path, env: Mapping[str, str]) -> Any:
    return load_config(config, env, hostname=lambda: CONTAINER_HOSTNAME, local_address=lambda host, port: CONTAINER_IP)


def nginx_directives() -> str:
    """config/nginx-compose.conf without comments."""
    return re.sub(r"#[^\n]*", "", NGINX_CONF.read_text(encoding="utf-8"))


# --- (a) the Compose schema ---------------------------------------------------------------


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()

    @checker.checks("duration", raises=ValueError)
    def _duration(value: object) -> bool:  # Go durations, as compose parses them
        if isinstance(value, str) and "$" not in value:
            parse_duration(value)
        return True

    @checker.checks("subnet_ip_address", raises=ValueError)
    def _subnet(value: object) -> bool:
        if isinstance(value, str):
            ipaddress.ip_network(value)
        return True

    return checker


def test_compose_file_is_valid_against_the_compose_specification_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    # The file's "$schema" (http://json-schema.org/draft/2019-09/schema#) is not the exact
    # URI jsonschema knows, so name the draft instead of letting it guess.
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema, format_checker=_format_checker())
    errors = sorted(validator.iter_errors(compose_file()), key=lambda e: list(e.absolute_path))
    assert not errors, "docker-compose.yml does not match the Compose schema:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors
    )


# --- (b) stop_grace_period against the sidecar's worst-case shutdown ---------------------


def test_every_sidecar_container_outlasts_the_sidecars_worst_case_shutdown() -> None:
    services = compose_file()["services"]
    managed = sidecar_services()
    # Both modes are there; otherwise this test would check nothing.
    assert {"web", "web-alongside-sidecar"} <= set(managed), f"sidecar services found: {sorted(managed)}"
    used = {str(path.relative_to(ROOT)) for path in managed.values()}
    assert used <= set(SIDECAR_CONFIGS), (
        f"configs used {sorted(used)}; add new ones to SIDECAR_CONFIGS (check-config test)"
    )

    problems = []
    for name, config_path in sorted(managed.items()):
        service = services[name]
        raw = service.get("stop_grace_period")
        grace = DOCKER_DEFAULT_STOP_TIMEOUT if raw is None else parse_duration(interpolate(str(raw), {}))
        worst = load(config_path, service_environment(service)).shutdown.worst_case
        if not grace > worst:
            problems.append(
                f"service {name}: stop_grace_period {raw or 'unset (10s)'} is not above the worst-case "
                f"shutdown {worst:g}s of {config_path.relative_to(ROOT)} "
                "(deregister_timeout + propagation_delay + app_timeout + 1s)"
            )
    assert not problems, "\n".join(problems)


# --- (c) nginx ------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_PLACES if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail(
            "nginx is not installed, so config/nginx-compose.conf cannot be checked with `nginx -t`; "
            "install it (Debian: apt-get install nginx-light) and run the tests again"
        )
    return found


@pytest.mark.integration
def test_nginx_accepts_the_compose_configuration(tmp_path: Path) -> None:
    nginx = nginx_binary()
    # The resolver is the consul service by name, which only Docker's embedded DNS knows:
    # nginx resolves it when it loads the file, so the copy checked here names 127.0.0.1
    # instead (upstream names are resolved per request, never at load). A prefix of our own
    # keeps nginx away from system paths.
    conf = tmp_path / "nginx.conf"
    text = NGINX_CONF.read_text(encoding="utf-8")
    assert "resolver consul:8600 " in text
    conf.write_text(text.replace("resolver consul:8600 ", "resolver 127.0.0.1:8600 "), encoding="utf-8")
    result = subprocess.run(
        [nginx, "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"nginx -t rejects {NGINX_CONF.relative_to(ROOT)}:\n{result.stderr}"


def test_nginx_resolves_consul_dns_through_the_consul_service_by_name() -> None:
    conf = nginx_directives()
    doc = compose_file()
    services = doc["services"]

    resolvers = re.findall(r"^\s*resolver\s+([^;]+);", conf, re.M)
    assert len(resolvers) == 1, f"expected one resolver directive, found {resolvers}"
    address, *options = resolvers[0].split()
    host, _, port = address.rpartition(":")
    assert host == "consul", (
        f"resolver {address}: the consul service's name (Docker's DNS resolves it when nginx loads)"
    )
    assert port == "8600", f"resolver {address}: Consul DNS listens on 8600"
    assert "valid=1s" in options and "ipv6=off" in options, f"resolver options {options}"

    consul = services["consul"]
    command = as_argv(consul["command"])
    assert "-dev" in command and "-client=0.0.0.0" in command and "-dns-port=8600" in command, command
    # nginx looks the name up once, at load: consul must be there (and answering) by then.
    depends = services["nginx"]["depends_on"]
    assert isinstance(depends, dict) and depends.get("consul", {}).get("condition") == "service_healthy", depends
    nets = set(consul["networks"]) & set(services["nginx"]["networks"])
    assert nets, "nginx is not on the consul container's network"


def test_two_copies_of_the_stack_can_run_on_one_daemon() -> None:
    """No fixed subnet, address or container name; every host port comes from the environment."""
    doc = compose_file()
    for name, net in (doc.get("networks") or {}).items():
        assert not (net or {}).get("ipam"), f"network {name}: a fixed subnet collides with a second copy of the stack"
    for name, service in doc["services"].items():
        assert "container_name" not in service, f"service {name}: container_name allows one copy per daemon"
        nets = service.get("networks") or []
        if isinstance(nets, dict):
            for net, cfg in nets.items():
                assert not (cfg or {}).get("ipv4_address"), f"service {name}: fixed address on {net}"
        for port in service.get("ports") or []:
            published = str(port).rsplit(":", 1)[0]
            assert "${" in published, f"service {name}: host port in {port!r} is fixed; take it from the environment"


def test_each_rollout_unit_has_its_own_version_variable() -> None:
    """web and the alongside pair each follow one variable, so rolling one of them never leaves
    the other differing from the compose file (a plain `up -d` would recreate it without a surge)."""
    services = compose_file()["services"]
    raw = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "APP_VERSION:-" not in raw.replace("$$APP_VERSION", ""), (
        "a shared ${APP_VERSION} is back in docker-compose.yml"
    )

    def variables(service: Mapping[str, Any]) -> set[str]:
        text = json.dumps({k: v for k, v in service.items() if k in ("environment", "command")})
        return set(re.findall(r"\$\{([A-Z_]+_VERSION)", text))

    assert variables(services["web"]) == {"WEB_VERSION"}
    assert variables(services["web-alongside"]) == variables(services["web-alongside-sidecar"]) == {"ALONGSIDE_VERSION"}
    assert (
        variables(services["web-alongside-standby"])
        == variables(services["web-alongside-standby-sidecar"])
        == {"ALONGSIDE_STANDBY_VERSION"}
    )


def test_nginx_routes_to_the_names_the_sidecars_register_without_retries() -> None:
    conf = nginx_directives()
    doc = compose_file()
    nginx = doc["services"]["nginx"]
    assert re.search(r"^\s*listen\s+80\s*;", conf, re.M), "nginx must listen on 80"
    assert [interpolate(str(p), {}) for p in nginx["ports"]] == ["8080:80"], (
        "nginx: the host's $NGINX_PORT, 8080 by default"
    )
    assert f"./{NGINX_CONF.relative_to(ROOT)}:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert re.search(r"^\s*proxy_next_upstream\s+off\s*;", conf, re.M), "proxy_next_upstream off is required"

    # proxy_pass with a variable: nginx resolves the name per request through the resolver.
    for target in re.findall(r"^\s*proxy_pass\s+([^;]+);", conf, re.M):
        assert "$" in target, f"proxy_pass {target}: without a variable nginx resolves it once, at start-up"
    wanted = set(re.findall(r"([A-Za-z0-9_-]+)\.service\.consul", conf))
    services = doc["services"]
    registered = {
        load(path, service_environment(services[name])).service.name for name, path in sidecar_services().items()
    }
    assert wanted and wanted <= registered, (
        f"nginx asks Consul DNS for {sorted(wanted)}; sidecars register {sorted(registered)}"
    )


# --- (d) check-config -------------------------------------------------------------------------


def sidecar_cli() -> list[str]:
    script = Path(sys.executable).with_name("consul-sidecar")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sidecar"]


@pytest.mark.integration
@pytest.mark.parametrize("config", SIDECAR_CONFIGS)
def test_sidecar_config_passes_check_config(config: str) -> None:
    path = ROOT / config
    # The environment a container of the service has: nothing inherited that the file reads,
    # plus the service's own environment from the compose file.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CONSUL_") and k not in ("SERVICE_ADDRESS", "APP_VERSION")
    }
    services = compose_file()["services"]
    for name, used in sidecar_services().items():
        if used == path.resolve():
            env.update(service_environment(services[name]))
    result = subprocess.run(
        [*sidecar_cli(), "check-config", "-c", str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, f"check-config rejects {config}:\n{result.stderr}"
    shown = json.loads(result.stdout)
    assert parse_duration(shown["shutdown"]["worst_case"]) == load(path, env).shutdown.worst_case


# --- the image and the rollout script ---------------------------------------------------------


def test_dockerfile_installs_the_project_and_runs_the_sidecar_as_non_root() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.partition("=")[::2] for op, rest in instructions if op == "ARG")
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms == ["${BASE_IMAGE}"], f"FROM {froms}: the base image is the build argument BASE_IMAGE"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args.get("BASE_IMAGE", "")), (
        f"ARG BASE_IMAGE={args.get('BASE_IMAGE')}: python 3.11 slim by default, pinned to a patch release"
    )
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"USER {users}"
    run = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "pip install /src" in run
    # Offline: from a wheelhouse in the build context, without any index.
    assert "WHEELHOUSE" in args and "--no-index --find-links" in run
    entrypoint, cmd, copies = image_defaults()
    assert entrypoint == ["consul-sidecar"]
    assert cmd[:1] == ["run"]
    assert copies.get("/app/examples/app/app.py") == "examples/app/app.py"


def test_dockerfile_stop_signal_and_healthcheck_match_the_sidecar_config() -> None:
    """STOPSIGNAL is the one the sidecar drains on; the HEALTHCHECK asks /ready on the status endpoint
    both compose sidecar configs listen on (a port-0 default there would make every container unhealthy)."""
    instructions = dockerfile_instructions()
    assert [rest for op, rest in instructions if op == "STOPSIGNAL"] == ["SIGTERM"]
    health = [rest for op, rest in instructions if op == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0], health
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    url = re.search(r"SIDECAR_HEALTH_URL=(\S+)", env)
    assert url is not None and "SIDECAR_HEALTH_URL" in health[0], (env, health)
    for name in ("compose-web.toml", "compose-alongside.toml"):  # both sidecar containers run this image
        status = load(ROOT / "config" / name, {}).status
        assert status is not None, f"config/{name} must keep its status endpoint: the HEALTHCHECK asks it"
        listen = f"{status.host}:{status.port}"
        assert url.group(1) == f"http://{listen}/ready", (
            f"HEALTHCHECK asks {url.group(1)}; config/{name} listens on {listen}"
        )


@pytest.mark.integration
@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_compose_scripts_are_valid_bash(script: str) -> None:
    path = ROOT / "scripts" / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.access(path, os.X_OK), f"{path} is not executable"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is not installed: scripts/setup installs it (apt-get install shellcheck)"
    result = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_rollout_script_never_passes_no_deps_to_compose() -> None:
    """Compose v2.26.0-2.29.2 change the config-hash label of containers created with --no-deps;
    a later plain `up -d` then recreated every new container at once."""
    commands = [ln for ln in ROLLOUT_SCRIPT.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in commands if "--no-deps" in ln]
    assert any("--no-recreate" in ln for ln in commands)
