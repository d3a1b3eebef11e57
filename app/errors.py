"""Errors that modules below app/config.py raise too (app/secretbox.py), so they need no import of it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""
