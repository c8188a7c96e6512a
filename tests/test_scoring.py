"""One scorer: `evaluate` (on written masks), `cv`'s score_models and self-training's score_round give the
same numbers for the same predictions.

The predictor is replaced by fixed probability maps (no model is trained or loaded), so the three entry
points see identical predictions and only their scoring can differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

import medstudent.inference.predict as predict_mod
from medstudent.config import PostprocessConfig, load_config
from medstudent.core.postprocess import postprocess
from medstudent.data.layouts import open_classification, open_segmentation
from medstudent.evaluation.evaluate import evaluate_classification, evaluate_segmentation
from medstudent.evaluation.scoring import seg_row, seg_summary
from medstudent.experiments.cv import score_models
from medstudent.selftrain.plan import Plan
from medstudent.selftrain.rounds import score_round
from medstudent.training.loaders import Prepared

# a setting that changes the masks: small speckles are dropped, holes filled
POST = PostprocessConfig(threshold=0.5, min_area=40, fill_holes=True)


def _key(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _seg_prob(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible probability map: the blurred truth, a hole, and speckles that min_area removes."""
    rng = np.random.default_rng(seed)
    prob = gaussian_filter((gt > 0).astype(np.float32), 2.0) * 0.9
    h, w = prob.shape
    for _ in range(6):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        prob[y : y + 3, x : x + 3] = 0.8
    return np.clip(prob + rng.normal(0, 0.05, prob.shape).astype(np.float32), 0, 1)


def _fake_engine(monkeypatch, predictor, maps: dict[str, np.ndarray]) -> list[dict]:
    """load_predictor returns `predictor`; predict_probs returns the fixed map of the image it is given."""
    calls: list[dict] = []

    def predict_probs(predictors, image, **kw):
        calls.append(kw)
        return maps[_key(image)]

    monkeypatch.setattr(predict_mod, "load_predictor", lambda path, device="cpu": predictor)
    monkeypatch.setattr(predict_mod, "predict_probs", predict_probs)
    return calls


def _plan(ds, val_idx: list[int]) -> Plan:
    return Plan(Prepared(ds, {}, [], val_idx, []), [], None)


def test_segmentation_entry_points_agree(synth_stas_dir, tmp_path, monkeypatch):
    ds = open_segmentation(synth_stas_dir)
    idx = list(range(len(ds)))
    maps, gts = {}, {}
    for i in idx:
        img, gt = ds.load(i)
        maps[_key(img)] = _seg_prob(gt, i)
        gts[ds.ids()[i]] = (maps[_key(img)], gt)
    predictor = SimpleNamespace(task="segmentation", class_names=["background", "stas"], postprocess=POST)
    _fake_engine(monkeypatch, predictor, maps)
    cfg = load_config("stas_cpu", [f"data.root={synth_stas_dir}", "predict.ensemble=mean"])

    # evaluate: the masks `predict` would write with the run's post-processing
    masks = tmp_path / "pred" / "masks"
    masks.mkdir(parents=True)
    for image_id, (prob, _) in gts.items():
        Image.fromarray(postprocess(prob, POST) * 255).save(masks / f"{Path(image_id).name}.png")
    ev = evaluate_segmentation(tmp_path / "pred", synth_stas_dir, tmp_path / "eval")
    per_image = pd.read_csv(tmp_path / "eval" / "per_image.csv", dtype={"id": str}).set_index("id")

    table, cv_metrics = score_models([tmp_path / "model"], cfg, ds.ids())
    st_metrics = score_round([tmp_path / "model"], cfg, _plan(ds, idx), "val")
    assert st_metrics is not None

    assert ev["images"] == cv_metrics["n_images"] == st_metrics["n_images"] == len(ds)
    for key in ("mean_dice", "pooled_dice", "mean_iou"):
        assert cv_metrics[key] == pytest.approx(ev[key], abs=1e-12), key
        assert st_metrics[key] == pytest.approx(ev[key], abs=1e-12), key
    # where the probabilities are at hand, the 0.5-threshold score is kept beside the post-processed one
    assert cv_metrics["mean_dice_raw"] == pytest.approx(st_metrics["mean_dice_raw"], abs=1e-12)
    assert cv_metrics["mean_dice_raw"] != pytest.approx(cv_metrics["mean_dice"], abs=1e-4)
    raw = seg_summary([seg_row(i, gt, mask=prob > 0.5)[0] for i, (prob, gt) in gts.items()])
    assert cv_metrics["mean_dice_raw"] == pytest.approx(raw["mean_dice"], abs=1e-12)
    # and image by image
    by_id = table.set_index("id")
    stems = [Path(i).name for i in by_id.index]
    np.testing.assert_allclose(by_id["dice"].to_numpy(), per_image.loc[stems, "dice"].to_numpy(), atol=1e-12)


def test_classification_entry_points_agree(synth_oct_dir, tmp_path, monkeypatch):
    ds = open_classification(synth_oct_dir)
    idx = list(range(len(ds)))
    rng = np.random.default_rng(0)
    k = ds.num_classes
    maps, rows = {}, []
    for i in idx:
        p = rng.dirichlet(np.ones(k)).astype(np.float32)
        p[ds.items[i].label] += 0.3 * (i % 3 != 0)  # right for two of three images
        p /= p.sum()
        maps[_key(ds.load_image(i))] = p
        probs = {f"p_{c}": float(v) for c, v in zip(ds.class_names, p, strict=True)}
        rows.append({"path": str(ds.items[i].image), **probs})
    (tmp_path / "pred").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "pred" / "predictions.csv", index=False)
    predictor = SimpleNamespace(task="classification", class_names=ds.class_names, postprocess=None)
    _fake_engine(monkeypatch, predictor, maps)
    cfg = load_config("oct_cpu", [f"data.root={synth_oct_dir}"])

    ev = evaluate_classification(tmp_path / "pred", synth_oct_dir, tmp_path / "eval")
    _, cv_metrics = score_models([tmp_path / "model"], cfg, ds.ids())
    st_metrics = score_round([tmp_path / "model"], cfg, _plan(ds, idx), "val")
    assert st_metrics is not None
    for key in ("accuracy", "macro_f1", "auc_macro"):
        assert cv_metrics[key] == pytest.approx(ev[key], abs=1e-12), key
        assert st_metrics[key] == pytest.approx(ev[key], abs=1e-12), key
    assert ev["n_images"] == cv_metrics["n_images"] == st_metrics["n_images"] == len(ds)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["accuracy"] == ev["accuracy"]
