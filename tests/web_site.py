"""A journal filled through the Store's public methods, real image files, and a listener over loopback."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenario_watch.config import Settings
from scenario_watch.journal.store import Store
from scenario_watch.sandbox.images import make_png
from scenario_watch.shell.instance import InstanceLock, lock_path
from scenario_watch.shell.metrics import Metrics, Snapshot
from scenario_watch.shell.status import JOURNAL, build
from scenario_watch.shell.web import Listener

API_KEY, API_SECRET = "sk-web-test-key-0123456789", "web-test-secret-abcdefghij"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Site:
    """Folders under `root`, a journal, and a listener on 127.0.0.1 serving them."""

    root: Path
    http: dict[str, Any] = field(default_factory=dict)
    presets: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        folders = {name: self.root / name for name in ("inbox", "outbox", "done", "failed", "state")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(
            folders={k: str(v) for k, v in folders.items()},
            api={"key": API_KEY, "secret": API_SECRET},
            http={"listen": "127.0.0.1:0", **self.http},
        )
        self.folders = self.settings.folders
        self.store = Store(self.folders.state / JOURNAL)
        self.lock: InstanceLock | None = None
        self.metrics = Metrics(presets=self.presets)
        self.metrics.set_snapshot(lambda: Snapshot(in_flight=len(self.store.active())))
        self.listener = Listener.from_settings(
            self.settings, self.store, self.status, self.metrics, self.presets
        )
        self.listener.start()

    def status(self) -> dict[str, Any]:
        """What `status --json` says about this journal."""
        return self.status_at(time.time())

    def status_at(self, now: float) -> dict[str, Any]:
        """What `status --json` would say at `now` (Unix time)."""
        lock = lock_path(self.folders.state, JOURNAL)
        return build(self.store, lock, self.settings.budget, now)

    def close(self) -> None:
        self.listener.close()
        if self.lock is not None:
            self.lock.release()
        self.store.close()

    def run_daemon(self, published: dict[str, Any] | None = None) -> None:
        """Look like a running daemon: hold the journal's lock and publish a heartbeat."""
        if self.lock is None:
            self.lock = InstanceLock.acquire(lock_path(self.folders.state, JOURNAL))
        beat = {"pid": 4242, "queue": "a free slot", "waiting": {}, "queued": 0, **(published or {})}
        self.store.set_meta("daemon", json.dumps({**beat, "heartbeat": time.time()}))

    # -- requests -----------------------------------------------------------------------------------

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Answer:
        """One request sent exactly as written (no client-side normalising of the path)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.listener.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            sent = {"Host": f"127.0.0.1:{self.listener.port}", **(headers or {})}
            for name, value in sent.items():
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    # -- journal rows -------------------------------------------------------------------------------

    def image(self, path: Path, seed: str, size: tuple[int, int] = (320, 240)) -> bytes:
        data = make_png(seed, *size)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def claimed(self, name: str, prompt: str, preset: str | None = None) -> int:
        """A prompt claimed and validated, with a reference image beside it in the inbox."""
        claimed = self.folders.inbox / ".processing" / "1" / name
        prompt_id = self.store.add(name, claimed, preset)
        stem = Path(name).stem
        self.image(self.folders.inbox / f"{stem}-ref.png", f"ref {stem}")
        inputs = {"prompt": prompt, "referenceImages": [f"{stem}-ref.png"]}
        self.store.queued(prompt_id, inputs, stem, "0" * 64)
        return prompt_id

    def running(self, name: str, prompt: str, progress: float | None = None) -> int:
        """A job at Scenario (progress None: the API said nothing yet)."""
        prompt_id = self.claimed(name, prompt)
        stem = Path(name).stem
        self.store.submitting(prompt_id, {"prompt": prompt}, "2030-01-01T00:00:00Z")
        self.store.set_references(
            prompt_id, [{"file": f"{stem}-ref.png", "sha256": "0" * 64, "assetId": "asset_r"}]
        )
        self.store.submitted(prompt_id, f"job_{stem}", 5.0)
        if progress is not None:
            self.store.polled(prompt_id, progress)
        return prompt_id

    def finish(self, prompt_id: int, outputs: int = 2) -> list[bytes]:
        """The job succeeded: its images written into the outbox, the prompt filed under done/."""
        row = self.store.get(prompt_id)
        stem = str(Path(row.file).with_suffix(""))  # sub/x.json -> outbox/sub/x_1.png
        self.store.downloading(prompt_id, [f"asset_{n}" for n in range(outputs)], 5.0)
        names = [f"{stem}_{n}.png" for n in range(1, outputs + 1)]
        data = [self.image(self.folders.outbox / n, f"out {stem} {n}", (512, 384)) for n in names]
        (self.folders.outbox / f"{stem}.manifest.json").write_text("{}")
        self.store.done(prompt_id, [*names, f"{stem}.manifest.json"])
        self.store.filed(prompt_id, self.folders.done / row.file)
        return data

    def done(self, name: str, prompt: str, outputs: int = 2) -> int:
        prompt_id = self.running(name, prompt)
        self.finish(prompt_id, outputs)
        return prompt_id

    def failed(self, name: str, stage: str, error: str, hint: str | None) -> int:
        prompt_id = self.claimed(name, f"prompt of {name}")
        self.store.failed(prompt_id, stage, error, hint)
        self.store.filed(prompt_id, self.folders.failed / name)
        return prompt_id
