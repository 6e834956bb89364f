"""Presence registries: in-process (embedded default); Redis with TTLs for many nodes."""
