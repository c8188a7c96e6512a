"""Benchmark: whole-slide inference (issue 19) on slides stitched from the held-out shared STAS tiles.

    .venv/bin/python benchmarks/slides.py agreement  --run RUN [--mpp 0.5] [--map-factor 4]
    .venv/bin/python benchmarks/slides.py throughput --run RUN --onnx EXPORT [--tiles 16] [--downsample 4]
    .venv/bin/python benchmarks/slides.py memory     --run RUN [--engine torch|onnx --onnx EXPORT]

RUN is a STAS run folder whose split.json holds out 64 test images (e.g. `medstudent train stas_cpu --fold
all --set data.mpp=0.5`); EXPORT its `medstudent export` folder. The STAS tiles carry no um/px; 0.5 is
assumed for them and for the stitched slides alike, so the model reads the slide at the tiles' own scale.

- agreement: the 64 held-out tiles on white with gaps, as one pyramidal TIFF; `predict_slide` vs `predict`
  on each tile (same engine, TTA none, the run's post-processing), compared on the slide's map grid:
  Dice(slide, tile) and Dice against ground truth, next to the tile-level Dice at full resolution; and,
  to tell the pipeline from the model's sensitivity to what surrounds a tile, `predict` on the tile with
  the slide's surroundings (the canvas around it, margin included) vs the slide and vs the tile alone.
- throughput: regions/s of the whole slide pipeline (tissue, reading, network, maps, post-processing,
  polygons, pyramids) vs the bare network on the same prepared regions already in memory, torch and ONNX;
  `--repeats` interleaved pairs, medians reported.
- memory: peak RSS of a fresh process predicting a 40,000 x 40,000 px slide with 12 tissue islands, and the
  same islands on a 20,000 x 20,000 px slide (4x smaller).
Results go to bench_out/slides/<what>.json; figures to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stas"
OUT = ROOT / "bench_out" / "slides"
GAP = 128


def held_out(run: Path):
    from medstudent.data.layouts import open_segmentation

    ds = open_segmentation(DATA)
    index = {i: k for k, i in enumerate(ds.ids())}
    split = json.loads((run / "split.json").read_text())
    return [ds.load(index[t]) for t in split["test"]]


def stitch(tiles: list[np.ndarray], path: Path, mpp: float, cols: int = 8, downsample: int = 4):
    """The tiles on white, `cols` per row with GAP px between, as a pyramid whose levels are `downsample`
    times coarser each; returns their (x, y) positions and the canvas."""
    from medstudent.data.synth.slide import Canvas, Island, write_pyramid_tiff

    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    ph, pw = -(-(h + GAP) // 32) * 32, -(-(w + GAP) // 32) * 32  # pitches on the maps' pixel grid
    rows = -(-len(tiles) // cols)
    canvas = Canvas(cols * pw + GAP, rows * ph + GAP)
    places = []
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        places.append((GAP + c * pw, GAP + r * ph))
        canvas.islands.append(Island(*places[-1], t))
    write_pyramid_tiff(path, canvas, mpp, downsample=downsample)
    return places, canvas


def down(mask: np.ndarray, step: int) -> np.ndarray:
    """A full-resolution mask on the map grid (block majority), as the slide's map pixels cover it."""
    h, w = mask.shape[0] // step * step, mask.shape[1] // step * step
    return mask[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3)) > 0.5


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, {platform.python_version()}"


def load(engine: str, run: Path, onnx: Path | None):
    if engine == "onnx":
        from medstudent.runner import OnnxPipeline

        return OnnxPipeline(onnx, int8=True)
    from medstudent.inference.engine import load_engine

    return load_engine([run], device="cpu", precision="auto")


