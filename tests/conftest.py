"""Fixtures: a real sandbox server on loopback, temp folders, the real daemon in a subprocess."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import HereDaemon, capture_logs

from scenario_watch.api.client import ScenarioClient
from scenario_watch.clock import ManualClock
from scenario_watch.config import load_settings
from scenario_watch.dispatch.dispatcher import Dispatcher
from scenario_watch.journal.store import Store
from scenario_watch.sandbox import Sandbox

KEY, SECRET = "sandbox-key", "sandbox-secret"
# The base directories other programs (and a future scenario-watch) may read instead of HOME.
XDG_DIRS = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of the test's own: the user's config, credentials and folders are never read or written.

    HOME and the XDG base directories point into a temp dir, the working directory is that dir (so a
    `./scenario-watch.toml` in the checkout is not found), and every SCENARIO_* variable and
    $CREDENTIALS_DIRECTORY is removed: in-process settings and subprocesses (which inherit
    os.environ, see cli_env) see only what a test sets.
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for name in XDG_DIRS:
        monkeypatch.setenv(name, str(home / name.lower()))
    for name in list(os.environ):
        if name.upper().startswith("SCENARIO_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.chdir(home)
    return home


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll a condition until it is truthy (bounded); fail the test with `what` otherwise.

    A condition that meets the world mid-change (a file renamed away as it is read, a connection the
    server still drops, half a JSON line) raises OSError or ValueError: that counts as "not yet", and
    the last such error is shown if the time runs out.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = condition()
        except (OSError, ValueError) as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port nobody listens on now (for a listener the test configures)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_process(request: pytest.FixtureRequest) -> bool:
    """Whether the test's module asks for in-process daemons (`IN_PROCESS = True`: see harness.py)."""
    return bool(getattr(request.module, "IN_PROCESS", False))


@pytest.fixture(autouse=True)
def _system_wide_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """A `system_wide` test (an inotify limit lowered for every process) runs while no other test of
    any xdist worker does: it holds this lock exclusively, every other test holds it shared."""
    exclusive = request.node.get_closest_marker("system_wide") is not None
    locks = Path(tempfile.gettempdir())
    with (
        open(locks / "scenario-watch-tests.gate", "a") as gate,
        open(locks / "scenario-watch-tests.lock", "a") as lock,
    ):
        # The gate lets no new test in while a system_wide one waits: it waits only for those running.
        fcntl.flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # both released when the files close


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock, starting at the real time (journal and API timestamps look real)."""
    return ManualClock(wall=time.time())


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, clock: ManualClock) -> Iterator[Sandbox]:
    """The sandbox; for an in-process module, on the manual clock its daemons share."""
    with Sandbox(generation_seconds=0.3, clock=clock.wall if in_process(request) else time.time) as sb:
        yield sb


@dataclass
class Folders:
    root: Path
    inbox: Path
    outbox: Path
    done: Path
    failed: Path
    state: Path
    config: Path

    def drop(self, name: str, body: Any, *, raw: bytes | None = None) -> Path:
        """Write a prompt elsewhere, then move it in (the safe way a script delivers a file)."""
        return move_in(self, self.inbox, name, raw if raw is not None else json.dumps(body).encode())

    def claimed(self) -> list[str]:
        """Prompt files under inbox/.processing/ (each daemon claims into a folder of its own there)."""
        return sorted(p.name for p in (self.inbox / ".processing").rglob("*.json"))

    def names(self, folder: Path) -> list[str]:
        return (
            sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
        )


def move_in(folders: Folders, folder: Path, name: str, data: bytes) -> Path:
    """Deliver a file the safe way: written elsewhere, renamed in."""
    staging = folders.root / "staging"
    staging.mkdir(exist_ok=True)
    (staging / name).write_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(staging / name, folder / name)
    return folder / name


def write_config(folders: Folders, base_url: str, **sections: dict[str, Any]) -> None:
    config: dict[str, dict[str, Any]] = {
        "api": {"base_url": base_url, "request_timeout": 5.0, "lost_answer_wait": 1.0},
        "folders": {
            "inbox": str(folders.inbox),
            "outbox": str(folders.outbox),
            "done": str(folders.done),
            "failed": str(folders.failed),
            "state": str(folders.state),
        },
        "jobs": {"poll_interval": 0.05, "poll_max_interval": 0.2, "max_in_flight": 8},
        "watch": {"settle": 0.5},
        "log": {"format": "json", "level": "debug"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(
            f"{key} = {json.dumps(value)}" for key, value in values.items() if not isinstance(value, dict)
        )
        for key, table in values.items():  # [presets.NAME]
            if isinstance(table, dict):
                lines.append(f"[{section}.{key}]")
                lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
    folders.config.write_text("\n".join(lines) + "\n")


@pytest.fixture
def folders(tmp_path: Path, sandbox: Sandbox) -> Folders:
    f = Folders(
        root=tmp_path,
        inbox=tmp_path / "inbox",
        outbox=tmp_path / "outbox",
        done=tmp_path / "done",
        failed=tmp_path / "failed",
        state=tmp_path / "state",
        config=tmp_path / "config.toml",
    )
    f.inbox.mkdir()
    write_config(f, sandbox.base_url)
    return f


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCENARIO_", "CREDENTIALS_DIRECTORY"))}
    env.update({"SCENARIO_API_KEY": KEY, "SCENARIO_API_SECRET": SECRET, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def from_a_terminal() -> None:
    """Popen's preexec_fn for a command a test stops with Ctrl-C (SIGINT): a process started with
    SIGINT ignored (a background job of a non-interactive shell, as pytest may be) keeps it ignored,
    so Python would raise no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_dispatcher(folders: Folders, sandbox: Sandbox, journal: Path) -> Dispatcher:
    """The dispatcher of the folders' config, on its own journal, for tests that drive its tasks by hand."""
    settings = load_settings(folders.config, env={}).settings
    for folder in (folders.outbox, folders.done, folders.failed):
        folder.mkdir(exist_ok=True)
    api = settings.api
    client = ScenarioClient(api.base_url, sandbox.key, sandbox.secret, model_id=api.model_id, timeout=5)
    return Dispatcher(settings, client, Store(journal))


