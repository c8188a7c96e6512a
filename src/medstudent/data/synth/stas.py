"""Synthetic STAS: H&E lung tissue with clusters of atypical cells floating in air spaces (the targets),
in the real layout (`Train_Images/` + labelme `Train_Annotations/`, optional `Unlabeled_Images/`).

Clusters of the same cells attached to alveolar walls and dense lymphocyte aggregates share their colours
and are not labelled, so a colour threshold fails and a model has to use context and morphology.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from medstudent.data.labelme import mask_to_labelme, write_labelme
from medstudent.data.synth.marker import mark_synthetic
from medstudent.data.synth.shapes import blob_polygons, disk, draw_polys, smooth_noise, unit, upsample

# Ruifrok & Johnston optical densities (per unit concentration); tuned slightly so eosin reads as H&E pink.
_OD_H = np.array([0.65, 0.70, 0.29])
_OD_E = np.array([0.07, 0.99, 0.30])
_OD_RBC = np.array([0.09, 0.92, 0.50])  # red blood cells: strongly eosinophilic, redder than stroma
_FULL_AREA = 1716 * 942  # real STAS image size; feature sizes are set relative to it


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
    dy = smooth_noise(rng, hs, ws, spacing * 0.8 / f) * amp
    dx = smooth_noise(rng, hs, ws, spacing * 0.8 / f) * amp
    yy = (np.arange(hs, dtype=np.float32)[:, None] + dy).round().astype(np.int32).clip(0, hs - 1)
    xx = (np.arange(ws, dtype=np.float32)[None, :] + dx).round().astype(np.int32).clip(0, ws - 1)
    lab = lab_seed[yy, xx]
    edge = np.zeros((hs, ws), bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    dist = upsample(ndi.distance_transform_edt(~edge) * f, h, w)
    half = rng.uniform(3.5, 7.5) * k * (1 + 0.35 * smooth_noise(rng, h, w, spacing * 0.7)).clip(0.45, 2.2)
    soft = np.clip(half - dist + 0.5, 0, 1)
    # patches of solid (collapsed / fibrotic) tissue with ragged edges
    solid_field = smooth_noise(rng, h, w, 220 * k) + 0.25 * smooth_noise(rng, h, w, 30 * k)
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
    cyto = blob_polygons(rng, cx, cy, r * rng.uniform(0.95, 1.1, n), r * rng.uniform(0.8, 1.0, n), 0.12)
    e_level = rng.uniform(0.45, 0.85)
    draw_polys(layers.d_cyto_e, cyto, e_level * rng.uniform(0.8, 1.2, n))
    draw_polys(layers.d_cyto_h, cyto, rng.uniform(0.1, 0.3) * rng.uniform(0.8, 1.2, n))
    if cluster_id is not None:
        draw_polys(layers.d_stas, cyto, cluster_id + 1)
    rn = r * rng.uniform(0.42, 0.6, n)
    off = rng.uniform(0, 0.25, n) * r
    a = rng.uniform(0, 2 * np.pi, n)
    ncx, ncy = cx + off * np.cos(a), cy + off * np.sin(a)
    nuc = blob_polygons(rng, ncx, ncy, rn * rng.uniform(0.95, 1.15, n), rn * rng.uniform(0.8, 1.0, n), 0.15)
    draw_polys(layers.d_nuc, nuc, rng.uniform(1.3, 2.0) * rng.uniform(0.85, 1.15, n))
    has = rng.random(n) < 0.5
    if has.any():
        rr = np.maximum(0.8, 0.22 * rn[has])
        dots = blob_polygons(rng, ncx[has], ncy[has], rr, rr, 0.0, n_vert=6)
        draw_polys(layers.d_nuc, dots, 2.6)


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
        draw_polys(
            layers.d_cyto_e,
            blob_polygons(rng, x0, y0, np.array([spread * 1.5]), np.array([spread * 1.2]), 0.2),
            0.4,
        )
        draw_polys(
            layers.d_nuc,
            blob_polygons(rng, cx[keep], cy[keep], rn, rn * rng.uniform(0.85, 1.0, mk), 0.08, 8),
            rng.uniform(1.5, 2.2, mk),
        )

    # --- ordinary wall nuclei (pneumocytes, fibroblasts, endothelium): small, often elongated
    if free_wall:
        m = int(wall.sum() / (rng.uniform(110, 260) * k * k))
        cx, cy = wall_points(m)
        rn = rng.uniform(2.8, 4.4, m) * k
        rx, ry = rn * rng.uniform(1.0, 2.0, m), rn * rng.uniform(0.6, 0.9, m)
        draw_polys(layers.d_nuc, blob_polygons(rng, cx, cy, rx, ry, 0.1, 10), rng.uniform(0.8, 1.5, m))

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
        draw_polys(layers.d_rbc, blob_polygons(rng, x, y, rr, rr * 0.9, 0.05, 10), c)
        draw_polys(layers.d_rbc, blob_polygons(rng, x, y, rr * 0.45, rr * 0.4, 0.05, 8), c * 0.7)

    # --- compose concentrations
    fluid = np.zeros(int(lab.max()) + 1, np.float32)  # pale proteinaceous fluid in some air spaces
    has_fluid = rng.random(len(fluid)) < rng.uniform(0, 0.3)
    fluid[has_fluid] = rng.uniform(0.03, 0.12, int(has_fluid.sum()))
    texture = 1 + 0.22 * smooth_noise(rng, h, w, 3 * k) + 0.12 * smooth_noise(rng, h, w, 25 * k)
    c_e = (wall_soft * rng.uniform(0.55, 1.0) + upsample(fluid[lab], h, w) * (1 - wall_soft)) * texture
    c_e = np.maximum(c_e, np.asarray(layers.cyto_e))
    c_h = np.maximum(wall_soft * rng.uniform(0.05, 0.16) * texture, np.asarray(layers.cyto_h))
    nuc = np.asarray(layers.nuc_h) * (1 + 0.2 * smooth_noise(rng, h, w, 1.5 * k))
    c_h = np.maximum(c_h, nuc)
    c_e = c_e * np.where(nuc > 0, np.float32(0.55), np.float32(1.0))
    sigma = max(0.6, 0.9 * k)
    conc = [ndi.gaussian_filter(c, sigma) for c in (c_h, c_e, np.asarray(layers.rbc))]

    # per-image staining: stain vectors and strengths vary between slides
    vh = unit(_OD_H + rng.normal(0, 0.05, 3)) * rng.uniform(0.75, 1.3)
    ve = unit(_OD_E + rng.normal(0, 0.05, 3)) * rng.uniform(0.65, 1.35)
    vr = unit(_OD_RBC + rng.normal(0, 0.03, 3))
    od_bg = rng.uniform(0.0, 0.05, 3)
    illum = 1 - 0.06 * (1 + smooth_noise(rng, h, w, max(h, w) / 2)) / 2
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
        crop = ndi.binary_closing(crop, disk(rc))
        crop = ndi.binary_dilation(crop, disk(max(1, round(1.2 * k))))
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
    mark_synthetic(out, "STAS", seed)
    return out
