"""The prompt-file model: read bounded bytes, parse strictly, check its keys against the model's schema.

Leaves of preparation (`preparation.py` runs them in order): nothing here reads a reference or calls back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenario_watch.config import Settings
from scenario_watch.errors import PromptError
from scenario_watch.files import read_regular
from scenario_watch.prepare.reference import Reference
from scenario_watch.prepare.schema import BUILTIN, ModelSchema, check_value, show, unknown_input

MAX_PROMPT_BYTES = 1024 * 1024
MAX_NAME_LENGTH = 120
NAME_RULE = "a plain file name without / or \\ (it names the outputs)"


@dataclass(frozen=True)
class PromptRules:
    """What a prompt is checked against: the model's schema, [defaults], and where references may live."""

    schema: ModelSchema = BUILTIN
    defaults: Mapping[str, Any] = field(default_factory=dict)
    roots: Sequence[Path] = ()


def rules_from_settings(settings: Settings | None, schema: ModelSchema = BUILTIN) -> PromptRules:
    """The PromptRules of a configuration ([defaults], [watch] reference_roots); none: the bare schema."""
    if settings is None:
        return PromptRules(schema)
    return PromptRules(
        schema, settings.defaults.model_dump(exclude_none=True), tuple(settings.watch.reference_roots)
    )


@dataclass
class Prompt:
    """A validated prompt: the generate inputs (defaults applied) and where its outputs go."""

    inputs: dict[str, Any]
    stem: str
    references: list[Reference] = field(default_factory=list)


def read_prompt_bytes(path: Path) -> bytes:
    """The file's bytes, refusing early anything too big to be a prompt."""
    data = read_regular(path, MAX_PROMPT_BYTES)  # a symlink, FIFO or folder: UnsafeFile, unread
    if len(data) > MAX_PROMPT_BYTES:
        raise PromptError([f"the file is larger than {MAX_PROMPT_BYTES // 1024} KiB: not a prompt file"])
    return data