def status_watch_until(folders: Folders, seen: Callable[[str], Any], what: str, timeout: float = 20.0) -> str:
    """Run `status --watch` until its screen shows what `seen` looks for, then Ctrl-C it; the screen
    (exit status 0 and no traceback checked)."""
    screen = folders.root / "watch.out"
    with screen.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scenario_watch", "status", "--watch", "-c", str(folders.config)],
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=from_a_terminal,
        )
        try:
            wait_for(lambda: seen(screen.read_text()), timeout=timeout, what=what)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(10)
    text = screen.read_text()
    assert code == 0 and "Traceback" not in text, text
    return text


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m scenario_watch ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "scenario_watch", *args],
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


class DaemonProcess:
    """The real daemon in a subprocess; its log lines are kept for assertions."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None, *extra: str) -> None:
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scenario_watch", "run", "-c", str(config), *extra],
            env=cli_env() if env is None else env,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: "daemon.started" in self.output() or self.proc.poll() is not None, 20, "daemon start"
        )
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.log.read_text()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def saw(self, event: str, **fields: Any) -> bool:
        """Whether the daemon logged `event` (with these field values)."""
        return any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.events()
        )

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.handle.close()
        return code


StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def daemon(
    request: pytest.FixtureRequest, folders: Folders, sandbox: Sandbox, clock: ManualClock
) -> Iterator[StartDaemon]:
    """Start daemons on the folders' config: processes, or (IN_PROCESS modules) in this process."""
    if in_process(request):
        with contextlib.ExitStack() as stack:
            capture = stack.enter_context(capture_logs())
            here: list[HereDaemon] = []

            def start_here(*extra: str, env: dict[str, str] | None = None) -> HereDaemon:
                here.append(HereDaemon(folders.config, sandbox, clock, capture, env, once="--once" in extra))
                return here[-1]

            yield start_here  # type: ignore[misc]
            for d in here:
                if not d.daemon.closed:
                    d.stop()
        return
    started: list[DaemonProcess] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> DaemonProcess:
        proc = DaemonProcess(folders.config, folders.root / f"daemon-{len(started)}.log", env, *extra)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@contextlib.contextmanager
def inotify_lines(argv: list[str], env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Run an inotifywait command line; yield the lines it prints (filled as they come) once it watches."""
    lines: list[str] = []
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as reader:
        assert reader.stdout is not None and reader.stderr is not None
        stdout = reader.stdout
        collect = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in stdout))
        try:
            while "Watches established" not in reader.stderr.readline():
                assert reader.poll() is None, "the reader stopped"
            collect.start()
            yield lines
            time.sleep(0.3)  # time for a duplicate to show up
        finally:
            os.killpg(reader.pid, signal.SIGTERM)
            if collect.is_alive():
                collect.join(timeout=5)


def generate_posts(sb: Sandbox) -> list[Any]:
    """The generate requests the server saw (dry runs excluded)."""
    return [
        r
        for r in sb.requests
        if r.server == "api"
        and r.method == "POST"
        and "/generate/" in r.path
        and r.query.get("dryRun") not in ("true", "api")
    ]
