"""Training tiles from whole slides and their QuPath annotations: the engine of `data from-slides`.

For each slide, its GeoJSON (`<slide stem>.geojson` or `.json` in the annotation folder, or the one file
given with one slide) is read with data.qupath, and the slide's pixel grid at `mpp` um/px is cut into
`tile` x `tile` cells starting at (0, 0). Every cell an annotation overlaps (more than along an edge) is a
positive tile; about `negatives` times as many cells that touch no annotation and are at least
MIN_TISSUE_FRACTION tissue (tissue_mask on a thumbnail) are drawn at random as negatives, so the model
also sees unannotated tissue. The output is the `images/` + `masks/` layout the rest of the project reads
(layouts.open_dataset), with `tiles.csv` (where each tile came from) and `label_map.json`.

Writes are safe to interrupt and repeat: a slide's tiles are written to a hidden staging folder and moved
into place only once the whole slide succeeded, then tiles.csv is rewritten (atomically). A re-run replaces
the tiles of the slides it processes (stale ones listed in the old tiles.csv are removed) and keeps the
rows and files of the other slides; a slide that fails leaves its previous tiles as they were.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import shapely
from PIL import Image

from medstudent.atomic import atomic_path, write_text_atomic
from medstudent.data.io import write_mask_png
from medstudent.data.qupath import rasterize, read_annotations
from medstudent.data.slide import Slide
from medstudent.data.tissue import THUMBNAIL_MPP, tissue_mask
from medstudent.errors import ConfigError, DataError

MIN_TISSUE_FRACTION = 0.5  # a negative tile is at least half tissue (by the thumbnail's tissue mask)
ANNOTATION_SUFFIXES = (".geojson", ".json")
MAX_CLASS_ID = 50  # data.io.read_mask takes larger values (and 0/255) for something else than class ids
COLUMNS = ["slide", "x", "y", "mpp", "tile", "positive_pixels", "kind", "level0_x", "level0_y", "image"]


def annotation_file(slide: Path, annotations: Path, n_slides: int) -> Path:
    """The GeoJSON of `slide`: `<stem>.geojson|.json` (or `<name>.geojson`, as QuPath names exports of
    'slide.svs') in a folder, or the single file when one slide is given. A missing one is an error, not
    an empty slide: unannotated tissue would silently become negatives."""
    if annotations.is_dir():
        for name in (slide.stem, slide.name):
            for suffix in ANNOTATION_SUFFIXES:
                if (annotations / f"{name}{suffix}").is_file():
                    return annotations / f"{name}{suffix}"
        raise DataError(slide, f"has no annotation file {slide.stem}.geojson (or .json) in {annotations}")
    if annotations.is_file():
        if n_slides != 1:
            raise DataError(
                annotations,
                f"is one annotation file but {n_slides} slides were given; "
                "pass a folder of <slide stem>.geojson files",
            )
        return annotations
    raise DataError(annotations, "no such annotation file or folder")


def _cell_boxes(cols: np.ndarray, rows: np.ndarray, tile: int, s: float) -> np.ndarray:
    """Level-0 boxes of grid cells (col, row) at `s` level-0 px per grid px."""
    t = tile * s
    return shapely.box(cols * t, rows * t, (cols + 1) * t, (rows + 1) * t)


def annotated_cells(items: list, tile: int, s: float, ncol: int, nrow: int) -> list[tuple[int, int]]:
    """Cells (col, row) whose box shares area with an annotation: a polygon ending exactly on a cell edge
    does not pull in the neighbour (it would be an empty 'positive' tile)."""
    cells: set[tuple[int, int]] = set()
    t = tile * s
    for geom, _ in items:
        x0, y0, x1, y1 = geom.bounds
        c = np.arange(max(0, math.floor(x0 / t)), min(ncol, math.floor(x1 / t) + 1))
        r = np.arange(max(0, math.floor(y0 / t)), min(nrow, math.floor(y1 / t) + 1))
        if not len(c) or not len(r):
            continue
        cc, rr = (a.ravel() for a in np.meshgrid(c, r))
        boxes = _cell_boxes(cc, rr, tile, s)
        shapely.prepare(geom)
        hit = shapely.intersects(geom, boxes) & ~shapely.touches(geom, boxes)
        cells.update(zip(cc[hit].tolist(), rr[hit].tolist(), strict=True))
    return sorted(cells, key=lambda cr: (cr[1], cr[0]))


def tissue_fraction(tissue: np.ndarray, f: float, tile: int, ncol: int, nrow: int) -> np.ndarray:
    """(nrow, ncol) fraction of each cell that is tissue; `f` = thumbnail px per grid px. A cell smaller
    than a thumbnail pixel takes the pixel it starts in."""
    ii = np.zeros((tissue.shape[0] + 1, tissue.shape[1] + 1))
    ii[1:, 1:] = tissue.cumsum(0).cumsum(1)
    th, tw = tissue.shape

    def edges(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.clip(np.floor(np.arange(n) * tile * f), 0, size).astype(int)
        b = np.clip(np.maximum(a + 1, np.ceil((np.arange(n) + 1) * tile * f)), 0, size).astype(int)
        return a, b

    xa, xb = edges(ncol, tw)
    ya, yb = edges(nrow, th)
    total = ii[yb][:, xb] - ii[ya][:, xb] - ii[yb][:, xa] + ii[ya][:, xa]
    area = np.outer(yb - ya, xb - xa)
    return np.divide(total, area, out=np.zeros_like(total), where=area > 0)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path, fsync=False) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


class _SlideJob:
    """One slide's tiles, written to `stage` (a hidden folder inside `out`) before they are moved in."""

    def __init__(self, path: Path, ann: Path, stage: Path, mpp: float, tile: int, binary: bool):
        self.path, self.ann, self.stage, self.mpp, self.tile, self.binary = (
            path,
            ann,
            stage,
            mpp,
            tile,
            binary,
        )
        self.rows: list[dict] = []

    def run(self, label_map: dict[str, int] | None, negatives: float, seed: int, slide_mpp: float | None):
        tile, mpp = self.tile, self.mpp
        with Slide(self.path, mpp=slide_mpp) as sl:
            items = read_annotations(self.ann, label_map, bounds=sl.dimensions)
            s = mpp / sl.mpp  # level-0 px per grid px
            w, h = sl.size_at(mpp)
            ncol, nrow = math.ceil(w / tile), math.ceil(h / tile)
            pos = annotated_cells(items, tile, s, ncol, nrow)
            n_neg = round(negatives * len(pos))
            neg = self._negatives(sl, items, s, ncol, nrow, n_neg, seed) if n_neg > 0 else []
            tree = shapely.STRtree([g for g, _ in items]) if items else None
            for kind, cells in (("positive", pos), ("negative", neg)):
                for c, r in cells:
                    self._tile(sl, items, tree, s, c * tile, r * tile, kind)

    def _negatives(self, sl: Slide, items: list, s: float, ncol: int, nrow: int, n: int, seed: int) -> list:
        """`n` random cells (fewer if there are not so many) that are mostly tissue and touch no annotation;
        the draw is seeded by the seed and the slide's name, so it does not depend on the other slides."""
        thumb_mpp = max(THUMBNAIL_MPP, sl.mpp)
        tissue = tissue_mask(sl.thumbnail(thumb_mpp), thumb_mpp)
        frac = tissue_fraction(tissue, self.mpp / thumb_mpp, self.tile, ncol, nrow)
        ok = frac >= MIN_TISSUE_FRACTION
        rr, cc = np.nonzero(ok)
        if items and len(rr):
            tree = shapely.STRtree([g for g, _ in items])
            hit = tree.query(_cell_boxes(cc, rr, self.tile, s), predicate="intersects")[0]
            free = np.ones(len(rr), bool)
            free[hit] = False
            rr, cc = rr[free], cc[free]
        rng = np.random.default_rng([seed, zlib.crc32(self.path.stem.encode())])
        pick = np.sort(rng.choice(len(rr), size=min(n, len(rr)), replace=False)) if len(rr) else []
        return [(int(cc[i]), int(rr[i])) for i in pick]

    def _tile(self, sl: Slide, items: list, tree, s: float, x: int, y: int, kind: str) -> None:
        tile = self.tile
        near = sorted(tree.query(shapely.box(x * s, y * s, (x + tile) * s, (y + tile) * s))) if tree else []
        mask = rasterize([items[i] for i in near], x, y, tile, tile, s)
        name = f"{self.path.stem}_x{x}_y{y}.png"
        _write_png(self.stage / "images" / name, sl.read(x, y, tile, tile, self.mpp))
        write_mask_png(self.stage / "masks" / name, mask, binary_255=self.binary)
        self.rows.append(
            {
                "slide": self.path.name,
                "x": x,
                "y": y,
                "mpp": self.mpp,
                "tile": tile,
                "positive_pixels": int(np.count_nonzero(mask)),
                "kind": kind,
                "level0_x": round(x * s),
                "level0_y": round(y * s),
                "image": f"images/{name}",
            }
        )


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(
            path, f"cannot read the previous tiles.csv ({type(e).__name__}); use a new folder"
        ) from None


