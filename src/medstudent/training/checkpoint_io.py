"""Checkpoints written atomically, so a run killed while saving keeps a loadable last.ckpt for --resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medstudent.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose save goes to a temp file next to the checkpoint and is renamed over it.

    Lightning's own save serialises into memory and writes through an fsspec transaction whose temp file
    lies in the system temp folder; where that is another file system (a tmpfs /tmp, a scratch volume) the
    commit is a copy into the checkpoint path, so a kill during it leaves a truncated last.ckpt and the run
    cannot resume. Here the rename is within one folder, hence atomic: the old checkpoint or the new one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)
