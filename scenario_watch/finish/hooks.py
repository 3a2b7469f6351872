"""Hooks: `[hooks] on_done` / `on_failed`, a command run after each prompt is filed.

They run off the main loop, a few at a time, without a shell, each in a session of its own so a hook
past `timeout` is killed with everything it started. A hook never changes a prompt's outcome. The
journal says a hook is owed from the moment its prompt is filed until it ran, so one interrupted by
a crash or a stop runs again at the next start: at least once, exactly once when nothing crashes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import structlog

from scenario_watch import logs
from scenario_watch.config import HookSettings
from scenario_watch.errors import ConfigError
from scenario_watch.finish.finisher import error_file_for
from scenario_watch.journal.rows import Row
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import State

log = logs.get()

# Hooks running at once; more wait their turn (a slow hook never holds up the prompts).
HOOK_WORKERS = 3
# What of a hook's output reaches the log: its last lines, at most this much.
TAIL_BYTES = 4096
TAIL_LINES = 20
# A hook past its timeout gets SIGTERM, then SIGKILL this much later.
KILL_GRACE = 1.0
# The daemon's credentials never reach a hook's environment.
SECRET_VARIABLES = frozenset(
    {
        "SCENARIO_API_KEY",
        "SCENARIO_API_SECRET",
        "SCENARIO_WATCH_API__KEY",
        "SCENARIO_WATCH_API__SECRET",
        "CREDENTIALS_DIRECTORY",
    }
)


def check_command(argv: list[str], key: str, path: str) -> None:
    """ConfigError unless the hook's program exists and may be run (found on `path` when it has no /)."""
    if not argv:
        return
    program = argv[0]
    if "/" in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ConfigError(f"[hooks] {key}: {program!r} is not an executable file")
    elif not program or shutil.which(program, path=path) is None:
        raise ConfigError(f"[hooks] {key}: {program!r} is not found on PATH ({path})")


def hook_environment(base: Mapping[str, str], row: Row, outbox: Path) -> dict[str, str]:
    """The daemon's environment without its secrets, plus the SW_* variables describing the prompt."""
    env = {key: value for key, value in base.items() if key.upper() not in SECRET_VARIABLES}
    done = row.state == State.DONE
    stem = row.out_stem or row.stem or Path(row.file).stem
    final = Path(row.final_path) if row.final_path else None
    files = [str(outbox / out) for out in row.outputs if not out.endswith(".manifest.json")]
    env.update(
        SW_EVENT="done" if done else "failed",
        SW_NAME=Path(stem).name,
        SW_PROMPT_FILE=str(final or ""),
        SW_MANIFEST=str(outbox / f"{stem}.manifest.json") if done else "",
        SW_FILES="\n".join(files),
        SW_ERROR_FILE=str(error_file_for(final)) if final is not None and not done else "",
        SW_JOB_ID=row.job_id or "",
    )
    return env


class HookRunner:
    """Runs the hook owed for each filed prompt on a small thread pool; the journal records each run."""

    def __init__(
        self,
        settings: HookSettings,
        store: Store,
        outbox: Path,
        env: Mapping[str, str],
        finished: Callable[[], None] = lambda: None,
    ) -> None:
        for key in ("on_done", "on_failed"):
            check_command(getattr(settings, key), key, env.get("PATH", os.defpath))
        self.commands = {State.DONE: settings.on_done, State.FAILED: settings.on_failed}
        self.timeout = settings.timeout
        self.store = store
        self.outbox = outbox
        self.env = dict(env)
        self.finished = finished  # wakes the main loop (for --once, which waits for its hooks)
        self._pool = ThreadPoolExecutor(HOOK_WORKERS, thread_name_prefix="hook")
        self._lock = threading.Lock()
        self._queued = 0
        self._running: set[subprocess.Popen[bytes]] = set()
        self._closing = False

    def wants(self, state: State) -> bool:
        """Whether prompts ending in `state` have a hook to run."""
        return bool(self.commands.get(state))

    def run(self, prompt_id: int) -> None:
        """Run the prompt's hook soon (from any thread); after close, the next start runs it."""
        with self._lock:
            if self._closing:
                return
            self._queued += 1
        self._pool.submit(self._run, prompt_id)

    def resume(self) -> int:
        """Run the hooks a previous run owed (a crash or a stop between filing and hook); how many."""
        rows = self.store.hooks_pending()
        for row in rows:
            self.run(row.id)
        return len(rows)

    def busy(self) -> bool:
        """Hooks are queued or running."""
        with self._lock:
            return self._queued > 0

    def close(self, grace: float) -> None:
        """Stop: queued hooks wait for the next start, running ones get `grace` seconds, then are killed."""
        with self._lock:
            self._closing = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            running = list(self._running)
        for proc in running:  # still owed in the journal: it runs again at the next start
            _kill_group(proc, signal.SIGKILL)
        self._pool.shutdown(wait=True)

    def _run(self, prompt_id: int) -> None:
        # A pool thread is reused: the previous prompt's context (its job_id) must not leak into this one.
        structlog.contextvars.clear_contextvars()
        try:
            row = self.store.get(prompt_id)
            argv = self.commands.get(row.state)
            if argv:
                logs.bind(file=row.file, job_id=row.job_id)
                if not self._execute(argv, hook_environment(self.env, row, self.outbox)):
                    return  # killed by the shutdown: owed again at the next start
            self.store.hook_ran(prompt_id)
        except Exception:  # a hook's trouble is logged, never raised into the pool and forgotten
            log.exception("hook.error", prompt_id=prompt_id)
        finally:
            structlog.contextvars.clear_contextvars()
            with self._lock:
                self._queued -= 1
            self.finished()

    def _execute(self, argv: list[str], env: dict[str, str]) -> bool:
        """Run one hook to its end (or its timeout) and log how it went; False if the shutdown killed it."""
        event = env["SW_EVENT"]
        started = time.monotonic()
        with tempfile.TemporaryFile() as output:  # a file, not a pipe: a chatty hook cannot block
            try:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: a timeout kills all it started
                )
            except OSError as exc:
                log.warning("hook.failed", hook=event, command=argv[0], error=str(exc))
                return True
            with self._lock:
                self._running.add(proc)
                if self._closing:  # started as the daemon stopped: owed again at the next start
                    _kill_group(proc, signal.SIGKILL)
            try:
                timed_out = _wait(proc, self.timeout)
            finally:
                with self._lock:
                    self._running.discard(proc)
                    closing = self._closing
            took = round(time.monotonic() - started, 3)
            tail = _tail(output)
        context = {"hook": event, "command": argv[0], "took": took, **({"output": tail} if tail else {})}
        if timed_out:
            log.warning(
                "hook.timed_out", timeout=self.timeout, note="killed with its process group", **context
            )
        elif proc.returncode != 0 and closing:
            return False
        elif proc.returncode != 0:
            log.warning("hook.failed", exit_code=proc.returncode, **context)
        else:
            log.info("hook.ran", **context)
        return True


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the hook; past `timeout`, kill its process group (TERM, then KILL). True if it timed out."""
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()
    return True


def _kill_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, sig)  # the group's id is the hook's pid (start_new_session)


def _tail(output: IO[bytes]) -> str:
    """The last lines of what the hook wrote (bounded), for the log."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - TAIL_BYTES))
    text = output.read().decode("utf-8", "replace")
    return "\n".join(text.strip().splitlines()[-TAIL_LINES:])
