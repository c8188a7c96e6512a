"""Synthetic OCT2017: retinal B-scans of four classes told apart by lesion shape (RPE bumps, cysts, sub-RPE
mass) under speckle, in the real layout `{train,val,test}/{CLASS}/{CLASS}-{PATIENT}-{k}.jpeg`; `difficulty`
makes lesions subtler and speckle heavier.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image
from scipy import ndimage as ndi

from medstudent.data.synth.marker import mark_synthetic
from medstudent.data.synth.shapes import smooth_noise

OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")

# and nuclear (darker) layers, dark ONL, then the bright ellipsoid zone just above the RPE.
_OCT_D = np.array(
    [
        -0.02,
        0.0,
        0.03,
        0.10,
        0.15,
        0.26,
        0.30,
        0.38,
        0.42,
        0.49,
        0.52,
        0.57,
        0.62,
        0.84,
        0.87,
        0.89,
        0.92,
        0.95,
        0.975,
        1.0,
    ]
)
_OCT_V = np.array(
    [
        0.05,
        0.5,
        0.72,
        0.66,
        0.48,
        0.45,
        0.58,
        0.55,
        0.26,
        0.26,
        0.52,
        0.50,
        0.17,
        0.15,
        0.36,
        0.22,
        0.22,
        0.82,
        0.45,
        0.40,
    ]
)


def _domes(x: np.ndarray, centres: ArrayLike, half_widths: ArrayLike, heights: ArrayLike) -> np.ndarray:
    """Sum of dome profiles (drusen, lesion lobes, fluid pockets) along the scan."""
    c, hw, ht = (np.atleast_1d(np.asarray(v, np.float64))[:, None] for v in (centres, half_widths, heights))
    t = (x[None, :] - c) / hw
    return (ht * np.sqrt(np.clip(1 - t * t, 0, None))).sum(0)


def _render_oct(rng: np.random.Generator, cls: str, height: int, width: int, difficulty: float) -> np.ndarray:
    """B-scan of any size (the real data mixes 512x496, 768x496, ...); geometry is built per column."""
    if cls not in OCT_CLASSES:
        raise ValueError(f"unknown OCT class '{cls}', expected one of {OCT_CLASSES}")
    H, W = int(height), int(width)
    d = float(np.clip(difficulty, 0.0, 1.0))
    s = (1.6 - 1.2 * d) * rng.uniform(0.75, 1.2)  # lesion strength: smaller, fewer, fainter when hard
    x = np.linspace(0, 1, W)
    yy = np.arange(H, dtype=np.float32)[:, None]
    xf = rng.uniform(0.38, 0.62)  # fovea

    # geometry, in pixel rows as a function of the column
    rpe_th = H * rng.uniform(0.018, 0.03)
    bruch = (
        H * rng.uniform(0.5, 0.7)
        + H * rng.uniform(-0.1, 0.1) * (2 * x - 1)
        + H * rng.uniform(-0.06, 0.08) * (2 * x - 1) ** 2
    )
    thick = H * rng.uniform(0.16, 0.24) * (1 + 0.04 * smooth_noise(rng, 1, W, W / 4)[0])
    pit_depth = rng.uniform(0.35, 0.65) if rng.random() < 0.6 else rng.uniform(0.0, 0.15)
    pit = np.exp(-0.5 * ((x - xf) / rng.uniform(0.04, 0.07)) ** 2)
    elev = np.zeros(W)
    fluid = np.zeros(W)
    material = 0.0
    ride = 0.3
    cysts: list[tuple[float, float, float, float]] = []

    if cls == "DRUSEN":
        m = max(1, int(round(rng.uniform(2, 7) * min(1.0, s))))
        c = xf + rng.uniform(-0.3, 0.3, m)
        elev = _domes(x, c, rng.uniform(0.02, 0.05, m) * (0.6 + 0.4 * s), H * rng.uniform(0.02, 0.05, m) * s)
        material = rng.uniform(0.4, 0.6)
        ride = 0.35
    elif cls == "CNV":
        # a broad sub-RPE mass with an irregular, lobulated top
        c0 = xf + rng.uniform(-0.12, 0.12)
        half = rng.uniform(0.09, 0.18) * (0.6 + 0.4 * s)
        m = int(rng.integers(1, 4))
        c = np.concatenate([[c0], c0 + rng.uniform(-0.6, 0.6, m) * half])
        hw = np.concatenate([[half], half * rng.uniform(0.25, 0.55, m)])
        ht = H * np.concatenate([[rng.uniform(0.03, 0.06)], rng.uniform(0.01, 0.03, m)]) * s
        elev = _domes(x, c, hw, ht) * (1 + 0.15 * smooth_noise(rng, 1, W, W / 40)[0])
        material = rng.uniform(0.6, 0.85)
        ride = 0.75
        if rng.random() < 0.7:  # subretinal fluid over the lesion
            centre, extent = c0 + rng.uniform(-0.5, 0.5) * half, half * rng.uniform(0.8, 1.4)
            fluid = _domes(x, centre, extent, H * rng.uniform(0.02, 0.05) * s)
        pit_depth *= 0.4
    elif cls == "DME":
        xd = xf + rng.uniform(-0.08, 0.08)
        swell = np.exp(-0.5 * ((x - xd) / rng.uniform(0.1, 0.2)) ** 2)  # macular thickening
        thick = thick * (1 + s * rng.uniform(0.3, 0.7) * swell)
        pit_depth *= 0.3
        for _ in range(max(1, int(round(rng.uniform(2, 8) * min(1.0, s))))):
            cx = xd + rng.uniform(-0.18, 0.18)
            cysts.append(
                (
                    cx,
                    rng.uniform(0.35, 0.8),
                    rng.uniform(0.012, 0.04) * math.sqrt(s),
                    rng.uniform(0.12, 0.3) * math.sqrt(s),
                )
            )
        if rng.random() < 0.3:
            fluid = _domes(x, xd, rng.uniform(0.05, 0.12), H * rng.uniform(0.01, 0.035) * s)

    rpe_top = bruch - rpe_th - elev
    pr = rpe_top - fluid  # photoreceptor tips
    thick = thick * (1 - pit_depth * pit)
    ilm = pr - thick + (1 - ride) * elev  # the retina surface rides partly on the elevation
    f32 = np.float32
    ilm, pr, rpe_top, bruch, thick, elev = (v.astype(f32) for v in (ilm, pr, rpe_top, bruch, thick, elev))
    depth = (yy - ilm[None, :]) / (pr - ilm)[None, :]
    q = (0.55 * pit_depth * pit).astype(f32)[None, :]  # inner layers vanish into the foveal pit
    img = np.interp(q + (1 - q) * depth, _OCT_D, _OCT_V).astype(f32)
    img[depth < 0] = 0.04
    for cx, dc, rx, rel_ry in cysts:  # dark ellipses, drawn within their bounding boxes
        col = int(np.clip(cx * (W - 1), 0, W - 1))
        cy = ilm[col] + dc * (pr[col] - ilm[col])
        ry = rel_ry * (pr[col] - ilm[col])
        y0, y1 = max(0, int(cy - ry) - 1), min(H, int(cy + ry) + 2)
        x0, x1 = max(0, int((cx - rx) * (W - 1)) - 1), min(W, int((cx + rx) * (W - 1)) + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        r2 = ((x[None, x0:x1] - cx) / rx) ** 2 + ((yy[y0:y1] - cy) / ry) ** 2
        img[y0:y1, x0:x1] *= (1 - 0.9 * np.clip((1 - r2) * 4, 0, 1)).astype(f32)
    img[yy >= pr[None, :]] = 0.05  # subretinal fluid (zero height where there is none)
    rpe_val = 0.95 * (1 + (0.25 if cls == "CNV" else 0.06) * smooth_noise(rng, 1, W, W / 30)[0])
    img = np.where(yy >= rpe_top[None, :], rpe_val[None, :], img)
    sub = yy >= (rpe_top + rpe_th)[None, :]
    tex = smooth_noise(rng, H, W, H / 40)
    img = np.where(sub, material * (1 + 0.2 * tex), img)
    z = yy - bruch[None, :]
    shadow = 1 - 0.5 * np.clip(elev / (H * 0.03), 0, 1) if cls == "CNV" else np.ones(W)
    choroid = (
        0.5
        * np.exp(-z / (H * rng.uniform(0.06, 0.11)))
        * (0.65 + 0.35 * np.clip(tex, -1.5, 1.5))
        * shadow[None, :]
        + 0.02
    )
    img = np.where(z >= 0, choroid, img)
    # vessel shadows, occasionally a detached posterior hyaloid line: in every class, so not a cue
    vessels = np.ones(W)
    for vc in rng.uniform(0, 1, int(rng.integers(1, 5))):
        vessels *= 1 - 0.45 * np.exp(-0.5 * ((x - vc) / rng.uniform(0.003, 0.008)) ** 2)
    img = np.where(yy > (ilm + 0.15 * thick)[None, :], img * vessels.astype(f32)[None, :], img)
    if rng.random() < 0.3:
        hy = bruch - H * rng.uniform(0.3, 0.45) + H * rng.uniform(-0.08, 0.08) * (2 * x - 1) ** 2
        show = (x > rng.uniform(0, 0.6)) & (hy < ilm - 0.03 * H)
        img = img + 0.3 * np.exp(-0.5 * ((yy - hy[None, :]) / 0.8) ** 2) * show[None, :]
    img = ndi.gaussian_filter(img, (0.6, 0.8))

    # speckle: multiplicative gamma noise (fewer looks = grainier when harder), then a noise floor
    looks = 5.0 - 3.5 * d
    speckle = rng.standard_gamma(looks, (H, W), dtype=f32) / f32(looks)
    floor = rng.standard_gamma(1.5, (H, W), dtype=f32) * f32(0.04 / 1.5)
    img = ndi.gaussian_filter(img.astype(f32) * speckle, (0.5, 0.9)) + floor
    img = np.clip(img * f32(rng.uniform(0.85, 1.05)), 0, 1) ** f32(0.85) * f32(255)
    out = img.astype(np.uint8)
    if rng.random() < 0.25:  # white wedge left by the scanner's registration, as in the real data
        wedge = H * rng.uniform(0.03, 0.12) * (x if rng.random() < 0.5 else 1 - x)
        out[yy < wedge[None, :]] = 255
    return out


def render_oct(rng: np.random.Generator, cls: str, size: int = 256, difficulty: float = 0.5) -> np.ndarray:
    """One synthetic OCT B-scan of class `cls` (uint8 size x size grey); lesions fade as difficulty -> 1."""
    return _render_oct(rng, cls, size, size, difficulty)


def _patients(rng: np.random.Generator, n: int) -> list[int]:
    """Images per patient (1-4 each, summing to n), at least three patients when n >= 3 (one per subset)."""
    sizes: list[int] = []
    left = n
    while left > 0:
        sizes.append(min(left, int(rng.integers(1, 5))))
        left -= sizes[-1]
    while len(sizes) < 3 and max(sizes, default=1) > 1:
        j = int(np.argmax(sizes))
        sizes[j] -= 1
        sizes.append(1)
    return sizes


def synth_oct(
    out: str | Path,
    n: int = 40,
    seed: int = 0,
    size: int = 256,
    difficulty: float = 0.5,
    n_unlabeled: int = 0,
) -> Path:
    """Write an OCT2017-style data set: {train,val,test}/{CLASS}/{CLASS}-{PATIENT}-{k}.jpeg, `n` images per
    class, patients kept within one subset (~70/15/15 of patients). Like the real data, about half the
    images are RGB size x size and half greyscale (mode L) at a wider native size."""
    out = Path(out)
    rng = np.random.default_rng([seed, 2])
    plan: list[tuple[str, str, int, int]] = []  # subset, class, patient id, images
    used: set[int] = set()
    for cls in OCT_CLASSES:
        sizes = _patients(rng, n)
        ids = []
        for _ in sizes:
            pid = int(rng.integers(10_000, 10_000_000))
            while pid in used:
                pid = int(rng.integers(10_000, 10_000_000))
            used.add(pid)
            ids.append(pid)
        p = len(sizes)
        n_val = n_test = max(1, round(0.15 * p)) if p >= 3 else 0
        subsets = ["val"] * n_val + ["test"] * n_test + ["train"] * (p - n_val - n_test)
        subsets = [subsets[i] for i in rng.permutation(p)]
        plan += [(sub, cls, pid, m) for sub, pid, m in zip(subsets, ids, sizes, strict=True)]
    for j, (sub, cls, pid, m) in enumerate(plan):
        prng = np.random.default_rng([seed, 3, j])
        grey = prng.random() < 0.5  # one device per patient: same mode and size for all its scans
        wide = int(size * (1.5 if prng.random() < 0.75 else 2.0))
        folder = out / sub / cls
        folder.mkdir(parents=True, exist_ok=True)
        for kk in range(1, m + 1):
            if grey:
                im = Image.fromarray(_render_oct(prng, cls, size, wide, difficulty))
            else:
                im = Image.fromarray(render_oct(prng, cls, size, difficulty)).convert("RGB")
            im.save(folder / f"{cls}-{pid}-{kk}.jpeg", quality=92)
    if n_unlabeled > 0:
        (out / "unlabeled").mkdir(parents=True, exist_ok=True)
        for i in range(n_unlabeled):
            urng = np.random.default_rng([seed, 4, i])
            cls = OCT_CLASSES[int(urng.integers(len(OCT_CLASSES)))]
            grey = urng.random() < 0.5
            w = int(size * 1.5) if grey else size
            im = Image.fromarray(_render_oct(urng, cls, size, w, difficulty))
            im = im if grey else im.convert("RGB")
            im.save(out / "unlabeled" / f"unlabeled-{i:05d}.jpeg", quality=92)
    mark_synthetic(out, "OCT", seed)
    return out
