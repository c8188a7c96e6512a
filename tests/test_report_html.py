"""report.html of `medstudent evaluate`: parsed in Python (self-contained, escaped), and opened in a real
headless Chromium (the sorter and the image check run; the dumped DOM and the console are read back)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medstudent.evaluation.evaluate import evaluate_classification, evaluate_segmentation
from medstudent.evaluation.report_html import per_image_html, write_seg_report

HOSTILE = "<img src=x onerror=alert(1)>"  # a legal file name on POSIX ("/" is not, so no </script>)
# row shift of the predicted square per image: Dice = 1 - shift / 20; "small" is a 9x10 lesion found exactly
SHIFTS = {HOSTILE: 2, "img0": 3, "img1": 0, "img2": 5, "img3": 1, "img4": 8, "img5": 2, "img6": 4}


class Page(HTMLParser):
    """What the tests read from a report: body attributes, images, links and the per-image table."""

    def __init__(self, text: str):
        super().__init__()
        self.body: dict = {}
        self.imgs: list[dict] = []
        self.urls: list[str] = []
        self.rows: list[list[str]] = []  # data-v of each per-image row's cells
        self.tags: list[str] = []
        self.headers: list[dict] = []
        self._in_table = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self._in_table = a.get("id") == "per-image"
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag == "td":
            self.rows[-1].append(a.get("data-v"))
        elif self._in_table and tag == "th":
            self.headers.append(a)

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False

    @property
    def data_rows(self) -> list[list[str]]:
        return [r for r in self.rows if r]


def _square(shape, y, x, h, w) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[y : y + h, x : x + w] = 255
    return m


@pytest.fixture(scope="module")
def seg_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    gt, pred = root / "gt", root / "pred"
    for d in (gt / "images", gt / "masks", pred):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = {
        n: (_square((48, 64), 10, 10, 20, 20), _square((48, 64), 10 + s, 10, 20, 20))
        for n, s in SHIFTS.items()
    }
    cases["small"] = (_square((48, 64), 5, 5, 9, 10),) * 2
    for name, (g, p) in cases.items():
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(gt / "images" / f"{name}.png")
        Image.fromarray(g).save(gt / "masks" / f"{name}.png")
        Image.fromarray(p).save(pred / f"{name}.png")
    evaluate_segmentation(pred, gt, root / "out")
    return root / "out" / "report.html"


@pytest.fixture(scope="module")
def cls_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls")
    rows = []
    for c, colour in (("CNV", 40), ("NORMAL", 200)):
        (root / "gt" / c).mkdir(parents=True)
        for k in range(3):
            path = root / "gt" / c / f"{c.lower()}{k}.png"
            Image.fromarray(np.full((32, 32, 3), colour + k, np.uint8)).save(path)
            p_cnv = [0.9, 0.6, 0.2][k] if c == "CNV" else [0.15, 0.3, 0.7][k]  # one wrong per class
            rows.append({"path": str(path), "p_CNV": p_cnv, "p_NORMAL": 1 - p_cnv})
    (root / "pred").mkdir()
    pd.DataFrame(rows).to_csv(root / "pred" / "predictions.csv", index=False)
    evaluate_classification(root / "pred", root / "gt", root / "out")
    return root / "out" / "report.html"


# ------------------------------------------------------------------------------------------ plain Python


def test_report_is_self_contained_and_parses(seg_report):
    text = seg_report.read_text()
    page = Page(text)
    assert page.body.get("data-ready") is None  # only the script sets it
    assert len(page.data_rows) == len(SHIFTS) + 1 and len(page.imgs) == 3  # by size, worst 6, best 3
    assert all(u.startswith("data:image/png;base64,") for u in page.urls) and "link" not in page.tags
    for img in page.imgs:  # each embedded PNG decodes
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    assert "http://" not in text and "https://" not in text
    assert {h["data-col"]: h["data-type"] for h in page.headers}["dice"] == "num"
    for key in (
        "mean_dice",
        "pooled_dice",
        "lesion_f1",
        "mean_hd95_px",
        "mean_surface_dice",
        "lesions by size",
    ):
        assert key in text


def test_hostile_file_name_is_escaped(seg_report):
    text = seg_report.read_text()
    assert HOSTILE not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert HOSTILE in [r[0] for r in Page(text).data_rows]  # the parsed cell reads back as the file name
    hostile = "<script>alert(1)</script>.png"  # not a legal file name, so straight into the writer
    df = pd.DataFrame({"id": [hostile, 'a"b'], "dice": [0.5, float("nan")]})
    out = per_image_html(df)
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in out
    assert Page(out).data_rows == [[hostile, "0.5"], ['a"b', ""]]
    path = write_seg_report(seg_report.parent / "x", {"note": hostile}, df, lambda i: None)
    assert path.read_text().count("<script>") == 1  # the report's own sorter only


def test_classification_report_parses(cls_report):
    page = Page(cls_report.read_text())
    # both confusion matrices and the confidently-wrong gallery; one row per image
    assert len(page.imgs) == 3 and len(page.data_rows) == 6
    assert {h["data-col"] for h in page.headers} >= {"image", "true", "predicted", "confidence", "p_CNV"}
    assert "accuracy" in cls_report.read_text()


# ------------------------------------------------------------------------------------------ real browser


def _browser() -> str | None:
    env = os.environ.get("CHROME")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


def _open(report: Path, fragment: str = "") -> tuple[Page, list[str]]:
    """The DOM after the page's scripts ran in headless Chromium, and the browser's console lines."""
    browser = _browser()
    if browser is None:
        pytest.skip(
            "no headless browser: none of chromium, chromium-browser, google-chrome, chrome; no $CHROME"
        )
    profile = report.parent / f".chrome-profile{os.getpid()}"
    res = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            report.as_uri() + fragment,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    shutil.rmtree(profile, ignore_errors=True)
    assert res.returncode == 0 and "<body" in res.stdout, res.stderr[-2000:]
    return Page(res.stdout), [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln]


def test_browser_loads_segmentation_report(seg_report):
    page, console = _open(seg_report)
    assert console == []  # no console message at all: no error, no uncaught exception
    assert page.body.get("data-ready") == "1"
    assert len(page.data_rows) == len(SHIFTS) + 1 and len(page.imgs) == 3
    assert page.data_rows[0][0] == HOSTILE  # unsorted: evaluation order, by id


@pytest.mark.parametrize(
    "fragment, first",
    [
        ("#sort=dice_asc", "img4"),  # worst Dice first
        ("#sort=dice_desc", "img1"),  # ties (img1, small at 1.0) keep their order
        ("#sort=tp_asc", "small"),  # numeric: 90 < 240 (as text "240.0" < "90.0")
        ("#sort=id_desc", "small"),  # text
    ],
)
def test_browser_sorts_the_per_image_table(seg_report, fragment, first):
    page, console = _open(seg_report, fragment)
    assert console == [] and page.body.get("data-ready") == "1"
    assert page.data_rows[0][0] == first
    col, direction = fragment[len("#sort=") :].rsplit("_", 1)
    (th,) = [h for h in page.headers if h["data-col"] == col]
    assert th.get("aria-sort") == {"asc": "ascending", "desc": "descending"}[direction]
    values = (
        [float(r[[h["data-col"] for h in page.headers].index(col)]) for r in page.data_rows]
        if col != "id"
        else []
    )
    assert values == sorted(values, reverse=direction == "desc")


def test_browser_flags_a_broken_image(seg_report, tmp_path):
    text = seg_report.read_text()
    broken = tmp_path / "report.html"
    broken.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    page, _ = _open(broken)
    assert page.body.get("data-ready") == "broken"


def test_browser_loads_classification_report(cls_report):
    page, console = _open(cls_report, "#sort=confidence_desc")
    assert console == [] and page.body.get("data-ready") == "1"
    assert len(page.imgs) == 3 and len(page.data_rows) == 6
    assert page.data_rows[0][0] == "cnv0.png"  # p = 0.9, the most confident
