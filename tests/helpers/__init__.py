"""Shared test helpers (corpora, data bytes, servers); fixtures live in conftest.py."""
