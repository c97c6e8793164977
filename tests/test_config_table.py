"""The key table (sidecar/config/keys.py) is the one source of the configuration: the loader validates
every key in it, the settings' defaults are its defaults, and docs/configuration.md is generated from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.config import KEYS, SECTIONS, Config, ConfigError, Key, Kind, Strategy, load_config, loader
from sidecar.config import docs as config_docs
from sidecar.config.keys import BY_PATH, default
from sidecar.config.model import (
    AppSettings,
    CheckSettings,
    ConsulSettings,
    EtcdSettings,
    HotRestartSettings,
    RegistrySettings,
    ServiceSettings,
    ShutdownSettings,
    StartupSettings,
    StatusSettings,
)

MINIMAL = '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\n'

# A TOML value of the wrong type for each kind of key.
WRONG = {Kind.BOOL: '"maybe"', Kind.INTEGER: "[1]", Kind.STRINGS: "5", Kind.TABLE: "5"}


def load(tmp_path: Path, text: str) -> object:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p, {}, hostname=lambda: "h", local_address=lambda h, p: "10.9.8.7")


def test_docs_are_generated_from_the_table() -> None:
    """docs/configuration.md is exactly what the table renders (regenerate: python -m sidecar.config.docs),
    and names every key."""
    text = config_docs.DOC_PATH.read_text()
    assert text == config_docs.render_markdown(), "docs/configuration.md is stale: run `python -m sidecar.config.docs`"
    for key in KEYS:
        assert f"| `{key.name}` |" in text


def test_stale_docs_are_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staleness check can fail: a copy with one edited line makes `--check` exit 1; the fresh one 0."""
    copy = tmp_path / "configuration.md"
    monkeypatch.setattr(config_docs, "DOC_PATH", copy)
    assert config_docs.main([]) == 0 and config_docs.main(["--check"]) == 0
    copy.write_text(copy.read_text().replace('`"5s"`', '`"6s"`', 1))
    assert config_docs.main(["--check"]) == 1


@pytest.mark.parametrize("key", KEYS, ids=[k.path for k in KEYS])
def test_the_loader_validates_every_key_in_the_table(tmp_path: Path, key: Key) -> None:
    """Each key of the table, given a value of the wrong type, is one problem naming that key:
    a key added to the table but not read by the loader fails here."""
    doc: dict[str, dict[str, str]] = {"service": {"name": '"web"', "port": "8080", "address": '"127.0.0.2"'}}
    doc.setdefault(key.section, {})[key.name] = WRONG.get(key.kind, "1")  # every other kind is a string
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for s, keys in doc.items())
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert any(f": {key.path}: " in line for line in e.value.problems), (text, e.value.problems)


def test_settings_defaults_are_the_tables() -> None:
    """What a file that sets nothing gets equals the settings' own defaults, which equal the table's."""
    sd = ShutdownSettings()
    assert (sd.propagation_delay, sd.app_timeout, sd.strategy) == (5.0, 20.0, Strategy.FIXED)
    assert (sd.learned, sd.learned_margin) == (False, None)  # propagation_delay's second field; no static default
    for f in dataclasses.fields(ShutdownSettings):
        if f.name not in ("dns", "propagation_delay", "learned", "learned_margin"):
            assert getattr(sd, f.name) == default(f"shutdown.{f.name}"), f.name
    assert sd.propagation_delay == default("shutdown.propagation_delay")[0]
    assert StartupSettings() == StartupSettings(default("startup.wait_healthy"), default("startup.timeout"))
    assert (StatusSettings().host, StatusSettings().port) == ("127.0.0.1", 0)


def test_a_minimal_file_gets_the_settings_defaults(tmp_path: Path) -> None:
    """The loader and the settings classes agree on every default (one source, not two)."""
    c = load(tmp_path, MINIMAL)
    assert c.shutdown == ShutdownSettings()  # type: ignore[attr-defined]
    assert c.startup == StartupSettings()  # type: ignore[attr-defined]
    assert c.check == CheckSettings(http="http://127.0.0.2:8080/healthz")  # type: ignore[attr-defined]
    assert c.status == StatusSettings()  # type: ignore[attr-defined]


def test_strategy_is_an_enum(tmp_path: Path) -> None:
    """shutdown.strategy is parsed into Strategy; an unknown value is one problem naming the key and both choices."""
    c = load(tmp_path, MINIMAL + '[shutdown]\nstrategy = "traffic"\npropagation_delay = "30s"\n')
    assert c.shutdown.strategy is Strategy.TRAFFIC  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as e:
        load(tmp_path, MINIMAL + '[shutdown]\nstrategy = "fast"\n')
    [line] = e.value.problems
    assert "shutdown.strategy" in line and '"fixed"' in line and '"traffic"' in line


