"""The long results format every experiment writes and `medstudent compare` reads.

One row per data set x method x fold, then any metric columns (and any extra columns):

    dataset,method,fold,mean_dice,pooled_dice,mean_iou,n_val
    stas,stas_cpu,0,0.81,0.84,0.70,51
    stas,stas_cpu,1,0.79,0.83,0.68,51
    stas,noisy_student,0,0.83,0.85,0.72,51

`fold` is the cross-validation fold index (or a label such as `test` for a held-out test set score).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medstudent.atomic import atomic_path
from medstudent.errors import DataError

KEY_COLUMNS = ("dataset", "method", "fold")


def primary_metric(task: str) -> str:
    """The metric CV, the self-training gate and a tuning study optimise by default (the column written)."""
    return "mean_dice" if task == "segmentation" else "accuracy"


def results_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with the key columns first (in KEY_COLUMNS order), the rest as first seen."""
    rows = [dict(r) for r in rows]
    for n, r in enumerate(rows):
        missing = [k for k in KEY_COLUMNS if k not in r]
        if missing:
            raise DataError(
                None, f"result row {n} lacks column(s) {missing} (needs {', '.join(KEY_COLUMNS)})"
            )
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k not in KEY_COLUMNS and k not in extra]
    return pd.DataFrame(rows, columns=[*KEY_COLUMNS, *extra])


def write_results(rows: Iterable[Mapping[str, Any]], path: str | Path, merge: bool = False) -> pd.DataFrame:
    """Write result rows as CSV in the long format. With `merge`, rows of an existing file are kept unless
    a new row has the same (dataset, method, fold); the merged table is written and returned."""
    path = Path(path)
    df = results_frame(rows)
    if merge and path.is_file():
        old = read_results(path)
        key = df[list(KEY_COLUMNS)].astype(str).agg("\x1f".join, axis=1)
        old_key = old[list(KEY_COLUMNS)].astype(str).agg("\x1f".join, axis=1)
        kept = old[~old_key.isin(set(key))]
        df = pd.concat([kept, df], ignore_index=True) if len(kept) else df
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def read_results(path: str | Path, required: Iterable[str] = KEY_COLUMNS) -> pd.DataFrame:
    """Read a results CSV; a missing file, unreadable CSV or missing column is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "results file not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(path, f"not a readable CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(path, f"lacks column(s) {missing}; it has {list(df.columns)}")
    return df
