"""One exception type for bad user input, so the CLI can print it as a single line and exit non-zero."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Bad input: the message names the file and the reason, on one line."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = str(path) if path is not None else None
        self.reason = " ".join(str(reason).split())  # keep it on one line
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)


class ConfigError(DataError):
    """A configuration value is invalid or inconsistent."""
