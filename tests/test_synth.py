"""Synthetic data: real layouts, exact labels, determinism, and tasks that are learnable but not trivial."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from medstudent.data.labelme import labelme_to_mask, read_labelme
from medstudent.data.synth import OCT_CLASSES, render_oct, render_stas, synth_oct, synth_stas

STAS_N, STAS_SEED, STAS_W, STAS_H, STAS_EMPTY = 8, 3, 512, 288, 0.25
OCT_N, OCT_SEED, OCT_SIZE = 12, 5, 96
KERMANY = re.compile(r"^(CNV|DME|DRUSEN|NORMAL)-(\d{5,7})-(\d+)\.jpeg$")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def stas_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_stas(
        tmp_path_factory.mktemp("stas") / "ds",
        n=STAS_N,
        seed=STAS_SEED,
        width=STAS_W,
        height=STAS_H,
        n_unlabeled=3,
        empty_fraction=STAS_EMPTY,
    )


@pytest.fixture(scope="module")
def stas_items(stas_root: Path) -> list[tuple[np.ndarray, np.ndarray, Path]]:
    """(rendered image, rendered mask, json path) per labeled image, re-rendered with the documented
    seeding of synth_stas: image i is render_stas(default_rng([seed, 0, i]), with_stas=<has shapes>)."""
    items = []
    for i in range(STAS_N):
        ann = stas_root / "Train_Annotations" / f"{i:08d}.json"
        has = bool(read_labelme(ann).shapes)
        image, mask = render_stas(np.random.default_rng([STAS_SEED, 0, i]), STAS_W, STAS_H, with_stas=has)
        items.append((image, mask, ann))
    return items


# ------------------------------------------------------------------------------------------------- STAS


def test_stas_layout_and_labelme_round_trip(stas_root: Path, stas_items: list) -> None:
    imgs = sorted((stas_root / "Train_Images").iterdir())
    anns = sorted((stas_root / "Train_Annotations").iterdir())
    assert [p.name for p in imgs] == [f"{i:08d}.jpg" for i in range(STAS_N)]
    assert [p.name for p in anns] == [f"{i:08d}.json" for i in range(STAS_N)]
    unl = sorted((stas_root / "Unlabeled_Images").iterdir())
    assert [p.name for p in unl] == [f"Unlabeled_{i:08d}.jpg" for i in range(3)]
    n_empty = 0
    for img_path, (image, rendered, ann) in zip(imgs, stas_items, strict=True):
        with Image.open(img_path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (STAS_W, STAS_H)
            jpeg = np.asarray(im).astype(np.int16)
        assert np.abs(jpeg - image).mean() < 8, "the JPEG on disk is not the rendered image"
        lm = read_labelme(ann)
        assert lm.image_path == img_path.name and (lm.width, lm.height) == (STAS_W, STAS_H)
        assert all(s.label == "STAS" and s.shape_type == "polygon" for s in lm.shapes)
        mask = labelme_to_mask(lm, image_size=(STAS_W, STAS_H))
        assert rendered.dtype == np.uint8 and set(np.unique(rendered)) <= {0, 1}
        if not lm.shapes:
            n_empty += 1
            assert not mask.any() and not rendered.any()
        else:
            assert _iou(mask, rendered) >= 0.98, img_path.name
    assert n_empty == round(STAS_EMPTY * STAS_N)
    for p in unl:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (STAS_W, STAS_H)


def test_stas_deterministic(tmp_path: Path) -> None:
    a, b, c = (
        _files(synth_stas(tmp_path / name, n=2, seed=seed, width=256, height=160, n_unlabeled=1))
        for name, seed in (("a", 11), ("b", 11), ("c", 12))
    )
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg"))
    x1, m1 = render_stas(np.random.default_rng(5), 256, 160)
    x2, m2 = render_stas(np.random.default_rng(5), 256, 160)
    x3, _ = render_stas(np.random.default_rng(6), 256, 160)
    assert np.array_equal(x1, x2) and np.array_equal(m1, m2) and not np.array_equal(x1, x3)


def test_stas_targets_have_a_range_of_sizes_and_float_in_air(stas_items: list) -> None:
    sizes, ring_brightness = [], []
    for image, mask, _ in stas_items:
        lab, n = ndi.label(mask)
        sizes += np.bincount(lab.ravel())[1:].tolist()
        grey = image.mean(-1)
        for obj in range(1, n + 1):
            blob = lab == obj
            ring = ndi.binary_dilation(blob, iterations=4) & ~ndi.binary_dilation(blob, iterations=1)
            ring_brightness.append(float(np.mean(grey[ring] > 200)))
    non_empty = sum(bool(m.any()) for _, m, _ in stas_items)
    assert len(sizes) >= non_empty
    assert min(sizes) < 200 and max(sizes) > 1000 and max(sizes) > 8 * min(sizes), sorted(sizes)
    # a STAS cluster floats in an air space: what immediately surrounds it is mostly bright background
    assert np.median(ring_brightness) > 0.6, ring_brightness


def _best_threshold_dice(feature: list[np.ndarray], masks: list[np.ndarray], n_bins: int = 512) -> float:
    """Best Dice over all thresholds (both directions) of one per-pixel feature, pooled over images."""
    values = np.concatenate([f.ravel() for f in feature])
    truth = np.concatenate([m.ravel() > 0 for m in masks])
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins)))
    edges = np.unique(np.concatenate([edges, np.quantile(values, 1 - np.geomspace(1e-5, 0.05, 200))]))
    pos = np.histogram(values[truth], np.append(edges, np.inf))[0]
    neg = np.histogram(values[~truth], np.append(edges, np.inf))[0]
    n_pos = truth.sum()
    best = 0.0
    for p, q in ((pos[::-1], neg[::-1]), (pos, neg)):  # predict value >= t, then value < t
        tp, fp = np.cumsum(p), np.cumsum(q)
        best = max(best, float(np.max(2 * tp / (tp + fp + n_pos))))
    return best


def test_stas_not_solvable_by_a_colour_threshold(stas_items: list) -> None:
    """Distractors (clusters of the same cells on the walls, lymphocyte aggregates, wall nuclei) share the
    colours of STAS, so no global threshold of a colour channel or of the hematoxylin density segments it."""
    labeled = [(im, m) for im, m, _ in stas_items if m.any()]
    images, masks = [im for im, _ in labeled], [m for _, m in labeled]
    od = [-np.log((im.astype(np.float64) + 1) / 256) for im in images]
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # Ruifrok H, E, DAB
    unmix = np.linalg.inv(stains / np.linalg.norm(stains, axis=1, keepdims=True))
    hema = [o @ unmix[:, 0] for o in od]
    features = {
        **{ch: [im[..., i] for im in images] for i, ch in enumerate("RGB")},
        "grey": [im.mean(-1) for im in images],
        "hematoxylin OD": hema,
        "hematoxylin OD, smoothed": [ndi.gaussian_filter(h, 3) for h in hema],
        "total OD, smoothed": [ndi.gaussian_filter(o.sum(-1), 3) for o in od],
    }
    dice = {name: _best_threshold_dice(f, masks) for name, f in features.items()}
    assert max(dice.values()) < 0.5, dice


def test_stas_full_resolution() -> None:
    image, mask = render_stas(np.random.default_rng(1), width=1716, height=942)
    assert image.shape == (942, 1716, 3) and image.dtype == np.uint8
    assert mask.shape == (942, 1716) and mask.any()
    assert 0.0005 < mask.mean() < 0.2


# -------------------------------------------------------------------------------------------------- OCT


@pytest.fixture(scope="module")
def oct_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_oct(
        tmp_path_factory.mktemp("oct") / "ds", n=OCT_N, seed=OCT_SEED, size=OCT_SIZE, n_unlabeled=4
    )


def test_oct_layout(oct_root: Path) -> None:
    per_class: dict[str, int] = defaultdict(int)
    patient_subset: dict[str, set[str]] = defaultdict(set)
    patient_class: dict[str, set[str]] = defaultdict(set)
    patient_ks: dict[str, list[int]] = defaultdict(list)
    modes, sizes = set(), set()
    for sub in ("train", "val", "test"):
        assert sorted(p.name for p in (oct_root / sub).iterdir()) == sorted(OCT_CLASSES), sub
        for cls in OCT_CLASSES:
            files = sorted((oct_root / sub / cls).iterdir())
            assert files, f"{sub}/{cls} is empty"
            for f in files:
                m = KERMANY.match(f.name)
                assert m and m.group(1) == cls, f.name
                per_class[cls] += 1
                patient_subset[m.group(2)].add(sub)
                patient_class[m.group(2)].add(cls)
                patient_ks[m.group(2)].append(int(m.group(3)))
                with Image.open(f) as im:
                    assert im.format == "JPEG"
                    modes.add(im.mode)
                    sizes.add(im.size)
                    if im.mode == "RGB":
                        assert im.size == (OCT_SIZE, OCT_SIZE)
                        rgb = np.asarray(im).astype(int)
                        assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() < 3  # grey replicated to 3 channels
                    else:
                        assert im.mode == "L" and im.size[1] == OCT_SIZE and im.size[0] > OCT_SIZE
    assert dict(per_class) == dict.fromkeys(OCT_CLASSES, OCT_N)
    assert all(len(s) == 1 for s in patient_subset.values()), "a patient straddles subsets"
    assert all(len(c) == 1 for c in patient_class.values())
    assert all(sorted(k) == list(range(1, len(k) + 1)) and len(k) <= 4 for k in patient_ks.values())
    n_train = sum(s == {"train"} for s in patient_subset.values())
    assert n_train > sum(s == {"val"} for s in patient_subset.values())
    assert modes == {"L", "RGB"} and len(sizes) >= 2
    unl = sorted((oct_root / "unlabeled").iterdir())
    assert len(unl) == 4 and all(p.suffix == ".jpeg" for p in unl)


def test_oct_deterministic(tmp_path: Path) -> None:
    a = _files(synth_oct(tmp_path / "a", n=4, seed=1, size=64, n_unlabeled=2))
    b = _files(synth_oct(tmp_path / "b", n=4, seed=1, size=64, n_unlabeled=2))
    c = _files(synth_oct(tmp_path / "c", n=4, seed=2, size=64, n_unlabeled=2))
    assert a == b and a != c
    for cls in OCT_CLASSES:
        x1 = render_oct(np.random.default_rng(3), cls, 64)
        assert x1.shape == (64, 64) and x1.dtype == np.uint8
        assert np.array_equal(x1, render_oct(np.random.default_rng(3), cls, 64))
        assert not np.array_equal(x1, render_oct(np.random.default_rng(4), cls, 64))
    with pytest.raises(ValueError):
        render_oct(np.random.default_rng(0), "GLAUCOMA")


def _oct_features(img: np.ndarray) -> np.ndarray:
    """Two hand-made features a reader would use: brightness just above Bruch's membrane (sub-RPE material
    lifting the RPE: drusen, CNV) and dark pixels inside the retina (cysts, fluid: DME)."""
    g = img.astype(np.float64)
    g[g >= 250] = 0  # scanner's white wedge
    h, w = g.shape
    g = ndi.gaussian_filter(g, (h / 128, w / 64))
    rows, cols = np.arange(h)[:, None], np.arange(w)
    bruch = np.where(g >= 0.7 * g.max(0), rows, 0).max(0)  # lowest bright row per column
    bruch = ndi.median_filter(bruch, size=max(3, w // 16), mode="nearest")
    off = np.arange(int(0.03 * h), int(0.09 * h))
    above = g[np.clip(bruch[None, :] - off[:, None], 0, h - 1), cols[None, :]].mean(0)
    rpe = np.median(g[np.clip(bruch - int(0.01 * h), 0, h - 1), cols])
    lift = (np.percentile(above, 90) - np.median(above)) / rpe
    thr = 0.5 * (np.median(g[: h // 8]) + np.percentile(g, 99.5))
    ilm = (g > thr).argmax(0)
    dark = [
        np.mean(g[a + 3 : b - 3, c] < 0.5 * thr)
        for c, (a, b) in enumerate(zip(ilm, bruch, strict=True))
        if b - a > 8
    ]
    return np.array([lift, np.mean(dark) if dark else 0.0])


def _oct_signal(
    difficulty: float, per_class: int = 20, size: int = 96
) -> tuple[np.ndarray, np.ndarray, float]:
    """Features, labels, and held-out accuracy of a nearest-centroid classifier on them (chance 0.25)."""
    feats, labels = [], []
    for i in range(per_class):
        for c, cls in enumerate(OCT_CLASSES):
            feats.append(_oct_features(render_oct(np.random.default_rng([77, i, c]), cls, size, difficulty)))
            labels.append(c)
    x, y = np.array(feats), np.array(labels)
    train = np.arange(len(y)) % 8 < 4  # whole rounds of 4 classes alternate between train and test
    z = (x - x[train].mean(0)) / (x[train].std(0) + 1e-9)
    centroids = np.array([z[train & (y == c)].mean(0) for c in range(len(OCT_CLASSES))])
    pred = np.argmin(((z[~train, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return x, y, float(np.mean(pred == y[~train]))


def test_oct_classes_carry_signal_and_difficulty_hides_it() -> None:
    x, y, acc = _oct_signal(0.5)
    mean = {cls: x[y == c].mean(0) for c, cls in enumerate(OCT_CLASSES)}
    assert mean["CNV"][0] > 1.5 * mean["NORMAL"][0] and mean["DRUSEN"][0] > 1.3 * mean["NORMAL"][0], mean
    assert mean["DME"][1] > 5 * max(mean["NORMAL"][1], 1e-3) and mean["DME"][1] > mean["CNV"][1], mean
    assert acc >= 0.55, acc
    _, _, acc_hard = _oct_signal(1.0)
    assert acc_hard < acc - 0.1, (acc, acc_hard)
