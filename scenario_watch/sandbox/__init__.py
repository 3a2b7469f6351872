"""A local simulator of the Scenario API and its CDN, for tests and `scenario-watch run --sandbox`.

It imports nothing from the rest of scenario_watch: the product never depends on it.
"""

from .faults import Fault
from .handlers import RequestRecord
from .models import ApiError
from .server import Sandbox, main_serve

__all__ = ["ApiError", "Fault", "RequestRecord", "Sandbox", "main_serve"]
