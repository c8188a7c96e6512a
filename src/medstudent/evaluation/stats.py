"""`medstudent compare`: are the differences between methods over several data sets significant?

Input: long-format results, one row per data set x method (x fold), any extra columns (the format
`medstudent cv` writes, see `medstudent.evaluation.results`). The scores of a method on a data set are
averaged over its folds; the data sets are the blocks of the tests (Demsar 2006, JMLR 7:1-30):

- average ranks (1 = best; ties share the mean rank);
- Friedman test (scipy, >= 3 methods) with the Iman-Davenport F correction;
- Nemenyi post-hoc p-values (scikit-posthocs' posthoc_nemenyi_friedman) and the critical difference
  CD = q_alpha * sqrt(k (k + 1) / (6 N)), drawn as a critical-difference diagram;
- Wilcoxon signed-rank test (scipy) when exactly two methods are compared.

With a single data set and a fold column, the folds are the blocks (noted in the report: folds share
training data, so the tests are optimistic).
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from medstudent.atomic import atomic_path, write_text_atomic
from medstudent.errors import DataError
from medstudent.evaluation.results import read_results


@dataclass
class Comparison:
    metric: str
    higher_is_better: bool
    alpha: float
    block: str  # what the rows of `means` are: "dataset" or "fold"
    means: pd.DataFrame  # blocks x methods
    ranks: pd.DataFrame  # blocks x methods, 1 = best
    average_ranks: pd.Series  # best first
    friedman: dict[str, float] | None = None
    nemenyi: pd.DataFrame | None = None
    cd: float | None = None
    wilcoxon: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return list(self.average_ranks.index)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float | np.floating):
                return None if math.isnan(float(v)) else float(v)
            if isinstance(v, np.integer):
                return int(v)
            return v

        return {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "alpha": self.alpha,
            "block": self.block,
            "n_blocks": len(self.means),
            "methods": self.methods,
            "means": {str(b): {str(m): clean(v) for m, v in row.items()} for b, row in self.means.iterrows()},
            "average_ranks": {str(m): clean(v) for m, v in self.average_ranks.items()},
            "mean_over_blocks": {str(m): clean(v) for m, v in self.means.mean().items()},
            "friedman": {k: clean(v) for k, v in self.friedman.items()} if self.friedman else None,
            "nemenyi": (
                {str(a): {str(b): clean(v) for b, v in row.items()} for a, row in self.nemenyi.iterrows()}
                if self.nemenyi is not None
                else None
            ),
            "critical_difference": clean(self.cd) if self.cd is not None else None,
            "wilcoxon": {k: clean(v) for k, v in self.wilcoxon.items()} if self.wilcoxon else None,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------------ input


def read_long(paths: Sequence[str | Path], columns: Sequence[str]) -> pd.DataFrame:
    """Concatenate result CSVs, checking each has the needed columns."""
    frames = [read_results(p, columns) for p in paths]
    if not frames:
        raise DataError(None, "no results files given")
    return pd.concat(frames, ignore_index=True)


def block_matrix(
    df: pd.DataFrame,
    metric: str,
    method_col: str = "method",
    dataset_col: str = "dataset",
    fold_col: str | None = None,
    source: str | Path | None = None,
    notes: list[str] | None = None,
) -> tuple[pd.DataFrame, str]:
    """Long rows -> (blocks x methods matrix of the metric, block kind). Incomplete blocks are dropped."""
    notes = notes if notes is not None else []
    cols = [metric, method_col, dataset_col] + ([fold_col] if fold_col else [])
    if missing := [c for c in cols if c not in df.columns]:
        raise DataError(source, f"lacks column(s) {missing}; it has {list(df.columns)}")
    df = df[cols].copy()
    values = pd.to_numeric(df[metric], errors="coerce")
    if bad := np.flatnonzero(~np.isfinite(values.to_numpy(float))).tolist():
        raise DataError(
            source,
            f"column '{metric}' has {len(bad)} missing or non-numeric value(s), "
            f"first in data row {bad[0] + 1}",
        )
    df[metric] = values
    df[method_col] = df[method_col].astype(str)
    df[dataset_col] = df[dataset_col].astype(str)
    if fold_col:
        df[fold_col] = df[fold_col].astype(str)
        dup = df.duplicated([dataset_col, method_col, fold_col], keep=False)
        if dup.any():
            r = df[dup].iloc[0]
            raise DataError(
                source,
                f"has duplicate rows for {dataset_col} '{r[dataset_col]}', {method_col} '{r[method_col]}', "
                f"{fold_col} '{r[fold_col]}'",
            )
    if df[method_col].nunique() < 2:
        raise DataError(source, f"has one method only ({df[method_col].iloc[0]!r}); nothing to compare")
    datasets = df[dataset_col].unique()
    if len(datasets) >= 2:
        block = "dataset"
        means = df.pivot_table(index=dataset_col, columns=method_col, values=metric, aggfunc="mean")
    elif fold_col:
        block = "fold"
        notes.append(
            f"one data set ({datasets[0]}): its folds are the blocks; folds share training data, so the "
            "tests below are optimistic"
        )
        means = df.pivot_table(index=fold_col, columns=method_col, values=metric, aggfunc="mean")
    else:
        raise DataError(
            source, f"has one data set only ({datasets[0]}); give --fold-col to compare over its folds"
        )
    incomplete = means.index[means.isna().any(axis=1)].tolist()
    if incomplete:
        notes.append(
            f"dropped {len(incomplete)} {block}(s) where a method has no result: "
            + ", ".join(map(str, incomplete[:10]))
            + (" ..." if len(incomplete) > 10 else "")
        )
        means = means.dropna()
    if len(means) < 2:
        raise DataError(source, f"needs at least 2 {block}s with results for every method, has {len(means)}")
    means.columns.name = None
    means.index.name = block
    return means, block


# ---------------------------------------------------------------------------------------------- tests


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks for k methods over n blocks."""
    q = sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6 * n)))


