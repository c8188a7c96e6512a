"""Shared fixtures: synthetic data sets made once per session, and the location of the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(
    os.environ.get("MEDSTUDENT_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


# A tiny segmentation model with augmentation switched off: what the training-side tests build on
# (`load_config("stas_cpu", [..., *TINY_SEG, ...])`), so a test takes seconds on 2 cores.
TINY_SEG = [
    "model.arch=fpn",
    "model.encoder=mobilenetv3_small_050",
    "model.pretrained=none",
    "train.batch_size=4",
    "augment.crop=null",
    "augment.rot90=0",
    "augment.stain=0",
    "augment.autoaugment=0",
    "augment.noise=0",
    "train.precision=32",
    "train.max_minutes=null",
    "train.val_every=1",
    "train.ema=0",
    "predict.tta=flip",
    "predict.budget_seconds=null",  # the preset's time budget would make the TTA plan depend on the machine
]

# The classification counterpart: a tiny untrained ResNet on 32 px images for one epoch on one thread.
TINY_CLS = [
    "model.arch=resnet10t",
    "model.pretrained=none",
    "augment.image_size=32",
    "train.epochs=1",
    "train.max_minutes=null",
    "train.threads=1",
]


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; the test is skipped when it is absent (real data is never in the repo)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available at {p}")
    return p


@pytest.fixture(scope="session", autouse=True)
def _threads():
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:  # pragma: no cover - torch is a dependency; the ONNX runner tests run without it
        pass


@pytest.fixture(scope="session")
def synth_stas_dir(tmp_path_factory) -> Path:
    from medstudent.data.synth import synth_stas

    return synth_stas(tmp_path_factory.mktemp("stas"), n=16, seed=1, width=256, height=160, n_unlabeled=4)


@pytest.fixture(scope="session")
def synth_oct_dir(tmp_path_factory) -> Path:
    from medstudent.data.synth import synth_oct

    return synth_oct(tmp_path_factory.mktemp("oct"), n=24, seed=1, size=96)
