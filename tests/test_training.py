"""Training, checkpoint -> predict -> evaluate round trip, resume, TTA/padding geometry, ensembles, losses."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_SEG
from medstudent.cli import app
from medstudent.config import OptimConfig, load_config
from medstudent.data.layouts import open_segmentation
from medstudent.data.preprocess import scaled_contract
from medstudent.errors import ConfigError, DataError
from medstudent.inference.predict import (
    load_predictor,
    predict_probs,
    predict_seg_probs,
    resolve_device,
)
from medstudent.training.losses import IGNORE, DeepSupervisionLoss, SegmentationLoss
from medstudent.training.optim import lr_factor
from medstudent.training.train import ensemble_members, train

runner = CliRunner()
TINY = [
    *TINY_SEG,
    "augment.scale=1.0",
    "data.test_fraction=4",
    "data.n_folds=3",
    "postprocess.min_area=0",
    "postprocess.fill_holes=false",
]


def tiny_cfg(root, tmp_path, *extra):
    return load_config(
        "stas_cpu", [f"data.root={root}", f"train.output_dir={tmp_path / 'runs'}", *TINY, *extra]
    )


@pytest.fixture(scope="module")
def trained_run(synth_stas_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_cfg(synth_stas_dir, tmp, "train.epochs=3", "train.name=tiny", "optim.lr=0.003")
    return train(cfg, progress=False)


@pytest.mark.slow  # trains a model
def test_training_lowers_loss_and_writes_run_tree(trained_run):
    run = trained_run
    for rel in (
        "config.yaml",
        "split.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "metrics.json",
        "training_curves.png",
        "logs/metrics.csv",
    ):
        assert (run / rel).exists(), rel
    assert run.name == "fold_0" and run.parent.name == "tiny"
    log = pd.read_csv(run / "logs" / "metrics.csv")
    losses = log.dropna(subset=["train_loss"])["train_loss"].to_numpy()
    assert len(losses) == 3 and losses[-1] < losses[0]
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 3 and 0 <= m["best_val_metric"] <= 1 and m["n_test"] == 4
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2  # refreshed every epoch, also when the validation metric did not improve


@pytest.mark.slow  # trains a model
def test_checkpoint_predict_evaluate_round_trip(trained_run, synth_stas_dir, tmp_path):
    out = tmp_path / "pred"
    res = runner.invoke(
        app,
        [
            "predict",
            str(trained_run),
            "-i",
            str(synth_stas_dir / "Train_Images"),
            "-o",
            str(out),
            "--tta",
            "flip",
            "--probs",
            "--labelme",
        ],
    )
    assert res.exit_code == 0, res.output
    ds = open_segmentation(synth_stas_dir)
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == len(ds)
    from PIL import Image

    m0 = np.asarray(Image.open(masks[0]))
    assert m0.shape == (160, 256) and set(np.unique(m0)) <= {0, 255}
    assert len(list((out / "labelme").glob("*.json"))) == len(ds)
    assert len(list((out / "overlays").glob("*.png"))) == len(ds)
    res = runner.invoke(app, ["evaluate", str(out), str(synth_stas_dir), "-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    per = pd.read_csv(tmp_path / "ev" / "per_image.csv")
    assert summary["images"] == len(ds) == len(per)
    assert summary["mean_dice"] == pytest.approx(per["dice"].mean())
    assert (tmp_path / "ev" / "worst.png").is_file()


@pytest.mark.slow  # trains a model
def test_resume_continues_from_saved_epoch(synth_stas_dir, tmp_path):
    cfg = tiny_cfg(synth_stas_dir, tmp_path, "train.epochs=1", "train.name=res")
    run = train(cfg, progress=False)
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    with pytest.raises(DataError, match="already holds checkpoints; pass --resume"):
        train(cfg, progress=False)
    cfg2 = tiny_cfg(synth_stas_dir, tmp_path, "train.epochs=2", "train.name=res")
    train(cfg2, resume=True, progress=False)
    log = pd.read_csv(run / "logs" / "metrics.csv").dropna(subset=["train_loss"])
    assert sorted(log["epoch"].unique().tolist()) == [0, 1]  # epoch 0 from the first run, epoch 1 resumed
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_resume_without_checkpoint_errors(synth_stas_dir, tmp_path):
    cfg = tiny_cfg(synth_stas_dir, tmp_path, "train.name=nothing")
    with pytest.raises(DataError, match=r"last\.ckpt: cannot resume"):
        train(cfg, resume=True, progress=False)


@pytest.mark.slow  # trains a model
def test_padding_and_tta_restore_exact_size(trained_run):
    pred = load_predictor(trained_run)
    rng = np.random.default_rng(0)
    for h, w in ((97, 131), (160, 256), (33, 301)):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for tta in ("none", "flip", "d4"):
            p = predict_seg_probs(pred, img, tta)
            assert p.shape == (h, w) and np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
        tiled = predict_seg_probs(pred, img, "none", tile=64)  # sliding window path
        assert tiled.shape == (h, w)


@pytest.mark.slow  # trains a model
def test_multi_scale_tta_is_the_mean_of_the_single_scale_maps(trained_run):
    pred = load_predictor(trained_run)
    img = np.random.default_rng(2).integers(0, 255, (97, 131, 3), dtype=np.uint8)
    one = predict_seg_probs(pred, img, "flip", scales=[1.0])
    bigger = predict_seg_probs(pred, img, "flip", scales=[1.25])
    assert one.shape == bigger.shape == (97, 131) and np.abs(one - bigger).max() > 1e-3  # really rescaled
    both = predict_seg_probs(pred, img, "flip", scales=[1.0, 1.25])
    np.testing.assert_allclose(both, (one + bigger) / 2, atol=1e-6)
    # the factor multiplies the run's resolution: 1.25 of scale 1.0 is the model at scale 1.25
    pred.cfg.augment.scale = 1.25
    np.testing.assert_allclose(predict_seg_probs(pred, img, "flip", scales=[1.0]), bigger, atol=1e-6)
    # default: the run's predict.tta_scales
    pred.cfg.augment.scale = 1.0
    pred.cfg.predict.tta_scales = [1.0, 1.25]
    np.testing.assert_allclose(predict_seg_probs(pred, img, "flip"), both, atol=1e-6)


def test_scaled_contract_multiplies_scale_or_resize():
    seg = {"task": "segmentation", "scale": 0.5, "resize": None}
    assert scaled_contract(seg, 1.25)["scale"] == 0.625 and seg["scale"] == 0.5  # a copy
    assert scaled_contract({**seg, "resize": [800, 800]}, 1.25)["resize"] == [1000, 1000]
    cls = {"task": "classification", "scale": 1.0, "center_crop": 400}
    assert scaled_contract(cls, 2.0) == cls
    with pytest.raises(ConfigError, match="tta_scales"):
        load_config("stas_cpu", ["predict.tta_scales=[]"])


@pytest.mark.slow  # trains a model
def test_two_model_ensemble_predicts(trained_run):
    pred = load_predictor(trained_run)
    img = np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    single = predict_probs([pred], img)
    double = predict_probs([pred, pred], img, ensemble="mean")
    np.testing.assert_allclose(single, double, atol=1e-6)


def test_missing_checkpoint_error(tmp_path):
    res = runner.invoke(
        app, ["predict", str(tmp_path / "nope"), "-i", str(tmp_path), "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 1 and "nope: no such run folder or checkpoint" in res.output
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(DataError, match="no checkpoint found"):
        load_predictor(tmp_path / "empty_run")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"bad\.ckpt: cannot read checkpoint"):
        load_predictor(bad)


@pytest.mark.slow  # trains a model
def test_prediction_device_choice(trained_run, synth_stas_dir, tmp_path):
    """--device: auto is the CPU on a machine without CUDA (a GPU where there is one); a GPU that is not
    there, or an unknown device, is a one-line error; the predictor's inputs follow the model's device."""
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(DataError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    pred = load_predictor(trained_run, device="auto")
    assert pred.device == auto
    img = np.random.default_rng(2).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    assert predict_seg_probs(pred, img, "flip").shape == (70, 90)
    if torch.cuda.is_available():
        return
    imgs = str(synth_stas_dir / "Train_Images")
    for dev, msg in (("cuda", "CUDA is not available"), ("mps", "unsupported device 'mps'")):
        args = ["predict", str(trained_run), "-i", imgs, "-o", str(tmp_path), "--device", dev]
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and msg in res.output, res.output
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


def test_unknown_encoder_error_through_cli(synth_stas_dir, tmp_path):
    res = runner.invoke(
        app,
        [
            "train",
            "stas_cpu",
            "--set",
            f"data.root={synth_stas_dir}",
            "--set",
            "model.encoder=no_such_net",
            "--set",
            "model.pretrained=none",
            "--set",
            f"train.output_dir={tmp_path}",
            "--quiet",
        ],
    )
    assert res.exit_code == 1
    assert "no_such_net" in res.output and len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


def test_config_errors():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config("stas_cpu", ["train.epochs=many"])
    with pytest.raises(ConfigError, match="model.colour: Extra inputs are not permitted"):
        load_config("stas_cpu", ["model.colour=red"])
    with pytest.raises(ConfigError, match="config not found"):
        load_config("no_such_preset")


def test_presets_validate_and_ensemble_members():
    for name in ("stas_cpu", "stas_unet_b3", "stas_deeplab_ensemble", "oct_resnet18", "oct_cpu"):
        load_config(name)
    cfg = load_config("stas_deeplab_ensemble")
    members = ensemble_members(cfg)
    assert [m.train.name for m in members] == [
        "stas_deeplab-b6ns",
        "stas_deeplab-v2m",
        "stas_deeplab-nfnetl2",
    ]
    assert [m.model.encoder for m in members] == [
        "tf_efficientnet_b6.ns_jft_in1k",
        "tf_efficientnetv2_m.in21k_ft_in1k",
        "eca_nfnet_l2",
    ]
    assert all(m.model.arch == "deeplabv3plus" and m.optim.name == "adabelief" for m in members)
    b3 = load_config("stas_unet_b3")
    assert b3.model.deep_supervision and b3.loss.deep_supervision_weights == (1.0, 0.25, 0.0625)


def test_ignore_pixels_get_zero_gradient():
    from medstudent.config import LossConfig

    for name in ("dice_focal", "dice_bce", "focal", "dice"):
        loss = SegmentationLoss(LossConfig(name=name), out_channels=1)
        logits = torch.randn(2, 1, 16, 16, requires_grad=True)
        target = torch.randint(0, 2, (2, 16, 16))
        target[:, :8] = IGNORE
        loss(logits, target).backward()
        g = logits.grad[:, 0]
        assert torch.all(g[:, :8] == 0), name
        assert g[:, 8:].abs().sum() > 0, name


def test_multiclass_loss_and_deep_supervision_decay():
    from medstudent.config import LossConfig

    base = SegmentationLoss(LossConfig(name="dice_focal"), out_channels=3)
    target = torch.randint(0, 3, (2, 32, 32))
    main = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(base(main, target))
    ds = DeepSupervisionLoss(base, (1.0, 0.25, 0.0625))
    outs = [main, torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    start, end = ds(outs, target, progress=0.0), ds(outs, target, progress=1.0)
    assert end == pytest.approx(float(base(main, target)), rel=1e-5)  # aux weights decayed to 0
    assert start > end
    assert ds.aux_factor(0.5) == pytest.approx(0.5)


def test_lr_schedules():
    cos = OptimConfig(scheduler="cosine", warmup_epochs=1, min_lr_ratio=0.0)
    assert lr_factor(0, cos, 10, 5) == pytest.approx(0.1)
    assert lr_factor(9, cos, 10, 5) == pytest.approx(1.0)
    assert lr_factor(10, cos, 10, 5) == pytest.approx(1.0)
    assert lr_factor(30, cos, 10, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    step = OptimConfig(scheduler="step", step_size=7, gamma=0.1)
    assert lr_factor(69, step, 10, 20) == 1.0 and lr_factor(70, step, 10, 20) == pytest.approx(0.1)
    assert lr_factor(140, step, 10, 20) == pytest.approx(0.01)


def test_a_single_sample_last_batch_is_dropped(synth_stas_dir, tmp_path):
    """BatchNorm cannot train on a batch of one: a remainder of exactly one sample is dropped."""
    from medstudent.training.loaders import make_loaders, prepare_data

    cfg = tiny_cfg(synth_stas_dir, tmp_path)
    prep = prepare_data(cfg)
    ids = list(range(len(prep.dataset)))
    for n, batches in ((9, 2), (10, 3), (8, 2)):
        prep.train_idx = ids[:n]
        train_loader, _ = make_loaders(cfg, prep)
        assert len(train_loader) == batches, n


@pytest.mark.slow  # trains a model
def test_init_from_checkpoint_copies_all_weights_or_fails_clearly(trained_run, synth_stas_dir, tmp_path):
    """A student can start from its teacher: every model weight is copied; another model is refused."""
    from medstudent.training.module import TaskModule
    from medstudent.training.train import _init_weights

    cfg = tiny_cfg(synth_stas_dir, tmp_path)
    module = TaskModule(cfg.model_dump(mode="json"), 2, ["background", "STAS"])
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    _init_weights(module, ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, saved["model." + k]), k
    other = tiny_cfg(synth_stas_dir, tmp_path, "model.encoder=resnet18")
    with pytest.raises(DataError, match="does not fit this model"):
        _init_weights(TaskModule(other.model_dump(mode="json"), 2, ["background", "STAS"]), ckpt)


@pytest.mark.slow  # trains a model
def test_frozen_backbone_then_unfrozen(synth_stas_dir, tmp_path):
    """optim.freeze_epochs: the encoder (weights and BatchNorm statistics) is untouched while frozen and
    trains afterwards at lr * backbone_lr_scale; the decoder trains throughout."""
    import lightning as L

    from medstudent.training.loaders import make_loaders, prepare_data
    from medstudent.training.module import TaskModule

    cfg = tiny_cfg(synth_stas_dir, tmp_path, "optim.freeze_epochs=1", "optim.backbone_lr_scale=0.5")
    prep = prepare_data(cfg)
    train_loader, _ = make_loaders(cfg, prep)
    module = TaskModule(cfg.model_dump(mode="json"), 2, ["background", "STAS"], steps_per_epoch=2)
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [g["initial_lr"] for g in groups] == [cfg.optim.lr, cfg.optim.lr * 0.5]

    def state(m):
        return {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}

    enc0, dec0 = state(module.model.encoder), state(module.model.decoder)
    seen: dict[int, dict] = {}

    class Snap(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = state(pl_module.model.encoder)

    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Snap()],
    )
    trainer.fit(module, train_loader)
    assert all(torch.equal(enc0[k], seen[0][k]) for k in enc0), "frozen encoder changed in epoch 0"
    assert any("running_mean" in k for k in enc0)  # BatchNorm statistics were compared too
    assert not all(torch.equal(enc0[k], seen[1][k]) for k in enc0), "encoder did not train after unfreezing"
    dec1 = state(module.model.decoder)
    assert not all(torch.equal(dec0[k], dec1[k]) for k in dec0)


def test_freezing_under_ddp_needs_find_unused(synth_stas_dir, tmp_path):
    from medstudent.training.train import build_trainer

    cfg = tiny_cfg(synth_stas_dir, tmp_path, "optim.freeze_epochs=2", "train.devices=2")
    with pytest.raises(ConfigError, match="find_unused"):
        build_trainer(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        OptimConfig(backbone_lr_scale=-1)


@pytest.mark.slow  # trains a model
def test_ema_checkpoints_hold_the_averaged_weights_and_resume(synth_stas_dir, tmp_path):
    cfg = tiny_cfg(
        synth_stas_dir, tmp_path, "train.epochs=2", "train.name=ema", "train.ema=0.5", "optim.lr=0.003"
    )
    run = train(cfg, progress=False)
    ck = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    avg, cur = ck["state_dict"], ck["current_model_state"]
    assert avg.keys() == cur.keys()
    moved = [k for k in avg if avg[k].is_floating_point() and not torch.equal(avg[k], cur[k])]
    assert moved  # the averaged weights are not the last training weights
    # predict loads the averaged weights (the checkpoint's state_dict)
    pred = load_predictor(run / "checkpoints" / "last.ckpt")
    k = next(k for k in moved if k.startswith("model."))
    loaded = dict(pred.model.named_parameters()) | dict(pred.model.named_buffers())
    assert torch.equal(loaded[k[len("model.") :]].float(), avg[k].float())
    cfg3 = tiny_cfg(synth_stas_dir, tmp_path, "train.epochs=3", "train.name=ema", "train.ema=0.5")
    train(cfg3, resume=True, progress=False)
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    with pytest.raises(ConfigError, match=r"train\.ema: .*a decay in \[0, 1\) is needed"):
        tiny_cfg(synth_stas_dir, tmp_path, "train.ema=1.0")


@pytest.mark.slow  # trains a model
def test_tune_postprocess_writes_the_setting_it_reports(trained_run, tmp_path):
    import shutil

    from medstudent.evaluation.postprocess_tuning import tune_run

    configured = load_predictor(trained_run).postprocess.model_dump(mode="json")
    run = tmp_path / "api" / "fold_0"
    shutil.copytree(trained_run, run)
    res = tune_run(run, tta="none")
    written = json.loads((run / "postprocess.json").read_text())
    assert written == res["best"] and load_predictor(run).postprocess.model_dump(mode="json") == written
    if res["adopted"]:
        assert res["dice_held_out"] > res["dice_configured"]
    else:
        assert written == configured and res["dice_held_out"] <= res["dice_configured"]
    assert res["dice_tuned"] >= res["dice_held_out"] - 1e-9  # left-out scoring can only lose
    assert len(list((run / "predictions" / "val").glob("*.png"))) == res["images"]
    cli_run = tmp_path / "cli" / "fold_0"
    shutil.copytree(trained_run, cli_run)
    out = runner.invoke(app, ["tune-postprocess", str(cli_run), "--tta", "none"])
    assert out.exit_code == 0, out.output
    assert "leave-one-image-out" in out.output and "tuned setting adopted" in out.output
    assert json.loads((cli_run / "postprocess.json").read_text()) == written  # same maps, same choice


@pytest.mark.slow  # trains a model
def test_fold_all_trains_on_every_non_test_image(synth_stas_dir, tmp_path):
    """--fold all (nnU-Net's final model): every non-test image trains, none validates, best = last; the run
    predicts; post-processing cannot be tuned on it and self-training refuses it, each with one line."""
    from medstudent.data.splits import fold_ids

    split = {
        "test": ["t"],
        "folds": [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}],
    }
    assert fold_ids(split, "all") == (["a", "b", "c"], [], ["t"])
    with pytest.raises(DataError, match="fold 2 does not exist"):
        fold_ids(split, 2)
    args = [f"data.root={synth_stas_dir}", f"train.output_dir={tmp_path / 'runs'}", *TINY, "train.epochs=1"]
    sets = [x for a in args for x in ("--set", a)]
    res = runner.invoke(
        app, ["train", "stas_cpu", "--fold", "all", "--quiet", *sets, "--set", "train.name=f"]
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "f" / "fold_all"
    m = json.loads((run / "metrics.json").read_text())
    saved = json.loads((run / "split.json").read_text())
    assert m["n_val"] == 0 and m["best_val_metric"] is None
    assert m["n_train"] == len(open_segmentation(synth_stas_dir)) - len(saved["test"])
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(best[k], last[k]) for k in best)
    img = np.random.default_rng(3).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    assert predict_seg_probs(load_predictor(run), img).shape == (64, 80)
    res = runner.invoke(app, ["tune-postprocess", str(run)])
    assert res.exit_code == 1 and "no validation images (trained with fold all)" in res.output
    res = runner.invoke(app, ["train", "stas_cpu", "--fold", "first", *sets])
    assert res.exit_code == 1 and "--fold must be a fold number or 'all', got 'first'" in res.output
    res = runner.invoke(app, ["selftrain", "stas_cpu", "--fold", "all", *sets])
    assert res.exit_code == 1 and "--fold all is for train" in res.output


def test_epochs_that_fit_the_time_budget():
    from medstudent.training.callbacks import epochs_that_fit

    assert epochs_that_fit(60, 1, 600, 52, 1) == 10  # 1 min per epoch, 10 min left
    assert epochs_that_fit(120, 2, 1000, 52, 2) == 16  # 16.7 fit -> 16, a validated epoch
    assert epochs_that_fit(60, 2, 6000, 52, 2) == 52  # everything fits: the configured number
    assert epochs_that_fit(600, 2, 300, 52, 2) == 2  # already over: never fewer than done
    # at the recent pace: 30 done in 1800 s, now 90 s per epoch, 1800 s left -> 30 + 20
    assert epochs_that_fit(1800, 30, 3600, 100, 1, recent_s_per_epoch=90) == 50


def test_time_budget_holds_when_the_machine_slows_down_half_way(monkeypatch):
    """An injected clock: 60 s per epoch for 30 epochs, then 30% slower. The first plan (58 epochs) would
    end after 66.7 min, past the 60-minute cap, cutting the cosine; re-planned at every validated epoch
    the run and its LR horizon end inside the budget, with the horizon at the last epoch run."""
    from types import SimpleNamespace

    import medstudent.training.callbacks as callbacks_mod

    now = [0.0]
    monkeypatch.setattr(callbacks_mod, "_clock", lambda: now[0])
    for val_every in (1, 2):
        now[0] = 0.0
        cb = callbacks_mod.FitEpochsToTime(60, val_every)  # budget 60 min x 0.97 margin
        trainer = SimpleNamespace(
            current_epoch=0,
            fit_loop=SimpleNamespace(max_epochs=100),
            strategy=SimpleNamespace(broadcast=lambda v, src=0: v),
            is_global_zero=False,
        )
        cb.on_fit_start(trainer, None)
        cb.on_train_start(trainer, None)
        first_plan, epoch = None, 0
        while epoch < trainer.fit_loop.max_epochs:
            now[0] += 60.0 if epoch < 30 else 78.0
            trainer.current_epoch = epoch
            cb.on_train_epoch_end(trainer, None)
            first_plan = first_plan or cb.planned
            epoch += 1
        assert first_plan == 58  # the one-shot plan of before
        assert 30 * 60 + (first_plan - 30) * 78 > cb.budget_s  # ... which would have overrun
        assert now[0] <= cb.budget_s and epoch == trainer.fit_loop.max_epochs  # cosine ends in time
        assert epoch >= 45 and epoch % val_every == 0


@pytest.mark.slow  # trains a model
def test_fit_epochs_to_time_ends_run_and_cosine_inside_the_budget(synth_stas_dir, tmp_path, monkeypatch):
    """A fake clock makes every epoch take 30 s against a 2-minute budget: the run stops after 3 of 6
    epochs with the cosine at its end (not cut at its middle), and the plan rides in the checkpoint."""
    import itertools
    from types import SimpleNamespace

    import medstudent.training.callbacks as callbacks_mod

    ticks = itertools.count()
    monkeypatch.setattr(callbacks_mod, "_clock", lambda: 30.0 * next(ticks))
    cfg = tiny_cfg(
        synth_stas_dir,
        tmp_path,
        "train.epochs=6",
        "train.max_minutes=2",
        "train.fit_epochs_to_time=true",
        "train.name=budget",
        "optim.min_lr_ratio=0.01",
    )
    run = train(cfg, progress=False)
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(cfg.optim.lr * 0.01, rel=1e-3)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("FitEpochsToTime"))
    assert state["planned"] == 3 and state["spent_s"] > 0
    # --resume: the restored plan is applied again before the first batch is loaded (at fit start)
    cb = callbacks_mod.FitEpochsToTime(2, 1)
    cb.load_state_dict(state)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(max_epochs=6))
    cb.on_fit_start(trainer, None)
    assert trainer.fit_loop.max_epochs == 3
