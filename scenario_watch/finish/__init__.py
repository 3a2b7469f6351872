"""The end of a prompt: its final state, done/ or failed/ with an error file, the hooks."""
