"""Presets and [defaults] are checked against the model's schema as the API tells it at start."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Folders, run_cli, write_config

from scenario_watch.config import load_settings
from scenario_watch.errors import ConfigError
from scenario_watch.sandbox import Sandbox

IN_PROCESS = True  # conftest: `daemon` runs in this process, on a manual clock shared with `sandbox`


def test_a_preset_key_the_live_model_lacks_stops_the_start(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    sandbox.seed_input = False  # the built-in table has seed; this model, live, does not
    write_config(folders, sandbox.base_url, presets={"fixed": {"prompt": "x", "seed": 7}})
    with pytest.raises(ConfigError) as raised:
        daemon()
    message = str(raised.value)
    assert "[presets.fixed]" in message and "'seed'" in message
    assert "model_google-gemini-pro-image-editing" in message and "live schema" in message


def test_defaults_take_the_models_keys_and_are_checked_against_the_live_schema(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    write_config(folders, sandbox.base_url, defaults={"seed": 42, "resolution": "1K"})
    settings = load_settings(folders.config, env={}).settings
    assert settings.defaults.model_dump() == {"seed": 42, "resolution": "1K"}
    sandbox.seed_input = False
    with pytest.raises(ConfigError) as raised:
        daemon()
    message = str(raised.value)
    assert message.startswith("invalid configuration: [defaults]") and "'seed'" in message
    assert "model_google-gemini-pro-image-editing" in message


def test_a_defaults_value_the_model_refuses_names_the_key(
    folders: Folders, sandbox: Sandbox, daemon: Any
) -> None:
    write_config(folders, sandbox.base_url, defaults={"numOutputs": 9})
    with pytest.raises(ConfigError, match=r"\[defaults\] numOutputs: must be"):
        daemon()


def test_defaults_from_the_environment_are_read_as_json(folders: Folders) -> None:
    env = {"SCENARIO_WATCH_DEFAULTS__SEED": "5", "SCENARIO_WATCH_DEFAULTS__RESOLUTION": "1K"}
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        defaults = load_settings(folders.config, env=env).settings.defaults.model_dump()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert defaults == {"seed": 5, "resolution": "1K"}


def test_run_exits_2_on_a_defaults_key_the_live_model_lacks(folders: Folders, sandbox: Sandbox) -> None:
    sandbox.seed_input = False
    write_config(folders, sandbox.base_url, defaults={"seed": 1})
    result = run_cli("run", "--once", "-c", str(folders.config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "seed" in result.stderr and "model_google-gemini-pro-image-editing" in result.stderr
