"""Dispatch: accept a prompt, check its outputs can be delivered, upload references, submit."""
