"""Where the model's schema comes from: the API at start and every few hours, else the journal's copy.

The live schema (`GET /v1/models/{id}`) is the truth about what a prompt may send; the journal keeps
the last one, so a start without network still validates against it; with neither, the built-in
table from the docs is used, with one warning.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from scenario_watch import logs
from scenario_watch.api.client import ScenarioClient
from scenario_watch.errors import ScenarioWatchError
from scenario_watch.journal.store import Store
from scenario_watch.prepare.schema import BUILTIN, ModelSchema, from_json, parse_model, to_json

log = logs.get()

META_KEY = "model_schema"


def cached_schema(store: Store) -> ModelSchema | None:
    """The schema the journal kept from the last successful fetch, or None."""
    found = store.get_meta(META_KEY)
    if found is None:
        return None
    text, written = found
    try:
        cached = from_json(text)
    except ValueError:
        return None
    return ModelSchema(cached.model_id, cached.inputs, "cached", cached.fetched_at or written)


class SchemaSource:
    """The schema in use now (`current`), refreshed from the API when stale or when a 400 names an input."""

    def __init__(
        self,
        client: ScenarioClient,
        store: Store,
        refresh_every: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.store = store
        self.refresh_every = refresh_every
        self.clock = clock
        self.current: ModelSchema = BUILTIN
        self._next_refresh = 0.0
        self._refreshing = threading.Lock()

    def load(self) -> ModelSchema:
        """At start: the live schema, else the cached one, else the built-in one (with a warning)."""
        if self.refresh():
            return self.current
        cached = cached_schema(self.store)
        if cached is not None:
            self.current = cached
            log.warning("model.schema_cached", schema=cached.describe(), note="the API could not be asked")
        else:
            log.warning(
                "model.schema_builtin",
                note="the API could not be asked and no schema was cached: using the documented inputs",
            )
        return self.current

    def refresh(self) -> bool:
        """Fetch the live schema now (one fetch at a time); False when the API could not tell."""
        if not self._refreshing.acquire(blocking=False):
            return False
        try:
            self._next_refresh = self.clock() + self.refresh_every
            try:
                body = self.client.get_model(self.client.model_id)
                schema = parse_model(body, "live", self.clock())
            except (ScenarioWatchError, OSError, ValueError) as exc:
                log.warning("model.schema_unavailable", error=str(exc))
                return False
            if schema.inputs != self.current.inputs:
                log.info("model.schema", schema=schema.describe(), inputs=sorted(schema.inputs))
            self.current = schema
            self.store.set_meta(META_KEY, to_json(schema))
            return True
        finally:
            self._refreshing.release()

    def refresh_if_stale(self) -> None:
        """Start a refresh in the background when the schema is older than refresh_every."""
        if self.clock() >= self._next_refresh:
            self._next_refresh = self.clock() + self.refresh_every
            threading.Thread(target=self.refresh, name="schema-refresh", daemon=True).start()
