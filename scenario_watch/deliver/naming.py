"""Output names from a template (``{date}/{preset}/{stem}_{index}``) that never leave the outbox."""

from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath

from scenario_watch.errors import ConfigError

DEFAULT = "{stem}_{index}"
TOKENS = ("stem", "index", "preset", "job_id", "date", "time", "model")
MAYBE_EMPTY = frozenset({"preset"})  # empty outside a preset folder: a folder made of it is left out
# Bytes per path component: NAME_MAX is 255, and the outbox adds an extension and a temp-name prefix.
MAX_COMPONENT = 200
INDEX_FORMAT = re.compile(r"0?[1-9]d?")  # {index:03} or {index:03d}: zero-padded, nothing else
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class _Field:
    name: str
    spec: str


_Component = list[str | _Field]


def check(template: str) -> str:
    """The template, if every output it names stays inside the outbox; ConfigError saying why not."""
    _parse(template)
    return template


def fields(template: str) -> frozenset[str]:
    """The tokens a (valid) template uses."""
    return frozenset(p.name for component in _parse(template) for p in component if isinstance(p, _Field))


def render(
    template: str,
    *,
    stem: str,
    index: int,
    when: datetime,
    preset: str = "",
    job_id: str = "",
    model: str = "",
) -> PurePosixPath:
    """The relative path an output gets: each value made a safe name part, ``{date}``/``{time}`` in UTC."""
    if when.tzinfo is None:
        raise ValueError("render() needs an aware datetime: {date} and {time} are UTC")
    utc = when.astimezone(UTC)
    values = {
        "stem": stem,
        "index": index,
        "preset": preset,
        "job_id": job_id,
        "model": model,
        "date": utc.strftime("%Y-%m-%d"),
        "time": utc.strftime("%H%M%S"),
    }
    components = _parse(template)
    texts = []
    for component in components:
        pieces = [p if isinstance(p, str) else _value(p, values[p.name]) for p in component]
        _shorten(pieces, [isinstance(p, _Field) for p in component])
        text = "".join(pieces)
        texts.append("_" + text[1:] if text.startswith(".") else text)  # never hidden, never ..
    if not texts[-1]:  # check() refuses templates that could do this; a caller's empty values could
        raise ValueError(f"name template {template!r} gives no file name for these values")
    return PurePosixPath(*(text for text in texts if text))  # an empty {preset} folder is left out


def _value(field: _Field, value: object) -> str:
    """One token's text: formatted, then stripped of what a path could use (/, \\, controls)."""
    text = format(value, field.spec) if field.spec else str(value)
    text = _UNSAFE.sub("_", text).strip()
    if not text and field.name not in MAYBE_EMPTY:
        return "_"  # an empty stem or model must not collapse a name into its neighbour's
    return text


def _shorten(pieces: list[str], is_value: list[bool]) -> None:
    """Cut the longest values until the component fits MAX_COMPONENT bytes (literals are checked)."""
    while len("".join(pieces).encode()) > MAX_COMPONENT:
        excess = len("".join(pieces).encode()) - MAX_COMPONENT
        longest = max((i for i, value in enumerate(is_value) if value), key=lambda i: len(pieces[i].encode()))
        encoded = pieces[longest].encode()
        pieces[longest] = encoded[: max(1, len(encoded) - excess)].decode("utf-8", "ignore") or "_"


def _parse(template: str) -> list[_Component]:
    """The template's path components, each a list of literal text and fields; ConfigError if unsafe."""
    where = f"name template {template!r}"
    if not template.strip():
        raise ConfigError(f"{where} is empty: it must name the output file, e.g. {DEFAULT!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone { or }
        raise ConfigError(f"{where}: {exc} (write {{{{ or }}}} for a literal brace)") from None
    components: list[_Component] = [[]]
    for literal, name, spec, conversion in parsed:
        for i, text in enumerate(literal.split("/")):
            if i:
                components.append([])
            if text:
                components[-1].append(text)
        if name is None:
            continue
        if name not in TOKENS:
            close = difflib.get_close_matches(name, TOKENS, n=1, cutoff=0.6)
            near = f" (did you mean {{{close[0]}}}?)" if close else ""
            known = " ".join(f"{{{token}}}" for token in TOKENS)
            raise ConfigError(f"{where} names an unknown token {{{name}}}{near}; the tokens are {known}")
        if conversion or (spec and (name != "index" or not INDEX_FORMAT.fullmatch(spec))):
            raise ConfigError(
                f"{where}: only {{index}} takes a format, a zero-padded width such as {{index:03}}"
            )
        components[-1].append(_Field(name, spec or ""))
    _check_components(where, template, components)
    return components


def _check_components(where: str, template: str, components: list[_Component]) -> None:
    if template.startswith("/"):
        raise ConfigError(f"{where} is an absolute path: names are relative to the outbox")
    for component in components:
        literal = "".join(p for p in component if isinstance(p, str))
        if not component:
            raise ConfigError(f"{where} has an empty folder name (// or a / at the end)")
        if component[0] in (".", "..") and len(component) == 1:
            raise ConfigError(f"{where} uses {component[0]!r}: names must stay inside the outbox")
        if isinstance(component[0], str) and component[0].startswith("."):
            raise ConfigError(f"{where} makes a hidden name (starting with a dot), which outbox readers skip")
        if _UNSAFE.search(literal):
            raise ConfigError(f"{where} has a backslash or a control character: use / for folders")
        if len(literal.encode()) > MAX_COMPONENT // 2:
            raise ConfigError(f"{where} has a name part longer than {MAX_COMPONENT // 2} bytes")
    last = components[-1]
    if all(isinstance(p, _Field) and p.name in MAYBE_EMPTY for p in last):
        raise ConfigError(f"{where} may give an empty file name: add {{stem}} or {{index}} to its last part")
