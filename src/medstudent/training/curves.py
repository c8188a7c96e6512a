"""training_curves.png: loss, validation metric, augmentation-policy probability and learning rate per epoch.

Written by the trainer at the end of every run (so it lives with training, not with the evaluation
reports). Built on `matplotlib.figure.Figure` directly (Agg canvas), never through pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from medstudent.errors import DataError
from medstudent.figures import new_figure, save_figure

PANEL_IN = (5.0, 3.8)  # width, height of one panel in inches


def epoch_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch: Lightning logs step rows and epoch rows with NaN elsewhere; average per epoch."""
    num = df.apply(pd.to_numeric, errors="coerce")
    per_epoch = num.drop(columns=[c for c in ("step",) if c in num]).groupby("epoch").mean()
    # Prefer Lightning's on-epoch aggregate ("x_epoch") over the per-step series ("x_step") of one metric.
    drop = [c for c in per_epoch if c.endswith("_step") and f"{c[:-5]}_epoch" in per_epoch]
    return per_epoch.drop(columns=drop).dropna(axis=1, how="all")


def _is_lr(c: str) -> bool:
    return c == "lr" or c.startswith(("lr-", "lr_", "lr/"))


def curve_panels(columns: Iterable[str]) -> dict[str, list[str]]:
    """Panel title -> the logged columns it plots, in drawing order; panels without a column are left out.

    Each panel is titled by what it plots: a `--fold all` run logs no validation metric, and its
    augmentation-policy probability must not appear under a "metric" title."""
    cols = [str(c) for c in columns]
    panels = {
        "loss": [c for c in cols if "loss" in c and not _is_lr(c)],
        "validation metric": [c for c in cols if c.startswith("val_") and "loss" not in c],
        "augmentation policy probability": [c for c in cols if c.startswith("aug_")],
        "learning rate": [c for c in cols if _is_lr(c)],
    }
    placed = {c for v in panels.values() for c in v}
    for c in cols:  # anything else logged gets a panel named after itself
        if c not in placed:
            panels[c] = [c]
    return {title: v for title, v in panels.items() if v}


def training_curves_png(metrics_csv: str | Path, path: str | Path) -> Path:
    """Curves per epoch from a Lightning CSVLogger `metrics.csv`, one panel per quantity (`curve_panels`).

    Step rows are averaged per epoch; a metric logged both per step and per epoch is shown once (the epoch
    value). A log with no metric yet gives a figure that says so; a missing file or one without an `epoch`
    column is a DataError.
    """
    metrics_csv = Path(metrics_csv)
    try:
        df = pd.read_csv(metrics_csv)
    except FileNotFoundError as e:
        raise DataError(metrics_csv, "file not found") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(metrics_csv, f"not a readable CSV ({type(e).__name__}: {e})") from e
    if "epoch" not in df:
        raise DataError(metrics_csv, f"no 'epoch' column (columns: {', '.join(map(str, df.columns))})")
    table = epoch_table(df)
    if table.empty:  # e.g. stopped before the first logged step: say so rather than fail the run
        fig = new_figure(*PANEL_IN)
        fig.text(0.5, 0.5, f"{metrics_csv}:\nno metric logged yet", ha="center", va="center", fontsize=9)
        return save_figure(fig, path)
    panels = curve_panels(table.columns)
    fig = new_figure(PANEL_IN[0] * len(panels), PANEL_IN[1])
    for i, (title, cols) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in cols:
            s = table[c].dropna()
            ax.plot(s.index, s.to_numpy(), marker="o", markersize=3, label=c)
        if title == "learning rate" and np.nanmin(table[cols].to_numpy()) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("/".join(metrics_csv.parts[-3:-1]) or metrics_csv.name, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
