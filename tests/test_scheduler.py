"""The scheduler alone: a float clock passed in, no threads, no sleeps, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

import pytest

from scenario_watch.config import JobSettings
from scenario_watch.lifecycle import Advanced, Again, Ended, Pause, Paused, Result, Task
from scenario_watch.scheduler import (
    AUTH_RETRY,
    BACKOFF_MAX,
    EXPECTED_MARGIN,
    PROBE_EVERY,
    REFILE_DELAY,
    SHORTEST_WAIT,
    Scheduler,
)


class Step(StrEnum):
    """What a test says happened, in words; `finish` turns it into the lifecycle's result."""

    ACCEPT = "accept"
    SUBMIT = "submit"
    POLL = "poll"
    DOWNLOAD = "download"
    RATE_LIMITED = "rate_limited"
    AUTH = "auth"
    BUDGET = "budget"
    FINISHED = "finished"
    NOT_FILED = "not_filed"


@dataclass(frozen=True)
class Outcome:
    step: Step
    attempt: int = 0
    retry_after: float | None = None
    delay: float | None = None
    duration: float | None = None
    limit: int | None = None
    unwritable: str | None = None


def finish(s: Scheduler, prompt_id: int, task: Task, o: Outcome, now: float) -> bool:
    """Hand the scheduler the result and the following task the daemon would; True: newly blocked."""
    was = s.auth_blocked
    following: Task | None = None
    result: Result
    if o.step == Step.POLL and task == Task.SUBMIT:
        result, following = Advanced(), Task.POLL
    elif o.step in (Step.POLL, Step.SUBMIT, Step.ACCEPT) and o.step.value == task.value:
        result = Again(attempt=o.attempt, retry_after=o.retry_after, delay=o.delay)
    elif o.step == Step.SUBMIT:  # accepted: queued for a slot
        result, following = Advanced(), Task.SUBMIT
    elif o.step == Step.DOWNLOAD and o.unwritable is not None:
        result = Paused(Pause.UNWRITABLE, o.unwritable, delay=o.delay)
    elif o.step == Step.DOWNLOAD:
        result, following = Advanced(duration=o.duration), Task.DOWNLOAD
    elif o.step == Step.RATE_LIMITED:
        result = Paused(Pause.RATE, retry_after=o.retry_after, limit=o.limit)
    elif o.step == Step.AUTH:
        result = Paused(Pause.CREDENTIALS, "HTTP 401")
    elif o.step == Step.BUDGET:
        result = Paused(Pause.BUDGET, delay=o.delay)
    else:
        result = Ended(filed=o.step == Step.FINISHED, problem="done/ or failed/ not writable")
    s.after(prompt_id, task, result, following, now)
    return s.auth_blocked and not was


def make(max_in_flight: int = 2, poll_interval: float = 1.0, poll_max_interval: float = 8.0) -> Scheduler:
    jobs = JobSettings(
        max_in_flight=max_in_flight, poll_interval=poll_interval, poll_max_interval=poll_max_interval
    )
    return Scheduler(jobs, rng=random.Random(7))


def submit_all(s: Scheduler, now: float, *ids: int) -> None:
    for prompt_id in ids:
        s.enqueue(prompt_id)
    assert s.due(now) == [(prompt_id, Task.SUBMIT) for prompt_id in ids[: s.limit]]


def downloaded(s: Scheduler, prompt_id: int, now: float) -> None:
    """Hand out the download a finished job is due for, and finish it."""
    assert s.due(now) == [(prompt_id, Task.DOWNLOAD)]
    finish(s, prompt_id, Task.DOWNLOAD, Outcome(Step.FINISHED), now)


def poll_times(s: Scheduler, prompt_id: int, start: float, end: float, step: float = 0.01) -> list[float]:
    """Walk the clock from start to end; the moments a poll of `prompt_id` came due (left running)."""
    times, now = [], start
    while now <= end:
        for pid, task in s.due(now):
            assert (pid, task) == (prompt_id, Task.POLL)
            times.append(round(now, 2))
            finish(s, pid, task, Outcome(Step.POLL), now)
        now += step
    return times


