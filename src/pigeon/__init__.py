"""Pigeon: a self-hostable messaging backend (1:1 and group chat over WebSockets)."""

__version__ = "0.1.0"
