"""Command line: a thin typer layer over the Python API. Bad input prints one line and exits 1."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medstudent.config import load_config, valid_tta_scales
from medstudent.core.budget import BudgetPlan
from medstudent.core.workflow import predict_images
from medstudent.data.check import check_dataset
from medstudent.data.monai_export import export_monai
from medstudent.data.nnunet import export_nnunet
from medstudent.data.stats import write_stats
from medstudent.data.synth import synth_oct, synth_stas
from medstudent.distributed import launch_local, rank_world
from medstudent.errors import DataError
from medstudent.rundir import RunDir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="medstudent: 2D medical-image segmentation, classification and Noisy Student.",
)
data_app = typer.Typer(no_args_is_help=True, help="Check, describe and split data sets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)


def plain(text: object) -> str:
    """User-supplied text (file names, labels) as rich shows it literally: markup escaped, so '[/]' cannot
    raise MarkupError and '[b]' does not vanish; lone surrogates (undecodable file names) as backslash escapes
    so a UTF-8 terminal can print them."""
    return escape(str(text).encode("utf-8", "backslashreplace").decode("utf-8"))


def one_line_errors(fn):
    """Turn DataError (bad input) into `error: <file>: <reason>` and exit status 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataError as e:
            err_console.print(f"[bold red]error:[/] {plain(e)}", highlight=False, soft_wrap=True, emoji=False)
            raise typer.Exit(1) from None

    return wrapper


EmptyIfMissing = Annotated[bool, typer.Option(help="an image without annotation is an empty mask")]
SkipBad = Annotated[bool, typer.Option(help="list unreadable files as skipped instead of failing")]


def _kv_table(title: str, mapping: dict) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    for k, v in mapping.items():
        t.add_row(str(k), str(v))
    return t


