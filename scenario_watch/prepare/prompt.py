"""The prompt-file model: read bounded bytes, parse strictly, validate against the model's schema."""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenario_watch.config import Settings
from scenario_watch.errors import MissingReference, PromptError, UnsafeFile
from scenario_watch.files import open_regular, read_regular
from scenario_watch.prepare.schema import BUILTIN, ModelSchema, check_value, show, unknown_input

MAX_PROMPT_BYTES = 1024 * 1024
MAX_REFERENCE_BYTES = 50 * 1024 * 1024
MAX_NAME_LENGTH = 120
NAME_RULE = "a plain file name without / or \\ (it names the outputs)"
REFERENCES = "referenceImages"  # the input whose entries may be local files, uploaded before generate
MISSING = "does not exist in"  # a missing reference file's problem: "'beach.jpg' does not exist in DIR"

# Magic bytes of the image types Scenario accepts as references (AVIF and HEIC: see _iso_bmff).
IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
IMAGE_KINDS = "a PNG, JPEG, GIF, WebP, TIFF, AVIF or HEIC image"
AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevx"})
HEIF_BRANDS = frozenset({b"mif1", b"msf1"})  # the generic HEIF brands: AVIF or HEIC by what else is listed
HEAD_BYTES = 64


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


@dataclass(frozen=True)
class Reference:
    """One entry of referenceImages: a Scenario asset id, or a local image file."""

    entry: str
    asset_id: str | None = None
    path: Path | None = None
    mime_type: str | None = None


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


def parse_json(data: bytes) -> dict[str, Any]:
    """Decode and parse strictly: UTF-8, one JSON object, no NaN, no duplicate keys."""
    if not data.strip():
        raise PromptError(["the file is empty"], hint='write a JSON object such as {"prompt": "a red fox"}')
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


def prepare_prompt(path: Path, *, name: str, base_dir: Path, rules: PromptRules) -> Prompt:
    """Read (bounded), parse and validate one prompt file; raise PromptError listing every problem.

    `name` is the file's name (relative to the inbox for the daemon): its stem is the default output stem.
    `base_dir` is the folder relative reference files are looked up in. OSError when it cannot be read.
    """
    return parse_prompt(read_prompt_bytes(path), name=name, base_dir=base_dir, rules=rules)


def parse_prompt(data: bytes, *, name: str, base_dir: Path, rules: PromptRules) -> Prompt:
    """Validate a prompt file's bytes against the rules (prepare_prompt without the reading)."""
    raw = parse_json(data)
    schema = rules.schema
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
    for key, value in rules.defaults.items():
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
    stem = _stem(raw, name, problems)
    try:
        references = _references(values.pop(REFERENCES, None) or [], base_dir, rules.roots)
    except PromptError as exc:
        if not problems:
            raise  # a missing file alone may still arrive (MissingReference)
        # Every problem at once, references too: fixing one must not reveal the next. With other
        # problems the file is invalid anyway, so a missing reference is not waited for.
        raise PromptError(problems + exc.problems, hint=exc.hint) from None
    if problems:
        raise PromptError(problems)
    # Only what the schema lists reaches the API, in the schema's order.
    inputs = {key: values[key] for key in schema.inputs if key in values}
    return Prompt(inputs=inputs, stem=stem, references=references)


def _stem(raw: dict[str, Any], file_name: str, problems: list[str]) -> str:
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


def _references(entries: list[Any], base_dir: Path, roots: Sequence[Path]) -> list[Reference]:
    """Check every reference; MissingReference only when a missing file is all that is wrong."""
    references: list[Reference] = []
    problems: list[str] = []
    hint: str | None = None
    only_missing = True
    for entry in entries:
        try:
            references.append(check_reference(entry, base_dir, roots))
        except PromptError as exc:
            only_missing = only_missing and isinstance(exc, MissingReference)
            hint = hint or exc.hint
            problems.extend(exc.problems)
    if problems:
        raise (MissingReference if only_missing else PromptError)(problems, hint=hint)
    return references


