"""The connector's configuration error, apart from ``config`` so that ``backends`` (whose registry ``config`` reads)
can raise it without importing ``config`` back."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and what is allowed."""