def test_slots_bound_the_jobs_at_scenario_and_free_when_a_job_ends() -> None:
    s = make(max_in_flight=2)
    submit_all(s, 0.0, 1, 2, 3)
    assert s.busy == {1, 2} and s.slots == {1, 2} and list(s.waiting) == [3]
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.1)  # submitted: polled later, still holds its slot
    assert s.due(0.2) == [] and s.slots == {1, 2}
    finish(s, 2, Task.SUBMIT, Outcome(Step.FINISHED), 0.3)  # failed at submit: the slot frees
    assert s.due(0.3) == [(3, Task.SUBMIT)]
    assert s.slots == {1, 3}
    assert s.due(2.0) == [(1, Task.POLL)]
    # A job that succeeded frees its slot at once: its download does not hold one.
    finish(s, 1, Task.POLL, Outcome(Step.DOWNLOAD), 2.0)
    assert 1 not in s.slots and s.due(2.0) == [(1, Task.DOWNLOAD)]


def test_a_retried_submission_waits_its_backoff_then_goes_first() -> None:
    s = make(max_in_flight=1, poll_interval=1.0)
    submit_all(s, 0.0, 1)
    s.enqueue(2)
    finish(s, 1, Task.SUBMIT, Outcome(Step.SUBMIT, attempt=1), 0.0)  # transient fault
    assert s.due(0.0) == [(2, Task.SUBMIT)]  # the free slot goes to the next prompt meanwhile
    finish(s, 2, Task.SUBMIT, Outcome(Step.FINISHED), 0.1)
    retry_at = s.next_due()
    assert retry_at is not None and 0.5 * 2.0 <= retry_at <= 2.0  # poll_interval x 2^1, jittered
    assert s.due(retry_at - 0.01) == []
    assert s.due(retry_at) == [(1, Task.SUBMIT)]


def test_what_is_left_of_a_wait_is_never_a_rounding_error_to_spin_on() -> None:
    """A quiet period that ends in 1e-9 s (a remainder computed from the wall clock) is not run again
    at once, over and over: the task waits at least SHORTEST_WAIT (seen as a livelock of reconciles)."""
    s = make(max_in_flight=1)
    submit_all(s, 0.0, 1)
    s.after(1, Task.SUBMIT, Again(delay=1e-9), None, 10.0)
    assert s.due(10.0 + 1e-9) == []
    assert s.next_due() == 10.0 + SHORTEST_WAIT
    assert s.due(10.0 + SHORTEST_WAIT) == [(1, Task.SUBMIT)]


def test_backoff_grows_exponentially_and_is_capped() -> None:
    s = make(poll_interval=1.0)
    for attempt in range(1, 6):
        delay = s.backoff(attempt)
        assert 0.5 * 2**attempt <= delay <= 2**attempt
    assert all(0.5 * BACKOFF_MAX <= s.backoff(n) <= BACKOFF_MAX for n in (7, 10, 50, 10_000))


def test_polls_start_at_poll_interval_and_slow_down_to_the_cap() -> None:
    s = make(poll_interval=1.0, poll_max_interval=4.0)
    submit_all(s, 0.0, 1)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    times = poll_times(s, 1, 0.0, 30.0)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert 0.5 <= gaps[0] <= 1.5 and 0.75 <= gaps[1] <= 2.25  # x1.5 each time, +-50 % jitter
    assert max(gaps) <= 4.0 + 0.02 and min(gaps[-3:]) >= 4.0 * 0.5 - 0.02  # never over the cap
    assert 2.5 <= sum(gaps[-8:]) / 8 <= 4.0  # near the cap on average


def test_learned_generation_time_from_the_api_schedules_the_first_poll() -> None:
    s = make(max_in_flight=4, poll_interval=1.0, poll_max_interval=8.0)
    submit_all(s, 0.0, 1)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    [(pid, task)] = s.due(1.2)
    finish(s, pid, task, Outcome(Step.DOWNLOAD, duration=3.0), 1.2)
    downloaded(s, 1, 1.2)
    assert s.typical == 3.0
    submit_all(s, 10.0, 2)
    finish(s, 2, Task.SUBMIT, Outcome(Step.POLL), 10.0)
    assert s.next_due() == pytest.approx(13.0 + EXPECTED_MARGIN)  # when it should be done
    # The estimate is an upper quantile of recent times: a slower job raises it, a faster one not.
    [(pid, task)] = s.due(13.1)
    finish(s, pid, task, Outcome(Step.DOWNLOAD, duration=4.0), 13.1)
    assert s.typical == 4.0