# --- the table parses: environment, one default, the model's fields ---------------------------------

SETTINGS_OF: dict[str, type] = {
    "consul": ConsulSettings,
    "service": ServiceSettings,
    "check": CheckSettings,
    "startup": StartupSettings,
    "shutdown": ShutdownSettings,
    "app": AppSettings,
    "status": StatusSettings,
    "hot_restart": HotRestartSettings,
    "registry": RegistrySettings,
    "etcd": EtcdSettings,
}

# A CA certificate (self-signed, EC), for a CA directory: CONSUL_CAPATH's files must hold PEM certificates.
CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBiTCCAS+gAwIBAgIUOtyHwt8jDl9gsAaeJzWjT+hFnjYwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOY29uZmlnLXRlc3QtY2EwIBcNMjYxMjA2MDYwNDE5WhgPMjEy
NjExMTIwNjA0MTlaMBkxFzAVBgNVBAMMDmNvbmZpZy10ZXN0LWNhMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAE5kGn8g9K/ZKGYn1J9FMdg5y1tc+U2TCLuaWfLZ06
c6dGNaxHs0qsF7HaC0XlaJXerFo398urJv897MtjecQwBqNTMFEwHQYDVR0OBBYE
FJOKqpOdQtc1Cu7WyGXQl1mLa8z1MB8GA1UdIwQYMBaAFJOKqpOdQtc1Cu7WyGXQ
l1mLa8z1MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgQT1ufAd1
D7Znf6cAWh0IDqdvPBqRjwFNPzZwjPeKkMICIQDEbFsAw0XyPLg96xAnFpCEmM7c
q3cXEWoUjJyJM807MQ==
-----END CERTIFICATE-----
"""


def load_env(tmp_path: Path, env: dict[str, str], text: str = MINIMAL) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p, env, hostname=lambda: "h", local_address=lambda h, p: "10.9.8.7")


def test_the_settings_fields_are_the_tables() -> None:
    """Every section's settings class has exactly the fields its keys fill (a key's attr, or the fields
    it is split into, like consul.address into scheme, host and port): a key without a field, or a field
    without a key, fails here."""
    assert set(SETTINGS_OF) == set(SECTIONS)
    for section, settings in SETTINGS_OF.items():
        from_table = [f for k in KEYS if k.section == section for f in k.model_fields]
        assert sorted(f.name for f in dataclasses.fields(settings)) == sorted(set(from_table)), section
    # token and token_file fill one field; no other two keys share one
    shared = [f"{k.section}.{k.attr}" for k in KEYS]
    assert {p for p in shared if shared.count(p) > 1} == {"consul.token"}


def test_each_key_has_one_default(tmp_path: Path) -> None:
    """A default is written once, in the table: every default the settings classes carry equals the
    table's parsed default (None where the table has none), and a file and environment that set nothing
    load exactly the table's defaults."""
    by_field = {(k.section, f): (k, i) for k in KEYS for i, f in enumerate(k.model_fields)}
    checked = 0
    for section, settings in SETTINGS_OF.items():
        for f in dataclasses.fields(settings):
            if f.default is dataclasses.MISSING:
                continue
            key, i = by_field[(section, f.name)]
            expected = key.value if len(key.model_fields) == 1 or key.value is None else key.value[i]
            assert f.default == expected, f"{section}.{f.name}: {f.default!r} in model.py, {expected!r} in the table"
            checked += 1
    assert checked >= 25
    c = load_env(tmp_path, {})
    for key in KEYS:
        if key.default is None:
            continue
        got = getattr(getattr(c, key.section), key.attr)
        if key.path == "consul.address":
            assert got == f"http://{key.value}"
        elif len(key.model_fields) > 1:  # status.listen, shutdown.propagation_delay: one field per part
            section = getattr(c, key.section)
            assert tuple(getattr(section, f) for f in key.model_fields) == key.value, key.path
        else:
            assert got == key.value, key.path


