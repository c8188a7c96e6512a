"""A cohort of slides: one output folder each, a manifest that makes reruns and killed runs resume.

Each slide is predicted into `OUT/<stem>.partial/` and renamed to `OUT/<stem>/` when complete, then a
"done" line goes to `OUT/manifest.jsonl` (appended and fsynced; a line cut by a kill is ignored). A rerun
skips a slide whose folder exists and whose last manifest line is "done" for the same slide file (path,
size, modification time); a leftover `.partial` folder is removed and the slide redone, so a half-written
slide is never reported as done. A bad slide is named, listed in `skipped.txt` and the rest continue.
Under torchrun/SLURM each rank takes every world-th slide, as `predict` does for images; the shared files
(`skipped.txt`, `slides.csv`, `index.html`) are rebuilt from the manifest and the summaries by whoever
finishes a slide, each written atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from medstudent.atomic import write_text_atomic
from medstudent.core.folder import output_stems
from medstudent.core.inferer import Engine
from medstudent.distributed import rank_world
from medstudent.errors import DataError
from medstudent.slides.predict import predict_slide

MANIFEST = "manifest.jsonl"
COLUMNS = [
    "tissue_area_mm2",
    "object_count",
    "object_area_mm2",
    "largest_object_mm2",
    "regions",
    "seconds",
    "regions_per_s",
]


def fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"slide": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_manifest(out: Path) -> dict[str, dict]:
    """stem -> its last manifest record (lines cut short by a kill are skipped)."""
    records: dict[str, dict] = {}
    path = out / MANIFEST
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("stem"), str):
            records[rec["stem"]] = rec
    return records


def _append(out: Path, record: dict) -> None:
    with open(out / MANIFEST, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def is_done(out: Path, stem: str, slide: Path, records: dict[str, dict]) -> bool:
    rec = records.get(stem)
    if rec is None or rec.get("status") != "done" or not (out / stem / "summary.json").is_file():
        return False
    try:
        fp = fingerprint(slide)
    except OSError:
        return False
    return all(rec.get(k) == v for k, v in fp.items())


def predict_cohort(
    engine: Engine,
    slides: list[Path],
    out: str | Path,
    *,
    on_slide: Callable[[int, int, str], None] | None = None,
    on_region: Callable[[int, int], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Predict `slides` (this rank's share) into `out`; `options` go to `predict_slide`. Returns counts
    and the skipped slides ("path: reason")."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_world()
    stems = output_stems(slides)  # as `predict` names outputs: by path where two slides share a stem
    mine = list(zip(slides, stems, strict=True))[rank::world]
    records = read_manifest(out)
    done = predicted = 0
    skipped: list[str] = []
    for i, (slide, stem) in enumerate(mine):
        if on_slide is not None:
            on_slide(i, len(mine), stem)
        if is_done(out, stem, slide, records):
            done += 1
            continue
        partial = out / f"{stem}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            fp = fingerprint(slide)
            summary = predict_slide(engine, slide, partial, on_region=on_region, **options)
        except Exception as e:  # noqa: BLE001 - a cohort names the slide and goes on, whatever went wrong
            shutil.rmtree(partial, ignore_errors=True)
            if not isinstance(e, DataError):  # not foreseen: say what, still one line naming the slide
                e = DataError(slide, f"unexpected error ({type(e).__name__}: {e})".replace("\n", " "))
            skipped.append(str(e))
            warnings.warn(f"skipped: {e}", stacklevel=2)
            _append(out, {"stem": stem, "status": "skipped", "reason": str(e), **_safe_fp(slide)})
            _write_cohort_files(out)
            continue
        final = out / stem
        shutil.rmtree(final, ignore_errors=True)  # a stale folder from another model or slide version
        partial.rename(final)
        _append(out, {"stem": stem, "status": "done", **fp, "object_count": summary["object_count"]})
        predicted += 1
        _write_cohort_files(out)
    _write_cohort_files(out)
    counts = {"slides": len(mine), "predicted": predicted, "already_done": done}
    return {**counts, "skipped": skipped, "rank": rank}


def _safe_fp(slide: Path) -> dict[str, Any]:
    try:
        return fingerprint(slide)
    except OSError:
        return {"slide": str(slide)}


def _thumb_uri(path: Path, side: int = 320) -> str:
    """overlay.png shrunk and embedded, so index.html is one self-contained file."""
    try:
        with Image.open(path) as im:
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=85)
    except OSError:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _write_cohort_files(out: Path) -> None:
    """skipped.txt, slides.csv and index.html from the manifest and the slides' summary.json files."""
    records = read_manifest(out)
    rows, skipped = [], []
    for stem, rec in sorted(records.items()):
        if rec.get("status") == "skipped":
            skipped.append((stem, rec))
            continue
        try:
            summary = json.loads((out / stem / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append((stem, summary))
    write_text_atomic(out / "skipped.txt", "".join(f"{r.get('reason', stem)}\n" for stem, r in skipped))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["slide", *COLUMNS])
    for stem, s in rows:
        writer.writerow([stem, *(s.get(c) for c in COLUMNS)])
    write_text_atomic(out / "slides.csv", buf.getvalue())
    write_text_atomic(out / "index.html", _index_html(out, rows, skipped))


def _index_html(out: Path, rows: list[tuple[str, dict]], skipped: list[tuple[str, dict]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in ["slide", "overlay", *COLUMNS])
    body = []
    for stem, s in rows:
        uri = _thumb_uri(out / stem / "overlay.png")
        img = f'<img src="{uri}" alt="{esc(stem)}">' if uri else ""
        link = f'<a href="{esc(stem)}/objects.geojson">{esc(stem)}</a>'
        cells = "".join(f"<td>{esc(str(s.get(c, '')))}</td>" for c in COLUMNS)
        body.append(f"<tr><td>{link}</td><td>{img}</td>{cells}</tr>")
    skip = "".join(f"<li>{esc(str(r.get('reason', stem)))}</li>" for stem, r in skipped)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>medstudent slides</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:320px}</style></head><body>"
        f"<h1>Slides: {len(rows)} predicted, {len(skipped)} skipped</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + (f"<h2>Skipped</h2><ul>{skip}</ul>" if skip else "")
        + "</body></html>\n"
    )
