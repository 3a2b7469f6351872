"""The behaviour knobs a test may turn on a running sandbox: their defaults and value checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# name -> (kind, default). Kinds: bool, int, number, rate (a number from 0 to 1), seconds (>= 0),
# text (a string or null). The defaults are today's documented API: no surprises unless asked for.
KNOBS: dict[str, tuple[str, Any]] = {
    "generation_seconds": ("number", 1.0),
    "parallel_limit": ("int", 50),
    "url_ttl": ("number", 86400.0),
    "seed_input": ("bool", True),
    "cost_per_output": ("number", 5),
    "echo_strings": ("bool", False),
    "echo_model_id": ("bool", False),
    "team_noise": ("rate", 0.0),
    "plan_required": ("text", None),
    "lost_answer_rate": ("rate", 0.0),
    "late_answer_rate": ("rate", 0.0),
    "late_answer_delay": ("seconds", 7.0),
    "rng_seed": ("int", 0),
    # False: statusHistory never shows the final entry (success/failure/canceled), as some live
    # answers do; status, progress and updatedAt are unchanged.
    "terminal_history": ("bool", True),
}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_knob(name: str, value: Any) -> None:
    """ValueError unless `name` is a knob and `value` fits its kind."""
    if name not in KNOBS:
        raise ValueError(f"unknown knob {name!r}; knobs: {', '.join(KNOBS)}")
    kind = KNOBS[name][0]
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{name} must be a boolean")
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer")
    if kind in ("number", "rate", "seconds") and not _is_number(value):
        raise ValueError(f"{name} must be a number")
    if kind == "rate" and not 0 <= value <= 1:
        raise ValueError(f"{name} must be from 0 to 1")
    if kind == "seconds" and value < 0:
        raise ValueError(f"{name} cannot be negative")
    if kind == "text" and value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or null")


def check_knobs(values: Any) -> dict[str, Any]:
    """The knob values of a control request, all checked before any is applied (ValueError if not)."""
    if not isinstance(values, Mapping):
        raise ValueError("expected a JSON object of knob names and values")
    for name, value in values.items():
        check_knob(name, value)
    return dict(values)
