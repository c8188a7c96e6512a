"""`medstudent predict-slide` and `medstudent data from-slides`: whole slides in and QuPath GeoJSON out,
and QuPath annotations back in as a training data set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medstudent.cli.common import (
    SkipBad,
    _load_engine,
    _progress,
    app,
    console,
    data_app,
    one_line_errors,
    parse_scales,
    plain,
)
from medstudent.data.from_slides import extract_tiles
from medstudent.data.slide import list_slides
from medstudent.distributed import launch_local, rank_world
from medstudent.errors import DataError
from medstudent.slides.cohort import predict_cohort
from medstudent.slides.stream import MARGIN, OUT_FACTOR, REGION


@app.command("predict-slide")
@one_line_errors
def predict_slide_cmd(
    model: Annotated[
        list[Path], typer.Argument(help="run folders / run roots (torch) or one exported folder (onnx)")
    ],
    slides: Annotated[list[Path], typer.Option("-s", "--slides", help="slide files or folders of slides")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder (one subfolder per slide)")],
    mpp: Annotated[
        float | None, typer.Option(help="um/px of slides whose metadata has none (ignored otherwise)")
    ] = None,
    model_mpp: Annotated[
        float | None, typer.Option(help="um/px the model was trained at, when its run has no data.mpp")
    ] = None,
    tta: Annotated[
        str, typer.Option(help="none | flip | d4 (default none: one pass per region, not the run's TTA)")
    ] = "none",
    tta_scales: Annotated[
        str | None, typer.Option(help="multi-scale TTA factors, e.g. 1,1.25 (default: 1)")
    ] = None,
    tile: Annotated[int | None, typer.Option(help="sliding-window size inside each region")] = None,
    region: Annotated[int, typer.Option(help="region side at the model's um/px (pixels)")] = REGION,
    margin: Annotated[int, typer.Option(help="context around each region (pixels), cut off")] = MARGIN,
    map_factor: Annotated[
        int, typer.Option(help="maps at 1/N of the network's resolution (1: full, larger outputs)")
    ] = OUT_FACTOR,
    tissue: Annotated[bool, typer.Option(help="predict only where tissue is detected")] = True,
    postprocess: Annotated[bool, typer.Option(help="apply the run's post-processing (in um)")] = True,
    engine: Annotated[str, typer.Option(help="torch or onnx")] = "torch",
    precision: Annotated[str, typer.Option(help="torch engine: 32, bf16 or auto")] = "32",
    device: Annotated[str, typer.Option(help="torch engine: auto, cpu, cuda, cuda:N")] = "auto",
    int8: Annotated[bool | None, typer.Option("--int8/--fp32", help="onnx engine: int8 or float32")] = None,
    devices: Annotated[int, typer.Option(help="processes sharing the slides (each takes every n-th)")] = 1,
) -> None:
    """Predict whole slides: probability and mask pyramids, QuPath GeoJSON objects, summary per slide,
    and a cohort index.html. A rerun skips finished slides; a bad slide is listed in skipped.txt."""
    if devices > 1 and rank_world()[1] == 1:
        raise typer.Exit(launch_local(devices))
    files = list_slides(slides)
    engine_obj = _load_engine(engine, model, precision=precision, device=device, int8=int8)
    layers = engine_obj.spec.whole_input_layers()
    if layers:
        console.print(
            f"[yellow]note:[/] the model has {', '.join(layers)}: each prediction depends on the whole "
            "region around it (glass included), so slide and tile predictions differ; a model without "
            "them (e.g. model.arch=unet over a Lite encoder) predicts regions independently",
            highlight=False,
        )
    with _progress() as bar:
        task = bar.add_task("slides", total=None)

        def on_slide(i: int, n: int, stem: str) -> None:
            bar.update(task, completed=0, total=None, description=f"slide {i + 1}/{n} {plain(stem)}: tissue")

        def on_region(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = predict_cohort(
            engine_obj,
            files,
            out,
            on_slide=on_slide,
            on_region=on_region,
            slide_mpp=mpp,
            model_mpp=model_mpp,
            tta=tta,
            tile=tile,
            scales=parse_scales(tta_scales) or [1.0],
            postprocess=postprocess,
            tissue=tissue,
            region=region,
            margin=margin,
            out_factor=map_factor,
        )
    console.print(
        f"{summary['predicted']} slide(s) predicted, {summary['already_done']} already done, "
        f"{len(summary['skipped'])} skipped -> {plain(out)}/index.html",
        highlight=False,
    )
    for s in summary["skipped"]:
        console.print(f"[yellow]skipped:[/] {plain(s)}", highlight=False)


@data_app.command("from-slides")
@one_line_errors
def from_slides_cmd(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="SLIDES... ANNOTATIONS: slide files or folders, then the QuPath GeoJSON "
            "(a folder of <slide>.geojson, or one file for one slide)"
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="data set folder to write (images/ + masks/)")],
    mpp: Annotated[float, typer.Option(help="um/px of the tiles (the model's data.mpp)")],
    tile: Annotated[int, typer.Option(help="tile side in pixels at --mpp")] = 512,
    label_map: Annotated[
        str | None, typer.Option(help="QuPath class -> id as JSON, e.g. '{\"STAS\": 1}' (default: all 1)")
    ] = None,
    negatives: Annotated[float, typer.Option(help="unannotated tissue tiles per annotated tile")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed for choosing the unannotated tiles")] = 0,
    slide_mpp: Annotated[float | None, typer.Option(help="um/px of slides whose metadata has none")] = None,
    skip_bad: SkipBad = False,
) -> None:
    """Cut training tiles from slides around their QuPath annotations (and from unannotated tissue) into
    the images/ + masks/ layout that `data check` and `train` read."""
    if len(paths) < 2:
        raise DataError(None, "give the slides, then the annotations (a folder of <slide>.geojson or a file)")
    slides, annotations = paths[:-1], paths[-1]
    mapping = None
    if label_map:
        try:
            mapping = json.loads(label_map)
        except json.JSONDecodeError as e:
            raise DataError(None, f"--label-map is not JSON ({e.msg})") from None
        if not isinstance(mapping, dict):
            raise DataError(None, '--label-map must be a JSON object like {"STAS": 1}')
    summary = extract_tiles(
        list_slides(slides), annotations, out, mpp, tile, label_map=mapping, negatives=negatives, seed=seed,
        slide_mpp=slide_mpp, skip_bad=skip_bad,
    )  # fmt: skip
    console.print(
        f"{summary['tiles']} tiles ({summary['positive_tiles']} annotated, {summary['negative_tiles']} "
        f"unannotated tissue) from {summary['slides']} slide(s) -> {plain(out)}",
        highlight=False,
    )
    for s in summary["skipped"]:
        console.print(f"[yellow]skipped:[/] {plain(s)}", highlight=False)
