"""What every command module shares: the typer apps, the console, one-line errors, common options and
the engine loader and progress bar of the prediction commands."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medstudent.config import valid_tta_scales
from medstudent.core.budget import BudgetPlan
from medstudent.errors import DataError

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


def _cell(v: object) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


TtaScalesOption = Annotated[
    str | None,
    typer.Option(
        help="multi-scale TTA: resolutions as multiples of the training one, e.g. 1,1.25 "
        "(default: the run's predict.tta_scales)"
    ),
]


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
