"""`python -m scenario_watch` is the `scenario-watch` command."""

from .cli import main

raise SystemExit(main())
