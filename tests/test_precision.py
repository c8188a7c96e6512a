"""precision auto: bf16 only where the hardware computes it; an explicit bf16 elsewhere is kept but warned."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_SEG
from medstudent import precision as prec
from medstudent.cli import app
from medstudent.config import load_config
from medstudent.inference import engine as engine_mod
from medstudent.inference import predict as predict_mod
from medstudent.training.train import _precision

runner = CliRunner()


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU does (True) or does not (False) compute bf16 natively."""

    def set_native(native: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(prec, "_warned", set())

    return set_native


def test_auto_follows_the_hardware(cpu_bf16):
    cpu_bf16(True)
    assert prec.native_bf16("cpu") and prec.resolve_precision("auto", "cpu") == "bf16"
    cpu_bf16(False)
    assert not prec.native_bf16("cpu") and prec.resolve_precision("auto", "cpu") == "32"
    assert prec.resolve_precision("32", "cpu") == "32"
    if not torch.cuda.is_available():
        assert not prec.native_bf16("cuda") and prec.resolve_precision("auto", "cuda") == "32"
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        prec.resolve_precision("half", "cpu")


def test_explicit_bf16_on_an_emulating_cpu_is_kept_and_warned_once(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(UserWarning, match="bf16 on this cpu is emulated"):
        assert prec.resolve_precision("bf16", "cpu") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prec.resolve_precision("bf16", "cpu") == "bf16"  # once per process
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prec.resolve_precision("bf16", "cpu") == "bf16"


def test_training_precision_flag(cpu_bf16):
    cfg = load_config("stas_cpu", ["train.accelerator=cpu"])
    assert cfg.train.precision == "auto"  # the CPU preset must not emulate bf16 on an AVX2-only machine
    cpu_bf16(False)
    assert _precision(cfg) == "32-true"
    cpu_bf16(True)
    assert _precision(cfg) == "bf16-mixed"
    assert _precision(load_config("stas_cpu", ["train.accelerator=cpu", "train.precision=32"])) == "32-true"


@pytest.mark.slow  # trains a model
def test_prediction_autocast_follows_auto(cpu_bf16, synth_stas_dir, tmp_path):
    """The autocast context of prediction is bf16 under auto only on a bf16-native CPU."""
    cpu_bf16(False)
    with engine_mod._autocast("auto", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    cpu_bf16(True)
    with engine_mod._autocast("auto", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    cpu_bf16(False)
    from medstudent.training.train import train

    cfg = load_config(
        "stas_cpu",
        [
            f"data.root={synth_stas_dir}",
            f"train.output_dir={tmp_path}",
            *TINY_SEG,
            "train.epochs=1",
            "data.test_fraction=4",
            "data.n_folds=3",
        ],
    )
    run = train(cfg, progress=False)
    pred = predict_mod.load_predictor(run)
    img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    same = predict_mod.predict_seg_probs(pred, img, "none", precision="auto")
    np.testing.assert_array_equal(same, predict_mod.predict_seg_probs(pred, img, "none", precision="32"))
    res = runner.invoke(
        app, ["predict", str(run), "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--precision", "fp8"]
    )
    assert res.exit_code == 1 and "--precision must be 32, bf16 or auto, got 'fp8'" in res.output
