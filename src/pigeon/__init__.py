"""Pigeon: a self-hosted realtime messaging server."""