def test_without_api_timestamps_the_polls_themselves_bound_the_generation_time() -> None:
    s = make(max_in_flight=4, poll_interval=1.0, poll_max_interval=8.0)
    submit_all(s, 0.0, 1)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    [(_, task)] = s.due(1.0)  # poll at 1.0: still running
    finish(s, 1, task, Outcome(Step.POLL), 1.0)
    due = s.next_due()
    assert due is not None
    s.due(due)  # poll at ~2.5: done, with no terminal statusHistory entry
    finish(s, 1, Task.POLL, Outcome(Step.DOWNLOAD), due)
    downloaded(s, 1, due)
    assert s.typical == pytest.approx((1.0 + due) / 2)  # between "still running" and "done"
    # Polls at the expected time that find jobs done bring the estimate down, a little each time.
    before, now = s.typical, 100.0
    for prompt_id in range(2, 40):
        submit_all(s, now, prompt_id)
        finish(s, prompt_id, Task.SUBMIT, Outcome(Step.POLL), now)
        first = s.next_due()
        assert first is not None and first == pytest.approx(now + s.typical + EXPECTED_MARGIN)
        s.due(first)
        finish(s, prompt_id, Task.POLL, Outcome(Step.DOWNLOAD), first)
        downloaded(s, prompt_id, first)
        now = first + 10
    assert s.typical is not None and before * 0.9 < s.typical < before
    # One found still running is polled again soon (not a whole interval later), and raises it.
    lowered = s.typical
    submit_all(s, now, 50)
    finish(s, 50, Task.SUBMIT, Outcome(Step.POLL), now)
    first = s.next_due()
    assert first is not None
    s.due(first)
    finish(s, 50, Task.POLL, Outcome(Step.POLL), first)
    again = s.next_due()
    assert again is not None and again - first <= max(0.1 * lowered, 2 * EXPECTED_MARGIN) + 1e-9
    s.due(again + 0.5)
    finish(s, 50, Task.POLL, Outcome(Step.DOWNLOAD), again + 0.5)
    downloaded(s, 50, again + 0.5)
    # Jobs that keep taking longer than assumed raise the estimate.
    now = again + 10
    for prompt_id in range(51, 60):
        submit_all(s, now, prompt_id)
        finish(s, prompt_id, Task.SUBMIT, Outcome(Step.POLL), now)
        first = s.next_due()
        assert first is not None
        s.due(first)
        finish(s, prompt_id, Task.POLL, Outcome(Step.POLL), first)
        s.due(first + 1.0)
        finish(s, prompt_id, Task.POLL, Outcome(Step.DOWNLOAD), first + 1.0)
        downloaded(s, prompt_id, first + 1.0)
        now = first + 10
    assert s.typical > lowered


def test_the_first_job_seen_done_has_the_rest_of_its_batch_polled_at_once() -> None:
    """Cold start: 16 jobs sent together poll on jittered x1.5 intervals. When the first is seen done
    (1.0 s by the API's clock), each other one is polled when it should be done by that measure, not at
    its own planned time, up to a whole interval later; the polls planned before come to nothing."""
    s = make(max_in_flight=16, poll_interval=0.25, poll_max_interval=1.0)
    ids = list(range(1, 17))
    submit_all(s, 0.0, *ids)
    for prompt_id in ids:
        finish(s, prompt_id, Task.SUBMIT, Outcome(Step.POLL), prompt_id * 0.001)
    seen: dict[int, float] = {}  # prompt id -> when a poll found its job done
    polls, now = 0, 0.0
    while len(seen) < 16 and now < 3.0:
        now += 0.001
        for prompt_id, task in s.due(now):
            if task == Task.POLL:
                polls += 1
                done = now >= 1.0 + prompt_id * 0.001
                result = Outcome(Step.DOWNLOAD, duration=1.0) if done else Outcome(Step.POLL)
                finish(s, prompt_id, task, result, now)
                if done:
                    seen[prompt_id] = now
            else:
                finish(s, prompt_id, task, Outcome(Step.FINISHED), now)
    first = min(seen.values())
    assert first < 1.3  # the spread polls of 16 jobs find the first end soon after 1.0 s
    # Every other job is seen within a few milliseconds of when it should be done, or of `first`.
    assert all(at <= max(first, 1.003 + p * 0.001) + 0.002 for p, at in seen.items()), seen
    assert polls <= 16 * 4
    for prompt_id, task in s.due(now):
        assert task == Task.DOWNLOAD
        finish(s, prompt_id, task, Outcome(Step.FINISHED), now)
    assert s.due(now + 5.0) == [] and s.idle()  # the polls planned before came to nothing


