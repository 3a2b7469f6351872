"""The tests (and load_settings given an env) never see the machine's user: HOME, SCENARIO_*, the cwd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from scenario_watch.config import load_settings
from scenario_watch.errors import ConfigError

TESTS = Path(__file__).resolve().parent
BAD_CONFIG = "[jobs]\nmax_inflight = 3\n"  # a key that stops every start that reads it


def user_config(home: Path) -> Path:
    config = home / ".config" / "scenario-watch" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(BAD_CONFIG)
    return config


def test_load_settings_expands_home_from_the_env_it_is_given(tmp_path: Path) -> None:
    config = user_config(tmp_path / "someone")
    with pytest.raises(ConfigError, match=r"unknown key jobs\.max_inflight") as caught:
        load_settings(env={"HOME": str(tmp_path / "someone")})
    assert str(config) in str(caught.value)
    (tmp_path / "nobody").mkdir()
    assert load_settings(env={"HOME": str(tmp_path / "nobody")}).path is None


def test_settings_a_test_sees_are_its_own() -> None:
    """Run by the test below inside a hostile environment; here, it is also run as it is."""
    loaded = load_settings()
    assert loaded.path is None
    assert loaded.credentials is None
    assert str(loaded.settings.folders.inbox).startswith(os.environ["HOME"])
    shown = json.loads(run_cli("config", "--json").stdout)
    assert shown["jobs.max_in_flight"] == {"value": "8", "from": "default"}


def test_the_suite_ignores_the_users_home_environment_and_working_directory(tmp_path: Path) -> None:
    home, project = tmp_path / "home", tmp_path / "project"
    user_config(home)
    project.mkdir()
    (project / "scenario-watch.toml").write_text(BAD_CONFIG)
    hostile = dict(
        os.environ,
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        SCENARIO_API_KEY="the-users-real-key",
        SCENARIO_API_SECRET="the-users-real-secret",
        SCENARIO_WATCH_JOBS__MAX_IN_FLIGHT="0",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(TESTS.parent),
            "--basetemp",
            str(tmp_path / "inner"),  # its temp dirs stay inside this test's
            f"{TESTS / 'test_isolation.py'}::test_settings_a_test_sees_are_its_own",
            f"{TESTS / 'test_cli.py'}::test_example_toml_documents_every_key_with_its_default",
        ],
        cwd=project,
        env=hostile,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
