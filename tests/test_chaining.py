"""Chaining end to end, with the real daemon and the sandbox: preset folders, hooks, downstream readers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Folders, StartDaemon, generate_posts, inotify_lines, move_in, run_cli, wait_for
from conftest import write_config as _write_config

from scenario_watch.sandbox import Sandbox

README = Path(__file__).resolve().parent.parent / "README.md"

# A hook that appends its SW_* environment (and whether secrets leaked) as one JSON line to $HOOK_LOG.
HOOK_SCRIPT = """\
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("SW_")}
env["secrets"] = sorted(k for k in os.environ if k in ("SCENARIO_API_KEY", "SCENARIO_API_SECRET"))
env["manifest_exists"] = bool(env["SW_MANIFEST"]) and os.path.exists(env["SW_MANIFEST"])
env["files_exist"] = [os.path.exists(f) for f in env["SW_FILES"].splitlines()]
env["prompt_exists"] = os.path.exists(env["SW_PROMPT_FILE"])
env["error_exists"] = bool(env["SW_ERROR_FILE"]) and os.path.exists(env["SW_ERROR_FILE"])
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(env) + "\\n")
print("hook saw", env["SW_EVENT"], env["SW_NAME"])
"""


def write_config(folders: Folders, base_url: str, **sections: dict[str, Any]) -> None:
    """The test config with [images] normalize off: these tests' PNGs are sized bytes, not pictures."""
    _write_config(folders, base_url, images={"normalize": False}, **sections)


@pytest.fixture(autouse=True)
def _opaque_images(folders: Folders, sandbox: Sandbox) -> None:
    write_config(folders, sandbox.base_url)


def png(size: int, seed: int) -> bytes:
    """Bytes that are a PNG by their signature (all the daemon and the sandbox look at)."""
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return (b"\x89PNG\r\n\x1a\n" + body)[:size]


def hook_calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def hook_command(folders: Folders, log: Path) -> list[str]:
    script = folders.root / "hook.py"
    script.write_text(HOOK_SCRIPT)
    return [sys.executable, str(script), str(log)]


