"""The CLI as a user runs it: validate, config, credentials, retry, estimate, status, help."""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path

import pytest
from conftest import KEY, SECRET, Folders, cli_env, generate_posts, run_cli

from scenario_watch.sandbox import Sandbox

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def test_help_teaches_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "validate", "status", "retry", "estimate", "config", "sandbox"):
        assert command in result.stdout
    assert "--sandbox" in run_cli("run", "--help").stdout


def test_python_dash_m_and_console_script_agree() -> None:
    assert run_cli("--version").stdout.startswith("scenario-watch ")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (b"   \n", "the file is empty"),
        (b"not json", "not valid JSON"),
        (b'{"prompt": "cut', "not valid JSON"),
        (b"[1, 2]", "holds an array"),
        (b'"a string"', "holds a string"),
        (b"null", "holds null"),
        (b"42", "holds a number"),
        (b"{}", "'prompt' is required"),
        (b'{"prompt": ""}', "prompt: must be a non-empty string"),
        (b'{"prompt": "   "}', "prompt: must be a non-empty string"),
        (b'{"prompt": 5}', "prompt: must be a non-empty string (got 5)"),
        (
            b'{"prompt": "x", "promt": "y"}',
            "'promt' is not an input of model model_google-gemini-pro-image-editing (built-in schema): "
            "did you mean 'prompt'?",
        ),
        (b'{"prompt": "x", "numOutput": 2}', "did you mean 'numOutputs'?"),
        (b'{"prompt": "x", "numOutputs": 5}', "numOutputs: must be a whole number from 1 to 4 (got 5)"),
        (b'{"prompt": "x", "numOutputs": 0}', "numOutputs: must be a whole number from 1 to 4"),
        (b'{"prompt": "x", "numOutputs": "2"}', 'numOutputs: must be a whole number from 1 to 4 (got "2")'),
        (b'{"prompt": "x", "numOutputs": 1.5}', "numOutputs: must be a whole number"),
        (b'{"prompt": "x", "seed": -1}', "seed: must be a whole number from 0 to 2147483647"),
        (b'{"prompt": "x", "seed": 2147483648}', "seed: must be a whole number from 0 to 2147483647"),
        (b'{"prompt": "x", "aspectRatio": "7:5"}', "aspectRatio: must be one of 21:9"),
        (b'{"prompt": "x", "resolution": "8K"}', "resolution: must be one of 1K, 2K, 4K"),
        (b'{"prompt": "x", "useGoogleSearch": "yes"}', "useGoogleSearch: must be true or false"),
        (
            b'{"prompt": "x", "referenceImages": "beach.jpg"}',
            'must be a list, even for one image: ["beach.jpg"]',
        ),
        (b'{"prompt": "x", "referenceImages": ["missing.png"]}', "'missing.png' does not exist"),
        (b'{"prompt": "x", "referenceImages": ["../up.png"]}', "leaves the inbox"),
        (b'{"prompt": "x", "referenceImages": ["/etc/passwd"]}', "is an absolute path"),
        (b'{"prompt": "x", "referenceImages": [3]}', "each entry must be a non-empty string"),
        (
            b'{"prompt": "x", "referenceImages": [' + b",".join([b'"asset_a"'] * 15) + b"]}",
            "more than 14 entries",
        ),
        (b'{"prompt": "x", "name": "../../x"}', "name: '../../x' must be a plain file name"),
        (b'{"prompt": "x", "name": "a/b"}', "must be a plain file name"),
        (b'{"prompt": NaN}', "NaN is not a number JSON allows"),
        (b'{"prompt": "x", "seed": Infinity}', "Infinity is not a number JSON allows"),
        (b'{"prompt": "x", "prompt": "y"}', "key 'prompt' appears twice"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        ('{"prompt": "x"}'.encode("utf-16"), "the file is UTF-16 text, not UTF-8 text"),
        ('{"prompt": "x"}'.encode("utf-16-be"), "the file is UTF-16 text, not UTF-8 text"),
        (b"\x00" * 4096, "binary"),  # a file preallocated and never written
        (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_validate_explains_each_bad_input(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    result = run_cli("validate", str(path), env=cli_env(HOME=str(tmp_path)), cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert expected in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_refuses_a_huge_file_early(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as handle:
        handle.truncate(3 * 1024**3)  # sparse: 3 GB on paper, nothing on disk
    result = run_cli("validate", str(path), env=cli_env(HOME=str(tmp_path)), cwd=tmp_path)
    assert result.returncode == 1
    assert "larger than 1024 KiB" in result.stdout


def test_validate_reference_checks(tmp_path: Path) -> None:
    (tmp_path / "beach.png").write_bytes(PNG)
    (tmp_path / "notes.png").write_text("not an image")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(PNG)
    (tmp_path / "sneaky.png").symlink_to(outside)
    cases = {
        "ok.json": (["beach.png", "asset_abc123"], 0, "ok -> ok_N"),
        "wrongtype.json": (["notes.png"], 1, "is not a PNG, JPEG, GIF, WebP, TIFF, AVIF or HEIC image"),
        "symlink.json": (["sneaky.png"], 1, "points outside the inbox"),
    }
    for name, (refs, code, expected) in cases.items():
        (tmp_path / name).write_text(json.dumps({"prompt": "edit", "referenceImages": refs}))
        result = run_cli("validate", str(tmp_path / name), env=cli_env(HOME=str(tmp_path)), cwd=tmp_path)
        assert result.returncode == code, result.stdout
        assert expected in result.stdout


def test_validate_several_files_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text('{"prompt": "fine", "numOutputs": 2}')
    (tmp_path / "bad.json").write_text('{"prompt": "x", "numOutputs": 9, "resolution": "9K"}')
    result = run_cli(
        "validate", str(tmp_path / "good.json"), str(tmp_path / "bad.json"), env=cli_env(HOME=str(tmp_path))
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].endswith("good.json: ok -> good_N (numOutputs=2)")
    assert sum("bad.json:" in line for line in lines) == 2


def test_missing_credentials_exit_2_naming_the_variables(tmp_path: Path, folders: Folders) -> None:
    env = {k: v for k, v in cli_env(HOME=str(tmp_path)).items() if not k.startswith("SCENARIO_API")}
    result = run_cli("run", "--once", "-c", str(folders.config), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "SCENARIO_API_KEY" in result.stderr and "SCENARIO_API_SECRET" in result.stderr


def test_credentials_from_credentials_directory(tmp_path: Path, folders: Folders, sandbox: Sandbox) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "scenario-api-key").write_text(KEY + "\n")
    (creds / "scenario-api-secret").write_text(SECRET + "\n")
    env = {k: v for k, v in cli_env(HOME=str(tmp_path)).items() if not k.startswith("SCENARIO_API")}
    env["CREDENTIALS_DIRECTORY"] = str(creds)
    (folders.inbox / "c.json").write_text('{"prompt": "creds from systemd"}')
    result = run_cli("run", "--once", "-c", str(folders.config), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(generate_posts(sandbox)) == 1
    config = run_cli("config", "-c", str(folders.config), env=env)
    assert "credential scenario-api-secret" in config.stdout
    assert SECRET not in config.stdout


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[jobs]\nmax_in_flight = 0\n", "jobs.max_in_flight"),
        ("[jobs]\nmax_inflight = 3\n", "unknown key jobs.max_inflight (did you mean 'max_in_flight'?)"),
        ("[job]\n", "unknown section [job] (did you mean 'jobs'?)"),
        ('[log]\nformat = "xml"\n', "log.format"),
        # [defaults] takes the model's keys: the live schema judges them at start (test_live_schema.py).
        ('[api]\nbase_url = "ftp://x"\n', "api.base_url"),
        ("not toml [", "config file"),
        # Filed prompts taken again (and paid again, for ever), outputs taken for prompts:
        ('[folders]\ninbox = "/srv/sw/in"\ndone = "/srv/sw/in"\n', "folders.done is the inbox"),
        ('[folders]\ninbox = "/srv/sw/in"\nfailed = "/srv/sw/in"\n', "folders.failed is the inbox"),
        ('[folders]\ninbox = "/srv/sw/in"\noutbox = "/srv/sw/in"\n', "folders.outbox is the inbox"),
        (
            '[folders]\ninbox = "/srv/sw/in"\ndone = "/srv/sw/in/done"\n[watch]\nrecursive = true\n',
            "folders.done is inside the inbox",
        ),
        ('[folders]\nstate = "/srv/sw/s"\noutbox = "/srv/sw/s"\n', "folders.outbox is the state folder"),
        # (done = "/srv/sw/in/.done" with recursive is fine: the watcher skips hidden folders; below)
        ('[presets]\nfolder = "/srv/sw/p"\n', "presets.folder is not a preset: each preset is a table"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = run_cli("config", "-c", str(config), env=cli_env(HOME=str(tmp_path)))
    assert result.returncode == 2, result.stdout
    assert expected in result.stderr


def test_folders_inside_a_recursive_inbox_that_the_watcher_skips_are_fine(tmp_path: Path) -> None:
    config = tmp_path / "ok.toml"
    config.write_text(
        '[folders]\ninbox = "/srv/sw/in"\ndone = "/srv/sw/in/.done"\nfailed = "/srv/sw/in/archive/failed"\n'
        '[watch]\nrecursive = true\nignore = ["archive"]\n'
    )
    result = run_cli("config", "-c", str(config), env=cli_env(HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr


def test_a_folder_given_as_the_config_file_is_named_a_folder(tmp_path: Path) -> None:
    result = run_cli("config", "-c", str(tmp_path), env=cli_env(HOME=str(tmp_path)))
    assert result.returncode == 2 and f"config file {tmp_path} is a folder, not a file" in result.stderr


def test_env_overrides_file_and_config_shows_origins(tmp_path: Path, folders: Folders) -> None:
    env = cli_env(HOME=str(tmp_path), SCENARIO_WATCH_JOBS__MAX_IN_FLIGHT="3")
    result = run_cli("config", "--json", "-c", str(folders.config), env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["jobs.max_in_flight"] == {"value": "3", "from": "env SCENARIO_WATCH_JOBS__MAX_IN_FLIGHT"}
    assert shown["folders.inbox"]["from"].startswith("file ")
    assert shown["jobs.timeout"]["from"] == "default"
    assert shown["api.secret"]["value"] == "********"
    assert SECRET not in result.stdout


def test_config_warns_when_the_file_holding_secrets_is_world_readable(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[api]\nkey = "k-1234"\nsecret = "s-5678"\n')
    os.chmod(config, 0o644)
    env = {k: v for k, v in cli_env(HOME=str(tmp_path)).items() if not k.startswith("SCENARIO_API")}
    result = run_cli("config", "-c", str(config), env=env)
    assert "readable by other users" in result.stdout
    assert "s-5678" not in result.stdout


def test_retry_moves_failed_prompts_back(folders: Folders, sandbox: Sandbox) -> None:
    (folders.inbox / "bad.json").write_text('{"prompt": "x", "numOutputs": 7}')
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert folders.names(folders.failed) == ["bad.error.json", "bad.json"]
    (folders.failed / "bad.json").write_text('{"prompt": "x", "numOutputs": 2}')  # the person fixes it
    result = run_cli("retry", "bad", "-c", str(folders.config))
    assert result.returncode == 0, result.stdout
    assert folders.names(folders.failed) == []
    assert folders.names(folders.inbox) == ["bad.json"]
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    assert folders.names(folders.done) == ["bad.json"]
    assert run_cli("retry", "nothing-here", "-c", str(folders.config)).returncode == 1


def test_estimate_uses_dry_run_and_generates_nothing(folders: Folders, sandbox: Sandbox) -> None:
    a, b = folders.root / "a.json", folders.root / "b.json"
    a.write_text('{"prompt": "x", "numOutputs": 2}')
    b.write_text('{"prompt": "y", "resolution": "4K", "useGoogleSearch": true}')
    result = run_cli("estimate", "-c", str(folders.config), str(a), str(b))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a.json: 10 creative units" in result.stdout
    assert "b.json: 12 creative units" in result.stdout
    assert "total: 22 creative units" in result.stdout
    assert generate_posts(sandbox) == []
    assert sandbox.generate_jobs == []


def test_status_on_a_fresh_setup(folders: Folders) -> None:
    result = run_cli("status", "-c", str(folders.config))
    assert result.returncode == 0
    assert "no journal" in result.stdout


def test_example_toml_documents_every_key_with_its_default(tmp_path: Path) -> None:
    from scenario_watch.config import Settings, load_settings

    example = Path(__file__).resolve().parent.parent / "example.toml"
    loaded = load_settings(example, env={"HOME": str(tmp_path)})
    assert (
        loaded.settings.model_dump() == load_settings(None, env={"HOME": str(tmp_path)}).settings.model_dump()
    )
    text = example.read_text()
    for section, field in Settings.model_fields.items():
        assert f"[{section}]" in text
        model = field.annotation
        if typing.get_origin(model) is dict:  # [presets.NAME]: the keys of one preset
            model = typing.get_args(model)[1]
        for key in model.model_fields:  # type: ignore[union-attr]
            assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{section}.{key} is not in example.toml"


def test_estimate_prices_a_local_reference_as_one_entry(folders: Folders, sandbox: Sandbox) -> None:
    """A local reference file is sent as an asset: the dry run sees one entry for it, as the daemon sends."""
    import base64

    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    (folders.root / "beach.png").write_bytes(png)
    (folders.root / "sky.png").write_bytes(png)
    one = folders.root / "one.json"
    one.write_text('{"prompt": "x", "referenceImages": ["beach.png"]}')
    two = folders.root / "two.json"
    two.write_text('{"prompt": "y", "referenceImages": ["beach.png", "sky.png"], "numOutputs": 2}')
    result = run_cli("estimate", "-c", str(folders.config), str(one), str(two))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "one.json: 5 creative units" in result.stdout and "two.json: 10 creative units" in result.stdout
    dry = [r for r in sandbox.requests if r.method == "POST" and r.query.get("dryRun") == "api"]
    assert [len(r.body.get("referenceImages", [])) for r in dry] == [1, 2]
    uploads = [r for r in sandbox.requests if r.method == "POST" and r.path.rstrip("/").endswith("/assets")]
    assert len(uploads) == 1  # one placeholder for the run, whatever the files
    assert generate_posts(sandbox) == [] and sandbox.generate_jobs == []
