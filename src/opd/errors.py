"""Errors shared across opd modules (kept free of heavy imports, so pure modules can raise them)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and the fix."""
