"""Every kind of bad input dropped into a running daemon: failed/ + an error file; the daemon stays up."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import Folders, StartDaemon, generate_posts, wait_for, write_config

from scenario_watch.sandbox import Sandbox

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

CORPUS: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "the file is empty"),
    "notjson": (b"hello there", "not valid JSON"),
    "truncated": (b'{"prompt": "a cat', "not valid JSON"),
    "array": (b'["a", "b"]', "holds an array"),
    "string": (b'"just a string"', "holds a string"),
    "null": (b"null", "holds null"),
    "noprompt": (b'{"numOutputs": 2}', "'prompt' is required"),
    "emptyprompt": (b'{"prompt": ""}', "prompt: must be a non-empty string"),
    "numberprompt": (b'{"prompt": 12}', "prompt: must be a non-empty string"),
    "typo": (b'{"prompt": "x", "aspectRatoi": "1:1"}', "did you mean 'aspectRatio'?"),
    "range": (b'{"prompt": "x", "numOutputs": 12}', "numOutputs: must be a whole number from 1 to 4"),
    "type": (b'{"prompt": "x", "seed": "7"}', "seed: must be a whole number"),
    "ratio": (b'{"prompt": "x", "aspectRatio": "2:1"}', "aspectRatio: must be one of"),
    "refstring": (b'{"prompt": "x", "referenceImages": "pic.png"}', "must be a list, even for one image"),
    "refmissing": (b'{"prompt": "x", "referenceImages": ["nowhere.png"]}', "'nowhere.png' does not exist"),
    "refdotdot": (b'{"prompt": "x", "referenceImages": ["../pic.png"]}', "leaves the inbox"),
    "refabsolute": (b'{"prompt": "x", "referenceImages": ["/etc/hostname"]}', "is an absolute path"),
    "refsymlink": (b'{"prompt": "x", "referenceImages": ["link.png"]}', "points outside the inbox"),
    "reftoomany": (
        b'{"prompt": "x", "referenceImages": [' + b",".join([b'"asset_x"'] * 15) + b"]}",
        "more than 14 entries",
    ),
    "nonutf8": (b'{"prompt": "caf\xe9"}', "not UTF-8 text"),
    "binary": (PNG, "binary"),
    "nan": (b'{"prompt": "x", "seed": NaN}', "NaN is not a number JSON allows"),
    "deep": (b'{"prompt": "x", "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    "escape": (b'{"prompt": "x", "name": "../../x"}', "must be a plain file name"),
    "dupe": (b'{"prompt": "x", "prompt": "y"}', "appears twice"),
    "refnul": (b'{"prompt": "x", "referenceImages": ["a\\u0000.png"]}', "contains a NUL character"),
}


def test_bad_input_corpus_fails_clearly_and_a_good_prompt_still_succeeds(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG)
    (folders.inbox / "link.png").symlink_to(outside)
    write_config(folders, sandbox.base_url, watch={"settle": 0.5, "reference_wait": 1.0})
    proc = daemon()
    for name, (data, _) in CORPUS.items():
        folders.drop(f"{name}.json", None, raw=data)
    huge = folders.inbox / "huge.json"  # written in place, sparse: 4 GB on paper
    with huge.open("wb") as handle:
        handle.truncate(4 * 1024**3)
    folders.drop("good.json", {"prompt": "after all that, a good one"})

    expected = len(CORPUS) + 1
    wait_for(lambda: (folders.done / "good.json").exists(), timeout=30, what="the good prompt")
    filed = [*(f"{name}.json" for name in CORPUS), "huge.json"]  # each filed after its error file
    wait_for(
        lambda: (
            all((folders.failed / name).exists() for name in filed)
            and len([n for n in folders.names(folders.failed) if n.endswith(".error.json")]) == expected
        ),
        timeout=30,
        what="every bad file in failed/",
    )
    for name, (data, message) in CORPUS.items():
        assert (folders.failed / f"{name}.json").read_bytes() == data, name
        report = json.loads((folders.failed / f"{name}.error.json").read_text())
        assert message in report["error"], (name, report)
        assert report["stage"] in ("validate", "references"), report
        assert report["at"]
    report = json.loads((folders.failed / "huge.error.json").read_text())
    assert "larger than" in report["error"]
    assert os.path.getsize(folders.failed / "huge.json") == 4 * 1024**3
    assert [p.body["prompt"] for p in generate_posts(sandbox)] == ["after all that, a good one"]
    assert proc.proc.poll() is None  # still running
    assert (folders.inbox / "link.png").is_symlink()  # references are inputs: left where they are
