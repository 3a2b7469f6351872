"""*When* each thing is due: timers, the waiting queue, free slots, pauses, poll times, backoff.

No I/O and no threads: the main loop passes `now` (monotonic seconds) in and hands out what is due;
a task reports facts about what happened (a result of lifecycle.py: attempts, Retry-After, a pause,
a duration), the lifecycle says which task follows, and this module turns those facts into times.
It is unit-tested with a plain float clock.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass

from scenario_watch.config import JobSettings
from scenario_watch.lifecycle import WORKER_TASKS, Advanced, Again, Ended, Pause, Paused, Result, Task

# Credentials refused: try submitting again after this long (someone may have fixed them meanwhile);
# a poll or download that met the refusal asks again after AUTH_PROBE (an answer ends the pause at once).
AUTH_RETRY = 300.0
AUTH_PROBE = 15.0
# Backoff after transient faults: poll_interval x 2^attempt, jittered, at most this.
BACKOFF_MAX = 60.0
BACKOFF_EXPONENT_CAP = 10
# Polls of a running job slow down by this factor each time, up to poll_max_interval. Each delay is
# spread by +-POLL_JITTER: jobs sent together then poll at times spread over the interval, so that
# together they sample it finely, and the first of them seen done has the rest polled at once (_hurry).
# Simulated for 16 jobs of 1 s at poll_interval 0.25 s: the first seen done at 1.04 s (+-10 %: 1.12 s).
POLL_GROWTH = 1.5
POLL_JITTER = 0.5
# A job is polled this long after it should be done: our start is the POST's answer, after the API's
# own start, so only the API's lag in showing a final status needs covering.
EXPECTED_MARGIN = 0.003
# The learned generation time is this quantile of the last ESTIMATE_WINDOW jobs' times: most jobs
# are done when first polled, and one that is not is polled again soon (a share of the time, at most
# poll_interval). Without the API's timestamps, a job found done at its first poll counts as
# PROBE_DOWN less than assumed, which lets the estimate come down when generations get faster.
ESTIMATE_QUANTILE = 0.8
ESTIMATE_WINDOW = 32
PROBE_DOWN = 0.01
MISSED_RETRY_SHARE = 0.1
# A prompt that could not be moved to done/ or failed/ (a full disk) is tried again this much later.
REFILE_DELAY = 10.0
# A task that waits for a moment (a quiet period's end, a reference's deadline) runs again at least this
# much later: what is left of a wait may be a rounding error, and the task must not spin until it passes.
SHORTEST_WAIT = 0.05
# A download that could not write the outbox is tried again this much later (submissions wait).
WRITE_RETRY = 10.0
# While an output folder cannot be written, submissions stop and a probe file is tried this often.
PROBE_EVERY = 5.0


@dataclass
class _Job:
    """What the scheduler knows about one job at Scenario."""

    started: float  # when the submission was answered (monotonic)
    interval: float  # the next poll delay while the generation time is unknown or past
    polled_at: float | None = None  # when the current poll was handed out
    running_at: float | None = None  # the latest poll that found it still running (since start)
    expected: bool = False  # the current poll is the one at the time it should be done
    estimate: float | None = None  # the generation time that poll assumed
    missed: bool = False  # that poll found it still running
    timer: tuple[float, int] | None = None  # its pending poll's timer (when, tie-break)


class Scheduler:
    """Timers, the queue for free slots at Scenario, 429 and credential pauses, learned poll times."""

    def __init__(self, jobs: JobSettings, rng: random.Random | None = None) -> None:
        self.jobs = jobs
        self.limit = jobs.max_in_flight  # jobs at Scenario at once
        self._rng = rng or random.Random()
        self._timers: list[tuple[float, int, int, Task]] = []  # (due, tie-break, prompt id, task)
        self._moved: set[int] = set()  # tie-breaks of polls moved earlier: skipped when they come
        self._order = itertools.count()
        self.waiting: deque[int] = deque()  # ready to submit, in order, for a free slot
        self.slots: set[int] = set()  # prompts holding one of `limit`
        self.busy: set[int] = set()  # prompts with a task in a worker
        self.paused_until = 0.0  # 429: no submission before this
        self.auth_blocked = False
        self._auth_retry_at: float | None = None
        self.budget_until = 0.0  # the daily budget is spent: no submission before this
        self.unwritable: str | None = None  # why an output folder cannot be written (no submission)
        self._probe_at: float | None = None  # when to try writing there again
        self.typical: float | None = None  # how long a generation takes, learned
        self._samples: deque[float] = deque(maxlen=ESTIMATE_WINDOW)
        self._running: dict[int, _Job] = {}

    # -- what the loop feeds in ------------------------------------------------------------------------

    def enqueue(self, prompt_id: int, *, first: bool = False) -> None:
        """Queue a prompt for a free slot (`first`: ahead of the others, e.g. a retry)."""
        if first:
            self.waiting.appendleft(prompt_id)
        else:
            self.waiting.append(prompt_id)

    def at(self, when: float, prompt_id: int, task: Task) -> tuple[float, int]:
        """Run `task` for a prompt at `when`; the timer's (when, tie-break), which name it."""
        order = next(self._order)
        heapq.heappush(self._timers, (when, order, prompt_id, task))
        return when, order

    def resume(self, prompt_id: int, task: Task, now: float, *, first: bool = False) -> None:
        """A prompt found in the journal at start: its next task (lifecycle.next_task) from now on."""
        if task == Task.SUBMIT:
            self.enqueue(prompt_id, first=first)
        elif task == Task.POLL:  # a job already at Scenario: it holds a slot and is polled at once
            self.slots.add(prompt_id)
            job = self._running[prompt_id] = _Job(started=now, interval=self.jobs.poll_interval)
            job.timer = self.at(now, prompt_id, Task.POLL)
        else:
            self.at(now, prompt_id, task)

    # -- what is due -----------------------------------------------------------------------------------

    def due(self, now: float, *, submit: bool = True) -> list[tuple[int, Task]]:
        """Everything due at `now`, in order; worker tasks are marked busy (`submit`: hand out slots)."""
        out: list[tuple[int, Task]] = []
        if self._auth_retry_at is not None and now >= self._auth_retry_at:
            self.auth_blocked, self._auth_retry_at = False, None  # try the credentials again
        # A pause that is over is forgotten, so that next_due never offers a moment in the past.
        if now >= self.paused_until:
            self.paused_until = 0.0
        if now >= self.budget_until:
            self.budget_until = 0.0
        while self._timers and self._timers[0][0] <= now:
            _, order, prompt_id, task = heapq.heappop(self._timers)
            if order in self._moved:
                self._moved.discard(order)
                continue
            if task == Task.SUBMIT:
                self.waiting.appendleft(prompt_id)  # its turn came before: it goes first
            else:
                out.append((prompt_id, task))
        if submit and not self.submissions_paused():
            sends: list[tuple[int, Task]] = []
            while self.waiting and len(self.slots) < self.limit:
                prompt_id = self.waiting.popleft()
                self.slots.add(prompt_id)
                sends.append((prompt_id, Task.SUBMIT))
            out = sends + out  # first: a free slot at Scenario is what the queue waits for
        for prompt_id, task in out:
            if task in WORKER_TASKS:
                self.busy.add(prompt_id)
            job = self._running.get(prompt_id)
            if task == Task.POLL and job is not None:
                job.polled_at, job.timer = now, None
        return out

    def next_due(self) -> float | None:
        """The earliest moment something may become due (monotonic), or None."""
        times = [self._timers[0][0]] if self._timers else []
        if self.waiting and not self.auth_blocked:
            times += [t for t in (self.paused_until, self.budget_until) if t]
        if self._auth_retry_at is not None:
            times.append(self._auth_retry_at)
        if self._probe_at is not None:
            times.append(self._probe_at)
        return min(times, default=None)

    def submissions_paused(self) -> bool:
        """Whether submitting waits (429, credentials, budget, an unwritable folder); pauses end in due()."""
        return bool(self.paused_until or self.budget_until or self.auth_blocked or self.unwritable)

    def probe_due(self, now: float) -> bool:
        """Whether it is time to try writing the output folders again."""
        return self._probe_at is not None and now >= self._probe_at

    def probed(self, problem: str | None, now: float) -> None:
        """The result of a probe: None (writable: submissions go on) or why not (probe again later)."""
        self.unwritable = problem
        self._probe_at = None if problem is None else now + PROBE_EVERY

    def idle(self) -> bool:
        """Nothing queued, timed or running (prompts held back until the budget's next day aside)."""
        timed = len(self._timers) > len(self._moved)  # polls moved earlier leave their old timer behind
        return not ((self.waiting and not self.budget_until) or timed or self.busy)

    # -- facts into times ------------------------------------------------------------------------------

    def after(self, prompt_id: int, ran: Task, result: Result, following: Task | None, now: float) -> None:
        """Take a finished task's result; `following` is what the lifecycle says runs next."""
        self.busy.discard(prompt_id)
        if isinstance(result, Ended):
            self.forget(prompt_id)
            if not result.filed:  # done/ or failed/ cannot be written: submissions wait too
                self.probed(result.problem, now)
                self.at(now + REFILE_DELAY, prompt_id, Task.FILE)
        elif isinstance(result, Paused):
            self._pause(prompt_id, ran, result, now)
        elif isinstance(result, Again):
            if ran in (Task.POLL, Task.SUBMIT) and result.attempt == 0:
                self.credentials_work()
            if ran == Task.POLL:
                self._poll_later(prompt_id, result, now)
                return
            if ran == Task.SUBMIT:  # it waits for a free slot again when due
                self.slots.discard(prompt_id)
            self.at(now + self._delay(result), prompt_id, ran)
        elif isinstance(result, Advanced):
            if ran in (Task.POLL, Task.SUBMIT):
                self.credentials_work()
            self._advance(prompt_id, ran, result, following, now)

    def _advance(
        self, prompt_id: int, ran: Task, result: Advanced, following: Task | None, now: float
    ) -> None:
        if following == Task.SUBMIT:  # checked (or certainly not sent): wait for a slot
            self.slots.discard(prompt_id)
            self.waiting.append(prompt_id)
        elif following == Task.POLL:  # just submitted (or a lost answer's job adopted)
            started = now if result.at is None else min(now, result.at)  # the answer, not our bookkeeping
            self._running[prompt_id] = _Job(started=started, interval=self.jobs.poll_interval)
            self._poll_later(prompt_id, Again(), now)
        elif following == Task.DOWNLOAD:  # terminal at Scenario: its slot is free while outputs download
            if ran == Task.POLL:
                self._learn(prompt_id, result.duration, now)
            self.forget(prompt_id)
            self._hurry(now)
            self.at(now, prompt_id, Task.DOWNLOAD)
        elif following is not None:
            self.forget(prompt_id)
            self.at(now, prompt_id, following)
        else:
            self.forget(prompt_id)

    def _pause(self, prompt_id: int, ran: Task, result: Paused, now: float) -> None:
        """One rule per kind of pause, wherever it was met: submissions wait, the task waits, jobs stay."""
        if result.kind == Pause.RATE:
            pause = result.retry_after if result.retry_after is not None else self.backoff(1)
            self.paused_until = max(self.paused_until, now + pause)
            if result.limit is not None and 1 <= result.limit < self.limit:
                self.limit = result.limit  # the plan's parallel limit: more in flight only meets 429s
        elif result.kind == Pause.CREDENTIALS:
            if not self.auth_blocked:
                self._auth_retry_at = now + AUTH_RETRY
            self.auth_blocked = True
        elif result.kind == Pause.BUDGET:
            self.budget_until = max(self.budget_until, now + (result.delay or 0.0))
        else:
            self.probed(result.reason, now)
        if ran == Task.SUBMIT:  # not sent: first in line when submitting resumes
            self.slots.discard(prompt_id)
            self.waiting.appendleft(prompt_id)
        elif ran == Task.POLL:  # the job runs on at Scenario: ask again later, its slot kept
            delay = AUTH_PROBE if result.kind == Pause.CREDENTIALS else max(result.retry_after or 0.0, 1.0)
            self._poll_later(prompt_id, Again(delay=delay), now)
        else:
            delay = AUTH_PROBE if result.kind == Pause.CREDENTIALS else (result.delay or WRITE_RETRY)
            self.at(now + delay, prompt_id, ran)

    def credentials_work(self) -> None:
        """The API just accepted the credentials: a credentials pause is over."""
        self.auth_blocked, self._auth_retry_at = False, None

    def forget(self, prompt_id: int) -> None:
        """Drop what is kept about a prompt whose job is over."""
        self._running.pop(prompt_id, None)
        self.slots.discard(prompt_id)

    def _poll_later(self, prompt_id: int, outcome: Again, now: float) -> None:
        job = self._running.get(prompt_id)
        if job is None:  # a poll found at start without its job's start (resume() makes one)
            job = self._running[prompt_id] = _Job(started=now, interval=self.jobs.poll_interval)
        elif job.polled_at is not None and outcome.retry_after is None and outcome.attempt == 0:
            job.running_at = job.polled_at - job.started  # it was still running then
            job.missed = job.missed or job.expected
        delay = outcome.delay if outcome.delay is not None else self._interval(job, now)
        timer = self.at(now + max(delay, outcome.retry_after or 0.0), prompt_id, Task.POLL)
        waits = outcome.delay is not None or outcome.retry_after is not None  # the API's word, or a pause's
        job.timer = None if waits else timer  # _hurry never moves such a poll earlier

    def _interval(self, job: _Job, now: float) -> float:
        """The delay before the next poll of a running job.

        It starts at poll_interval and grows x1.5 towards poll_max_interval (jittered), which bounds
        the request rate. Once finished jobs have shown how long a generation takes, a job younger
        than that is polled when it should be done instead: fewer polls, and results seen sooner.
        """
        typical = self.typical
        if typical is not None and not job.missed:
            due = job.started + typical + EXPECTED_MARGIN - now
            if due > 0:  # polling before then would only find it running
                job.expected, job.estimate = True, typical
                return due
        if typical is not None and job.expected:  # the expected poll missed: it should be done soon
            job.expected = False
            return min(job.interval, max(2 * EXPECTED_MARGIN, MISSED_RETRY_SHARE * typical))
        current = job.interval
        job.interval = min(self.jobs.poll_max_interval, current * POLL_GROWTH)
        spread = current * self._rng.uniform(1 - POLL_JITTER, 1 + POLL_JITTER)
        return min(spread, self.jobs.poll_max_interval)

    def _learn(self, prompt_id: int, duration: float | None, now: float) -> None:
        """Learn the generation time from a job that just finished.

        The estimate is an upper quantile of recent generation times, so most jobs are done when
        first polled. The API's own timestamps give a time exactly. Without them the polls bound it:
        still running at one poll and done at the next gives the middle; done at the poll at the
        expected time says only "at most this", which counts as a little less than was assumed,
        probing the estimate down.
        """
        sample = duration
        job = self._running.get(prompt_id)
        if sample is None and job is not None and job.polled_at is not None:
            if job.estimate is not None and not job.missed:
                sample = job.estimate * (1 - PROBE_DOWN)
            else:
                done_at = job.polled_at - job.started
                sample = done_at if job.running_at is None else (job.running_at + done_at) / 2
        if sample is not None:
            self.recall(sample)

    def _hurry(self, now: float) -> None:
        """Jobs that should be done by now, as far as the generation time just learned says, are polled
        now instead of at their planned time: a batch sent together is seen done together, as soon as
        its first job is (in a cold start, before this, their polls were spread over x1.5 intervals)."""
        typical = self.typical
        if typical is None:
            return
        for prompt_id, job in self._running.items():
            if prompt_id in self.busy or job.missed or job.timer is None:
                continue  # a poll in flight, a wait the API set, or a poll found it running late
            if job.running_at is not None and job.running_at >= typical:
                continue  # seen running past that time already: not one to judge the estimate by
            due = max(now, job.started + typical + EXPECTED_MARGIN)
            if due < job.timer[0]:
                self._moved.add(job.timer[1])
                job.expected, job.estimate = True, typical
                job.timer = self.at(due, prompt_id, Task.POLL)

    def recall(self, sample: float) -> None:
        """One generation time more (learned now, or the one an earlier run had learned, at start)."""
        self._samples.append(sample)
        ordered = sorted(self._samples)
        self.typical = ordered[min(len(ordered) - 1, int(ESTIMATE_QUANTILE * len(ordered)))]

    def _delay(self, outcome: Again) -> float:
        if outcome.delay is not None:  # the rest of a wait: never a few microseconds, run again and again
            return max(outcome.delay, SHORTEST_WAIT)
        return 0.0 if outcome.attempt == 0 else self.backoff(outcome.attempt)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter after transient faults: poll_interval x 2^n, at most 60 s."""
        base = self.jobs.poll_interval * 2.0 ** min(attempt, BACKOFF_EXPONENT_CAP)
        return self._rng.uniform(0.5, 1.0) * min(BACKOFF_MAX, base)
