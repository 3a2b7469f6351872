"""The worker threads that run the HTTP tasks (submit, poll, download): a few at first, more while
tasks wait for one.

Threads share one GIL. When requests answer in a millisecond (the sandbox, a near network) a task is
mostly CPU, and every thread waiting for the GIL costs futex calls and context switches: four workers
taking turns spend less CPU than eight (paired benchmark drains, 4 of 4: 0.7 to 2.4 ms less a job,
with the same drain efficiency), and eight less than twenty. Two were no better than four.
Against the real API a request takes hundreds of milliseconds, and a round of submissions must not
queue behind each other for long: a task that waited longer than GROW_AFTER for a worker starts one
more, up to the most the daemon allows. The pool never shrinks; idle threads cost nothing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from scenario_watch.lifecycle import Result, Task

FIRST = 4  # workers at start
GROW_AFTER = 0.2  # seconds a task may wait for a worker before another one is started

Run = Callable[[int, Task], Result]
Report = Callable[[int, Task, Result], None]


class Workers:
    """A pool of threads taking (prompt id, task) in order; each result is reported, whatever happens."""

    def __init__(
        self, run: Run, report: Report, died: Callable[[threading.Thread], None], most: int, crashed: Result
    ) -> None:
        """`report` gets every task's result, `crashed` for a task that ended its thread (a BaseException),
        and `died` is told of that thread next. Nothing starts before `start()`."""
        self.run, self.report, self.died, self.most, self.crashed = run, report, died, most, crashed
        self.threads: list[threading.Thread] = []
        self._tasks: queue.SimpleQueue[tuple[int, Task, float] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._named = 0

    def start(self) -> None:
        """Start the first workers."""
        for _ in range(min(FIRST, self.most)):
            self._add()

    def put(self, prompt_id: int, task: Task) -> None:
        """Run `task` for a prompt in the next free worker."""
        self._tasks.put((prompt_id, task, time.monotonic()))  # real time: a wait for a thread

    def replace(self, thread: threading.Thread) -> None:
        """A worker ended on a BaseException: another takes its place."""
        with self._lock:
            self.threads.remove(thread)
            self._add()

    def close(self, deadline: float) -> None:
        """Let each worker finish its task and end, waiting until `deadline` (time.monotonic) at most."""
        with self._lock:
            threads = list(self.threads)
        for _ in threads:
            self._tasks.put(None)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _add(self) -> None:
        """Start one worker (the lock held, or before any runs)."""
        self._named += 1
        thread = threading.Thread(target=self._work, name=f"worker-{self._named}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _work(self) -> None:
        try:
            while (item := self._tasks.get()) is not None:
                prompt_id, task, queued = item
                if time.monotonic() - queued > GROW_AFTER:
                    with self._lock:
                        if len(self.threads) < self.most:
                            self._add()
                result = self.crashed
                try:
                    result = self.run(prompt_id, task)
                finally:  # even when the thread dies (a BaseException), its prompt is not left busy
                    self.report(prompt_id, task, result)
        except BaseException:
            self.died(threading.current_thread())
            raise
