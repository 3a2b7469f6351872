"""[images] and [outbox]: defaults, overrides, and a bad name template refused at start (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from scenario_watch.config import load_settings
from scenario_watch.errors import ConfigError


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(None, env={"HOME": str(tmp_path)}).settings
    assert (settings.images.normalize, settings.images.max_side) == (True, 0)
    assert settings.outbox.name == "{stem}_{index}" and settings.outbox.format == "original"
    assert (settings.outbox.quality, settings.outbox.metadata) == (90, True)


def test_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config(
        tmp_path, '[images]\nnormalize = false\nmax_side = 2048\n[outbox]\nname = "{date}/{stem}"\n'
    )
    # pydantic-settings reads the process environment; load_settings' env names the origins.
    env = {
        "HOME": str(tmp_path),
        "SCENARIO_WATCH_OUTBOX__FORMAT": "webp",
        "SCENARIO_WATCH_OUTBOX__QUALITY": "75",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    loaded = load_settings(path, env=env)
    assert loaded.settings.images.normalize is False and loaded.settings.images.max_side == 2048
    assert loaded.settings.outbox.name == "{date}/{stem}"
    assert (loaded.settings.outbox.format, loaded.settings.outbox.quality) == ("webp", 75)
    assert loaded.origins["outbox.format"] == "env SCENARIO_WATCH_OUTBOX__FORMAT"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[outbox]\nname = "../{stem}"\n', "outbox.name (from file"),
        ('[outbox]\nname = "{stem}_{idx}"\n', "did you mean {index}?"),
        ('[outbox]\nformat = "gif"\n', "outbox.format"),
        ("[outbox]\nquality = 101\n", "outbox.quality"),
        ("[images]\nmax_side = -1\n", "images.max_side"),
        ("[images]\nnormalise = false\n", "did you mean 'normalize'?"),
    ],
)
def test_bad_values_are_config_errors(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(config(tmp_path, text), env={"HOME": str(tmp_path)})
    assert says in str(caught.value)


def test_a_template_that_escapes_the_outbox_stops_the_cli_with_exit_2(tmp_path: Path) -> None:
    result = run_cli("config", "-c", str(config(tmp_path, '[outbox]\nname = "/srv/{stem}"\n')))
    assert result.returncode == 2
    assert "outbox.name" in result.stderr and "absolute path" in result.stderr
