"""Benchmark (issue 7): torch eager vs ONNX Runtime on full-size STAS images with the stas_cpu model.

Exports the trained `bench_out/stas_cpu/stas_cpu/fold_0` run (fp32, and int8: static quantisation of the
decoder, calibrated on 16 of the run's training images), then, on 20
of its 64 held-out test images at full size (1716x942), measures seconds per image of every variant without
TTA and with flip TTA (--repeat R: R times each), in one process, interleaved image by image (the variant
order rotates) so that load
from other processes hits all variants alike. Time = preprocessing + network (+ TTA) + resizing back to full
size, i.e. the probability map `predict` thresholds; image decoding and post-processing (identical for all
variants) are left out, post-processing time is reported on its own. Each timed call starts after
--gap idle seconds: torch's OpenMP workers and ONNX Runtime's pool keep spinning for a while after a call,
and in an interleaved run that spinning lands on the next variant's time (it made ONNX Runtime's network
pass 0.31 s instead of its 0.24 s alone, session 4); a deployment runs one engine, so no variant should pay
for another's. Dice: mean over images, with the run's
tuned post-processing (what `predict` writes) and with a plain 0.5 threshold, against the ground truth.
Also a network-only timing at the model's input size (480x864). Writes bench_out/onnx_speed.json.

    .venv/bin/python benchmarks/onnx_speed.py [--images 20] [--repeat 1] [--gap 0.5] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stas"
RUN = ROOT / "bench_out" / "stas_cpu" / "stas_cpu" / "fold_0"
TTAS = ("none", "flip")
INT8 = "ONNX Runtime int8 (static, decoder)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=RUN)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="time every image this many times (interleaved)")
    ap.add_argument("--gap", type=float, default=0.5, help="idle seconds before each timed call")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "onnx_speed.json")
    ap.add_argument("--export-dir", type=Path, default=ROOT / "bench_out" / "onnx_export" / "stas_cpu")
    args = ap.parse_args()
    from medstudent.rundir import RunDir

    if not RunDir(args.run).best_ckpt.is_file():
        print(f"no trained stas_cpu run at {args.run}: run benchmarks/stas_cpu.py first")
        return 1
    warnings.filterwarnings("ignore")
    import torch

    from medstudent.core.postprocess import postprocess
    from medstudent.data.layouts import open_segmentation
    from medstudent.evaluation.scoring import seg_row
    from medstudent.inference.export import export_runs
    from medstudent.inference.predict import load_predictor, predict_seg_probs
    from medstudent.runner import OnnxPipeline
    from medstudent.runner.onnx_runner import usable_cores

    cores = usable_cores()
    torch.set_num_threads(cores)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    # static int8 calibrated on 16 of the run's own training images (never the test images)
    split = json.loads(RunDir(args.run).split.read_text())
    calib = args.export_dir.parent / f"{args.export_dir.name}_calibration"
    shutil.rmtree(calib, ignore_errors=True)
    calib.mkdir(parents=True)
    for rel in split["folds"][0]["train"][:16]:
        src = next(args.data.glob(f"{rel}.*"))
        (calib / src.name).symlink_to(src.resolve())
    spec = export_runs([args.run], args.export_dir, tta="flip", int8="static", calibrate=calib)
    export_s = time.perf_counter() - t0
    pred = load_predictor(args.run)
    pred_cl = dataclasses.replace(pred, model=copy.deepcopy(pred.model).to(memory_format=torch.channels_last))
    fp32 = OnnxPipeline(args.export_dir, threads=cores)
    int8 = OnnxPipeline(args.export_dir, threads=cores, int8=True)
    fp32_seq = OnnxPipeline(args.export_dir, threads=cores, parallel_passes=False)
    int8_seq = OnnxPipeline(args.export_dir, threads=cores, int8=True, parallel_passes=False)

    variants: dict[str, Callable[[np.ndarray, str], np.ndarray]] = {
        "torch eager fp32": lambda img, tta: predict_seg_probs(pred, img, tta, "32"),
        "torch eager fp32, channels-last": lambda img, tta: predict_seg_probs(pred_cl, img, tta, "32"),
        "torch bf16 autocast, channels-last": lambda img, tta: predict_seg_probs(pred_cl, img, tta, "bf16"),
        "ONNX Runtime fp32": lambda img, tta: fp32.predict_probs(img, tta=tta),
        INT8: lambda img, tta: int8.predict_probs(img, tta=tta),
        # the runner's default runs the TTA passes side by side, one core each; these run them one by one
        "ONNX Runtime fp32, passes one by one": lambda img, tta: fp32_seq.predict_probs(img, tta=tta),
        INT8 + ", passes one by one": lambda img, tta: int8_seq.predict_probs(img, tta=tta),
    }
    names = list(variants)
    ds = open_segmentation(args.data)
    index = {i: k for k, i in enumerate(ds.ids())}
    test_ids = split["test"][: args.images]
    post = pred.postprocess

    # warm-up (first runs allocate buffers and create oneDNN primitives), on the first image
    img0, _ = ds.load(index[test_ids[0]])
    for fn in variants.values():
        for tta in TTAS:
            fn(img0, tta)

    secs = {(n, t): [] for n in names for t in TTAS}
    dice = {(n, t): [] for n in names for t in TTAS}  # per image, post-processed
    dice_thr = {(n, t): [] for n in names for t in TTAS}  # per image, threshold 0.5
    max_diff = {(n, t): 0.0 for n in names for t in TTAS}
    mask_px = {(n, t): 0 for n in names for t in TTAS}
    post_s: list[float] = []
    for i, tid in enumerate(test_ids):
        img, gt = ds.load(index[tid])
        gt = gt > 0
        order = names[i % len(names) :] + names[: i % len(names)]
        out: dict[tuple[str, str], np.ndarray] = {}
        for _ in range(args.repeat):
            for n in order:
                for tta in TTAS:
                    time.sleep(args.gap)  # let the previous engine's spinning worker threads go idle
                    t = time.perf_counter()
                    out[(n, tta)] = variants[n](img, tta)
                    secs[(n, tta)].append(time.perf_counter() - t)
        masks = {}
        for (n, tta), p in out.items():
            t = time.perf_counter()
            masks[(n, tta)] = postprocess(p, post)
            post_s.append(time.perf_counter() - t)
            dice[(n, tta)].append(seg_row(tid, gt, mask=masks[(n, tta)])[0]["dice"])
            dice_thr[(n, tta)].append(seg_row(tid, gt, prob=p)[0]["dice"])  # no post: threshold 0.5
        for tta in TTAS:
            ref = out[("torch eager fp32", tta)]
            for n in names:
                max_diff[(n, tta)] = max(max_diff[(n, tta)], float(np.abs(out[(n, tta)] - ref).max()))
                mask_px[(n, tta)] += int((masks[(n, tta)] != masks[("torch eager fp32", tta)]).sum())
        print(f"{i + 1}/{len(test_ids)} {tid}", flush=True)

    rows = []
    for n in names:
        for tta in TTAS:
            s = np.asarray(secs[(n, tta)])
            base = np.asarray(secs[("torch eager fp32", tta)])
            rows.append(
                {
                    "variant": n,
                    "tta": tta,
                    "s_per_image_mean": float(s.mean()),
                    "s_per_image_median": float(np.median(s)),
                    "speedup_vs_torch_fp32": float(base.mean() / s.mean()),
                    "speedup_vs_torch_fp32_median_of_ratios": float(np.median(base / s)),
                    "mean_dice_postprocessed": float(np.mean(dice[(n, tta)])),
                    "mean_dice_threshold_0.5": float(np.mean(dice_thr[(n, tta)])),
                    "max_abs_prob_diff_vs_torch_fp32": max_diff[(n, tta)],
                    "mask_pixels_differing_vs_torch_fp32": mask_px[(n, tta)],
                }
            )
    by = {(r["variant"], r["tta"]): r for r in rows}
    for r in rows:
        r["dice_diff_vs_torch_fp32"] = (
            r["mean_dice_postprocessed"] - by[("torch eager fp32", r["tta"])]["mean_dice_postprocessed"]
        )

    # network only, at the model's input size for these images (858x471 padded to 864x480)
    x = np.random.default_rng(0).standard_normal((1, 3, 480, 864)).astype(np.float32)
    xt = torch.from_numpy(x)

    def torch_net(model: torch.nn.Module, bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(xt)

        return run

    nets = {
        "torch eager fp32": torch_net(pred.model, False),
        "torch eager fp32, channels-last": torch_net(pred_cl.model, False),
        "torch bf16 autocast, channels-last": torch_net(pred_cl.model, True),
        "ONNX Runtime fp32": lambda: fp32.members[0].run(x),
        INT8: lambda: int8.members[0].run(x),
        "ONNX Runtime fp32, one thread": lambda: fp32.members[0].run_solo(x),
        INT8 + ", one thread": lambda: int8.members[0].run_solo(x),
    }
    net_s: dict[str, list[float]] = {n: [] for n in nets}
    for _ in range(7):
        for n, f in nets.items():
            time.sleep(args.gap)
            t = time.perf_counter()
            f()
            net_s[n].append(time.perf_counter() - t)
    net = {n: float(np.median(v)) for n, v in net_s.items()}

    onnx32 = [by[("ONNX Runtime fp32", t)] for t in TTAS]
    q8 = [by[(INT8, t)] for t in TTAS]
    int8_dice_ok = all(
        abs(a["mean_dice_postprocessed"] - b["mean_dice_postprocessed"]) <= 0.005
        for a, b in zip(q8, onnx32, strict=True)
    )
    int8_faster = all(a["s_per_image_mean"] < b["s_per_image_mean"] for a, b in zip(q8, onnx32, strict=True))
    res = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {cores} usable cores ({os.cpu_count()} reported)",
        "caveat": "the CPU is shared with other processes; ratios are more reliable than absolute times",
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "data": f"{args.data}: {len(test_ids)} held-out test images of {args.run / 'split.json'}, full size",
        "repeat": args.repeat,
        "gap_s": args.gap,
        "run": str(args.run),
        "images": test_ids,
        "export_seconds": export_s,
        "export_max_abs_diff": spec["members"][0]["export_max_abs_diff"],
        "versions": spec["versions"],
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": cores},
        "postprocess": post.model_dump(),
        "postprocess_s_per_image": float(np.mean(post_s)),
        "results": rows,
        "network_only_s_480x864": net,
        "network_only_speedup_onnx_fp32_vs_torch_fp32": net["torch eager fp32"] / net["ONNX Runtime fp32"],
        "target_onnx_speedup_2_5x_met": {
            t: by[("ONNX Runtime fp32", t)]["speedup_vs_torch_fp32"] >= 2.5 for t in TTAS
        },
        "target_same_dice_0_001_met": {
            t: abs(by[("ONNX Runtime fp32", t)]["dice_diff_vs_torch_fp32"]) <= 0.001 for t in TTAS
        },
        "target_met_by_int8_static": {
            t: by[(INT8, t)]["speedup_vs_torch_fp32"] >= 2.5
            and abs(by[(INT8, t)]["dice_diff_vs_torch_fp32"]) <= 0.001
            for t in TTAS
        },
        "int8": {
            "method": spec["int8"]["method"],
            "dice_within_0_005_of_fp32": int8_dice_ok,
            "faster_than_fp32": int8_faster,
            "kept": int8_dice_ok and int8_faster,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(
        f"{'variant':38s} {'tta':5s} {'s/img':>7s} {'x fp32':>7s} {'Dice':>7s} {'dDice':>8s} {'max|dp|':>9s}"
    )
    for r in rows:
        print(
            f"{r['variant']:38s} {r['tta']:5s} {r['s_per_image_mean']:7.3f} "
            f"{r['speedup_vs_torch_fp32']:7.2f} "
            f"{r['mean_dice_postprocessed']:7.4f} {r['dice_diff_vs_torch_fp32']:+8.4f} "
            f"{r['max_abs_prob_diff_vs_torch_fp32']:9.2e}"
        )
    print("network only (s):", json.dumps(net))
    print("int8:", res["int8"], f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
