"""Errors every side raises for a user to read: a bad flag, setting or file."""

from __future__ import annotations


class UsageError(Exception):
    """A bad flag, setting or file: the command prints the message and exits 2."""
