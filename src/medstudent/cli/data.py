"""`medstudent data ...` (check, stats, split, nnU-Net / MONAI export) and `medstudent synth`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medstudent.cli.common import (
    EmptyIfMissing,
    SkipBad,
    _kv_table,
    app,
    console,
    data_app,
    one_line_errors,
    plain,
)
from medstudent.data.check import check_dataset
from medstudent.data.monai_export import export_monai
from medstudent.data.nnunet import export_nnunet
from medstudent.data.stats import write_stats
from medstudent.data.synth import synth_oct, synth_stas
from medstudent.errors import DataError


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
