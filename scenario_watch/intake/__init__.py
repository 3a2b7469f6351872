"""Intake: watchdog events and scans, readiness, the atomic claim, what a prompt file is."""
