"""The README's Quick start works when pasted into a fresh shell on a fresh clone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import cli_env, wait_for

from scenario_watch.shell.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SEPARATORS = {"&&", "||", ";", "|", "&"}
VENV_TOOLS = {"python", "python3", "pip", "pip3"}


def section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README.md lost its {title!r} section"
    return match.group(1)


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """Each simple command of a block as its words (comments, redirections and operators dropped)."""
    found: list[list[str]] = []
    for line in block.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        redirect = False
        for token in lexer:
            if token in SEPARATORS:
                found += [current] if current else []
                current = []
            elif token in (">", ">>", "<", "2>"):
                redirect = True
            elif redirect:
                redirect = False  # the redirection's target
            else:
                current.append(token)
        found += [current] if current else []
    return found


def test_quick_start_commands_are_reachable_in_a_fresh_shell() -> None:
    """Each block is a new terminal: a bare `scenario-watch` needs the venv activated in that block."""
    text = section("Quick start")
    assert "clone" in text and "`cd`" in text, "the Quick start must say where to clone and cd"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    venv_made = installed = False
    invocations = 0
    for block in shell_blocks(text):
        activated = False  # another terminal: a fresh shell, the same folder
        for words in commands(block):
            program = words[0]
            if words[:3] == ["python3", "-m", "venv"] and words[3] == ".venv":
                venv_made = True
            elif program in (".", "source"):
                assert words[1:] == [".venv/bin/activate"] and venv_made, words
                activated = True
                continue
            if program.startswith(".venv/bin/"):
                tool = program.removeprefix(".venv/bin/")
                assert venv_made, f"{program} before the venv is made"
                assert tool in VENV_TOOLS or (tool in scripts and installed), f"{program}: not there yet"
                installed = installed or (tool.startswith("pip") and "install" in words)
                if tool in scripts:
                    words = ["scenario-watch", *words[1:]]
            elif program == "scenario-watch":
                assert activated, f"`{shlex.join(words)}`: scenario-watch is not on PATH in this shell"
                assert installed
            else:
                assert shutil.which(program), f"{program}: no such command"
            if words[0] == "scenario-watch":
                invocations += 1
                try:
                    _parser().parse_args(words[1:])
                except SystemExit as exc:
                    raise AssertionError(f"`{shlex.join(words)}` is not a valid command line") from exc
    assert invocations >= 2


def test_quick_start_runs_as_pasted(tmp_path: Path) -> None:
    """Block one (minus the install, done: this venv) starts the daemon; block two, pasted, sees images."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file() or not (venv / "bin" / "scenario-watch").is_file():
        pytest.skip("the tests do not run from a venv with scenario-watch installed")
    first, second = shell_blocks(section("Quick start"))[:2]
    clone, home = tmp_path / "clone", tmp_path / "home"
    clone.mkdir()
    home.mkdir()
    (clone / ".venv").symlink_to(venv)
    env = {k: v for k, v in cli_env(HOME=str(home)).items() if not k.startswith("SCENARIO_API")}
    # A fresh shell: nothing of a venv on PATH (the one running the tests may be activated).
    env["PATH"] = os.pathsep.join(
        d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "scenario-watch").exists()
    )
    env.pop("VIRTUAL_ENV", None)
    start = "\n".join(line for line in first.splitlines() if not line.startswith("python3 -m venv"))
    daemon = subprocess.Popen(
        ["bash", "-e", "-c", start],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (home / "scenario-watch" / "inbox").is_dir(), what="the daemon's inbox")
        pasted = subprocess.run(
            ["bash", "-e", "-c", second], cwd=clone, env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        out, _ = daemon.communicate(timeout=15)
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    assert "daemon   running, PID" in pasted.stdout, pasted.stdout
    assert pasted.stdout.split()[-3:] == ["p.manifest.json", "p_1.png", "p_2.png"], pasted.stdout
    assert "Traceback" not in out, out
