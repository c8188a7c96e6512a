"""A file in every synthetic data set saying so, so that what is trained on it (model cards) can tell."""

from __future__ import annotations

from pathlib import Path

SYNTHETIC_MARKER = "SYNTHETIC.md"


def mark_synthetic(root: Path, what: str, seed: int) -> None:
    (Path(root) / SYNTHETIC_MARKER).write_text(
        f"Synthetic {what} data made by `medstudent synth` (seed {seed}): look-alikes, not real images.\n"
    )


def is_synthetic(root: str | Path) -> bool:
    return (Path(root) / SYNTHETIC_MARKER).is_file()