def check_reference(entry: Any, base_dir: Path, roots: Sequence[Path] = ()) -> Reference:
    """Check one referenceImages entry offline: an asset id, or an image file in base_dir or a root."""
    if not isinstance(entry, str) or not entry:
        raise PromptError([f"referenceImages: each entry must be a non-empty string (got {show(entry)})"])
    if "\x00" in entry:  # the OS refuses such paths with ValueError, not OSError
        raise PromptError([f"referenceImages: {entry!r} contains a NUL character"])
    if re.fullmatch(r"asset_[A-Za-z0-9_-]+", entry):
        return Reference(entry, asset_id=entry)
    path = base_dir / entry  # an absolute entry stays absolute
    problem = _reference_path_problem(Path(entry), path, [base_dir, *roots])
    if problem:
        raise PromptError([f"referenceImages: {entry!r} {problem}"])
    # In the inbox a reference is the file itself, never a symlink; under a reference root a symlink
    # is fine once it resolves inside the roots (checked above): open what it resolves to.
    in_inbox = _inside(Path(os.path.abspath(path)), [Path(os.path.abspath(base_dir))])
    target = path if in_inbox else path.resolve()
    try:
        with open_regular(target) as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(HEAD_BYTES)
    except UnsafeFile as exc:
        problem = f"referenceImages: {entry!r} is {exc.kind}: refused (name an image file)"
        raise PromptError([problem]) from None
    except FileNotFoundError:
        raise MissingReference(
            [f"referenceImages: {entry!r} {MISSING} {path.parent}"],
            hint="drop the image into the inbox beside the prompt file, or fix the name",
        ) from None
    except OSError as exc:
        raise PromptError([f"referenceImages: {entry!r} cannot be read: {exc.strerror}"]) from None
    mime = image_type(head)
    if mime is None:
        raise PromptError([f"referenceImages: {entry!r} is not {IMAGE_KINDS}"])
    if size > MAX_REFERENCE_BYTES:
        raise PromptError([f"referenceImages: {entry!r} is larger than {MAX_REFERENCE_BYTES >> 20} MiB"])
    return Reference(entry, path=target, mime_type=mime)  # the file that was checked is the one read


def missing_reference_name(problem: str) -> str | None:
    """The file a MissingReference problem names ("'beach.jpg' does not exist in ..."), else None."""
    match = re.match(rf"(?:{REFERENCES}: )?('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\") {MISSING} ", problem)
    return str(ast.literal_eval(match.group(1))) if match else None


def image_type(head: bytes) -> str | None:
    """The MIME type of an image judged by its first bytes, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return _iso_bmff(head)
    for signature, mime in IMAGE_SIGNATURES:
        if head.startswith(signature):
            return mime
    return None


def _iso_bmff(head: bytes) -> str | None:
    """AVIF or HEIC/HEIF from an ISO-BMFF `ftyp` box: its major brand, then its compatible brands."""
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size) if size >= 16 else 16
    # major brand at 8, minor version at 12, compatible brands from 16 to the end of the box
    brands = [head[8:12]] + [head[i : i + 4] for i in range(16, end - 3, 4)]
    if any(brand in AVIF_BRANDS for brand in brands):
        return "image/avif"
    if any(brand in HEIC_BRANDS for brand in brands):
        return "image/heic"
    if any(brand in HEIF_BRANDS for brand in brands):
        return "image/heif"
    return None  # MP4, QuickTime and the other ISO-BMFF files are not images


def safe_stem(name: str) -> str:
    """A `name` from a prompt file as an output stem; refuses anything that would leave the outbox."""
    if "/" in name or "\\" in name or "\x00" in name or name.strip() in (".", ".."):
        raise PromptError([f"name: {name!r} must be {NAME_RULE}"])
    return _sanitise(name)


def _sanitise(name: str) -> str:
    cleaned = re.sub(r"[^\w.\- ]", "_", name).strip(" .")[:MAX_NAME_LENGTH]
    return cleaned or "prompt"


def _reference_path_problem(entry: Path, path: Path, roots: list[Path]) -> str | None:
    """Why a reference path is refused: it must stay inside the inbox or a reference root."""
    if ".." in entry.parts:
        return "leaves the inbox (..); name a file inside the inbox"
    resolved_roots = [root.resolve() for root in roots]
    if entry.is_absolute() and not _inside(Path(os.path.abspath(path)), resolved_roots):
        return "is an absolute path outside the inbox and [watch] reference_roots"
    if not _inside(path.resolve(), resolved_roots):
        return "is a symlink that points outside the inbox and [watch] reference_roots"
    return None


def _inside(candidate: Path, roots: Sequence[Path]) -> bool:
    return any(candidate == root or root in candidate.parents for root in roots)


def _no_constant(name: str) -> Any:
    raise ValueError(f"not valid JSON: {name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result
