"""One exception type for bad user input, so the CLI can print it as a single line and exit non-zero."""

from __future__ import annotations

from pathlib import Path


def _one_line(text: str) -> str:
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text
    )


class DataError(Exception):
    """Bad input: the message names the file and the reason, on one line."""

    def __init__(self, path: str | Path | None, reason: str):
        # keep it on one line: a newline in a file name is shown as \n, whitespace in the reason collapsed
        self.path = _one_line(str(path)) if path is not None else None
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)


class ConfigError(DataError):
    """A configuration value is invalid or inconsistent."""