def agreement(args) -> dict:
    import tifffile

    from medstudent.core.inferer import predict_probs
    from medstudent.core.postprocess import postprocess
    from medstudent.slides.predict import predict_slide

    engine = load(args.engine, args.run, args.onnx)
    items = held_out(args.run)
    OUT.mkdir(parents=True, exist_ok=True)
    slide = OUT / "held_out_64.tif"
    places, canvas = stitch([img for img, _ in items], slide, args.mpp)
    t = time.perf_counter()
    s = predict_slide(
        engine, slide, OUT / "agreement", tta="none", scales=[1.0], out_factor=args.map_factor,
        region=args.region, margin=args.margin,
    )  # fmt: skip
    slide_s = time.perf_counter() - t
    mask = tifffile.imread(OUT / "agreement" / "mask.tif") > 0
    step = round(s["map_mpp"] / args.mpp)
    post = engine.spec.postprocess
    d_tile_slide, d_slide_gt, d_tile_gt, d_tile_gt_map, d_ctx_slide, d_tile_ctx = [], [], [], [], [], []
    d_interior = []  # slide vs tile without a band of --border px along the tile's edges
    b = round(args.border / step)
    inner = (slice(b, -b), slice(b, -b)) if b else (slice(None), slice(None))
    t = time.perf_counter()
    m = args.margin  # the slide's region margin: the context a region gives the network around a tile
    for (img, gt), (x, y) in zip(items, places, strict=True):
        tile = postprocess(predict_probs(engine, img, tta="none", scales=[1.0]), post) > 0
        ref, g = down(tile, step), down(gt > 0, step)
        crop = mask[y // step : y // step + ref.shape[0], x // step : x // step + ref.shape[1]]
        # the tile predicted inside the slide's surroundings (white glass, neighbours' edges), in memory
        h, w = img.shape[:2]
        around = canvas.render(x - m, y - m, w + 2 * m, h + 2 * m)
        ctx = postprocess(predict_probs(engine, around, tta="none", scales=[1.0])[m : m + h, m : m + w], post)
        ctx = down(ctx > 0, step)
        d_tile_slide.append(dice(crop, ref))
        d_interior.append(dice(crop[inner], ref[inner]))
        d_slide_gt.append(dice(crop, g))
        d_tile_gt.append(dice(tile, gt > 0))
        d_tile_gt_map.append(dice(ref, g))
        d_ctx_slide.append(dice(crop, ctx))
        d_tile_ctx.append(dice(ref, ctx))
    tiles_s = time.perf_counter() - t
    return {
        "slide": {k: s[k] for k in ("slide_size", "map_mpp", "regions", "object_count", "seconds")},
        "map_factor": args.map_factor,
        "region": args.region,
        "margin": args.margin,
        "engine": args.engine,
        "mean_dice_slide_vs_tile": float(np.mean(d_tile_slide)),
        "min_dice_slide_vs_tile": float(np.min(d_tile_slide)),
        "border_px": args.border,
        "mean_dice_slide_vs_tile_interior": float(np.mean(d_interior)),
        "mean_dice_slide_vs_tile_in_its_surroundings": float(np.mean(d_ctx_slide)),
        "mean_dice_tile_alone_vs_tile_in_its_surroundings": float(np.mean(d_tile_ctx)),
        "mean_dice_slide_vs_gt_on_map_grid": float(np.mean(d_slide_gt)),
        "mean_dice_tile_vs_gt_on_map_grid": float(np.mean(d_tile_gt_map)),
        "mean_dice_tile_vs_gt_full_resolution": float(np.mean(d_tile_gt)),
        "slide_seconds": slide_s,
        "tiles_seconds": tiles_s,
    }


def throughput(args) -> dict:
    from medstudent.core.inferer import prepare
    from medstudent.data.slide import Slide
    from medstudent.data.tissue import THUMBNAIL_MPP, tissue_mask
    from medstudent.slides.predict import predict_slide
    from medstudent.slides.stream import slide_grid, tissue_regions

    items = held_out(args.run)[: args.tiles]
    OUT.mkdir(parents=True, exist_ok=True)
    slide_path = OUT / f"held_out_{args.tiles}_ds{args.downsample}.tif"
    stitch([img for img, _ in items], slide_path, args.mpp, cols=4, downsample=args.downsample)
    res = {}
    for name in ("torch", "onnx"):
        engine = load(name, args.run, args.onnx)
        # a warm-up slide first: first-call costs (allocations, kernels) are not the pipeline's
        predict_slide(engine, slide_path, OUT / f"warmup_{name}", tta="none", scales=[1.0])
        with Slide(slide_path) as slide:  # the same regions, read and prepared before the clock starts
            grid = slide_grid(engine, slide, None)
            side = grid.region + 2 * grid.margin
            tissue = tissue_mask(slide.thumbnail(THUMBNAIL_MPP), THUMBNAIL_MPP)
            boxes = tissue_regions(grid, tissue, THUMBNAIL_MPP)
            m, mpp = grid.margin, grid.model_mpp
            xs = [prepare(engine, 0, slide.read(x - m, y - m, side, side, mpp))[0] for x, y in boxes]
        pipes, bares = [], []
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
            t = time.perf_counter()
            s = predict_slide(engine, slide_path, OUT / f"throughput_{name}", tta="none", scales=[1.0])
            pipes.append(time.perf_counter() - t)
            t = time.perf_counter()
            for x in xs:
                engine.run(0, x[None])
            bares.append(time.perf_counter() - t)
        pipeline_s, bare_s = float(np.median(pipes)), float(np.median(bares))
        res[name] = {
            "regions": len(xs),
            "pipeline_s": pipeline_s,
            "bare_network_s": bare_s,
            "pipeline_regions_per_s": len(xs) / pipeline_s,
            "bare_regions_per_s": len(xs) / bare_s,
            "ratio": bare_s / pipeline_s,
            "ratios": [b / p for b, p in zip(bares, pipes, strict=True)],
            "summary_read_s": s["read_seconds"],
            "read_mpp": s["read_mpp"],
            "slide_downsample": args.downsample,
            "summary_predict_s": s["predict_seconds"],
            "precision": engine.precision,
        }
        print(name, json.dumps(res[name]), flush=True)
    return res


def memory_child(args) -> None:
    """In a fresh process: predict one slide, print the peak RSS (MB)."""
    from medstudent.slides.predict import predict_slide

    engine = load(args.engine, args.run, args.onnx)
    t = time.perf_counter()
    s = predict_slide(engine, args.slide, args.out, tta="none", scales=[1.0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak, "seconds": time.perf_counter() - t, "regions": s["regions"]}))


