"""The daily spend cap: whether a prompt may be sent now, by its estimated cost and today's spend.

Days are UTC days. Today's spend is what the API reported for the jobs submitted since midnight,
read from the journal (so a restart keeps it); a submission under way reserves its estimate until
its own cost is journaled; a submission whose answer was lost keeps its reservation while it is
reconciled (its job, if any, has a cost nobody knows yet) until the job is found or it is resent.
Estimates come from the API's dryRun once per parameter shape, then from what that shape cost: one
dryRun per kind of prompt, not one per prompt. What each shape costs is kept in the journal's meta
table, so a restart does not ask again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from scenario_watch import logs
from scenario_watch.config import BudgetSettings

log = logs.get()

DAY = timedelta(days=1)
# Costs are floats: a sum that passes the cap by a rounding error still fits.
EPSILON = 1e-9

Shape = tuple[Any, ...]

# The journal's meta key of the learned costs: [[shape...], cost] pairs, as JSON.
COSTS_KEY = "budget_costs"


class Meta(Protocol):
    """Where learned costs are kept (the journal's meta table)."""

    def get_meta(self, key: str) -> tuple[str, float] | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


def day_start(wall: float) -> float:
    """The UTC midnight at or before a Unix time."""
    moment = datetime.fromtimestamp(wall, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def next_day(wall: float) -> float:
    """The UTC midnight after a Unix time: when a spent budget is whole again."""
    return (datetime.fromtimestamp(day_start(wall), UTC) + DAY).timestamp()


def shape(inputs: Mapping[str, Any]) -> Shape:
    """What a generation's price depends on (the prompt's words do not)."""
    return (
        inputs.get("numOutputs"),
        inputs.get("resolution"),
        inputs.get("useGoogleSearch"),
        len(inputs.get("referenceImages") or ()),
    )


def fits(estimate: float, spent: float, reserved: float, daily: float) -> bool:
    """Whether a generation costing `estimate` keeps the day within `daily` (0: no cap)."""
    return daily <= 0 or spent + reserved + estimate <= daily + EPSILON


@dataclass(frozen=True)
class Verdict:
    """The answer for one prompt: go, wait for `resumes_at` (Unix time), or too dear for one prompt."""

    estimate: float | None
    allowed: bool
    too_dear: bool = False  # above [budget] max_per_prompt: the prompt fails
    spent: float = 0.0
    resumes_at: float | None = None


class Budget:
    """Admits submissions under [budget]; shared by the workers (a lock guards the reservations)."""

    def __init__(
        self,
        settings: BudgetSettings,
        spent_since: Callable[[float, Collection[int]], float],
        wall: Callable[[], float] = time.time,
        meta: Meta | None = None,
    ) -> None:
        self.daily = settings.daily
        self.max_per_prompt = settings.max_per_prompt
        # The journal's reported costs of jobs submitted since a time, but for the prompts named.
        self.spent_since = spent_since
        self.wall = wall
        self._lock = threading.Lock()
        self.meta = meta
        self._costs: dict[Shape, float] = _load_costs(meta)  # learned per shape, kept across restarts
        self._reserved: dict[int, float] = {}  # prompt id → estimate, while it is being submitted
        self._paused_until: float | None = None  # logged once per pause

    @property
    def enabled(self) -> bool:
        """Whether any limit is set (without one, no estimate is ever asked for)."""
        return self.daily > 0 or self.max_per_prompt > 0

    def admit(self, prompt_id: int, inputs: Mapping[str, Any], estimate: Callable[[Any], float]) -> Verdict:
        """Estimate a prompt (`estimate`: a dryRun, for a new shape) and reserve it if it fits."""
        if not self.enabled:
            return Verdict(None, allowed=True)
        cost = self._costs.get(shape(inputs))
        if cost is None:
            cost = estimate(dict(inputs))  # a request: outside the lock
            self.learn(inputs, cost)
        if self.max_per_prompt and cost > self.max_per_prompt + EPSILON:
            return Verdict(cost, allowed=False, too_dear=True)
        now = self.wall()
        newly = resumed = False
        with self._lock:
            # A reserved prompt counts as its estimate until released, even once its cost is journaled.
            spent = self.spent_since(day_start(now), self._reserved.keys())
            reserved = sum(self._reserved.values())
            if not fits(cost, spent, reserved, self.daily):
                resumes_at = next_day(now)
                newly = self._paused_until != resumes_at
                self._paused_until = resumes_at
                verdict = Verdict(cost, allowed=False, spent=spent, resumes_at=resumes_at)
            else:
                self._reserved[prompt_id] = cost
                resumed, self._paused_until = self._paused_until is not None, None
                verdict = Verdict(cost, allowed=True, spent=spent)
        if not verdict.allowed and newly:
            log.warning(
                "budget.paused",
                spent=round(spent, 4),
                in_flight=round(reserved, 4),  # estimates of submissions under way
                cap=self.daily,
                next_estimate=cost,
                resumes_at=datetime.fromtimestamp(next_day(now), UTC).isoformat(timespec="seconds"),
                note="no prompt is sent until then; they stay queued",
            )
        elif verdict.allowed and resumed:
            log.info("budget.resumed", spent=round(spent, 4), cap=self.daily)
        return verdict

    def remaining(self) -> float | None:
        """Creative units left today under [budget] daily (reservations count as spent); None: no cap."""
        if self.daily <= 0:
            return None
        now = self.wall()
        with self._lock:
            spent = self.spent_since(day_start(now), self._reserved.keys())
            reserved = sum(self._reserved.values())
        return max(0.0, self.daily - spent - reserved)

    def learn(self, inputs: Mapping[str, Any], cost: float | None) -> None:
        """Remember what a generation of this shape costs (from a dryRun, or the API's reported cost)."""
        if cost is None or not self.enabled:
            return
        with self._lock:
            changed = self._costs.get(shape(inputs)) != cost
            self._costs[shape(inputs)] = cost
            text = json.dumps([[list(key), value] for key, value in self._costs.items()])
        if changed and self.meta is not None:
            self.meta.set_meta(COSTS_KEY, text)

    def hold(self, prompt_id: int, inputs: Mapping[str, Any]) -> None:
        """Keep (or after a restart, take again) the reservation of a prompt whose answer was lost.

        Its job may exist with a cost not yet known: it counts as its shape's learned cost until the
        job is found (its cost then journaled) or it is resent (admitted again). Never refused.
        """
        if not self.enabled:
            return
        with self._lock:
            cost = self._costs.get(shape(inputs))
            if prompt_id not in self._reserved and cost is not None:
                self._reserved[prompt_id] = cost

    def holds(self, prompt_id: int) -> bool:
        """Whether a prompt's estimate is reserved now."""
        with self._lock:
            return prompt_id in self._reserved

    def release(self, prompt_id: int) -> None:
        """The submission is over (its cost, if any, is in the journal now): drop its reservation."""
        with self._lock:
            self._reserved.pop(prompt_id, None)


def _load_costs(meta: Meta | None) -> dict[Shape, float]:
    """The learned costs the journal kept; none when there are none or they cannot be read."""
    found = meta.get_meta(COSTS_KEY) if meta is not None else None
    if found is None:
        return {}
    try:
        return {tuple(key): float(cost) for key, cost in json.loads(found[0])}
    except (ValueError, TypeError):
        return {}