def compare(
    df: pd.DataFrame,
    metric: str,
    method_col: str = "method",
    dataset_col: str = "dataset",
    fold_col: str | None = None,
    alpha: float = 0.05,
    higher_is_better: bool = True,
    source: str | Path | None = None,
) -> Comparison:
    import scikit_posthocs as sp

    if not 0 < alpha < 1:
        raise DataError(None, f"alpha must be between 0 and 1, got {alpha}")
    notes: list[str] = []
    means, block = block_matrix(df, metric, method_col, dataset_col, fold_col, source, notes)
    n, k = means.shape
    signed = -means if higher_is_better else means
    ranks = signed.rank(axis=1, method="average")
    avg = ranks.mean().sort_values(kind="stable")
    comp = Comparison(metric, higher_is_better, alpha, block, means, ranks, avg, notes=notes)
    cols = [means[c].to_numpy(float) for c in means.columns]
    if k >= 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stat, p = sps.friedmanchisquare(*cols)
        stat, p = float(stat), float(p)
        denom = n * (k - 1) - stat
        f_id = (n - 1) * stat / denom if denom > 0 else math.inf
        comp.friedman = {
            "statistic": stat,
            "pvalue": p,
            "df": k - 1,
            "iman_davenport_F": f_id,
            "iman_davenport_pvalue": float(sps.f.sf(f_id, k - 1, (k - 1) * (n - 1))),
            "n_blocks": n,
            "k_methods": k,
        }
        if math.isnan(stat):
            notes.append("every method scores the same in every block: the Friedman test is undefined")
        nem = sp.posthoc_nemenyi_friedman(means.to_numpy(float))
        nem.index = nem.columns = list(means.columns)
        comp.nemenyi = nem.loc[avg.index, avg.index]
        comp.cd = critical_difference(k, n, alpha)
        if not math.isnan(p) and p >= alpha:
            notes.append(
                f"Friedman p = {p:.3g} >= alpha = {alpha}: no evidence of any difference; "
                "the post-hoc tests are shown for completeness"
            )
    else:
        notes.append("Friedman and Nemenyi need at least 3 methods; two methods get the Wilcoxon test")
    if k == 2:
        a, b = (means[c].to_numpy(float) for c in means.columns)
        diff = a - b
        if np.all(diff == 0):
            stat, p = 0.0, 1.0
            notes.append("the two methods score the same in every block")
        else:
            res = sps.wilcoxon(a, b)
            stat, p = float(res.statistic), float(res.pvalue)
        better = means.columns[0] if (diff.mean() > 0) == higher_is_better else means.columns[1]
        comp.wilcoxon = {
            "method_a": str(means.columns[0]),
            "method_b": str(means.columns[1]),
            "statistic": stat,
            "pvalue": p,
            "n_blocks": n,
            "mean_difference": float(diff.mean()),
            "median_difference": float(np.median(diff)),
            "better": None if np.all(diff == 0) else str(better),
            "significant": bool(p < alpha),
        }
        if n < 6:
            notes.append(
                f"with {n} blocks the Wilcoxon test cannot reach p < 0.05 (exact two-sided p >= 1/16)"
            )
    return comp


# ------------------------------------------------------------------------------------------------ output