def test_three_images_in_a_preset_folder_three_jobs_named_after_them(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    calls = folders.root / "hooks.jsonl"
    hook = hook_command(folders, calls)
    write_config(
        folders,
        sandbox.base_url,
        presets={"recolor": {"prompt": "make it red", "numOutputs": 2}},
        hooks={"on_done": hook, "on_failed": hook},
    )
    proc = daemon()
    recolor = folders.inbox / "recolor"
    assert recolor.is_dir()  # created at start
    images = {f"car{n}": png(20_000 + n, n) for n in range(1, 4)}
    for stem, data in images.items():
        move_in(folders, recolor, f"{stem}.png", data)
    move_in(folders, recolor, "notanimage.png", b"just some text, not an image\n")
    wait_for(lambda: len(hook_calls(calls)) == 4, timeout=30, what="four hooks")
    time.sleep(0.3)  # time for a duplicate hook to show up

    posts = generate_posts(sandbox)
    assert len(posts) == 3  # exactly three paid jobs: nothing for the text file
    firsts = sorted(sandbox.asset_bytes(post.body["referenceImages"][0]) for post in posts)
    assert firsts == sorted(images.values())  # each job's first reference is its own image
    out = folders.outbox / "recolor"
    expected = sorted(f"{s}{suffix}" for s in images for suffix in ("_1.png", "_2.png", ".manifest.json"))
    assert folders.names(out) == expected
    for stem, data in images.items():
        manifest = json.loads((out / f"{stem}.manifest.json").read_text())
        assert manifest["preset"] == "recolor" and manifest["prompt"] == "make it red"
        assert manifest["parameters"]["numOutputs"] == 2
        assert manifest["references"][0]["sha256"] == hashlib.sha256(data).hexdigest()
        assert (folders.done / "recolor" / f"{stem}.png").read_bytes() == data  # the image, filed
    assert folders.names(folders.failed / "recolor") == ["notanimage.png", "notanimage.png.error.json"]
    report = json.loads((folders.failed / "recolor" / "notanimage.png.error.json").read_text())
    assert "notanimage.png is not a PNG, JPEG" in report["error"] and report["stage"] == "validate"
    assert folders.names(recolor) == []  # nothing lost, nothing left behind

    by_event: dict[str, list[dict[str, Any]]] = {"done": [], "failed": []}
    for call in hook_calls(calls):
        by_event[call["SW_EVENT"]].append(call)
    assert sorted(c["SW_NAME"] for c in by_event["done"]) == sorted(images)
    for call in by_event["done"]:
        assert call["manifest_exists"] and call["files_exist"] == [True, True] and call["prompt_exists"]
        assert call["SW_JOB_ID"] and call["SW_ERROR_FILE"] == "" and call["secrets"] == []
    [failed] = by_event["failed"]  # one on_failed call
    assert failed["SW_NAME"] == "notanimage" and failed["error_exists"] and failed["SW_MANIFEST"] == ""
    assert proc.saw("hook.ran", hook="done")


def test_a_json_prompt_in_a_preset_folder_takes_the_preset_keys_as_defaults(
    folders: Folders, sandbox: Sandbox
) -> None:
    write_config(
        folders,
        sandbox.base_url,
        defaults={"resolution": "1K"},
        presets={"wide": {"prompt": "widen it", "aspectRatio": "16:9", "numOutputs": 2}},
    )
    # A first run sees the preset (and makes its folder): what arrives after it is the preset's to take.
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    (folders.inbox / "wide" / "mine.JSON").write_text(json.dumps({"prompt": "my own words", "numOutputs": 1}))
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    [post] = generate_posts(sandbox)
    assert post.body["prompt"] == "my own words" and post.body["numOutputs"] == 1  # the file has its say
    assert post.body["aspectRatio"] == "16:9" and post.body["resolution"] == "1K"  # preset, then [defaults]
    assert folders.names(folders.outbox / "wide") == ["mine.manifest.json", "mine_1.png"]


def test_a_hook_past_its_timeout_is_killed_with_its_group_and_nothing_waits_for_it(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    pids = folders.root / "pids"
    slow = ["sh", "-c", f'sleep 60 & echo $! >> {pids}; echo "slow hook for $SW_NAME"; wait']
    write_config(folders, sandbox.base_url, hooks={"on_done": slow, "timeout": 1.0})
    proc = daemon()
    started = time.monotonic()
    for n in range(6):
        folders.drop(f"p{n}.json", {"prompt": f"picture {n}"})
    wait_for(lambda: len(folders.names(folders.done)) == 6, timeout=20, what="every prompt done")
    took = time.monotonic() - started
    # Six hooks of 1 s each, three at a time, would hold a pipeline that waited for them 2 s and more.
    assert took < 2.5, took
    wait_for(lambda: len([e for e in proc.events() if e.get("event") == "hook.timed_out"]) == 6, timeout=20)
    timed_out = [e for e in proc.events() if e.get("event") == "hook.timed_out"]
    assert all("slow hook for p" in e["output"] for e in timed_out)  # the hook's last lines
    assert {e["file"] for e in timed_out} == {f"p{n}.json" for n in range(6)}
    for pid in pids.read_text().split():  # the hook's own children were killed with it
        wait_for(lambda pid=pid: _gone(int(pid)), timeout=5, what=f"the hook's child {pid} killed")
    assert len(generate_posts(sandbox)) == 6  # a hook never changes the outcome


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"  # killed, waiting for its (re)parent to reap it


def test_a_crash_between_filing_and_the_hook_runs_the_hook_at_the_next_start(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    calls = folders.root / "hooks.jsonl"
    hook = hook_command(folders, calls)
    pid_file = folders.root / "hook.pid"
    # The first run's hook is slow: the daemon is killed (kill -9, and the hook with it) before it ends.
    slow = ["sh", "-c", f'echo $$ > {pid_file}; sleep 30; exec "$@"', "sh", *hook]
    write_config(folders, sandbox.base_url, hooks={"on_done": slow})
    first = daemon()
    folders.drop("crash.json", {"prompt": "a crash"})
    wait_for(pid_file.exists, timeout=20, what="the hook to start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # the machine went down: the hook with it
    assert folders.names(folders.done) == ["crash.json"] and hook_calls(calls) == []

    write_config(folders, sandbox.base_url, hooks={"on_done": hook})
    second = daemon()
    wait_for(lambda: hook_calls(calls), timeout=20, what="the owed hook")
    time.sleep(0.5)
    [call] = hook_calls(calls)  # once, at the next start
    assert call["SW_NAME"] == "crash" and call["manifest_exists"]
    assert second.saw("recover.hooks", count=1)
    assert len(generate_posts(sandbox)) == 1  # nothing generated again
    second.stop()
    third = daemon()  # the hook ran: a further start does not run it again
    time.sleep(1.0)
    third.stop()
    assert len(hook_calls(calls)) == 1


def test_bad_hooks_and_bad_presets_stop_the_start(folders: Folders, sandbox: Sandbox) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"hooks": {"on_failed": ["no-such-command-for-scenario-watch"]}}, "[hooks] on_failed"),
        ({"hooks": {"on_done": [str(folders.root / "missing.sh")]}}, "is not an executable file"),
        ({"presets": {"recolor": {"prompt": "x", "numOutputs": 9}}}, "[presets.recolor] numOutputs"),
        ({"presets": {"recolor": {"promt": "x"}}}, "did you mean 'prompt'"),
        ({"presets": {"recolor": {"numOutputs": 2}}}, "[presets.recolor] 'prompt' is required"),
        ({"presets": {"loop": {"prompt": "x", "folder": str(folders.outbox / "loop")}}}, "come back to it"),
    ]
    for sections, expected in cases:
        write_config(folders, sandbox.base_url, **sections)
        result = run_cli("run", "--once", "-c", str(folders.config))
        assert result.returncode == 2, (sections, result.stderr)
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert sandbox.generate_jobs == []


def test_two_stages_through_a_preset_folder_on_the_outbox_with_one_daemon(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    write_config(
        folders,
        sandbox.base_url,
        presets={"colour": {"prompt": "colour it in", "folder": str(folders.outbox)}},
    )
    daemon()
    folders.drop("sketch.json", {"prompt": "a pencil sketch", "numOutputs": 2})
    final = folders.outbox / "colour"
    wait_for(
        lambda: (
            folders.names(final)
            == sorted(
                ["sketch_1.manifest.json", "sketch_1_1.png", "sketch_2.manifest.json", "sketch_2_1.png"]
            )
        ),
        timeout=30,
        what="stage two's outputs",
    )
    time.sleep(0.5)  # no third stage: stage two's outputs are not taken again
    assert len(generate_posts(sandbox)) == 3
    stage1 = json.loads((folders.outbox / "sketch.manifest.json").read_text())  # skipped, left in place
    for n, out in enumerate(stage1["files"], start=1):
        manifest = json.loads((final / f"sketch_{n}.manifest.json").read_text())
        assert manifest["preset"] == "colour" and manifest["references"][0]["sha256"] == out["sha256"]
        assert (
            hashlib.sha256((folders.done / "colour" / out["file"]).read_bytes()).hexdigest() == out["sha256"]
        )


def test_skipped_files_are_logged_once_each_and_upper_case_json_is_a_prompt(
    folders: Folders, sandbox: Sandbox, daemon: StartDaemon
) -> None:
    write_config(
        folders, sandbox.base_url, watch={"settle": 0.2, "rescan_interval": 0.3, "ignore": ["*.draft.json"]}
    )
    (folders.inbox / "sub").mkdir()
    (folders.inbox / "sub" / "deep.json").write_text('{"prompt": "too deep"}')
    (folders.inbox / "notes.md").write_text("not a prompt")
    proc = daemon()
    folders.drop("later.draft.json", {"prompt": "a draft"})
    folders.drop("UPPER.JSON", {"prompt": "shouting"})
    (folders.inbox / "sub" / "late.json").write_text('{"prompt": "arrived later"}')
    wait_for(lambda: folders.names(folders.done) == ["UPPER.JSON"], what="UPPER.JSON done")
    time.sleep(1.0)  # a few rescans

    def skipped(name: str) -> list[str]:
        return [
            e["reason"]
            for e in proc.events()
            if e.get("event") == "watch.skipped" and e["path"].endswith(os.sep + name)
        ]

    assert skipped("deep.json") == ["in a subfolder while [watch] recursive is off"]
    assert skipped("late.json") == ["in a subfolder while [watch] recursive is off"]
    assert skipped("notes.md") == ["not a .json prompt file or a .txt beside an image"]
    assert skipped("later.draft.json") == ["matches ignore pattern *.draft.json"]
    assert folders.names(folders.outbox) == ["UPPER.manifest.json", "UPPER_1.png"]


def test_validate_and_estimate_understand_presets(folders: Folders, sandbox: Sandbox) -> None:
    write_config(folders, sandbox.base_url, presets={"recolor": {"prompt": "make it red", "numOutputs": 2}})
    photos = folders.root / "photos"
    photos.mkdir()
    (photos / "car.png").write_bytes(png(5_000, 1))
    (photos / "notanimage.png").write_text("text")
    (photos / "UPPER.JSON").write_text('{"prompt": "fine"}')
    (photos / "notes.txt").write_text('{"prompt": "fine, but never read"}')
    config = ["-c", str(folders.config)]
    result = run_cli(
        "validate", *config, "--preset", "recolor", str(photos / "car.png"), str(photos / "notanimage.png")
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].endswith("car.png: ok -> car_N (numOutputs=2, 1 reference(s))")
    assert "notanimage.png is not a PNG, JPEG" in lines[1]
    result = run_cli("validate", *config, str(photos / "UPPER.JSON"), str(photos / "notes.txt"))
    assert result.returncode == 1
    assert "UPPER.JSON: ok" in result.stdout
    assert "notes.txt: the image of notes.txt (notes.<" in result.stdout  # a sidecar without its image
    result = run_cli("estimate", *config, "--preset", "recolor", str(photos / "car.png"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "car.png: 10 creative units" in result.stdout  # 5 per output, two outputs
    result = run_cli("validate", *config, "--preset", "nosuch", str(photos / "car.png"))
    assert result.returncode == 2 and "no [presets.nosuch]" in result.stderr
    assert sandbox.generate_jobs == []


# -- the README's recipes -----------------------------------------------------------------------------


def readme_block(marker: str, language: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```{language}\n(.*?)```", README.read_text(), re.S)
    assert match, f"README.md lost its {marker} recipe"
    return match.group(1)


def test_the_readme_outbox_reader_sees_every_file(folders: Folders, sandbox: Sandbox, tmp_path: Path) -> None:
    if shutil.which("inotifywait") is None:
        pytest.skip("inotifywait is not installed (Debian: apt-get install inotify-tools)")
    home = tmp_path / "home"
    outbox = home / "scenario-watch" / "outbox"
    outbox.mkdir(parents=True)
    folders.outbox = outbox
    write_config(folders, sandbox.base_url, presets={"recolor": {"prompt": "red", "numOutputs": 2}})
    reader = ["bash", "-c", readme_block("outbox-reader", "sh")]
    # A first run sees the preset: images that arrive after it are taken (those before: left alone).
    assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
    with inotify_lines(reader, env={**os.environ, "HOME": str(home)}) as lines:
        for n in range(3):
            folders.drop(f"p{n}.json", {"prompt": f"picture {n}", "numOutputs": 2})
            move_in(folders, folders.inbox / "recolor", f"car{n}.png", png(3_000, n))
        assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
        published = sorted(
            str(p.relative_to(outbox))
            for p in outbox.rglob("*")
            if p.is_file() and ".processing" not in p.parts
        )
        assert len(published) == 18
        wait_for(lambda: sorted(_reported(lines, outbox)) == published, timeout=10, what="every file")
    assert sorted(_reported(lines, outbox)) == published  # each exactly once


def _reported(lines: list[str], outbox: Path) -> list[str]:
    return [line.split(": ", 1)[1].removeprefix(str(outbox) + "/") for line in lines if ": " in line]


def test_the_readme_failure_notification_hook_posts_the_error(folders: Folders, sandbox: Sandbox) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    import http.server
    import tomllib

    received: list[tuple[dict[str, str], bytes]] = []

    class Topic(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Topic)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recipe = readme_block("failure-hook", "toml").replace(
            "https://ntfy.sh/my-scenario-alerts", f"http://127.0.0.1:{server.server_port}/my-scenario-alerts"
        )
        write_config(folders, sandbox.base_url, hooks=tomllib.loads(recipe)["hooks"])
        folders.drop("broken.json", {"prompt": "x", "numOutputs": 9})
        assert run_cli("run", "--once", "-c", str(folders.config)).returncode == 0
        wait_for(lambda: received, timeout=10, what="the notification")
    finally:
        server.shutdown()
        server.server_close()
    [(headers, body)] = received
    assert "broken" in headers["Title"]
    assert "numOutputs" in json.loads(body)["error"]
