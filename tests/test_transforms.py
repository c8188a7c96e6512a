"""Augmentation pipelines: sizes, image/mask alignment, target-biased crops, the policy schedule, stain
robustness, mixed-mode classification inputs and parity of the torch-free eval contract."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

from medstudent.config import AugmentConfig
from medstudent.data import transforms as T
from medstudent.data.preprocess import apply_eval_contract, pad_to_multiple, restore_geometry, scaled_size
from medstudent.errors import ConfigError

NO_AUG = dict(hflip=0.0, vflip=0.0)


def _np(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _rects(h: int, w: int, rng: np.random.Generator, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with bright, asymmetric rectangles and the matching mask."""
    img = np.full((h, w, 3), 30, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(n):
        y, x = rng.integers(0, h - 30), rng.integers(0, w - 40)
        mask[y : y + rng.integers(10, 30), x : x + rng.integers(15, 40)] = 1
    img[mask == 1] = 230
    return img, mask


def test_sizes():
    assert pad_to_multiple(942, 1716) == (960, 1728)
    assert scaled_size(942, 1716, 0.5) == (471, 858)
    assert pad_to_multiple(*scaled_size(942, 1716, 0.5)) == (480, 864)
    assert T.pad_to_multiple(64, 96) == (64, 96)
    assert scaled_size(100, 100, 0.29) == (29, 29)  # no truncation of 28.999...
    img = np.zeros((942, 1716, 3), np.uint8)
    out = T.seg_eval_transform(AugmentConfig(scale=0.5))(image=img, mask=np.ones((942, 1716), np.uint8))
    assert tuple(out["image"].shape) == (3, 480, 864) and out["image"].dtype.is_floating_point
    assert tuple(out["mask"].shape) == (480, 864)
    assert _np(out["mask"])[:471, :858].all() and not _np(out["mask"])[471:].any()  # padded with 0


def test_train_transform_keeps_image_and_mask_aligned():
    cfg = AugmentConfig(
        crop=(96, 96), crop_target_prob=0.5, hflip=0.5, vflip=0.5, rot90=0.5, autoaugment=1.0, noise=0.5
    )
    rng = np.random.default_rng(0)
    for seed in range(30):
        t = T.seg_train_transform(cfg, seed=seed)
        img, mask = _rects(150, 210, rng)
        out = t(image=img, mask=mask)
        x, m = _np(out["image"]).mean(0), _np(out["mask"])
        assert x.shape == m.shape == (96, 96)
        if m.all() or not m.any():
            continue
        thr = (x[m == 1].mean() + x[m == 0].mean()) / 2
        assert x[m == 1].mean() > x[m == 0].mean()
        bright = x > thr
        iou = (bright & (m == 1)).sum() / (bright | (m == 1)).sum()
        assert iou > 0.85, (seed, iou)  # flipping only one of them gives ~0.15 on average


def test_hflip_and_vflip_are_independent():
    t = T.seg_train_transform(AugmentConfig(hflip=0.5, vflip=0.5), seed=3)
    img = np.zeros((32, 32, 3), np.uint8)
    img[0, 0] = 255  # the corner tells which flips were applied
    corners = {tuple(np.argwhere(_np(t(image=img)["image"])[0] > 0)[0]) for _ in range(60)}
    assert len(corners) == 4


def test_target_biased_crop():
    img = np.full((300, 400, 3), 128, np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[200:206, 300:306] = 1

    def hit_rate(q: float, n: int = 150) -> float:
        t = T.seg_train_transform(AugmentConfig(crop=(64, 64), crop_target_prob=q, **NO_AUG), seed=1)
        return float(np.mean([_np(t(image=img, mask=mask)["mask"]).any() for _ in range(n)]))

    assert hit_rate(1.0, 40) == 1.0
    assert hit_rate(0.7) >= 0.6
    assert hit_rate(0.0) <= 0.2
    # a crop larger than the image pads instead of failing
    out = T.seg_train_transform(AugmentConfig(crop=(64, 96), crop_target_prob=0.5, **NO_AUG))(
        image=img[:40, :50], mask=mask[:40, :50]
    )
    assert tuple(out["image"].shape) == (3, 64, 96)


def test_policy_schedule_decays_to_zero():
    t = T.seg_train_transform(AugmentConfig(autoaugment=0.8, autoaugment_off_last=0.2, **NO_AUG))
    assert t.policy_prob == pytest.approx(0.8)
    probs = []
    for epoch in range(10):
        t.set_epoch(epoch, 10)
        probs.append(t.policy_prob)
        assert t.policy.p == t.policy_prob and t.policy in t.compose.transforms
    assert probs[0] == pytest.approx(0.8)
    assert all(a >= b for a, b in zip(probs, probs[1:], strict=False))
    assert probs[7] > 0 and probs[8] == probs[9] == 0.0
    assert T.policy_schedule(0.5, 0, 3, 0.1) == 0.5 and T.policy_schedule(0.5, 2, 3, 0.1) == 0.0
    assert T.policy_schedule(0.5, 9, 10, 0.0) > 0
    # picklable for DataLoader workers, and the policy inside the copy is still the one set_epoch drives
    t.set_epoch(3, 10)
    t2 = pickle.loads(pickle.dumps(t))
    assert t2.policy_prob == pytest.approx(probs[3]) and t2.policy in t2.compose.transforms
    t2.set_epoch(9, 10)
    assert next(x for x in t2.compose.transforms if x is t2.policy).p == 0.0
    assert T.seg_train_transform(AugmentConfig(**NO_AUG)).policy_prob == 0.0


def _synthetic_he(h: int, w: int, seed: int) -> np.ndarray:
    """H&E-like tile: Beer-Lambert mix of haematoxylin and eosin over a white background."""
    rng = np.random.default_rng(seed)
    he = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    conc = rng.gamma(2.0, 0.35, (h, w, 2)) * (rng.random((h, w, 1)) < 0.7)
    return np.clip(255 * np.exp(-conc @ he), 0, 255).astype(np.uint8)


def test_stain_augmentation_is_robust():
    cfg = AugmentConfig(stain=1.0, **NO_AUG)
    t = T.seg_train_transform(cfg, seed=0)
    stain = next(x for x in t.compose.transforms if type(x).__name__ == "HEStain")
    tiles = {
        "white": np.full((128, 128, 3), 255, np.uint8),
        "black": np.zeros((128, 128, 3), np.uint8),
        "tissue": _synthetic_he(128, 128, 0),
        "noise": np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an invalid divide would mean NaN somewhere
        for name, tile in tiles.items():
            for _ in range(5):
                out = stain(image=tile)["image"]
                assert out.dtype == np.uint8 and out.shape == tile.shape, name
                if name == "white":
                    assert out.min() >= 250  # background stays background
            x = _np(t(image=tile)["image"])
            assert np.isfinite(x).all() and np.abs(x).max() < 3.0, name
    changed = stain(image=tiles["tissue"])["image"]
    assert np.abs(changed.astype(int) - tiles["tissue"]).mean() > 1  # it does change tissue colour


def test_classification_mixed_modes_and_sizes():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, s, dtype=np.uint8)
        for s in [(496, 512), (320, 320, 3), (496, 768), (90, 70, 4), (200, 150, 1)]
    ]
    cfg = AugmentConfig(
        grayscale=True,
        center_crop=160,
        image_size=64,
        hflip=0.5,
        rotate=10,
        randaugment=1.0,
        noise=0.5,
        normalize="half",
    )
    for channels in (3, 1):
        train, ev = T.cls_train_transform(cfg, channels, seed=0), T.cls_eval_transform(cfg, channels)
        for img in images:
            for _ in range(3):
                assert tuple(train(image=img)["image"].shape) == (channels, 64, 64)
            x = _np(ev(image=img)["image"])
            assert x.shape == (channels, 64, 64) and x.dtype == np.float32
            assert np.abs(x).max() <= 1.0 + 1e-6  # "half": [0, 255] -> [-1, 1]
            if channels == 3:
                assert (x[0] == x[1]).all() and (x[1] == x[2]).all()
    # colour (not greyscale) data: RGB stays RGB and grey inputs are replicated
    x = _np(T.cls_eval_transform(AugmentConfig(image_size=32))(image=images[0])["image"])
    assert x.shape == (3, 32, 32)


def test_classification_resized_crop_and_intensity_train_only():
    """resized_crop_scale crops part of the image (zoom and aspect) in training only; the evaluation
    transform and its contract keep the plain resize. intensity changes the values, not the geometry."""
    img = np.zeros((100, 100), np.uint8)
    img[:, :50] = 255  # left half bright: a crop shows it as a different bright fraction
    base = dict(grayscale=True, image_size=32, hflip=0.0, normalize="half")
    plain = AugmentConfig(**base)
    zoom = AugmentConfig(**base, resized_crop_scale=(0.3, 0.5), resized_crop_ratio=(0.5, 2.0))
    bright = lambda t: float((_np(t(image=img)["image"]) > 0).mean())  # noqa: E731
    assert bright(T.cls_train_transform(plain, 1, seed=0)) == pytest.approx(0.5)
    train = T.cls_train_transform(zoom, 1, seed=0)
    fractions = {round(bright(train), 3) for _ in range(20)}
    assert len(fractions) > 5 and all(x.shape == (1, 32, 32) for x in [_np(train(image=img)["image"])])
    assert bright(T.cls_eval_transform(zoom, 1)) == pytest.approx(0.5)
    assert T.eval_contract(zoom, in_channels=1) == T.eval_contract(plain, in_channels=1)
    grey = np.full((40, 40), 128, np.uint8)
    jitter = T.cls_train_transform(AugmentConfig(**base, intensity=1.0), 1, seed=0)
    values = {round(float(_np(jitter(image=grey)["image"]).mean()), 3) for _ in range(10)}
    assert len(values) > 5
    with pytest.raises(ConfigError, match="resized_crop_scale"):
        T.cls_train_transform(AugmentConfig(image_size=32, resized_crop_scale=(0.5, 1.2)))
    with pytest.raises(ConfigError, match="image_size"):
        T.cls_train_transform(AugmentConfig(resized_crop_scale=(0.5, 1.0)))
    with pytest.raises(ConfigError, match="augment.intensity"):
        T.cls_train_transform(AugmentConfig(image_size=32, intensity=1.5))


@pytest.mark.parametrize(
    ("shape", "cfg"),
    [
        ((942, 1716, 3), AugmentConfig(scale=0.5)),
        ((100, 150, 3), AugmentConfig(scale=1.3)),
        ((100, 150), AugmentConfig(resize=(64, 80))),
        ((70, 90, 3), AugmentConfig()),
    ],
)
def test_seg_eval_contract_parity(shape, cfg):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    contract = T.eval_contract(cfg, "segmentation")
    json.dumps(contract)
    ref = _np(T.seg_eval_transform(cfg)(image=img)["image"])
    arr, info = apply_eval_contract(img, contract)
    assert arr.shape == ref.shape and arr.dtype == np.float32
    assert np.abs(arr - ref).max() < 1e-5
    assert tuple(info["input_size"]) == ref.shape[1:]
    back = restore_geometry(np.ones(ref.shape[1:], np.float32), info)
    assert back.shape == shape[:2]
    assert restore_geometry(np.ones((2, *ref.shape[1:]), np.float32), info).shape == (2, *shape[:2])


def test_cls_eval_contract_parity():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(496, 512), (320, 320, 3), (90, 70, 4)]]
    cases = [
        (AugmentConfig(grayscale=True, center_crop=224, image_size=96, normalize="half"), 3),
        (AugmentConfig(grayscale=True, image_size=50), 1),
        (AugmentConfig(center_crop=100), 3),
    ]
    for cfg, channels in cases:
        contract = T.eval_contract(cfg, in_channels=channels)
        assert contract["task"] == "classification"
        json.dumps(contract)
        ev = T.cls_eval_transform(cfg, channels)
        for img in images:
            arr, _ = apply_eval_contract(img, contract)
            assert np.abs(arr - _np(ev(image=img)["image"])).max() < 1e-5


def test_preprocess_module_is_torch_free():
    code = (
        "import sys, medstudent.data.preprocess; "
        "bad = [m for m in ('torch', 'albumentations') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=None)


def test_worker_reseeding(monkeypatch):
    torch = pytest.importorskip("torch")
    t = T.cls_train_transform(AugmentConfig(hflip=0.5, image_size=8), seed=0)
    img = np.zeros((8, 8), np.uint8)
    img[:, 0] = 255

    def draws(worker_seed: int) -> list[bool]:
        info = type("Info", (), {"seed": worker_seed, "id": 0})()
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        return [bool(_np(t(image=img)["image"])[0, 0, -1] > 0) for _ in range(32)]

    a, b, a2 = draws(11), draws(12), draws(11)
    assert a != b and a == a2  # different workers differ; the same worker seed repeats


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="augment.stain"):
        T.seg_train_transform(AugmentConfig(stain=1.5))
    with pytest.raises(ConfigError, match="augment.crop"):
        T.seg_train_transform(AugmentConfig(crop=(0, 64)))
    with pytest.warns(UserWarning, match="rot90"):
        T.seg_train_transform(AugmentConfig(rot90=0.5))
