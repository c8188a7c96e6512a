"""The `make demo` path end to end, in its small form (the full demo is what `make demo` runs)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from rich.console import Console

from medstudent.demo import run_demo


@pytest.mark.slow
def test_small_stas_demo_writes_every_artefact(tmp_path):
    text = io.StringIO()
    summary = run_demo("stas", tmp_path, small=True, console=Console(file=text, width=200))
    results = summary["results"]
    assert set(results) == {
        "model, no TTA, no post-processing",
        "model + flip TTA + tuned post-processing",
        "baseline: all-empty masks",
        "baseline: all-foreground masks",
    }
    assert all(0.0 <= r["mean_dice"] <= 1.0 for r in results.values())
    assert "STAS demo: mean Dice on" in text.getvalue() and "HTML report" in text.getvalue()
    assert json.loads((tmp_path / "demo_summary.json").read_text())["train"]["epochs"] >= 1
    images = sorted((tmp_path / "test_images").glob("*.jpg"))
    assert images
    page = (tmp_path / "index.html").read_text()
    for img in images:
        mask = Image.open(tmp_path / "pred" / "masks" / f"{img.stem}.png")
        assert mask.size == Image.open(img).size  # original size, competition format
        assert set(mask.getdata()) <= {0, 255}
        assert (tmp_path / "pred" / "labelme" / f"{img.stem}.json").is_file()
        assert f"html/{img.stem}_pred.png" in page and (tmp_path / "html" / f"{img.stem}_pred.png").is_file()
