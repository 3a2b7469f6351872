"""`python -m scenario_watch` is the `scenario-watch` command."""

from scenario_watch.shell.cli import main

raise SystemExit(main())
