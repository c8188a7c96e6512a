"""Procedural synthetic data in exactly the real on-disk layouts.

Real images cannot ship with the package or run in CI, so the demo and the tests use look-alikes written in
the same layouts the real data arrives in (STAS: `Train_Images/` + labelme `Train_Annotations/`; OCT2017:
`{train,val,test}/{CLASS}/{CLASS}-{PATIENT}-{k}.jpeg`). They are built to be learnable but not trivial:

- STAS (H&E lung tissue): the targets are clusters of atypical cells floating in air spaces. Clusters of the
  same cells attached to alveolar walls and dense lymphocyte aggregates share their colours and are not
  labelled, so a colour threshold fails and a model has to use context and morphology.
- OCT (retinal B-scans): four classes told apart by lesion shape (RPE bumps, cysts, sub-RPE mass), under
  speckle; `difficulty` makes lesions subtler and speckle heavier.

Only numpy/scipy/Pillow are used here, so this works without torch. Every image is drawn from its own
`numpy.random.default_rng([seed, ...])`, so a data set is byte-for-byte reproducible from its seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from medstudent.data.labelme import mask_to_labelme, write_labelme

__all__ = ["OCT_CLASSES", "render_oct", "render_stas", "synth_oct", "synth_stas"]

OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")

# Ruifrok & Johnston optical densities (per unit concentration); tuned slightly so eosin reads as H&E pink.
_OD_H = np.array([0.65, 0.70, 0.29])
_OD_E = np.array([0.07, 0.99, 0.30])
_OD_RBC = np.array([0.09, 0.92, 0.50])  # red blood cells: strongly eosinophilic, redder than stroma
_FULL_AREA = 1716 * 942  # real STAS image size; feature sizes are set relative to it


# ----------------------------------------------------------------------------------------------- helpers


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Roughly zero-mean, unit-std noise with features about `scale` pixels wide (bicubic upsampling)."""
    if scale <= 2:
        return rng.standard_normal((h, w), dtype=np.float32)
    gh, gw = max(2, math.ceil(h / scale) + 1), max(2, math.ceil(w / scale) + 1)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    small = (small - small.mean()) / (small.std() + 1e-6)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def _upsample(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float map (used for fields computed at half resolution to save time)."""
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.01, None)
    return v / np.linalg.norm(v)


def _blob_polygons(
    rng: np.random.Generator,
    cx: np.ndarray,
    cy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    irregular: float,
    n_vert: int = 12,
) -> np.ndarray:
    """(N, n_vert, 2) outlines of irregular rotated ellipses: nuclei and cells are never perfect circles."""
    n = len(cx)
    phi = np.linspace(0, 2 * np.pi, n_vert, endpoint=False)[None, :]
    theta = rng.uniform(0, np.pi, (n, 1))
    a2, a3 = rng.uniform(-1, 1, (n, 1)), rng.uniform(-0.7, 0.7, (n, 1))
    p2, p3 = rng.uniform(0, 2 * np.pi, (n, 1)), rng.uniform(0, 2 * np.pi, (n, 1))
    wobble = 1 + irregular * (a2 * np.cos(2 * phi + p2) + a3 * np.cos(3 * phi + p3))
    ex = rx[:, None] * wobble * np.cos(phi)
    ey = ry[:, None] * wobble * np.sin(phi)
    px = cx[:, None] + ex * np.cos(theta) - ey * np.sin(theta)
    py = cy[:, None] + ex * np.sin(theta) + ey * np.cos(theta)
    return np.stack([px, py], axis=-1)


def _draw_polys(draw: ImageDraw.ImageDraw, polys: np.ndarray, values: np.ndarray | float) -> None:
    if not len(polys):
        return
    vals = np.broadcast_to(np.asarray(values, dtype=np.float64), (len(polys),))
    if draw.mode != "F":
        vals = vals.round().astype(int)
    for poly, v in zip(polys.reshape(len(polys), -1).tolist(), vals.tolist(), strict=True):
        draw.polygon(poly, fill=v)  # flat [x0, y0, x1, y1, ...]


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r


# ------------------------------------------------------------------------------------------------- STAS


class _Layers:
    """Stain concentration maps drawn with PIL (fast polygon fill in C), combined at the end."""

    def __init__(self, h: int, w: int) -> None:
        self.cyto_e = Image.new("F", (w, h), 0.0)
        self.cyto_h = Image.new("F", (w, h), 0.0)
        self.nuc_h = Image.new("F", (w, h), 0.0)
        self.rbc = Image.new("F", (w, h), 0.0)
        self.stas = Image.new("L", (w, h), 0)  # cluster id + 1 of the STAS cells, for the label
        self.d_cyto_e, self.d_cyto_h = ImageDraw.Draw(self.cyto_e), ImageDraw.Draw(self.cyto_h)
        self.d_nuc, self.d_rbc, self.d_stas = (
            ImageDraw.Draw(self.nuc_h),
            ImageDraw.Draw(self.rbc),
            ImageDraw.Draw(self.stas),
        )


def _alveoli(rng: np.random.Generator, h: int, w: int, k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alveolar walls as warped Voronoi boundaries, computed at half resolution for speed.

    Returns (soft wall 0..1 at full size, air-space id map at half size, air distance at half size in
    full-size pixels).
    """
    spacing = rng.uniform(80, 170) * k
    n = max(6, int(h * w / spacing**2))
    pts = rng.uniform((0, 0), (h, w), size=(n, 2))
    # merge some neighbours so that air spaces vary from small alveoli to large ducts
    _, nn = cKDTree(pts).query(pts, k=2)
    group = np.arange(n)
    p_merge = rng.uniform(0.1, 0.4)
    for i in rng.permutation(n):
        if rng.random() < p_merge:
            group[group == group[i]] = group[nn[i, 1]]
    f = 2
    hs, ws = math.ceil(h / f), math.ceil(w / f)
    seeds = np.ones((hs, ws), bool)
    sy, sx = (pts[:, 0] / f).astype(int).clip(0, hs - 1), (pts[:, 1] / f).astype(int).clip(0, ws - 1)
    seeds[sy, sx] = False
    idmap = np.zeros((hs, ws), np.int64)
    idmap[sy, sx] = np.arange(n)
    iy, ix = ndi.distance_transform_edt(seeds, return_distances=False, return_indices=True)
    lab_seed = group[idmap[iy, ix]]
    amp = 0.18 * spacing / f  # warp the cells so walls are wavy, not straight Voronoi edges
    dy = _smooth_noise(rng, hs, ws, spacing * 0.8 / f) * amp
    dx = _smooth_noise(rng, hs, ws, spacing * 0.8 / f) * amp
    yy = (np.arange(hs, dtype=np.float32)[:, None] + dy).round().astype(np.int32).clip(0, hs - 1)
    xx = (np.arange(ws, dtype=np.float32)[None, :] + dx).round().astype(np.int32).clip(0, ws - 1)
    lab = lab_seed[yy, xx]
    edge = np.zeros((hs, ws), bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    dist = _upsample(ndi.distance_transform_edt(~edge) * f, h, w)
    half = rng.uniform(3.5, 7.5) * k * (1 + 0.35 * _smooth_noise(rng, h, w, spacing * 0.7)).clip(0.45, 2.2)
    soft = np.clip(half - dist + 0.5, 0, 1)
    # patches of solid (collapsed / fibrotic) tissue with ragged edges
    solid_field = _smooth_noise(rng, h, w, 220 * k) + 0.25 * _smooth_noise(rng, h, w, 30 * k)
    solid = np.clip((solid_field - rng.uniform(0.6, 2.6)) * 8, 0, 1)
    soft = np.maximum(soft, solid)
    wall_small = np.asarray(Image.fromarray(soft).resize((ws, hs), Image.Resampling.BILINEAR)) > 0.3
    air_dist = ndi.distance_transform_edt(~wall_small).astype(np.float32) * f
    return soft, lab, air_dist


def _grow_cluster(rng: np.random.Generator, n: int, r_mean: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres (relative to 0,0) and radii of a compact, irregular cluster grown cell by cell."""
    r = r_mean * rng.uniform(0.8, 1.2, n)
    pos = np.zeros((n, 2))
    placed = 1
    for j in range(1, n):
        for _ in range(12):
            p = rng.integers(placed)
            a = rng.uniform(0, 2 * np.pi)
            c = pos[p] + (r[p] + r[j]) * rng.uniform(0.72, 0.92) * np.array([np.cos(a), np.sin(a)])
            d = np.hypot(*(pos[:placed] - c).T)
            if (d >= 0.7 * (r[:placed] + r[j])).all():
                pos[placed], r[placed] = c, r[j]
                placed += 1
                break
    return pos[:placed], r[:placed]


def _atypical_cells(
    rng: np.random.Generator,
    layers: _Layers,
    pos: np.ndarray,
    r: np.ndarray,
    cluster_id: int | None,
) -> None:
    """Large atypical cells: pink cytoplasm, big dark round nuclei, sometimes a nucleolus.

    The same renderer serves STAS and the wall-attached distractors, so only context tells them apart.
    """
    n = len(r)
    cx, cy = pos[:, 0], pos[:, 1]
    cyto = _blob_polygons(rng, cx, cy, r * rng.uniform(0.95, 1.1, n), r * rng.uniform(0.8, 1.0, n), 0.12)
    e_level = rng.uniform(0.45, 0.85)
    _draw_polys(layers.d_cyto_e, cyto, e_level * rng.uniform(0.8, 1.2, n))
    _draw_polys(layers.d_cyto_h, cyto, rng.uniform(0.1, 0.3) * rng.uniform(0.8, 1.2, n))
    if cluster_id is not None:
        _draw_polys(layers.d_stas, cyto, cluster_id + 1)
    rn = r * rng.uniform(0.42, 0.6, n)
    off = rng.uniform(0, 0.25, n) * r
    a = rng.uniform(0, 2 * np.pi, n)
    ncx, ncy = cx + off * np.cos(a), cy + off * np.sin(a)
    nuc = _blob_polygons(rng, ncx, ncy, rn * rng.uniform(0.95, 1.15, n), rn * rng.uniform(0.8, 1.0, n), 0.15)
    _draw_polys(layers.d_nuc, nuc, rng.uniform(1.3, 2.0) * rng.uniform(0.85, 1.15, n))
    has = rng.random(n) < 0.5
    if has.any():
        rr = np.maximum(0.8, 0.22 * rn[has])
        dots = _blob_polygons(rng, ncx[has], ncy[has], rr, rr, 0.0, n_vert=6)
        _draw_polys(layers.d_nuc, dots, 2.6)


def render_stas(
    rng: np.random.Generator,
    width: int = 512,
    height: int = 288,
    with_stas: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic H&E lung field; returns (uint8 HxWx3 RGB image, uint8 HxW 0/1 STAS mask).

    Colours come from stain concentrations through Beer-Lambert (RGB = I0 * exp(-sum c_s * OD_s)), with
    per-image stain vectors, concentrations and illumination, so colour varies between images as between
    slides. Feature sizes scale gently with image area so small test images still show cells.
    """
    h, w = int(height), int(width)
    k = max(0.5, math.sqrt(h * w / _FULL_AREA))
    wall_soft, lab, air_half = _alveoli(rng, h, w, k)
    wall = wall_soft > 0.5
    hs, ws = air_half.shape

    def air_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance (full-size pixels) from (x, y) to the nearest wall; looked up on the half-size map."""
        iy = (np.asarray(y) // 2).astype(int).clip(0, hs - 1)
        return air_half[iy, (np.asarray(x) // 2).astype(int).clip(0, ws - 1)]

    layers = _Layers(h, w)
    occupied = Image.new("L", (w, h), 0)  # STAS keep-out zone for distractors and RBCs
    d_occ = ImageDraw.Draw(occupied)

    # --- STAS: clusters of atypical cells floating in air spaces, not touching walls
    n_clusters = int(min(5, 1 + rng.poisson(1.0))) if with_stas else 0
    margin = 6.0 * k  # clear air between a STAS cell and the nearest wall
    cid = 0
    for _ in range(n_clusters):
        r_mean = rng.uniform(6.5, 11.0) * k
        n_cells = int(np.clip(np.exp(rng.uniform(np.log(2), np.log(70))), 2, 70))
        for _attempt in range(6):
            pos, r = _grow_cluster(rng, n_cells, r_mean)
            extent = float(np.max(np.hypot(*pos.T) + r))
            cand_x, cand_y = rng.integers(0, w, 400), rng.integers(0, h, 400)
            # no walls are drawn beyond the border, so count it as one, except for a few clusters cut by it
            to_border = np.minimum(np.minimum(cand_x, w - 1 - cand_x), np.minimum(cand_y, h - 1 - cand_y))
            room = np.minimum(air_dist(cand_x, cand_y), to_border + (extent if rng.random() < 0.2 else 0))
            ok = (room > extent + margin) & (np.asarray(occupied)[cand_y, cand_x] == 0)
            if ok.any():
                j = int(np.flatnonzero(ok)[0])
                centre = np.array([cand_x[j], cand_y[j]], dtype=np.float64)
                pos = pos + centre
                keep = air_dist(pos[:, 0], pos[:, 1]) > r + margin  # no cell may touch a wall
                pos, r = pos[keep], r[keep]
                if len(r):
                    _atypical_cells(rng, layers, pos, r, cid)
                    rr = extent + 4 * margin
                    d_occ.ellipse([centre[0] - rr, centre[1] - rr, centre[0] + rr, centre[1] + rr], fill=255)
                    cid += 1
                break
            n_cells = max(2, n_cells // 2)
    if with_stas and cid == 0:  # no air space was big enough: clear one and put a small cluster there
        cy, cx = (np.array(np.unravel_index(int(np.argmax(air_half)), air_half.shape)) * 2).tolist()
        pos, r = _grow_cluster(rng, 3, 7.0 * k)
        extent = float(np.max(np.hypot(*pos.T) + r)) + margin
        yy, xx = np.ogrid[:h, :w]
        wall_soft[(yy - cy) ** 2 + (xx - cx) ** 2 <= (extent + 2 * margin) ** 2] = 0
        wall = wall_soft > 0.5
        _atypical_cells(rng, layers, pos + [cx, cy], r, 0)
        d_occ.ellipse([cx - extent * 2, cy - extent * 2, cx + extent * 2, cy + extent * 2], fill=255)
        cid = 1
    occ = np.asarray(occupied) > 0

    wall_idx = np.flatnonzero(wall & ~occ)
    free_wall = len(wall_idx) > 0

    def wall_points(m: int) -> tuple[np.ndarray, np.ndarray]:
        idx = wall_idx[rng.integers(0, len(wall_idx), m)]
        return (idx % w).astype(np.float64), (idx // w).astype(np.float64)

    def outside_stas(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ~occ[np.clip(y.round().astype(int), 0, h - 1), np.clip(x.round().astype(int), 0, w - 1)]

    # --- distractors: the same atypical cells attached to walls (same colours, different context)
    area_scale = max(1.0, math.sqrt(h * w / (k * k * 512 * 288 / 0.25)))  # 1 at the default size
    for _ in range(int(rng.poisson(2.5 * area_scale)) + 1 if free_wall else 0):
        pos, r = _grow_cluster(rng, int(np.exp(rng.uniform(np.log(3), np.log(45)))), rng.uniform(6.5, 11) * k)
        extent = float(np.max(np.hypot(*pos.T) + r))
        # walk from a wall point in a random direction to where the air starts, then set the cluster there so
        # that it visibly sits on the wall (a cluster centred on a thin wall would hide it and look floating)
        x0, y0 = wall_points(1)
        a = rng.uniform(0, 2 * np.pi)
        steps = np.arange(0, 30 * k + extent)
        px, py = x0 + steps * np.cos(a), y0 + steps * np.sin(a)
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        air = inside & (air_dist(px.clip(0, w - 1), py.clip(0, h - 1)) > 0)
        t = steps[int(np.argmax(air))] if air.any() else 0.0
        t += extent * rng.uniform(0.2, 0.6)
        pos = pos + [x0[0] + t * np.cos(a), y0[0] + t * np.sin(a)]
        keep = outside_stas(pos[:, 0], pos[:, 1])
        if keep.any():
            _atypical_cells(rng, layers, pos[keep], r[keep], None)
    # --- distractors: dense lymphocyte aggregates on walls (dark round nuclei, different morphology)
    for _ in range(int(rng.poisson(1.5 * area_scale)) if free_wall else 0):
        x0, y0 = wall_points(1)
        m = int(rng.integers(15, 90))
        spread = math.sqrt(m) * 2.6 * k
        cx, cy = x0 + rng.normal(0, spread, m), y0 + rng.normal(0, spread, m)
        keep = outside_stas(cx, cy)
        mk = int(keep.sum())
        rn = rng.uniform(3.2, 4.4, mk) * k
        _draw_polys(
            layers.d_cyto_e,
            _blob_polygons(rng, x0, y0, np.array([spread * 1.5]), np.array([spread * 1.2]), 0.2),
            0.4,
        )
        _draw_polys(
            layers.d_nuc,
            _blob_polygons(rng, cx[keep], cy[keep], rn, rn * rng.uniform(0.85, 1.0, mk), 0.08, 8),
            rng.uniform(1.5, 2.2, mk),
        )

    # --- ordinary wall nuclei (pneumocytes, fibroblasts, endothelium): small, often elongated
    if free_wall:
        m = int(wall.sum() / (rng.uniform(110, 260) * k * k))
        cx, cy = wall_points(m)
        rn = rng.uniform(2.8, 4.4, m) * k
        rx, ry = rn * rng.uniform(1.0, 2.0, m), rn * rng.uniform(0.6, 0.9, m)
        _draw_polys(layers.d_nuc, _blob_polygons(rng, cx, cy, rx, ry, 0.1, 10), rng.uniform(0.8, 1.5, m))

    # --- red blood cells: in capillaries along walls and in small haemorrhages inside air spaces
    blood = rng.uniform(0, 1) ** 2
    rbc_x, rbc_y = [], []
    if free_wall:
        x, y = wall_points(int(blood * wall.sum() / (350 * k * k)))
        rbc_x.append(x)
        rbc_y.append(y)
    for _ in range(int(rng.poisson(blood * 4 * area_scale))):
        m = int(rng.integers(5, 120))
        spread = math.sqrt(m) * 4.0 * k
        rbc_x.append(rng.uniform(0, w) + rng.normal(0, spread, m))
        rbc_y.append(rng.uniform(0, h) + rng.normal(0, spread, m))
    if rbc_x:
        x, y = np.concatenate(rbc_x), np.concatenate(rbc_y)
        keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        x, y = x[keep], y[keep]
        keep = outside_stas(x, y)
        x, y = x[keep], y[keep]
        rr = rng.uniform(3.0, 4.0, len(x)) * k
        c = rng.uniform(1.6, 2.4, len(x))
        _draw_polys(layers.d_rbc, _blob_polygons(rng, x, y, rr, rr * 0.9, 0.05, 10), c)
        _draw_polys(layers.d_rbc, _blob_polygons(rng, x, y, rr * 0.45, rr * 0.4, 0.05, 8), c * 0.7)

    # --- compose concentrations
    fluid = np.zeros(int(lab.max()) + 1, np.float32)  # pale proteinaceous fluid in some air spaces
    has_fluid = rng.random(len(fluid)) < rng.uniform(0, 0.3)
    fluid[has_fluid] = rng.uniform(0.03, 0.12, int(has_fluid.sum()))
    texture = 1 + 0.22 * _smooth_noise(rng, h, w, 3 * k) + 0.12 * _smooth_noise(rng, h, w, 25 * k)
    c_e = (wall_soft * rng.uniform(0.55, 1.0) + _upsample(fluid[lab], h, w) * (1 - wall_soft)) * texture
    c_e = np.maximum(c_e, np.asarray(layers.cyto_e))
    c_h = np.maximum(wall_soft * rng.uniform(0.05, 0.16) * texture, np.asarray(layers.cyto_h))
    nuc = np.asarray(layers.nuc_h) * (1 + 0.2 * _smooth_noise(rng, h, w, 1.5 * k))
    c_h = np.maximum(c_h, nuc)
    c_e = c_e * np.where(nuc > 0, np.float32(0.55), np.float32(1.0))
    sigma = max(0.6, 0.9 * k)
    conc = [ndi.gaussian_filter(c, sigma) for c in (c_h, c_e, np.asarray(layers.rbc))]

    # per-image staining: stain vectors and strengths vary between slides
    vh = _unit(_OD_H + rng.normal(0, 0.05, 3)) * rng.uniform(0.75, 1.3)
    ve = _unit(_OD_E + rng.normal(0, 0.05, 3)) * rng.uniform(0.65, 1.35)
    vr = _unit(_OD_RBC + rng.normal(0, 0.03, 3))
    od_bg = rng.uniform(0.0, 0.05, 3)
    illum = 1 - 0.06 * (1 + _smooth_noise(rng, h, w, max(h, w) / 2)) / 2
    i0 = (rng.uniform(238, 252) * illum).astype(np.float32)
    image = np.empty((h, w, 3), np.uint8)
    for ch in range(3):
        od = conc[0] * np.float32(vh[ch]) + conc[1] * np.float32(ve[ch]) + conc[2] * np.float32(vr[ch])
        val = i0 * np.exp(-(od + np.float32(od_bg[ch]))) + rng.normal(0.5, 2.0, (h, w)).astype(np.float32)
        image[..., ch] = np.clip(val, 0, 255).astype(np.uint8)

    # --- label: union of each cluster's cells, closed (and hole-filled) into one blob-ish object
    stas = np.asarray(layers.stas)
    mask = np.zeros((h, w), np.uint8)
    rc = max(1, round(4 * k))
    pad = 2 * rc + 2
    for lbl in range(1, cid + 1):
        ys, xs = np.nonzero(stas == lbl)
        if not len(ys):
            continue
        y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + pad + 1)
        crop = np.pad(stas[y0:y1, x0:x1] == lbl, pad)  # pad so closing also works at image borders
        crop = ndi.binary_closing(crop, _disk(rc))
        crop = ndi.binary_dilation(crop, _disk(max(1, round(1.2 * k))))
        crop = ndi.binary_fill_holes(crop)[pad:-pad, pad:-pad]
        mask[y0:y1, x0:x1] |= crop.astype(np.uint8)
    return image, mask


def synth_stas(
    out: str | Path,
    n: int = 24,
    seed: int = 0,
    width: int = 512,
    height: int = 288,
    n_unlabeled: int = 8,
    empty_fraction: float = 0.15,
) -> Path:
    """Write a STAS-competition-style data set: Train_Images/*.jpg, Train_Annotations/*.json (labelme),
    Unlabeled_Images/Unlabeled_*.jpg. round(empty_fraction * n) labeled images contain no STAS (empty
    `shapes`). Labeled image i is render_stas(default_rng([seed, 0, i]), ..., with_stas=<not empty>), so
    tests can re-render the exact mask behind a JSON file."""
    out = Path(out)
    img_dir, ann_dir, unl_dir = out / "Train_Images", out / "Train_Annotations", out / "Unlabeled_Images"
    for d in (img_dir, ann_dir, unl_dir if n_unlabeled > 0 else None):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    n_empty = int(round(empty_fraction * n))
    empty = set(np.random.default_rng([seed, 7]).permutation(n)[:n_empty].tolist())
    for i in range(n):
        rng = np.random.default_rng([seed, 0, i])
        image, mask = render_stas(rng, width, height, with_stas=i not in empty)
        path = img_dir / f"{i:08d}.jpg"
        Image.fromarray(image).save(path, quality=92)
        write_labelme(ann_dir / f"{i:08d}.json", mask_to_labelme(mask, path, class_names={1: "STAS"}))
    for i in range(n_unlabeled):
        rng = np.random.default_rng([seed, 1, i])
        image, _ = render_stas(rng, width, height, with_stas=bool(rng.random() > empty_fraction))
        Image.fromarray(image).save(unl_dir / f"Unlabeled_{i:08d}.jpg", quality=92)
    return out


# -------------------------------------------------------------------------------------------------- OCT

# Reflectivity from the ILM (0) to the photoreceptor tips (1): bright RNFL, alternating plexiform (brighter)
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
    thick = H * rng.uniform(0.16, 0.24) * (1 + 0.04 * _smooth_noise(rng, 1, W, W / 4)[0])
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
        elev = _domes(x, c, hw, ht) * (1 + 0.15 * _smooth_noise(rng, 1, W, W / 40)[0])
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
    rpe_val = 0.95 * (1 + (0.25 if cls == "CNV" else 0.06) * _smooth_noise(rng, 1, W, W / 30)[0])
    img = np.where(yy >= rpe_top[None, :], rpe_val[None, :], img)
    sub = yy >= (rpe_top + rpe_th)[None, :]
    tex = _smooth_noise(rng, H, W, H / 40)
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
    return out