def memory(args) -> dict:
    from medstudent.data.synth.slide import Canvas, Island, write_pyramid_tiff

    items = held_out(args.run)[:12]
    OUT.mkdir(parents=True, exist_ok=True)
    res = {}
    for side in (20_000, 40_000):
        path = OUT / f"islands_{side}.tif"
        if not path.is_file():
            canvas = Canvas(side, side)
            for k, (img, _) in enumerate(items):  # a 4 x 3 grid of islands spread over the slide
                r, c = divmod(k, 4)
                x = int((c + 0.5) * side / 4 - img.shape[1] / 2)
                y = int((r + 0.5) * side / 3 - img.shape[0] / 2)
                canvas.islands.append(Island(x, y, img))
            t = time.perf_counter()
            write_pyramid_tiff(path, canvas, args.mpp)
            mb = path.stat().st_size / 1e6
            print(f"wrote {path.name} ({mb:.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
        cmd = [sys.executable, __file__, "memory-child", "--run", str(args.run), "--engine", args.engine]
        cmd += ["--slide", str(path), "--out", str(OUT / f"memory_{side}")]
        cmd += ["--onnx", str(args.onnx)] if args.onnx else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[f"{side}x{side}"] = json.loads(out)
        print(side, res[f"{side}x{side}"], flush=True)
    a, b = res["20000x20000"]["peak_rss_mb"], res["40000x40000"]["peak_rss_mb"]
    res["growth_40k_vs_20k"] = b / a - 1
    res["engine"] = args.engine
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["agreement", "throughput", "memory", "memory-child"])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--engine", default="torch", choices=["torch", "onnx"])
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--map-factor", type=int, default=4)
    ap.add_argument("--region", type=int, default=2048)
    ap.add_argument("--margin", type=int, default=256)
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument(
        "--downsample", type=int, default=4, help="pyramid step of the slide (2: a level at 1 um/px)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--border", type=int, default=128, help="agreement: px left out")
    ap.add_argument("--slide", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    if args.what == "memory-child":
        return memory_child(args)
    result = {"agreement": agreement, "throughput": throughput, "memory": memory}[args.what](args)
    result.update({"date": str(date.today()), "machine": machine(), "command": " ".join(sys.argv)})
    OUT.mkdir(parents=True, exist_ok=True)
    name = args.what
    if args.what == "agreement":
        name = f"agreement_{args.engine}_f{args.map_factor}_r{args.region}_m{args.margin}"
    if args.what == "throughput":
        name = f"throughput_ds{args.downsample}"
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
