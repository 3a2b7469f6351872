"""Sidecar prompts: `NAME.txt` beside `NAME.<image>` is one job, the text its prompt, the image its reference.

In the inbox the `.txt` is the claimed file: it is read at once (not UTF-8, or empty: the prompt fails,
unpaid), and its image is a reference like any other, waited for up to `[watch] reference_wait`
(MissingReference) when it has not arrived yet. An image alone never starts work in the inbox.

In a preset folder the image is the claimed file and its `.txt` is optional: it is looked for until
`[watch] settle` seconds after the image was taken (`TextPending` meanwhile), and its text goes into
the preset's prompt where that says `{text}`, else after it.

Either way the two files are filed together: the companion moves to done/ or failed/ with the claimed
one (`companion`), unless another prompt still uses it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scenario_watch.errors import MissingReference, PromptError, ScenarioWatchError
from scenario_watch.files import read_regular
from scenario_watch.intake.names import IMAGE_SUFFIXES, is_image_name, is_text_name
from scenario_watch.prepare.prompt import MAX_PROMPT_BYTES

if TYPE_CHECKING:
    from scenario_watch.journal.rows import Row
    from scenario_watch.prepare.presets import Preset

TEXT_TOKEN = "{text}"  # where a preset's prompt takes the text of an image's .txt
SUFFIXES = "|".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))


class TextPending(ScenarioWatchError):
    """A preset image's `.txt` may still be on its way: look again shortly (up to `[watch] settle`)."""


def read_text(path: Path, label: str) -> str:
    """A sidecar's text: UTF-8 (a BOM is fine), not empty; PromptError saying what is wrong otherwise."""
    data = read_regular(path, MAX_PROMPT_BYTES)  # a symlink, FIFO or folder: UnsafeFile, unread
    if len(data) > MAX_PROMPT_BYTES:
        raise PromptError([f"{label} is larger than {MAX_PROMPT_BYTES // 1024} KiB: not a prompt"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"{label} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        raise PromptError([problem], hint="save it as UTF-8 (most editors offer it under Save as)") from None
    if "\x00" in text:
        raise PromptError([f"{label} is binary, not text"])
    if not text.strip():
        raise PromptError([f"{label} is empty"], hint="write the prompt in it, e.g. `make it dusk`")
    return text.strip()


def image_beside(folder: Path, stem: str) -> Path | None:
    """`stem.<image>` in `folder` (any case of the suffix); PromptError when there are several."""
    try:
        names = sorted(
            entry.name
            for entry in os.scandir(folder)
            if is_image_name(entry.name) and os.path.splitext(entry.name)[0] == stem
        )
    except FileNotFoundError:
        return None
    if len(names) > 1:
        raise PromptError(
            [f"{stem}.txt has {len(names)} images beside it ({', '.join(names)}): which one is meant?"],
            hint=f"keep one image named {stem}.<image> beside it, rename the others",
        )
    return folder / names[0] if names else None


def image_of(label: str, folder: Path) -> str:
    """The name of the image a `.txt` in the inbox is about (`stem.<image>` beside it); MissingReference
    while it has not arrived, PromptError when there are several."""
    stem = os.path.splitext(label)[0]
    image = image_beside(folder, stem)
    if image is None:
        raise MissingReference(
            [f"the image of {label} ({stem}.<{SUFFIXES}>) is not in {folder}"],
            hint=f"drop the image beside it as {stem}.jpg (or .png ...), or write a .json prompt file",
        )
    return image.name


def preset_text(image: Path, folder: Path, *, wait: bool) -> str | None:
    """The text of `NAME.txt` beside a preset's image, or None; TextPending if it may yet arrive."""
    path = folder / f"{image.stem}.txt"
    if not os.path.lexists(path):
        if wait:
            raise TextPending(f"{path.name} may follow {image.name}")
        return None
    return read_text(path, path.name)


def with_text(prompt: Any, text: str | None) -> Any:
    """A preset's prompt with a sidecar's text: where it says `{text}`, else after it."""
    if not isinstance(prompt, str):
        return text if text is not None else prompt
    if TEXT_TOKEN in prompt:
        return prompt.replace(TEXT_TOKEN, text or "").strip()
    return prompt if text is None else f"{prompt.rstrip()} {text}"


def companion(row: Row, inbox: Path, presets: Mapping[str, Preset]) -> Path | None:
    """The file filed with a prompt: a `.txt`'s image in the inbox, a preset image's `.txt`; or None."""
    base = Path(row.file).name
    if row.preset is None:
        if not is_text_name(base):
            return None
        try:
            return image_beside(row.folder(inbox), os.path.splitext(base)[0])
        except PromptError:
            return None  # several images: none is the pair's
    preset = presets.get(row.preset)
    if preset is None or not is_image_name(base):
        return None
    text = preset.folder / f"{os.path.splitext(base)[0]}.txt"
    return text if os.path.isfile(text) else None
