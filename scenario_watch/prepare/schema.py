"""The model's input schema: the source of truth for what a prompt may send (pure, no I/O)."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from scenario_watch.config import MODEL_ID

Source = Literal["live", "cached", "builtin"]
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "auto")
ARRAY_TYPES = frozenset({"file_array", "string_array", "number_array", "model_array", "inputs_array"})


@dataclass(frozen=True)
class ModelInput:
    """One input of the model as the API describes it (GET /v1/models/{id}: `inputs[]`)."""

    name: str
    type: str
    allowed_values: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None  # for array types: the most entries
    step: float | None = None
    default: Any = None
    required: bool = False
    cost_impact: bool = False


@dataclass(frozen=True)
class ModelSchema:
    """The inputs of one model, and whether they come from the API now, from a cache, or from the docs."""

    model_id: str
    inputs: dict[str, ModelInput]
    source: Source
    fetched_at: float | None = None  # unix time of the GET that produced it

    def describe(self) -> str:
        """One line for logs and messages: where this schema came from."""
        if self.source == "live":
            return f"live schema of {self.model_id} ({len(self.inputs)} inputs)"
        if self.source == "cached":
            return f"cached schema from {_when(self.fetched_at)}" if self.fetched_at else "cached schema"
        return "built-in schema (the API could not be asked)"

    @property
    def label(self) -> str:
        """A few words for inside a message: "live schema", "cached schema from ...", "built-in schema"."""
        if self.source == "cached" and self.fetched_at:
            return f"cached schema from {_when(self.fetched_at)}"
        return "built-in schema" if self.source == "builtin" else f"{self.source} schema"


def _when(unix: float | None) -> str:
    return datetime.fromtimestamp(unix or 0, UTC).strftime("%Y-%m-%d %H:%M UTC")


# The table in SCENARIO_API.md, for when the API cannot be asked (offline `validate`, first start offline).
BUILTIN = ModelSchema(
    model_id=MODEL_ID,
    source="builtin",
    inputs={
        inp.name: inp
        for inp in (
            ModelInput("prompt", "string", required=True),
            ModelInput("referenceImages", "file_array", max=14),
            ModelInput(
                "aspectRatio",
                "string",
                allowed_values=ASPECT_RATIOS,
                default="auto",
            ),
            ModelInput(
                "resolution", "string", allowed_values=("1K", "2K", "4K"), default="2K", cost_impact=True
            ),
            ModelInput("useGoogleSearch", "boolean", default=False, cost_impact=True),
            ModelInput("numOutputs", "number", min=1, max=4, step=1, default=1, cost_impact=True),
            ModelInput("seed", "number", min=0, max=2147483647, step=1),
        )
    },
)


def parse_model(body: Any, source: Source = "live", fetched_at: float | None = None) -> ModelSchema:
    """A ModelSchema from GET /v1/models/{id}'s answer; ValueError saying why when it is unusable."""
    model = body.get("model", body) if isinstance(body, dict) else None
    if not isinstance(model, dict):
        raise ValueError("the model answer is not a JSON object")
    found = model.get("id")
    model_id = found if isinstance(found, str) and found else "(model without id)"
    raw_inputs = model.get("inputs")
    if not isinstance(raw_inputs, list):
        raise ValueError(f"the model {model_id} lists no inputs")
    inputs: dict[str, ModelInput] = {}
    for raw in raw_inputs:
        # Tolerant: an entry we cannot read is skipped, not fatal; the API still judges what is sent.
        if isinstance(raw, dict) and isinstance(raw.get("name"), str) and isinstance(raw.get("type"), str):
            inputs[raw["name"]] = _parse_input(raw)
    if "prompt" not in inputs:
        raise ValueError(f"the model {model_id} has no prompt input (inputs: {', '.join(inputs) or 'none'})")
    return ModelSchema(model_id=model_id, inputs=inputs, source=source, fetched_at=fetched_at)


