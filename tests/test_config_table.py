"""The key table (sidecar/config/keys.py) is the one source of the configuration: the loader validates
every key in it, the settings' defaults are its defaults, and docs/configuration.md is generated from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sidecar.config import KEYS, ConfigError, Key, Kind, Strategy, load_config
from sidecar.config import docs as config_docs
from sidecar.config.keys import default
from sidecar.config.model import CheckSettings, ShutdownSettings, StartupSettings, StatusSettings

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
    for f in dataclasses.fields(ShutdownSettings):
        if f.name != "dns":
            assert getattr(sd, f.name) == default(f"shutdown.{f.name}"), f.name
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