def _every_variable(tmp_path: Path) -> dict[str, tuple[str, Callable[[Config], object]]]:
    """A valid value, unlike any default, for every variable a key lists, and what it must show in the Config."""
    token_file = tmp_path / "token"
    token_file.write_text("token-from-the-file-variable\n")
    token_file.chmod(0o600)
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text(CA_PEM)
    (tmp_path / "cas").mkdir()
    (tmp_path / "cas" / "ca.pem").write_text(CA_PEM)
    return {
        "CONSUL_HTTP_ADDR": ("consul.example:9501", lambda c: c.consul.address == "http://consul.example:9501"),
        "CONSUL_HTTP_TOKEN": ("token-from-the-variable", lambda c: c.consul.token.read() == "token-from-the-variable"),
        "CONSUL_HTTP_TOKEN_FILE": (
            str(token_file),
            lambda c: c.consul.token.file == token_file and c.consul.token.read() == "token-from-the-file-variable",
        ),
        "CONSUL_CACERT": (str(tmp_path / "ca.pem"), lambda c: c.consul.ca_file == tmp_path / "ca.pem"),
        "CONSUL_CAPATH": (str(tmp_path / "cas"), lambda c: c.consul.ca_path == tmp_path / "cas"),
        "CONSUL_CLIENT_CERT": (str(tmp_path / "client.pem"), lambda c: c.consul.cert_file == tmp_path / "client.pem"),
        "CONSUL_CLIENT_KEY": (str(tmp_path / "client.key"), lambda c: c.consul.key_file == tmp_path / "client.key"),
        "CONSUL_TLS_SERVER_NAME": ("server.dc9.consul", lambda c: c.consul.tls_server_name == "server.dc9.consul"),
        "CONSUL_HTTP_SSL_VERIFY": ("false", lambda c: c.consul.tls_verify is False),
        "ETCDCTL_ENDPOINTS": (
            "http://10.0.0.1:2379, http://10.0.0.2:2379",
            lambda c: c.etcd.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379"),
        ),
        "ETCDCTL_CACERT": (str(tmp_path / "ca.pem"), lambda c: c.etcd.ca_file == tmp_path / "ca.pem"),
        "ETCDCTL_CERT": (str(tmp_path / "client.pem"), lambda c: c.etcd.cert_file == tmp_path / "client.pem"),
        "ETCDCTL_KEY": (str(tmp_path / "client.key"), lambda c: c.etcd.key_file == tmp_path / "client.key"),
    }


# A variable another one overrides, as for the consul CLI: the token file wins over the token, and
# a CA file over a CA directory (which is then ignored with a warning).
SHADOWED_BY = {"CONSUL_HTTP_TOKEN": "CONSUL_HTTP_TOKEN_FILE", "CONSUL_CAPATH": "CONSUL_CACERT"}


def test_every_variable_a_key_lists_takes_effect(tmp_path: Path) -> None:
    """Every variable in any Key.env, all set at once in the environment passed to load_config, shows in
    the Config (those another one overrides, once that one is unset); a variable added to a key's env
    without a value here fails this test."""
    values = _every_variable(tmp_path)
    assert set(values) == {v for k in KEYS for v in k.env}
    env = {var: text for var, (text, _) in values.items()}
    c = load_env(tmp_path, env)
    for var, (_, shows) in values.items():
        assert shows(c) is (var not in SHADOWED_BY), var
    assert c.consul.ca_path is None and any("CONSUL_CAPATH" in w and "ignored" in w for w in c.warnings)
    for var, by in SHADOWED_BY.items():
        c = load_env(tmp_path, {v: t for v, t in env.items() if v != by})
        assert values[var][1](c), var


