"""`retry`: failed items back where they arrived; a prompt whose job may have succeeded is not paid twice.

Every item in failed/ can be retried by the name it has there (`car.json`, `recolor/fake.png`, a FIFO
refused unread); each has its own error file (`car.error.json`, `car.png.error.json`). A preset's item
(`NAME/...`) goes back into that preset's folder, wherever `[presets.NAME] folder` puts it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from scenario_watch.errors import PromptError
from scenario_watch.files import digest, move_no_clobber
from scenario_watch.finish.finisher import error_file_for
from scenario_watch.intake.names import is_image_name, is_text_name
from scenario_watch.journal.store import Store
from scenario_watch.lifecycle import PAID_STAGES
from scenario_watch.prepare import sidecar
from scenario_watch.sections import FolderSettings
from scenario_watch.shell.status import JOURNAL, SANDBOX_JOURNAL


def everything(failed: Path) -> list[str]:
    """Every failed item (prompt files, images of preset folders, anything filed there), by its name;
    the image of a sidecar pair is not named apart (it goes back with its `.txt`)."""
    return sorted(
        str(p.relative_to(failed))
        for p in failed.rglob("*")
        if (p.is_symlink() or not p.is_dir())  # a FIFO or socket refused unread is an item too
        and not p.name.endswith(".error.json")
        and not p.name.startswith(".")
        and not (is_image_name(p.name) and p.with_name(f"{p.stem}.txt").is_file())
    )


def _pair(src: Path) -> Path | None:
    """The other file of a sidecar pair filed with `src`: the image of a `.txt`, the `.txt` of an image."""
    if is_text_name(src.name):
        try:
            return sidecar.image_beside(src.parent, src.stem)
        except PromptError:
            return None  # several images of the name: none is surely the pair's
    text = src.with_name(f"{src.stem}.txt")
    return text if is_image_name(src.name) and text.is_file() else None


def name_in(failed: Path, name: str) -> str:
    """The item a person named: as shown in failed/, or a prompt's stem without `.json` (or the `.txt`
    of a sidecar pair)."""
    if (failed / name).exists() or name.endswith(".json"):
        return name
    text = f"{name}.txt"
    return text if (failed / text).is_file() and not (failed / f"{name}.json").exists() else f"{name}.json"


def home_of(rel: Path, inbox: Path, presets: Mapping[str, Path]) -> Path:
    """The folder a failed item arrived in: its preset's folder (`NAME/...`), else the inbox's."""
    if len(rel.parts) > 1 and rel.parts[0] in presets:
        return presets[rel.parts[0]].joinpath(*rel.parts[1:-1])
    return inbox / rel.parent


def send_back(folders: FolderSettings, name: str, presets: Mapping[str, Path] | None = None) -> list[str]:
    """Move one failed item back where it arrived (its error file removed); what to tell the person.

    `presets`: each preset's folder by name, so `NAME/x.png` goes back to its preset, not `<inbox>/NAME/`.
    """
    rel = Path(name)
    src = folders.failed / rel
    if (
        rel.is_absolute()
        or ".." in rel.parts
        or not (src.is_symlink() or (src.exists() and not src.is_dir()))
    ):
        return [f"{name}: not in {folders.failed}"]
    error_file = error_file_for(src)
    job_id = _paid_job(error_file)
    # Its job may have finished: the daemon asks before paying again (a job its journal knows, only).
    adopted = job_id is not None and _adopt_later(folders.state, rel, src, job_id)
    home = home_of(rel, folders.inbox, presets or {})
    home.mkdir(parents=True, exist_ok=True)
    lines = []
    pair = _pair(src)
    # The .txt first: in a preset folder the image reads it when taken; in the inbox it waits for its image.
    for path in sorted((p for p in (src, pair) if p is not None), key=lambda p: not is_text_name(p.name)):
        dest = move_no_clobber(path, home, path.name)
        if dest.is_relative_to(folders.inbox):
            lines.append(f"{rel.parent / path.name}: back in the inbox as {dest.relative_to(folders.inbox)}")
        else:
            lines.append(
                f"{rel.parent / path.name}: back in the folder of [presets.{rel.parts[0]}] as {dest}"
            )
    error_file.unlink(missing_ok=True)
    if adopted:
        lines.append(
            f"{name}: its earlier job {job_id} is asked about first; it is delivered if it succeeded"
        )
    elif job_id is not None:
        lines.append(
            f"{name}: its earlier job {job_id} is not in this daemon's journal (another state folder?):"
            " it is sent as a new job"
        )
    return lines


def _paid_job(error_file: Path) -> str | None:
    """The job of a prompt that failed after Scenario took it (timeout, download): it may have succeeded."""
    try:
        report = json.loads(error_file.read_text())
    except (OSError, ValueError):
        return None
    job_id = report.get("jobId") if isinstance(report, dict) else None
    return job_id if isinstance(job_id, str) and report.get("stage") in PAID_STAGES else None


def _adopt_later(state: Path, rel: Path, src: Path, job_id: str) -> bool:
    """Note in the journal that made the job: when this file comes back, ask about the job first.
    False when no journal here made it (an error file from elsewhere names any job: never adopted)."""
    sha256 = digest(src)[1]
    noted = False
    for name in (JOURNAL, SANDBOX_JOURNAL):
        if not (state / name).exists():
            continue
        store = Store(state / name)
        try:
            if store.owns_job(job_id):
                store.adopt_later(str(rel), sha256, job_id)
                noted = True
        finally:
            store.close()
    return noted
