"""`medstudent predict`, `export`, `evaluate` and `tune-postprocess`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medstudent.cli.common import (
    TtaScalesOption,
    _kv_table,
    _load_engine,
    _progress,
    _report_prediction,
    _scales_text,
    app,
    console,
    one_line_errors,
    parse_scales,
)
from medstudent.core.workflow import predict_images
from medstudent.distributed import launch_local, rank_world
from medstudent.errors import DataError


@app.command("predict")
@one_line_errors
def predict_cmd(
    runs: Annotated[
        list[Path],
        typer.Argument(help="run folders, checkpoints, run roots (all folds); onnx: one exported folder"),
    ],
    images: Annotated[Path, typer.Option("-i", "--images", help="an image, a folder, or a data set root")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")],
    tta: Annotated[str | None, typer.Option(help="none | flip | d4 (default: the run's predict.tta)")] = None,
    tta_scales: TtaScalesOption = None,
    ensemble: Annotated[str | None, typer.Option(help="mean | vote (several models)")] = None,
    probs: Annotated[bool, typer.Option("--probs", help="also write probability maps")] = False,
    labelme: Annotated[bool, typer.Option("--labelme", help="also write labelme JSON polygons")] = False,
    overlays: Annotated[bool, typer.Option(help="write overlay PNGs")] = True,
    postprocess: Annotated[bool, typer.Option(help="apply the run's (tuned) post-processing")] = True,
    tile: Annotated[
        int | None, typer.Option(help="force sliding-window inference with this tile size")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(help="torch engine: 32, bf16, or auto (bf16 where the CPU/GPU computes it natively)"),
    ] = "32",
    device: Annotated[
        str, typer.Option(help="torch engine: auto (a GPU when there is one), cpu, cuda, cuda:N")
    ] = "auto",
    engine: Annotated[
        str, typer.Option(help="torch (run folders) or onnx (a `medstudent export` folder, no torch)")
    ] = "torch",
    budget_seconds: Annotated[
        float | None,
        typer.Option(
            "--budget-seconds",
            help="seconds per image: measure, then pick the TTA passes, scales and models that fit "
            "(default: the run's predict.budget_seconds; 0: none, the full TTA)",
        ),
    ] = None,
    devices: Annotated[
        int, typer.Option(help="processes that share the images (under torchrun/srun: the launcher's ranks)")
    ] = 1,
    int8: Annotated[
        bool | None,
        typer.Option("--int8/--fp32", help="onnx engine: int8 or float32 graphs (default: pipeline.json)"),
    ] = None,
) -> None:
    """Predict masks (segmentation) or class probabilities (classification) for a folder of images."""

    if devices > 1 and rank_world()[1] == 1:  # start the ranks; each predicts every devices-th image
        raise typer.Exit(launch_local(devices))
    if budget_seconds is not None and not budget_seconds >= 0:
        raise DataError(None, f"--budget-seconds must be >= 0 (0: no budget), got {budget_seconds}")
    engine_obj = _load_engine(engine, runs, precision=precision, device=device, int8=int8)

    with _progress() as bar:
        task = bar.add_task("predicting", total=None)

        def on_image(n: int, total: int, path: Path) -> None:
            bar.update(task, completed=n, total=total, description=f"predicting {path.name}")

        summary = predict_images(
            engine_obj,
            images,
            out,
            tta=tta,
            tta_scales=parse_scales(tta_scales),
            ensemble=ensemble,
            budget_seconds=budget_seconds,
            tile=tile,
            postprocess=postprocess,
            save_probs=probs,
            save_labelme=labelme,
            save_overlays=overlays,
            on_image=on_image,
        )
        bar.update(task, completed=summary["images"], total=summary["images"], description="predicted")
    _report_prediction(summary, len(summary["members"]), out)


@app.command("export")
@one_line_errors
def export_cmd(
    runs: Annotated[list[Path], typer.Argument(help="run folders, checkpoints, or run roots (all folds)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for the ONNX graphs and pipeline.json")],
    tta: Annotated[str | None, typer.Option(help="none | flip | d4 (default: the run's predict.tta)")] = None,
    tta_scales: TtaScalesOption = None,
    ensemble: Annotated[str | None, typer.Option(help="mean | vote (default: the run's)")] = None,
    weights: Annotated[
        str | None, typer.Option(help="ensemble weights, comma-separated, one per model (default: equal)")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17)")] = 17,
    int8: Annotated[
        str,
        typer.Option(
            "--int8",
            help="also write int8 graphs: dynamic, or static (calibrated; segmentation: decoder convs only); "
            "recorded but off until checked",
        ),
    ] = "none",
    calibrate: Annotated[
        Path | None, typer.Option(help="folder of images to calibrate --int8 static on (first 16)")
    ] = None,
) -> None:
    """Export runs to ONNX (dynamic height/width) plus pipeline.json, for `predict --engine onnx`."""
    from medstudent.inference.export import export_runs, parse_weights  # deferred: imports torch, onnx

    spec = export_runs(
        runs,
        out,
        tta=tta,
        tta_scales=parse_scales(tta_scales),
        ensemble=ensemble,
        weights=parse_weights(weights),
        opset=opset,
        int8=int8,
        calibrate=calibrate,
        progress=lambda m: console.print(m, highlight=False, soft_wrap=True),
    )
    console.print(
        f"{len(spec['members'])} model(s), {spec['task']}, TTA {spec['tta']}"
        f"{_scales_text(spec['tta_scales'])}, ensemble {spec['ensemble']['mode']} -> {out / 'pipeline.json'}"
    )


@app.command("evaluate")
@one_line_errors
def evaluate_cmd(
    pred: Annotated[Path, typer.Argument(help="predicted masks folder, or predictions.csv (classification)")],
    gt: Annotated[
        Path, typer.Argument(help="ground truth: data set root, labelme folder, mask folder, classes")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="report folder")],
    iou: Annotated[float, typer.Option(help="segmentation: IoU at which a lesion counts as found")] = 0.5,
    tolerance: Annotated[float, typer.Option(help="segmentation: surface Dice tolerance in pixels")] = 2.0,
    mpp: Annotated[
        float | None, typer.Option(help="micrometres per pixel: lesion size bins also in um^2")
    ] = None,
) -> None:
    """Score predictions: Dice/IoU/precision/recall per image, lesions found by size, boundary distances;
    or accuracy/F1/AUC/sensitivity/specificity."""
    from medstudent.evaluation.evaluate import (  # deferred: imports matplotlib, scikit-learn
        evaluate_classification,
        evaluate_segmentation,
        per_class_table,
    )

    is_cls = pred.suffix == ".csv" or (pred / "predictions.csv").is_file()
    if is_cls:
        m = evaluate_classification(pred, gt, out)
        console.print(
            _kv_table(
                "classification",
                {
                    "images": m["n"],
                    "accuracy": f"{m['accuracy']:.4f} (95% CI {m['accuracy_ci95'][0]:.3f}-"
                    f"{m['accuracy_ci95'][1]:.3f})",
                    "macro F1": f"{m['macro_f1']:.4f}",
                    "AUC (macro, OvR)": f"{m['auc_macro']:.4f}",
                },
            )
        )
        console.print(per_class_table(m))
    else:
        s = evaluate_segmentation(pred, gt, out, iou=iou, tolerance_px=tolerance, mpp=mpp)
        lo, hi = s["mean_dice_ci95"]
        flo, fhi = s["lesion_f1_ci95"]
        console.print(
            _kv_table(
                "segmentation",
                {
                    "images": s["images"],
                    "mean Dice": f"{s['mean_dice']:.4f} (95% CI {lo:.3f}-{hi:.3f})",
                    "pooled Dice": f"{s['pooled_dice']:.4f}",
                    "mean IoU": f"{s['mean_iou']:.4f}",
                    "precision / recall": f"{s['mean_precision']:.3f} / {s['mean_recall']:.3f}",
                    f"lesions (IoU >= {iou:g}) TP / FP / FN": f"{s['lesions_tp']} / {s['lesions_fp']} / "
                    f"{s['lesions_fn']}, F1 {s['lesion_f1']:.3f} (95% CI {flo:.3f}-{fhi:.3f})",
                    "HD95 / surface Dice": f"{s['mean_hd95_px']:.1f} px / {s['mean_surface_dice']:.3f} "
                    f"(tolerance {tolerance:g} px)",
                },
            )
        )
    console.print(f"report -> {out}")


@app.command("tune-postprocess")
@one_line_errors
def tune_postprocess_cmd(
    run: Annotated[Path, typer.Argument(help="a segmentation run folder (runs/<name>/fold_<k>)")],
    tta: Annotated[str | None, typer.Option(help="TTA for the validation maps (default: the run's)")] = None,
) -> None:
    """Grid-search post-processing on the run's validation predictions; writes <run>/postprocess.json."""
    from medstudent.evaluation.postprocess_tuning import tune_run  # deferred: imports torch

    res = tune_run(run, tta=tta, progress=lambda msg: console.print(msg, highlight=False))
    console.print(
        _kv_table(
            "post-processing",
            {
                "validation images": res["images"],
                "mean Dice, plain 0.5 threshold": f"{res['dice_plain']:.4f}",
                "mean Dice, configured post-processing": f"{res['dice_configured']:.4f}",
                "mean Dice, best of the grid": f"{res['dice_tuned']:.4f}",
                "mean Dice, search scored leave-one-image-out": f"{res['dice_held_out']:.4f}",
                "tuned setting adopted": "yes" if res["adopted"] else "no: it did not win held out",
                "setting": res["best"],
                "written": res["path"],
            },
        )
    )