def _write_rows(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _commit(job: _SlideJob, out: Path, old: list[dict]) -> None:
    """Move the staged tiles in, then remove this slide's tiles of an earlier run that were not redone."""
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((job.stage / sub).glob("*.png")):
            os.replace(f, out / sub / f.name)
    new = {r["image"] for r in job.rows}
    for r in old:
        if r["image"] not in new:
            for sub in ("images", "masks"):
                (out / sub / Path(r["image"]).name).unlink(missing_ok=True)
    shutil.rmtree(job.stage, ignore_errors=True)


def extract_tiles(
    slides: list[Path],
    annotations: Path,
    out: Path,
    mpp: float,
    tile: int,
    label_map: dict[str, int] | None = None,
    negatives: float = 1.0,
    seed: int = 0,
    slide_mpp: float | None = None,
    skip_bad: bool = False,
) -> dict:
    """Cut annotated (and random unannotated tissue) tiles from `slides` into the images/ + masks/ data set
    `out`; see the module docstring. Masks are 0/255 when every class maps to 1 (the default), class ids
    otherwise. A bad slide or GeoJSON (or a missing annotation file) is a one-line DataError naming it;
    with skip_bad it is listed in out/skipped.txt and the other slides go on. Returns a summary:
    {"slides", "tiles", "positive_tiles", "negative_tiles", "skipped": [paths]}."""
    slides, annotations, out = [Path(p) for p in slides], Path(annotations), Path(out)
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ConfigError(None, f"--mpp must be a positive number of um/px, got {mpp}")
    if not (isinstance(tile, int | np.integer) and not isinstance(tile, bool) and 16 <= tile <= 8192):
        raise ConfigError(None, f"--tile must be an integer from 16 to 8192 px, got {tile}")
    if not (math.isfinite(negatives) and negatives >= 0):
        raise ConfigError(None, f"negatives must be a number >= 0, got {negatives}")
    bad_ids = {
        k: v for k, v in (label_map or {}).items() if not isinstance(v, int) or not 0 <= v <= MAX_CLASS_ID
    }
    if bad_ids:
        raise ConfigError(None, f"label_map ids must be 0..{MAX_CLASS_ID} in mask PNGs, got {bad_ids}")
    if not slides:
        raise DataError(None, "no slides given")
    stems = [p.stem for p in slides]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise DataError(None, f"several slides are named {dup[0]!r}; tile names need distinct slide names")
    if annotations.is_file() and len(slides) != 1:
        annotation_file(slides[0], annotations, len(slides))  # raises the one-line error
    binary = label_map is None or max(label_map.values(), default=1) <= 1
    out.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(out / "tiles.csv")
    skipped: list[str] = []
    new_rows: list[dict] = []
    for path in slides:
        stage = out / f".staging-{path.stem}"
        shutil.rmtree(stage, ignore_errors=True)  # left by a killed run
        job = _SlideJob(path, path, stage, float(mpp), tile, binary)
        try:
            job.ann = annotation_file(path, annotations, len(slides))
            job.run(label_map, negatives, seed, slide_mpp)
        except DataError as e:
            shutil.rmtree(stage, ignore_errors=True)
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        _commit(job, out, [r for r in rows if r.get("slide") == path.name])
        rows = [r for r in rows if r.get("slide") != path.name] + job.rows
        _write_rows(out / "tiles.csv", rows)
        new_rows += job.rows
    effective = dict(label_map) if label_map is not None else {"foreground": 1}
    write_text_atomic(out / "label_map.json", json.dumps(effective, indent=2) + "\n")
    write_text_atomic(out / "skipped.txt", "".join(f"{s}\n" for s in skipped))
    _write_rows(out / "tiles.csv", rows)  # also when no slide succeeded: the header, for readers
    return {
        "slides": len(slides) - len(skipped),
        "tiles": len(new_rows),
        "positive_tiles": sum(r["kind"] == "positive" for r in new_rows),
        "negative_tiles": sum(r["kind"] == "negative" for r in new_rows),
        "skipped": skipped,
    }
