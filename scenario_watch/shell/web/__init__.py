"""The HTTP listener (`[http] listen`): Prometheus metrics, the status object and a live page."""

from scenario_watch.shell.web.server import Listener

__all__ = ["Listener"]
