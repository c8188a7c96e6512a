"""Command line: a thin typer layer over the Python API. Bad input prints one line and exits 1.

The commands live in modules by stage (data, experiments, predict, slides); importing them registers
them on `app`, the console entry point."""

from __future__ import annotations

import sys

from medstudent.cli import data, experiments, predict, slides  # noqa: F401 - register the commands
from medstudent.cli.common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