def _utf16(data: bytes) -> bool:
    """Whether the bytes look like UTF-16 text: a byte-order mark, or ASCII with a NUL beside each byte."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    head = data[:64]
    return len(head) >= 4 and any(head) and (not any(head[1::2]) or not any(head[0::2]))


def parse_json(data: bytes) -> dict[str, Any]:
    """Decode and parse strictly: UTF-8, one JSON object, no NaN, no duplicate keys."""
    if not data.strip():
        raise PromptError(["the file is empty"], hint='write a JSON object such as {"prompt": "a red fox"}')
    if _utf16(data):  # PowerShell's `>` and Notepad's "Unicode" write it
        hint = "save it as UTF-8 (PowerShell: Out-File -Encoding utf8; an editor: Save As, encoding UTF-8)"
        raise PromptError(["the file is UTF-16 text, not UTF-8 text"], hint=hint)
    if b"\x00" in data:
        raise PromptError(["the file is binary, not JSON text"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"the file is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        raise PromptError([problem]) from None
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise PromptError([f"not valid JSON: {json_problem(exc)}"]) from None
    except RecursionError:
        raise PromptError(["not a prompt: the JSON is nested too deeply"]) from None
    except ValueError as exc:
        raise PromptError([str(exc)]) from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
            type(value), "a number"
        )
        raise PromptError(
            [f"the file holds {kind}; a prompt file is a JSON object"],
            hint='write a JSON object such as {"prompt": "a red fox"}',
        )
    return value


# Python's JSON messages, said as what to look for: (what is wrong, what a person can do).
JSON_MESSAGES = {
    "Expecting ',' delimiter": ("expected ','", "a missing comma, quote or brace near here"),
    "Expecting ':' delimiter": ("expected ':' after a key", "a missing colon or quote near here"),
    "Expecting property name enclosed in double quotes": (
        "expected a key in double quotes",
        'a comma before a closing brace, or a key without "double quotes", near here',
    ),
    "Expecting value": (
        "expected a value",
        'a comma too many, a missing value, or text without "double quotes" near here',
    ),
    "Unterminated string starting at": ("a string starts here and never ends", "a missing closing quote"),
    "Invalid control character at": (
        "a line break or tab inside a string",
        "write it as \\n or \\t, or close the string's quote",
    ),
    "Extra data": ("more text after the JSON object ends", "a brace too many, or a second object"),
    "Invalid \\escape": ("a backslash that starts no escape", "write a backslash as \\\\ (or paths with /)"),
    "Invalid \\uXXXX escape": ("a \\u escape without 4 hex digits", "write it as \\u00e9, or drop it"),
}
SHOW_LINE = 60  # characters of the offending line shown in the message


def json_problem(exc: json.JSONDecodeError) -> str:
    """A JSON syntax error for a person: where, what, what to look for, and the line itself."""
    what, advice = JSON_MESSAGES.get(exc.msg, (exc.msg[:1].lower() + exc.msg[1:], "look near here"))
    lines = exc.doc.splitlines() or [""]
    line = lines[min(exc.lineno, len(lines)) - 1]
    message = f"line {exc.lineno}, column {exc.colno}: {what} — {advice}: {_excerpt(line, exc.colno)}"
    before = [number for number in range(exc.lineno - 1, 0, -1) if lines[number - 1].strip()]
    if before and not line[: exc.colno - 1].strip():  # at the start of its line: the cause may end the last
        last = lines[before[0] - 1]
        message += f" (after line {before[0]}: {_excerpt(last, len(last))})"
    return message


def _excerpt(line: str, column: int) -> str:
    """The line, shortened around `column` to SHOW_LINE characters."""
    text = line.strip()
    if len(text) > SHOW_LINE:
        column -= len(line) - len(line.lstrip())
        start = max(0, min(column - SHOW_LINE // 2, len(text) - SHOW_LINE))
        end = start + SHOW_LINE
        text = ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")
    # A tab or other control character is shown escaped: a message stays one line.
    return re.sub(r"[\x00-\x1f\x7f]", lambda match: repr(match.group())[1:-1], text)


def check_keys(
    raw: Mapping[str, Any], schema: ModelSchema, defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """A prompt's keys against the model's schema, `defaults` where the prompt is silent: the values, and
    every problem (each naming its key; a default's says so)."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "name":
            continue
        problem = (
            check_value(schema, key, value) if key in schema.inputs else unknown_input(schema, key, ["name"])
        )
        if problem:
            problems.append(problem)
        elif value is not None:
            values[key] = value
    for key, value in defaults.items():
        if raw.get(key) is not None or value is None:
            continue  # the prompt file has its say first
        problem = check_value(schema, key, value)
        if problem:
            problems.append(f"{problem} (from [defaults])")
        else:
            values[key] = value
    for key in schema.inputs:
        if key not in values and (problem := check_value(schema, key, None)):
            problems.append(problem)
    return values, problems


def output_stem(raw: Mapping[str, Any], file_name: str, problems: list[str]) -> str:
    """The output stem: `name` from the file (checked), else the file's own stem."""
    name = raw.get("name")
    if name is None:
        return _sanitise(Path(file_name).stem)
    if not isinstance(name, str) or not name:
        problems.append(f"name: must be {NAME_RULE} (got {show(name)})")
        return "prompt"
    try:
        return safe_stem(name)
    except PromptError as exc:
        problems.extend(exc.problems)
        return "prompt"


def safe_stem(name: str) -> str:
    """A `name` from a prompt file as an output stem; refuses anything that would leave the outbox."""
    if "/" in name or "\\" in name or "\x00" in name or name.strip() in (".", ".."):
        raise PromptError([f"name: {name!r} must be {NAME_RULE}"])
    return _sanitise(name)


def _sanitise(name: str) -> str:
    cleaned = re.sub(r"[^\w.\- ]", "_", name).strip(" .")[:MAX_NAME_LENGTH]
    return cleaned or "prompt"


def _no_constant(name: str) -> Any:
    raise ValueError(f"not valid JSON: {name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result
