"""report.html: one self-contained page per `medstudent evaluate` run.

Everything is inline: the PNGs as base64 data URIs, the CSS, and a small vanilla-JS sorter (click any header
of the per-image table; numbers sort as numbers, text as text, a second click reverses). A Content Security
Policy forbids anything but inline script/style and data: images, so the page never reaches the network.
All text (file names are user input) goes through `html.escape`. `#sort=<column>_<asc|desc>` in the URL
sorts on load. When the script has wired the sorter and every <img> has decoded (naturalWidth > 0), it sets
`<body data-ready="1">`; a broken image gives `data-ready="broken"` (what the headless-browser test reads).
"""

from __future__ import annotations

import base64
import io
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from html import escape
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medstudent.atomic import write_text_atomic
from medstudent.evaluation.report import seg_gallery_png
from medstudent.figures import DPI, new_figure

N_OVERLAYS = 6  # worst and best images shown as overlays

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}
td.t,th.t{text-align:left}
table.sortable th{cursor:pointer;background:#f0f0f0;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
.note{color:#666;font-size:.85em}
"""

JS = """
(function () {
  "use strict";
  var body = document.body;
  function sortTable(table, col, dir) {
    var ths = table.tHead.rows[0].cells, idx = -1, i;
    for (i = 0; i < ths.length; i++) {
      if (ths[i].dataset.col === col) idx = i;
      ths[i].removeAttribute("aria-sort");
    }
    if (idx < 0) return false;
    var num = ths[idx].dataset.type === "num", tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = a.cells[idx].dataset.v, y = b.cells[idx].dataset.v;
      if (x === "" || y === "") return (x === "") - (y === "");  /* empty cells last, either way */
      var c = num ? Number(x) - Number(y) : (x < y ? -1 : x > y ? 1 : 0);
      return dir === "desc" ? -c : c;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    ths[idx].setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending");
    table.dataset.sortCol = col;
    table.dataset.sortDir = dir;
    return true;
  }
  function fromHash() {
    var m = /^#sort=(.+)_(asc|desc)$/.exec(decodeURIComponent(location.hash || ""));
    var table = document.getElementById("per-image");
    if (m && table) sortTable(table, m[1], m[2]);
  }
  function imagesLoaded(done) {
    var imgs = Array.prototype.slice.call(document.images), left = imgs.length, bad = 0;
    if (!left) { done(true); return; }
    imgs.forEach(function (img) {
      function check() { if (!(img.naturalWidth > 0)) bad++; if (--left === 0) done(bad === 0); }
      if (img.complete) { check(); return; }
      img.addEventListener("load", check, {once: true});
      img.addEventListener("error", check, {once: true});
    });
  }
  try {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
        th.addEventListener("click", function () {
          var again = table.dataset.sortCol === th.dataset.col && table.dataset.sortDir === "asc";
          sortTable(table, th.dataset.col, again ? "desc" : "asc");
        });
      });
    });
    fromHash();
    window.addEventListener("hashchange", fromHash);
    imagesLoaded(function (ok) { body.dataset.ready = ok ? "1" : "broken"; });
  } catch (e) {
    body.dataset.ready = "broken";
    throw e;
  }
})();
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return "n/a" if math.isnan(v) else f"{float(v):.4g}"
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def _ci(summary: dict, key: str) -> str:
    ci = summary.get(f"{key}_ci95", summary.get(f"{key}_ci"))
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return f"{_fmt(ci[0])} - {_fmt(ci[1])}"
    return ""


def _small_table(rows: Sequence[dict], caption: str) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    cap = f"<caption>{escape(caption)}</caption>"
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v: Any) -> str:
    return f"<td>{escape(_fmt(v))}</td>" if _is_num(v) else f'<td class="t">{escape(_fmt(v))}</td>'


def summary_html(summary: dict) -> str:
    """Every scalar of summary.json with its bootstrap 95% CI, then its lists of records as tables (per
    class, lesions by size); matrices are shown as figures, anything else as JSON."""
    rows, tables = [], []
    for key, v in summary.items():
        if key.endswith(("_ci95", "_ci")) or key.startswith("confusion_matrix"):
            continue
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            tables.append(_small_table(v, key.replace("_", " ")))
            continue
        shown = _fmt(v) if _is_num(v) or isinstance(v, str | bool) or v is None else json.dumps(v)
        cells = f"<td>{escape(shown)}</td><td>{escape(_ci(summary, key))}</td>"
        rows.append(f'<tr><td class="t">{escape(key)}</td>{cells}</tr>')
    head = '<thead><tr><th class="t">metric</th><th>value</th><th>95% CI (bootstrap)</th></tr></thead>'
    return f'<table id="summary">{head}<tbody>{"".join(rows)}</tbody></table>' + "".join(tables)


