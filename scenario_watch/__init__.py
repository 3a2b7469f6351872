"""scenario-watch: a drop-folder daemon for Scenario's Gemini 3 Pro image-editing model."""

__version__ = "0.1.0"

__all__ = ["__version__"]