def _parse_input(raw: dict[str, Any]) -> ModelInput:
    allowed = raw.get("allowedValues")
    required = raw.get("required")
    # Conditional rules (ifDefined, ifNotDefined, conditional) are left to the API to judge.
    always = required is True or (isinstance(required, dict) and required.get("always") is True)
    top = _number(raw.get("max"))
    if top is None and raw["type"] in ARRAY_TYPES:
        top = _number(raw.get("maxLength"))  # the SDK: maxLength bounds an array's number of items
    return ModelInput(
        name=raw["name"],
        type=raw["type"],
        allowed_values=tuple(allowed) if isinstance(allowed, list) and allowed else None,
        min=_number(raw.get("min")),
        max=top,
        step=_number(raw.get("step")),
        default=raw.get("default"),
        required=always,
        cost_impact=raw.get("costImpact") is True,
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def to_json(schema: ModelSchema) -> str:
    """The schema as text for the journal, in the API's own shape (from_json reads it back)."""
    inputs = []
    for inp in schema.inputs.values():
        item: dict[str, Any] = {"name": inp.name, "type": inp.type}
        extra = {
            "allowedValues": list(inp.allowed_values) if inp.allowed_values else None,
            "min": inp.min,
            "max": inp.max,
            "step": inp.step,
            "default": inp.default,
            "required": {"always": True} if inp.required else None,
            "costImpact": True if inp.cost_impact else None,
        }
        item.update({key: value for key, value in extra.items() if value is not None})
        inputs.append(item)
    return json.dumps({"model": {"id": schema.model_id, "inputs": inputs}, "fetchedAt": schema.fetched_at})


def from_json(text: str) -> ModelSchema:
    """A schema saved by to_json; its source is "cached" (whatever it was when saved)."""
    body = json.loads(text)
    fetched_at = _number(body.get("fetchedAt")) if isinstance(body, dict) else None
    return parse_model(body, "cached", fetched_at)


# -- checking values ----------------------------------------------------------------------------------


def check_value(schema: ModelSchema, key: str, value: Any) -> str | None:
    """What is wrong with `value` for input `key`, in words a person can act on; None when fine.

    None as value means "not given" (JSON null counts as not given): only a required input minds.
    """
    inp = schema.inputs.get(key)
    if inp is None:
        return unknown_input(schema, key)
    if value is None:
        return f"{key!r} is required: {allowed(inp)}" if inp.required else None
    if inp.type in ARRAY_TYPES:
        return _check_array(inp, value)
    if _fits(inp, value):
        return None
    return f"{key}: must be {allowed(inp)} (got {show(value)})"


def unknown_input(schema: ModelSchema, key: str, also: Iterable[str] = ()) -> str:
    """The message for a key the model does not have, with a near miss when there is one."""
    known = [*schema.inputs, *also]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    advice = f"did you mean {close[0]!r}?" if close else f"remove it (inputs: {', '.join(known)})"
    return f"{key!r} is not an input of model {schema.model_id} ({schema.label}): {advice}"


def allowed(inp: ModelInput) -> str:
    """What an input accepts, in words ("a whole number from 1 to 4")."""
    if inp.allowed_values is not None:
        return "one of " + ", ".join(_plain(v) for v in inp.allowed_values)
    if inp.type == "boolean":
        return "true or false"
    if inp.type == "number":
        words = "a whole number" if _whole_steps(inp) else "a number"
        if inp.min is not None and inp.max is not None:
            words += f" from {_plain(inp.min)} to {_plain(inp.max)}"
        elif inp.min is not None:
            words += f" of at least {_plain(inp.min)}"
        elif inp.max is not None:
            words += f" of at most {_plain(inp.max)}"
        if inp.step is not None and inp.step != 1:
            words += f" in steps of {_plain(inp.step)}"
        return words
    if inp.type in ("string", "file"):
        return "a non-empty string" if inp.required or inp.type == "file" else "a string"
    if inp.type in ARRAY_TYPES:
        items = "image file names or asset ids" if inp.type == "file_array" else "values"
        return f"a list of up to {_plain(inp.max)} {items}" if inp.max is not None else f"a list of {items}"
    return f"a value of type {inp.type}"


def _fits(inp: ModelInput, value: Any) -> bool:
    if inp.allowed_values is not None:
        return _among(value, inp.allowed_values)
    if inp.type == "boolean":
        return isinstance(value, bool)
    if inp.type == "number":
        return _fits_number(inp, value)
    if inp.type in ("string", "file"):
        return isinstance(value, str) and (bool(value.strip()) or not (inp.required or inp.type == "file"))
    return True  # a type this daemon does not know: the API judges it


def _fits_number(inp: ModelInput, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if _whole_steps(inp) and not isinstance(value, int):
        return False  # 2.0 is refused too: the API's integer inputs may reject a float
    if (inp.min is not None and value < inp.min) or (inp.max is not None and value > inp.max):
        return False
    if inp.step:
        steps = (value - (inp.min or 0)) / inp.step
        return math.isclose(steps, round(steps), abs_tol=1e-9)
    return True


def _among(value: Any, choices: tuple[Any, ...]) -> bool:
    # bool is an int in Python, but true is not 1 to the API.
    return any(isinstance(value, bool) == isinstance(v, bool) and value == v for v in choices)


def _whole_steps(inp: ModelInput) -> bool:
    return inp.step is not None and float(inp.step).is_integer() and inp.step > 0


def _check_array(inp: ModelInput, value: Any) -> str | None:
    key = inp.name
    if not isinstance(value, list):
        if isinstance(value, str):
            what = "image" if inp.type == "file_array" else "value"
            return f'{key} must be a list, even for one {what}: ["{value}"]'
        return f"{key}: must be {allowed(inp)} (got {show(value)})"
    if inp.max is not None and len(value) > inp.max:
        return f"{key} has more than {_plain(inp.max)} entries"
    if inp.min is not None and len(value) < inp.min:
        return f"{key} needs at least {_plain(inp.min)} entries"
    if inp.required and not value:
        return f"{key!r} is required: {allowed(inp)}"
    for entry in value:
        if inp.type in ("file_array", "string_array") and (not isinstance(entry, str) or not entry):
            return f"{key}: each entry must be a non-empty string (got {show(entry)})"
        if inp.allowed_values is not None and not _among(entry, inp.allowed_values):
            choices = ", ".join(map(_plain, inp.allowed_values))
            return f"{key}: each entry must be one of {choices} (got {show(entry)})"
    return None


def show(value: Any) -> str:
    """A value as JSON, shortened for a one-line message."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value)


__all__ = [
    "BUILTIN",
    "ModelInput",
    "ModelSchema",
    "allowed",
    "check_value",
    "from_json",
    "parse_model",
    "show",
    "to_json",
    "unknown_input",
]
