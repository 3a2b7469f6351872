"""Delivery: poll a job, then publish its outputs and manifest in the outbox."""