def per_image_html(df: pd.DataFrame) -> str:
    """The sortable per-image table: each cell keeps its raw value in data-v (the sorter's key)."""
    kinds = {c: "num" if pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool else "text" for c in df}
    text = ' class="t"'
    head = "".join(
        f'<th data-col="{escape(str(c))}" data-type="{kinds[c]}"{text if kinds[c] == "text" else ""}>'
        f"{escape(str(c))}</th>"
        for c in df.columns
    )
    body = []
    for rec in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, rec, strict=True):
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            raw = "" if missing else (repr(float(v)) if kinds[c] == "num" else str(v))
            cls = "" if kinds[c] == "num" else ' class="t"'
            cells.append(f'<td{cls} data-v="{escape(raw)}">{escape("" if missing else _fmt(v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<p class="note">Click a column header to sort (again to reverse).</p>'
        f'<table id="per-image" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def img_html(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def size_plot_png(by_size: Sequence[dict]) -> bytes:
    """Lesion recall and mean lesion Dice per size bin of the true lesions (bars), lesion counts on top."""
    labels = [str(r["area_px"]) for r in by_size]
    x = np.arange(len(labels))
    fig = new_figure(max(4.0, 1.1 * len(labels) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    recall = [float(r["recall"]) for r in by_size]
    dice = [float(r["mean_lesion_dice"]) for r in by_size]
    ax.bar(x - 0.2, np.nan_to_num(recall), 0.4, label="lesion recall")
    ax.bar(x + 0.2, np.nan_to_num(dice), 0.4, label="mean lesion Dice")
    for i, r in enumerate(by_size):
        ax.text(i, 1.02, f"n={r['lesions']}", ha="center", fontsize=8)
    ax.set_xticks(x, labels, rotation=30, fontsize=8)
    ax.set_xlabel("true lesion area (px)")
    ax.set_ylim(0, 1.12)
    ax.set_title("by lesion size")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    parts = "".join(f"<section><h2>{escape(h)}</h2>{body}</section>" for h, body in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{escape(title)}</h1>{parts}<script>{JS}</script></body></html>\n"
    )


def _gallery(items: list[dict], title: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return seg_gallery_png(items, Path(tmp) / "g.png", title).read_bytes()


def write_seg_report(
    out: str | Path,
    summary: dict,
    per_image: pd.DataFrame,
    tile: Callable[[str], dict | None],
    n: int = N_OVERLAYS,
) -> Path:
    """report.html for a segmentation evaluation. `tile(id)` gives a gallery item (see
    `report.seg_gallery_png`) or None where the image is unknown (then it gets no overlay)."""
    sections = [("summary", summary_html(summary))]
    by_size = summary.get("lesions_by_size") or []
    if by_size:
        sections.append(("lesion recall and Dice by size", img_html(size_plot_png(by_size), "by size")))
    ranked = list(per_image.sort_values("dice", kind="stable")["id"])
    worst = list(islice(filter(None, map(tile, ranked)), n))  # lazily: only the images shown are read
    shown = {t["id"] for t in worst}
    best = list(islice(filter(None, (tile(i) for i in reversed(ranked) if i not in shown)), n))
    if worst:
        sections.append((f"worst {len(worst)} by Dice", img_html(_gallery(worst, "worst by Dice"), "worst")))
    if best:
        sections.append((f"best {len(best)} by Dice", img_html(_gallery(best, "best by Dice"), "best")))
    if not worst:
        sections.append(("overlays", '<p class="note">no overlays: the images are not known</p>'))
    sections.append(("per image", per_image_html(per_image)))
    path = Path(out) / "report.html"
    write_text_atomic(path, page("medstudent evaluate: segmentation", sections))
    return path


def cls_per_image(
    paths: Sequence[Path], y: np.ndarray, probs: np.ndarray, names: Sequence[str]
) -> pd.DataFrame:
    """One row per scored image: true and predicted class, confidence and every class probability."""
    pred = probs.argmax(1)
    df = pd.DataFrame(
        {
            "image": [Path(p).name for p in paths],
            "true": [names[k] for k in y],
            "predicted": [names[k] for k in pred],
            "correct": np.where(pred == y, "yes", "no"),
            "confidence": probs.max(1),
        }
    )
    for k, c in enumerate(names):
        df[f"p_{c}"] = probs[:, k]
    return df


def write_cls_report(
    out: str | Path, summary: dict, per_image: pd.DataFrame, figures: Sequence[Path]
) -> Path:
    """report.html for a classification evaluation: summary, the figures (confusion matrices, the gallery of
    confidently wrong images) embedded, and the per-image table."""
    shown = "".join(img_html(Path(f).read_bytes(), Path(f).stem) for f in figures if Path(f).is_file())
    sections = [
        ("summary", summary_html(summary)),
        ("figures", shown),
        ("per image", per_image_html(per_image)),
    ]
    path = Path(out) / "report.html"
    write_text_atomic(path, page("medstudent evaluate: classification", sections))
    return path
