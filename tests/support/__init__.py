"""Test-only helpers that start and reach real engines (PostgreSQL databases and clusters,
Redis servers and Redis Clusters); registered as pytest plugins by tests/conftest.py."""