def test_the_file_wins_over_every_variable(tmp_path: Path) -> None:
    """Where the file sets a key, its variable (set too) is not used: checked for every key with an env."""
    values = _every_variable(tmp_path)
    env = {var: text for var, (text, _) in values.items()}
    (tmp_path / "file-ca.pem").write_text(CA_PEM)
    (tmp_path / "file-cas").mkdir()
    (tmp_path / "file-cas" / "ca.pem").write_text(CA_PEM)
    (tmp_path / "file-token").write_text("token-from-token_file\n")
    (tmp_path / "file-token").chmod(0o600)
    for name in ("file-client.pem", "file-client.key"):
        (tmp_path / name).write_text(CA_PEM)
    # token and token_file, ca_file and ca_path exclude each other: two files
    files: dict[str, tuple[str, Callable[[Config], object]]] = {
        "consul.address": ('"https://file.example:8501"', lambda c: c.consul.address == "https://file.example:8501"),
        "consul.token": ('"token-from-token"', lambda c: c.consul.token.read() == "token-from-token"),
        "consul.ca_file": (f'"{tmp_path / "file-ca.pem"}"', lambda c: c.consul.ca_file == tmp_path / "file-ca.pem"),
        "consul.cert_file": (
            f'"{tmp_path / "file-client.pem"}"',
            lambda c: c.consul.cert_file == tmp_path / "file-client.pem",
        ),
        "consul.key_file": (
            f'"{tmp_path / "file-client.key"}"',
            lambda c: c.consul.key_file == tmp_path / "file-client.key",
        ),
        "consul.tls_server_name": ('"file.dc1.consul"', lambda c: c.consul.tls_server_name == "file.dc1.consul"),
        "consul.tls_verify": ("true", lambda c: c.consul.tls_verify is True),
    }
    second: dict[str, tuple[str, Callable[[Config], object]]] = {
        "consul.token_file": (
            f'"{tmp_path / "file-token"}"',
            lambda c: c.consul.token.read() == "token-from-token_file",
        ),
        "consul.ca_path": (f'"{tmp_path / "file-cas"}"', lambda c: c.consul.ca_path == tmp_path / "file-cas"),
    }
    etcd: dict[str, tuple[str, Callable[[Config], object]]] = {
        "etcd.endpoints": ('["http://file.example:2379"]', lambda c: c.etcd.endpoints == ("http://file.example:2379",)),
        "etcd.ca_file": (f'"{tmp_path / "file-ca.pem"}"', lambda c: c.etcd.ca_file == tmp_path / "file-ca.pem"),
        "etcd.cert_file": (
            f'"{tmp_path / "file-client.pem"}"',
            lambda c: c.etcd.cert_file == tmp_path / "file-client.pem",
        ),
        "etcd.key_file": (
            f'"{tmp_path / "file-client.key"}"',
            lambda c: c.etcd.key_file == tmp_path / "file-client.key",
        ),
    }
    assert set(files) | set(second) | set(etcd) == {k.path for k in KEYS if k.env}
    for table, without in ((files, ()), (second, ("CONSUL_CACERT",)), (etcd, ())):
        section = next(iter(table)).split(".")[0]
        text = f"[{section}]\n" + "".join(f"{p.split('.')[1]} = {v}\n" for p, (v, _) in table.items()) + MINIMAL
        c = load_env(tmp_path, {v: t for v, t in env.items() if v not in without}, text)
        for path, (_, shows) in table.items():
            assert shows(c), path


def test_the_loader_reads_the_environment_through_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables a key falls back on are its Key.env and nothing written beside it: give a key a
    variable in the table and the loader uses it (and a variable a key no longer lists is not read)."""
    keys = tuple(dataclasses.replace(k, env=("SIDECAR_TEST_CHECK_URL",)) if k.path == "check.http" else k for k in KEYS)
    monkeypatch.setattr(loader, "KEYS", keys)
    text = '[service]\nname = "web"\nport = 8080\naddress = "127.0.0.2"\n'
    c = load_env(tmp_path, {"SIDECAR_TEST_CHECK_URL": "http://127.0.0.2:9/ready"}, text)
    assert c.check.http == "http://127.0.0.2:9/ready"
    keys = tuple(dataclasses.replace(k, env=()) if k.path == "consul.address" else k for k in keys)
    monkeypatch.setattr(loader, "KEYS", keys)
    assert load_env(tmp_path, {"CONSUL_HTTP_ADDR": "consul.example:9501"}).consul.address == "http://127.0.0.1:8500"


def test_only_with_is_a_typed_condition() -> None:
    """only_with names a choice key of the same section and one of its values, or a duration key and its
    word (held in the settings' flag); effective() shows the traffic keys only with strategy = "traffic",
    the learned ones only with propagation_delay = "learned"."""
    conditional = [k for k in KEYS if k.only_with is not None]
    assert {k.path for k in conditional} >= {"shutdown.min_delay", "shutdown.dns", "hot_restart.warmup"}
    for k in conditional:
        assert k.only_with is not None
        other = BY_PATH[f"{k.section}.{k.only_with.key}"]
        if k.only_with.flag:
            assert other.word == k.only_with.value and k.only_with.flag in other.model_fields, k.path
        else:
            assert other.choices is not None and k.only_with.value in list(other.choices), k.path
    min_delay = BY_PATH["shutdown.min_delay"].only_with
    assert min_delay is not None and min_delay.words == 'strategy = "traffic"'
    assert min_delay.holds(ShutdownSettings(strategy=Strategy.TRAFFIC))
    assert not min_delay.holds(ShutdownSettings())
    learned = BY_PATH["shutdown.learned_max"].only_with
    assert learned is not None and learned.words == 'propagation_delay = "learned"'
    assert learned.holds(ShutdownSettings(learned=True)) and not learned.holds(ShutdownSettings())