@pytest.mark.parametrize("history", [True, False])
def test_learned_polling_needs_few_polls_and_sees_results_soon(history: bool) -> None:
    """200 jobs of about 1 s (+-5 %), 16 at a time: polls per job and how late each result is seen."""
    s = make(max_in_flight=16, poll_interval=0.25, poll_max_interval=1.0)
    rng = random.Random(3)
    ends: dict[int, float] = {}  # prompt id -> when its job is done
    durations: dict[int, float] = {}
    for prompt_id in range(200):
        s.enqueue(prompt_id)
    polls, lateness, now, step = 0, [], 0.0, 0.005
    while len(lateness) < 200:
        for prompt_id, task in s.due(now):
            if task == Task.SUBMIT:
                durations[prompt_id] = rng.uniform(0.95, 1.05)
                ends[prompt_id] = now + durations[prompt_id]
                finish(s, prompt_id, task, Outcome(Step.POLL), now)
            elif task == Task.POLL:
                polls += 1
                if now < ends[prompt_id]:
                    finish(s, prompt_id, task, Outcome(Step.POLL), now)
                else:
                    known = durations[prompt_id] if history else None  # the API's own timing
                    finish(s, prompt_id, task, Outcome(Step.DOWNLOAD, duration=known), now)
                    lateness.append(now - ends[prompt_id])
            else:
                finish(s, prompt_id, task, Outcome(Step.FINISHED), now)
        now += step
    assert polls / 200 <= 1.5
    assert sum(lateness) / 200 <= 0.1  # a result is seen within a tenth of the generation time


def test_a_failed_poll_is_not_taken_as_running_and_honours_retry_after() -> None:
    s = make(poll_interval=1.0)
    submit_all(s, 0.0, 1)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    s.due(1.0)
    finish(s, 1, Task.POLL, Outcome(Step.POLL, attempt=1, retry_after=20.0), 1.0)
    assert s.next_due() == pytest.approx(21.0)
    # Another job seen done meanwhile teaches a generation time: the wait the API asked for still holds.
    submit_all(s, 1.5, 2)
    finish(s, 2, Task.SUBMIT, Outcome(Step.POLL), 1.5)
    [(_, task)] = s.due(3.0)
    finish(s, 2, task, Outcome(Step.DOWNLOAD, duration=1.0), 3.0)
    assert s.typical == 1.0
    assert s.due(3.0) == [(2, Task.DOWNLOAD)]
    assert s.next_due() == pytest.approx(21.0)


def test_rate_limit_pauses_submissions_until_retry_after_but_not_polls() -> None:
    s = make(max_in_flight=4)
    submit_all(s, 0.0, 1, 2)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    finish(s, 2, Task.SUBMIT, Outcome(Step.RATE_LIMITED, attempt=1, retry_after=5.0), 0.0)
    s.enqueue(3)
    assert list(s.waiting) == [2, 3]  # the refused prompt keeps its place at the head
    assert s.due(1.0) == [(1, Task.POLL)]  # polling goes on during the pause
    finish(s, 1, Task.POLL, Outcome(Step.POLL), 1.0)
    assert s.next_due() is not None and s.next_due() <= 5.0  # type: ignore[operator]
    assert all(task != Task.SUBMIT for _, task in s.due(4.99))
    assert [(p, t) for p, t in s.due(5.0) if t == Task.SUBMIT] == [(2, Task.SUBMIT), (3, Task.SUBMIT)]


def test_rate_limit_without_retry_after_backs_off() -> None:
    s = make(poll_interval=1.0)
    submit_all(s, 0.0, 1)
    finish(s, 1, Task.SUBMIT, Outcome(Step.RATE_LIMITED), 0.0)
    assert 1.0 <= s.paused_until <= 2.0


def test_rejected_credentials_block_submission_once_and_are_tried_again_later() -> None:
    s = make(max_in_flight=4)
    submit_all(s, 0.0, 1, 2)
    assert finish(s, 1, Task.SUBMIT, Outcome(Step.AUTH), 0.0) is True  # log this one
    assert finish(s, 2, Task.SUBMIT, Outcome(Step.AUTH), 0.0) is False  # not again
    assert s.auth_blocked and set(s.waiting) == {1, 2}
    assert s.due(AUTH_RETRY - 1) == []
    assert s.next_due() == pytest.approx(AUTH_RETRY)
    assert sorted(s.due(AUTH_RETRY)) == [(1, Task.SUBMIT), (2, Task.SUBMIT)]
    assert not s.auth_blocked


def test_stopping_hands_out_no_submission_but_keeps_polling() -> None:
    s = make()
    submit_all(s, 0.0, 1)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    s.enqueue(2)
    assert s.due(5.0, submit=False) == [(1, Task.POLL)]
    assert list(s.waiting) == [2]