# ----------------------------------------------------------------------------------------------------- data
@data_app.command("check")
@one_line_errors
def data_check(
    root: Annotated[
        Path, typer.Argument(help="data set folder (labelme, masks, classification or unlabeled)")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    skip_bad: SkipBad = False,
    empty_if_missing: EmptyIfMissing = False,
) -> None:
    """Read every file and report counts, sizes, modes, classes, empty masks, orphans, duplicates."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = check_dataset(root, skip_bad=skip_bad, empty_if_missing=empty_if_missing)
    if json_out:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        console.print(_kv_table(plain(f"{rep.root} ({rep.layout})"), rep.counts))
        console.print(_kv_table("image sizes (WxH)", rep.sizes))
        console.print(_kv_table("image modes", rep.modes))
        classes = {plain(k): v for k, v in rep.classes.items()}  # labels are user text
        console.print(
            _kv_table("classes" if rep.layout == "classification" else "objects per label", classes)
        )
        problems = {
            "empty masks": len(rep.empty_masks),
            "images without annotation": len(rep.images_without_annotation),
            "annotations without image": len(rep.annotations_without_image),
            "duplicate groups": len(rep.duplicates),
            "out-of-bounds shapes": len(rep.out_of_bounds),
            "warnings": len(rep.warnings),
            "skipped files": len(rep.skipped),
            "errors": len(rep.errors),
        }
        console.print(_kv_table("findings", problems))
        for title, lines in (
            ("duplicates", [" = ".join(d) for d in rep.duplicates]),
            ("out of bounds (clipped)", rep.out_of_bounds),
            ("warnings", rep.warnings),
            ("skipped", rep.skipped),
            ("errors", rep.errors),
        ):
            for line in lines[:20]:
                console.print(
                    f"[yellow]{title}:[/] {plain(line)}", highlight=False, soft_wrap=True, emoji=False
                )
            if len(lines) > 20:
                console.print(f"[yellow]{title}:[/] ... and {len(lines) - 20} more (see --json)")
        console.print("[green]OK[/]" if rep.ok else f"[red]{len(rep.errors)} error(s)[/]")
    if not rep.ok:
        raise typer.Exit(1)


@data_app.command("stats")
@one_line_errors
def data_stats(
    root: Annotated[Path, typer.Argument(help="segmentation data set folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder for CSVs and plots")],
    skip_bad: Annotated[bool, typer.Option(help="skip unreadable files and list them")] = False,
    empty_if_missing: EmptyIfMissing = False,
) -> None:
    """Per-image and per-object lesion statistics (CSV) with objects-per-image and object-area plots."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = write_stats(root, out, skip_bad=skip_bad, empty_if_missing=empty_if_missing)
    skipped = summary.pop("skipped")
    console.print(_kv_table(plain(f"lesion statistics -> {out}"), summary))
    for s in skipped:
        console.print(f"[yellow]skipped:[/] {plain(s)}", highlight=False, soft_wrap=True, emoji=False)


@data_app.command("split")
@one_line_errors
def data_split(
    root: Annotated[Path, typer.Argument(help="data set folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="split JSON to write")] = Path("split.json"),
    folds: Annotated[int, typer.Option("--folds", "-k", help="number of cross-validation folds")] = 5,
    test_fraction: Annotated[
        float, typer.Option("--test", help="test set: fraction (<1) or count (>=1)")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    bins: Annotated[int, typer.Option(help="segmentation: lesion-area-fraction bins")] = 7,
    group_regex: Annotated[
        str | None,
        typer.Option(
            help="classification: regex, first group = patient id (default: Kermany CLASS-PATIENT-N)"
        ),
    ] = None,
    from_folders: Annotated[
        bool, typer.Option(help="classification: use the train/val/test folders as given")
    ] = False,
    from_nnunet: Annotated[
        Path | None,
        typer.Option(help="nnU-Net folder: convert this splits_final.json (its folds, imagesTs = test)"),
    ] = None,
    empty_if_missing: EmptyIfMissing = False,
) -> None:
    """A fixed test set plus k stratified (and patient-grouped) folds, as a JSON every command accepts."""
    # deferred: data.splits imports scikit-learn
    from medstudent.data.layouts import KERMANY_GROUP_REGEX, ClassificationDataset, open_dataset
    from medstudent.data.splits import load_split, make_split, save_split, split_from_folders

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_dataset(
            root, empty_if_missing=empty_if_missing, group_regex=group_regex or KERMANY_GROUP_REGEX
        )
        if from_nnunet is not None:
            if getattr(ds, "format", None) != "nnunet":
                raise DataError(root, "--from-nnunet needs an nnU-Net raw data set folder")
            split = load_split(from_nnunet, ds)  # type: ignore[arg-type]
        elif isinstance(ds, ClassificationDataset):
            split = split_from_folders(ds) if from_folders else make_split(ds, test_fraction, folds, seed)
        elif from_folders:
            raise DataError(root, "--from-folders is for classification folders")
        elif hasattr(ds, "require_complete"):
            ds.require_complete()
            split = make_split(ds, test_fraction, folds, seed, n_bins=bins)
        else:
            raise DataError(root, "is a folder of unlabeled images; nothing to stratify")
    save_split(split, out)
    t = Table(
        title=f"{out}: {split['task']}, stratified by {split['stratify']}"
        + (", grouped by patient" if split["grouped_by"] else ""),
        title_justify="left",
    )
    for col in ("set", "images"):
        t.add_column(col)
    t.add_row("test", str(len(split["test"])))
    for k, f in enumerate(split["folds"]):
        t.add_row(f"fold {k}", f"train {len(f['train'])} / val {len(f['val'])}")
    console.print(t)


def _open_for_export(root: Path, split_path: Path | None, empty_if_missing: bool):
    """A complete segmentation data set and its checked split (None without one), for the interop exports."""
    # deferred: data.splits imports scikit-learn
    from medstudent.data.layouts import SegmentationDataset, open_dataset
    from medstudent.data.splits import load_split

    ds = open_dataset(root, empty_if_missing=empty_if_missing)
    if not isinstance(ds, SegmentationDataset):
        raise DataError(root, "is not a segmentation data set; only those export to nnU-Net and MONAI")
    ds.require_complete()
    if len(ds) == 0:
        raise DataError(root, "has no labeled images")
    return ds, (load_split(split_path, ds) if split_path is not None else None)


SplitFile = Annotated[
    Path | None, typer.Option("--split", help="medstudent split JSON: its test set and folds are kept")
]


@data_app.command("export-nnunet")
@one_line_errors
def data_export_nnunet(
    root: Annotated[Path, typer.Argument(help="segmentation data set folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="nnUNet_raw/DatasetNNN_Name folder to write")],
    split: SplitFile = None,
    empty_if_missing: EmptyIfMissing = False,
) -> None:
    """An nnU-Net v2 raw data set (imagesTr, labelsTr, imagesTs, dataset.json; splits_final.json = the
    split's folds, to copy into nnUNet_preprocessed/DatasetNNN_Name/)."""
    ds, sp = _open_for_export(root, split, empty_if_missing)
    console.print(_kv_table(plain(f"nnU-Net export -> {out}"), export_nnunet(ds, out, sp)))


@data_app.command("export-monai")
@one_line_errors
def data_export_monai(
    root: Annotated[Path, typer.Argument(help="segmentation data set folder")],
    out: Annotated[Path, typer.Option("-o", "--out", help="datalist JSON to write")] = Path("datalist.json"),
    split: SplitFile = None,
    empty_if_missing: EmptyIfMissing = False,
) -> None:
    """A MONAI datalist (training with folds, test) with the masks written as PNG next to it."""
    ds, sp = _open_for_export(root, split, empty_if_missing)
    console.print(_kv_table(plain(f"MONAI datalist -> {out}"), export_monai(ds, out, sp)))


# ---------------------------------------------------------------------------------------------------- synth
@app.command("synth")
@one_line_errors
def synth(
    task: Annotated[str, typer.Argument(help="stas or oct")],
    out: Annotated[Path, typer.Argument(help="output folder")],
    n: Annotated[int, typer.Option("--n", help="images (STAS: labeled images; OCT: images per class)")] = 24,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    width: Annotated[int | None, typer.Option(help="STAS image width (default 512)")] = None,
    height: Annotated[int | None, typer.Option(help="STAS image height (default 288)")] = None,
    size: Annotated[int | None, typer.Option(help="OCT image size (default 256)")] = None,
    n_unlabeled: Annotated[int | None, typer.Option(help="unlabeled images to add")] = None,
    difficulty: Annotated[float, typer.Option(help="OCT: 0 easy .. 1 hard")] = 0.5,
) -> None:
    """Procedural data in exactly the real layouts (STAS: JPEG + labelme; OCT: OCT2017 folders)."""

    if task == "stas":
        kw = {
            k: v
            for k, v in {"width": width, "height": height, "n_unlabeled": n_unlabeled}.items()
            if v is not None
        }
        path = synth_stas(out, n=n, seed=seed, **kw)
    elif task == "oct":
        kw = {k: v for k, v in {"size": size, "n_unlabeled": n_unlabeled}.items() if v is not None}
        path = synth_oct(out, n=n, seed=seed, difficulty=difficulty, **kw)
    else:
        raise DataError(None, f"synth: unknown task '{task}' (stas or oct)")
    console.print(f"wrote synthetic {task} data to {path}")


# ------------------------------------------------------------------------------------------- training
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a config value: a.b=v (repeatable)")
]
DevicesOpt = Annotated[str | None, typer.Option(help="devices per node (Lightning), e.g. 2 or auto")]
NodesOpt = Annotated[int | None, typer.Option(help="number of nodes (torchrun / SLURM)")]
StrategyOpt = Annotated[str | None, typer.Option(help="auto, ddp, ...")]
FoldOpt = Annotated[
    str | None,
    typer.Option(help="fold of the split, or all (every non-test image, no validation); default data.fold"),
]


def _fold(value: str | None) -> int | str | None:
    """--fold as an int, "all" or None (the config's data.fold)."""
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise DataError(None, f"--fold must be a fold number or 'all', got '{value}'") from None


SplitOpt = Annotated[Path | None, typer.Option(help="split JSON from `medstudent data split`")]
QuietOpt = Annotated[bool, typer.Option(help="no progress bar")]


def _scale_out(devices: str | None, num_nodes: int | None, strategy: str | None) -> list[str]:
    """--devices/--num-nodes/--strategy as config overrides (Lightning launches or joins the ranks)."""
    extra = [f"train.devices={devices}"] if devices else []
    extra += [f"train.num_nodes={num_nodes}"] if num_nodes else []
    return extra + ([f"train.strategy={strategy}"] if strategy else [])


@app.command("train")
@one_line_errors
def train_cmd(
    config: Annotated[str, typer.Argument(help="YAML config or preset name (stas_cpu, oct_cpu, ...)")],
    fold: FoldOpt = None,
    split: SplitOpt = None,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    devices: DevicesOpt = None,
    num_nodes: NodesOpt = None,
    strategy: StrategyOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a model; writes runs/<name>/fold_<k>/ (config, checkpoints, logs, metrics, curves)."""
    from medstudent.training.train import ensemble_members, train  # deferred: imports torch, lightning

    extra = _scale_out(devices, num_nodes, strategy)
    cfg = load_config(config, [*(overrides or []), *extra])
    for member in ensemble_members(cfg):
        run = train(member, fold=_fold(fold), split_path=split, resume=resume, progress=not quiet)
        done = RunDir(run).metrics
        metrics = json.loads(done.read_text()) if done.is_file() else {}
        console.print(
            f"[green]done[/] {run}: best {metrics.get('metric')} = {metrics.get('best_val_metric')}"
            f" after {metrics.get('epochs')} epoch(s), {metrics.get('train_minutes')} min"
        )


@app.command("selftrain")
@one_line_errors
def selftrain_cmd(
    config: Annotated[str, typer.Argument(help="YAML config or preset with a `selftrain:` section")],
    fold: FoldOpt = None,
    split: SplitOpt = None,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted self-training run")] = False,
    devices: DevicesOpt = None,
    num_nodes: NodesOpt = None,
    strategy: StrategyOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Noisy Student: teacher -> confident pseudo labels -> noised student, round after round."""
    from medstudent.selftrain import run_selftrain  # deferred: imports torch, lightning

    extra = _scale_out(devices, num_nodes, strategy)
    extra += [f"data.fold={_fold(fold)}"] if fold is not None else []
    cfg = load_config(config, [*(overrides or []), *extra])
    summary = run_selftrain(
        cfg, split, resume=resume, progress=not quiet, log=lambda m: console.print(m, highlight=False)
    )
    table = Table(title=f"Noisy Student: {summary['root']}", title_justify="left")
    cols = ["round", "role", "encoder", "pseudo_kept", "pseudo_quality", "val_metric", "test_metric", "gate"]
    for c in cols:
        table.add_column(c)
    for r in summary["rounds"]:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    console.print(table)
    console.print(f"best round: {summary['best_round']} (see summary.md and results.csv in the run)")


def _cell(v: object) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


TtaScalesOption = Annotated[
    str | None,
    typer.Option(
        help="multi-scale TTA: resolutions as multiples of the training one, e.g. 1,1.25 "
        "(default: the run's predict.tta_scales)"
    ),
]


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


def _load_engine(engine: str, runs: list[Path], *, precision: str, device: str, int8: bool | None):
    """--engine torch: run folders / checkpoints / run roots; --engine onnx: one exported folder."""
    if engine == "onnx":
        if len(runs) != 1:
            raise DataError(None, "--engine onnx takes one exported model folder")
        if precision != "32":
            raise DataError(None, "--precision is for the torch engine")
        if device not in ("auto", "cpu"):
            raise DataError(None, "--device is for the torch engine (ONNX Runtime runs on the CPU)")
        from medstudent.runner import OnnxPipeline  # deferred: loads onnxruntime

        return OnnxPipeline(runs[0], int8=int8)
    if engine != "torch":
        raise DataError(None, f"--engine must be torch or onnx, got '{engine}'")
    if int8 is not None:
        raise DataError(None, "--int8/--fp32 choose the graphs of the onnx engine")
    from medstudent.inference.engine import load_engine  # deferred: imports torch

    return load_engine(runs, device=device, precision=precision)


def _progress():
    """A rich progress bar with counts, elapsed time and ETA (on stderr, so stdout stays clean)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def parse_scales(text: str | None) -> list[float] | None:
    """'1,1.25' -> [1.0, 1.25] (the CLI's --tta-scales); None/empty = the run's predict.tta_scales."""

    if text is None or not text.strip():
        return None
    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise DataError(None, f"--tta-scales expects comma-separated numbers, got '{text}'") from e
    if not valid_tta_scales(scales):
        raise DataError(None, f"--tta-scales: each factor must be in [0.1, 4], got '{text}'")
    return scales


def _scales_text(scales: list[float] | None) -> str:
    return f" at scales {', '.join(f'{f:g}' for f in scales)}" if scales and list(scales) != [1.0] else ""


def _report_prediction(summary: dict, n_models: int, out: Path) -> None:
    if summary.get("plan"):
        console.print(BudgetPlan(**summary["plan"]).summary(), highlight=False, soft_wrap=True)
    console.print(
        f"{summary['predicted']}/{summary['images']} image(s) predicted with {n_models} "
        f"model(s), TTA {summary['tta']}{_scales_text(summary.get('tta_scales'))}, "
        f"ensemble {summary['ensemble']} -> {out}",
        soft_wrap=True,
    )
    for s in summary["skipped"]:
        err_console.print(f"[yellow]skipped:[/] {s}", highlight=False, soft_wrap=True)
    if summary["skipped"]:
        raise typer.Exit(1)


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


@app.command("demo")
@one_line_errors
def demo_cmd(
    task: Annotated[str, typer.Option(help="stas (segmentation) or oct (classification)")] = "stas",
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("demo_out"),
    minutes: Annotated[float | None, typer.Option(help="training time budget in minutes")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Synthesise data, train the CPU recipe briefly, predict with TTA + post-processing, evaluate, report."""
    from medstudent.demo import run_demo  # deferred: imports torch, lightning

    run_demo(task, out, minutes=minutes, seed=seed, console=console)


# ---------------------------------------------------------------------------------------------- experiments
@app.command("cv")
@one_line_errors
def cv_cmd(
    config: Annotated[str, typer.Argument(help="YAML config or preset name")],
    folds: Annotated[
        int | None,
        typer.Option("--folds", "-k", help="number of folds (of a new split; checked against a given one)"),
    ] = None,
    split: Annotated[
        Path | None, typer.Option(help="split JSON (default: data.split, the run's, new)")
    ] = None,
    overrides: SetOpt = None,
    fold_parallel: Annotated[
        int, typer.Option("--fold-parallel", help="folds trained at once, one process each (one per GPU)")
    ] = 1,
    test: Annotated[bool, typer.Option(help="ensemble the fold models on the split's test set")] = False,
    dataset: Annotated[str | None, typer.Option(help="data set name in results (default: data.root)")] = None,
    method: Annotated[str | None, typer.Option(help="method name in results (default: train.name)")] = None,
    quiet: QuietOpt = False,
    devices: DevicesOpt = None,
    num_nodes: NodesOpt = None,
    strategy: StrategyOpt = None,
) -> None:
    """Cross-validation: train every fold (resuming finished ones), out-of-fold predictions, mean +- sd."""
    from medstudent.experiments.cv import run_cv  # deferred: imports torch, lightning

    cfg = load_config(config, [*(overrides or []), *_scale_out(devices, num_nodes, strategy)])
    res = run_cv(
        cfg,
        n_folds=folds,
        split_path=split,
        fold_parallel=fold_parallel,
        test=test,
        progress=not quiet,
        log=lambda m: console.print(m, highlight=False),
        dataset=dataset,
        method=method,
    )
    if res is None:  # a DDP rank > 0: rank 0 reports
        return
    metrics = res.summary["metrics"]
    t = Table(title=f"cross-validation: {res.root}", title_justify="left")
    t.add_column("fold")
    for m in metrics:
        t.add_column(m)
    for _, row in res.folds.iterrows():
        t.add_row(str(row["fold"]), *(f"{row[m]:.4f}" for m in metrics))
    t.add_row(
        "mean +- sd",
        *(
            f"{s['mean']:.4f}" + (f" +- {s['sd']:.4f}" if s["sd"] is not None else "")
            for s in metrics.values()
        ),
    )
    console.print(t)
    if res.test:
        console.print(_kv_table("test set (ensemble of the fold models)", res.test))
    console.print(f"results -> {res.root / 'results.csv'} (for `medstudent compare`)")


@app.command("tune")
@one_line_errors
def tune_cmd(
    config: Annotated[str, typer.Argument(help="YAML config or preset with a `search:` section")],
    overrides: SetOpt = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL, e.g. postgresql://user:pw@host/db (default: SQLite in --out)"),
    ] = None,
    study_name: Annotated[str | None, typer.Option(help="study name (default: train.name)")] = None,
    n_trials: Annotated[int | None, typer.Option(help="finished trials to reach (search.n_trials)")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="study folder (runs/<name>/tune)")] = None,
    quiet: Annotated[bool, typer.Option(help="no per-trial log")] = False,
) -> None:
    """Optuna study over the config's `search:` space; objective: the CV metric; resumable, multi-worker."""
    import optuna  # deferred: optuna and the trainer import slowly

    from medstudent.experiments.hpo import run_study

    if quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(config, overrides)
    report = run_study(
        cfg,
        storage=storage,
        study_name=study_name,
        n_trials=n_trials,
        out=out,
        source=config,
        log=None if quiet else (lambda m: console.print(m, highlight=False)),
    )
    console.print(
        _kv_table(
            f"study {report['study']} ({report['storage']})",
            {
                "trials": ", ".join(f"{k} {v}" for k, v in report["trials"].items() if v),
                f"best {report['metric']}": report["best_value"],
                "best parameters": report["best_params"],
                "best config": report.get("best_config", "-"),
            },
        )
    )


@app.command("compare")
@one_line_errors
def compare_cmd(
    results: Annotated[
        list[Path], typer.Argument(help="long-format results CSV(s): a row per data set x method (x fold)")
    ],
    metric: Annotated[str, typer.Option(help="metric column, e.g. accuracy or mean_dice")],
    method_col: Annotated[str, typer.Option(help="column naming the method")] = "method",
    dataset_col: Annotated[str, typer.Option(help="column naming the data set")] = "dataset",
    fold_col: Annotated[str | None, typer.Option(help="column naming the fold (one row per fold)")] = None,
    alpha: Annotated[float, typer.Option(help="significance level (tests and CD diagram)")] = 0.05,
    lower_is_better: Annotated[bool, typer.Option(help="the metric is a loss/error")] = False,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="report folder (<csv>_compare)")] = None,
) -> None:
    """Friedman + Nemenyi (CD diagram) or Wilcoxon over data sets; Markdown/JSON report."""
    from medstudent.evaluation.stats import compare_files  # deferred: imports matplotlib, scikit-posthocs

    out = out or results[0].with_name(results[0].stem + "_compare")
    comp, files = compare_files(
        results, metric, method_col, dataset_col, fold_col, alpha, not lower_is_better, out
    )
    t = Table(title=f"{metric}: {len(comp.means)} {comp.block}s", title_justify="left")
    for c in ("method", "mean", "average rank"):
        t.add_column(c)
    for m, r in comp.average_ranks.items():
        t.add_row(str(m), f"{comp.means[m].mean():.4f}", f"{r:.2f}")
    console.print(t)
    if comp.friedman:
        f = comp.friedman
        console.print(f"Friedman chi2 = {f['statistic']:.4g}, p = {f['pvalue']:.4g}; CD = {comp.cd:.3g}")
    if comp.wilcoxon:
        w = comp.wilcoxon
        console.print(f"Wilcoxon {w['method_a']} vs {w['method_b']}: p = {w['pvalue']:.4g}")
    for n in comp.notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False)
    console.print(f"report -> {files['markdown']}")


# The whole-slide commands live in their own module; imported last because it registers on `app` and
# `data_app` and uses the helpers above.
from medstudent.cli import slides as _slides  # noqa: E402,F401


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