def cd_diagram_png(comp: Comparison, path: str | Path) -> Path | None:
    """Critical-difference diagram (scikit-posthocs): average ranks on the axis; methods whose Nemenyi
    p-value is >= alpha are joined by a bar. None when there is no Nemenyi matrix (fewer than 3 methods)."""
    import scikit_posthocs as sp
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if comp.nemenyi is None:
        return None
    k = len(comp.methods)
    fig = Figure(figsize=(7, 1.2 + 0.3 * k), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # significance as 0 (p < alpha) / 1 (not): the same bars whatever threshold the installed version uses
    sig = (comp.nemenyi >= comp.alpha).astype(float)
    params = inspect.signature(sp.critical_difference_diagram).parameters
    kw: dict[str, Any] = {"ax": ax}
    if "alpha" in params:
        kw["alpha"] = comp.alpha
    if "label_fmt_left" in params:
        kw.update(label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}")
    sp.critical_difference_diagram(comp.average_ranks, sig, **kw)
    ax.set_title(
        f"{comp.metric}: average rank over {len(comp.means)} {comp.block}s "
        f"(Nemenyi, alpha = {comp.alpha:g}, CD = {comp.cd:.2f})",
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return "nan" if math.isnan(float(v)) else f"{float(v):.4g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(comp: Comparison, figure: str | None = None) -> str:
    better = "higher" if comp.higher_is_better else "lower"
    out = [
        f"# Comparison of {len(comp.methods)} methods on {comp.metric} ({better} is better)",
        "",
        f"{len(comp.means)} {comp.block}s as blocks; alpha = {comp.alpha:g}.",
        "",
        f"## Mean {comp.metric} per {comp.block}",
        "",
        _md_table(
            [comp.block, *comp.methods],
            [[b, *(row[m] for m in comp.methods)] for b, row in comp.means.iterrows()]
            + [["**mean**", *(comp.means[m].mean() for m in comp.methods)]],
        ),
        "",
        "## Average ranks (1 = best)",
        "",
        _md_table(["method", "average rank"], [[m, r] for m, r in comp.average_ranks.items()]),
        "",
    ]
    if comp.friedman:
        f = comp.friedman
        out += [
            "## Friedman test",
            "",
            f"chi2({f['df']}) = {f['statistic']:.4g}, p = {f['pvalue']:.4g}; Iman-Davenport "
            f"F({f['df']}, {f['df'] * (f['n_blocks'] - 1)}) = {f['iman_davenport_F']:.4g}, "
            f"p = {f['iman_davenport_pvalue']:.4g}",
            "",
        ]
    if comp.nemenyi is not None:
        out += [
            "## Nemenyi post-hoc test (p-values)",
            "",
            _md_table(
                ["", *comp.methods],
                [[a, *(comp.nemenyi.loc[a, b] for b in comp.methods)] for a in comp.methods],
            ),
            "",
            f"Critical difference of average ranks: CD = {comp.cd:.4g} (alpha = {comp.alpha:g}).",
            "",
        ]
        if figure:
            out += [f"![critical-difference diagram]({figure})", ""]
    if comp.wilcoxon:
        w = comp.wilcoxon
        verdict = (
            f"{w['better']} is better (p < {comp.alpha:g})"
            if w["significant"]
            else f"no significant difference at alpha = {comp.alpha:g}"
        )
        out += [
            "## Wilcoxon signed-rank test",
            "",
            f"{w['method_a']} vs {w['method_b']} over {w['n_blocks']} {comp.block}s: "
            f"W = {w['statistic']:.4g}, p = {w['pvalue']:.4g}; "
            f"mean difference {w['mean_difference']:.4g} ({verdict}).",
            "",
        ]
    if comp.notes:
        out += ["## Notes", "", *(f"- {n}" for n in comp.notes), ""]
    return "\n".join(out)


def write_report(comp: Comparison, out: str | Path) -> dict[str, Path]:
    """compare.md, compare.json, means.csv, ranks.csv, nemenyi.csv and cd_diagram.png (>= 3 methods)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"means": comp.means, "ranks": comp.ranks, "nemenyi": comp.nemenyi}
    files = {name: out / f"{name}.csv" for name, t in tables.items() if t is not None}
    for name, path in files.items():  # each file in one rename: never half-written (the set may mix runs)
        with atomic_path(path, fsync=False) as tmp:
            tables[name].to_csv(tmp)
    png = cd_diagram_png(comp, out / "cd_diagram.png")
    if png is not None:
        files["cd_diagram"] = png
    files["markdown"] = out / "compare.md"
    write_text_atomic(files["markdown"], to_markdown(comp, png.name if png else None), fsync=False)
    files["json"] = out / "compare.json"
    write_text_atomic(files["json"], json.dumps(comp.to_dict(), indent=1), fsync=False)
    return files


def compare_files(
    paths: Sequence[str | Path],
    metric: str,
    method_col: str = "method",
    dataset_col: str = "dataset",
    fold_col: str | None = None,
    alpha: float = 0.05,
    higher_is_better: bool = True,
    out: str | Path | None = None,
) -> tuple[Comparison, dict[str, Path]]:
    cols = [metric, method_col, dataset_col] + ([fold_col] if fold_col else [])
    df = read_long(paths, cols)
    source = paths[0] if len(paths) == 1 else None
    comp = compare(df, metric, method_col, dataset_col, fold_col, alpha, higher_is_better, source)
    files = write_report(comp, out) if out is not None else {}
    return comp, files
