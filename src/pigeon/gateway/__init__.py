"""Gateways: the WebSocket and HTTP faces of the server. Thin: decode, authorise, call a service."""
