"""The Scenario REST API as typed calls and typed errors."""
