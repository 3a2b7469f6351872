"""The simulated Scenario account as one object (no HTTP): its jobs, assets and uploads over one memory."""

from __future__ import annotations

from scenario_watch.sandbox.assets import Assets
from scenario_watch.sandbox.jobs import Jobs
from scenario_watch.sandbox.uploads import Uploads


class World(Jobs, Assets, Uploads):
    """Everything the sandbox remembers; every public method is thread-safe.

    Account (account.py) holds the records, knobs and lock; each base adds one resource's endpoints.
    """
