"""One owner for the file names of a run folder (in the spirit of nnU-Net's `get_output_folder`).

runs/<name>/fold_<k>/
  config.yaml           the resolved configuration (what was really run)
  split.json            the split used (copied, so the run folder is self-contained)
  checkpoints/          best.ckpt (by val_metric) and last.ckpt (for --resume)
  logs/                 CSV and TensorBoard logs
  metrics.json          best validation metric, epochs, minutes, sizes
  env.json              versions, commit, hardware, seed, precision, data fingerprint (provenance)
  training_curves.png
  postprocess.json      tuned post-processing (medstudent tune-postprocess), used by predict
  oof.csv               out-of-fold scores written by `medstudent cv`
  predictions/val/      validation probability maps

Every module that reads or writes these files asks a `RunDir` for the path, so a renamed file is renamed
in one place. The other folders (cv roots, self-training roots) use the same names for their own
config.yaml, split.json and oof.csv, so `RunDir(root)` serves them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder; nothing is created or checked on construction."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of(cls, output_dir: str | Path, name: str, fold: int | str) -> RunDir:
        """runs/<name>/fold_<k> (`fold` may be "all": the run trained on every image)."""
        return cls.fold_in(Path(output_dir) / name, fold)

    @classmethod
    def fold_in(cls, root: str | Path, fold: int | str) -> RunDir:
        """<root>/fold_<k>: one fold of a run root (runs/<name>, a cv folder)."""
        return cls(Path(root) / f"fold_{fold}")

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def env(self) -> Path:
        """Versions, hardware, seed, precision and the data fingerprint (`provenance.write_env`)."""
        return self.root / "env.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def postprocess(self) -> Path:
        return self.root / "postprocess.json"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def curves(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def val_maps(self) -> Path:
        """Validation probability maps (uint8 PNG), written by `cv` and `tune-postprocess`."""
        return self.root / "predictions" / "val"

    def is_trained(self) -> bool:
        """Training finished here: metrics.json and the best checkpoint are both written."""
        return self.metrics.is_file() and self.best_ckpt.is_file()
