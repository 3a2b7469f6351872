"""The service shell: wiring, the loop, signals, systemd, status, the CLI, the listener."""