def test_accept_outcomes_queue_recheck_or_refile() -> None:
    s = make(max_in_flight=1)
    finish(s, 1, Task.ACCEPT, Outcome(Step.ACCEPT, delay=0.5), 0.0)  # a reference not there yet
    finish(s, 2, Task.ACCEPT, Outcome(Step.SUBMIT), 0.0)  # valid: queued behind the others
    assert s.due(0.0) == [(2, Task.SUBMIT)]
    finish(s, 3, Task.ACCEPT, Outcome(Step.NOT_FILED), 0.0)  # failed, and failed/ could not be written
    assert s.due(0.5) == [(1, Task.ACCEPT)]
    assert s.due(REFILE_DELAY) == [(3, Task.FILE)]


def test_idle_only_when_nothing_is_queued_timed_or_running() -> None:
    s = make()
    assert s.idle()
    s.enqueue(1)
    assert not s.idle()
    s.due(0.0)
    assert not s.idle()  # busy in a worker
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    assert not s.idle()  # a poll is timed
    s.due(100.0)
    finish(s, 1, Task.POLL, Outcome(Step.FINISHED), 100.0)
    assert s.idle() and not s.slots


def test_a_job_found_at_start_holds_a_slot_and_is_polled_at_once() -> None:
    s = make(max_in_flight=1)
    s.resume(1, Task.POLL, 50.0)
    s.enqueue(2)
    assert s.due(50.0) == [(1, Task.POLL)]
    assert s.slots == {1}


def test_the_budget_pauses_every_submission_until_the_given_time_with_the_prompt_first() -> None:
    s = make(max_in_flight=4)
    submit_all(s, 0.0, 1, 2)
    s.enqueue(3)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.1)  # paid, running
    finish(s, 2, Task.SUBMIT, Outcome(Step.BUDGET, delay=100.0), 0.2)  # would pass the cap
    assert list(s.waiting) == [2, 3] and s.slots == {1}  # not failed, first in line, its slot free
    assert s.submissions_paused() and s.next_due() is not None
    assert not s.idle()  # the running job still counts (`run --once` waits for it, not for tomorrow)
    assert all(task != Task.SUBMIT for _, task in s.due(50.0))  # polls go on, nothing is sent
    finish(s, 1, Task.POLL, Outcome(Step.FINISHED), 60.0)
    assert s.next_due() == pytest.approx(100.2)  # wakes when the day turns
    assert s.due(100.1) == [] and s.idle()  # only prompts waiting for tomorrow: --once may end
    assert s.due(100.2) == [(2, Task.SUBMIT), (3, Task.SUBMIT)]
    assert not s.submissions_paused() and s.budget_until == 0.0


def test_an_unwritable_output_folder_stops_submissions_until_a_probe_succeeds() -> None:
    s = make(max_in_flight=4)
    submit_all(s, 0.0, 1)
    finish(s, 1, Task.SUBMIT, Outcome(Step.POLL), 0.0)
    assert s.due(5.0) == [(1, Task.POLL)]
    finish(s, 1, Task.POLL, Outcome(Step.DOWNLOAD), 5.0)
    assert s.due(5.0) == [(1, Task.DOWNLOAD)]
    reason = "outbox not writable: No space left on device"
    finish(s, 1, Task.DOWNLOAD, Outcome(Step.DOWNLOAD, delay=30.0, unwritable=reason), 5.0)
    s.enqueue(2)
    assert s.unwritable == reason and s.due(6.0) == []  # the paid download waits; nothing new is sent
    assert not s.probe_due(5.0 + PROBE_EVERY - 0.01) and s.probe_due(5.0 + PROBE_EVERY)
    assert s.next_due() == pytest.approx(5.0 + PROBE_EVERY)
    s.probed(reason, 10.0)  # still full: probe again later
    assert s.due(11.0) == [] and s.probe_due(10.0 + PROBE_EVERY)
    s.probed(None, 15.0)  # written: submissions resume, and the download keeps its own timer
    assert not s.probe_due(100.0)
    assert s.due(15.0) == [(2, Task.SUBMIT)]
    assert s.due(35.0) == [(1, Task.DOWNLOAD)]


def test_a_finished_pause_is_forgotten_so_the_loop_never_spins() -> None:
    s = make(max_in_flight=1)
    submit_all(s, 0.0, 1)
    s.enqueue(2)
    finish(s, 1, Task.SUBMIT, Outcome(Step.RATE_LIMITED, retry_after=1.0), 0.0)
    assert s.due(1.0) == [(1, Task.SUBMIT)]  # the pause is over: the slot is taken again
    # The queue still waits (the one slot is busy): nothing is due until a timer says so.
    assert s.next_due() is None
