"""Preparation: a claimed file as a prompt (parse, presets, sidecars, the model's schema, images)."""
