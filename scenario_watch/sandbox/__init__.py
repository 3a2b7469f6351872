"""A local simulator of the Scenario API and its CDN, for tests and `scenario-watch run --sandbox`.

It imports nothing from the rest of scenario_watch: the product never depends on it.
"""

from scenario_watch.sandbox.faults import Fault
from scenario_watch.sandbox.models import ApiError
from scenario_watch.sandbox.request_log import RequestRecord
from scenario_watch.sandbox.server import Sandbox, main_serve

__all__ = ["ApiError", "Fault", "RequestRecord", "Sandbox", "main_serve"]
