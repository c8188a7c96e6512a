"""`medstudent compare`: Friedman, Nemenyi, average ranks, CD diagram and Wilcoxon on hand-made tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from medstudent.cli import app
from medstudent.errors import DataError
from medstudent.evaluation.stats import compare, critical_difference

runner = CliRunner()

# Six data sets x three methods (the block design of scikit-posthocs' Nemenyi-Friedman example).
SCORES = np.array([[31, 27, 24], [31, 28, 31], [45, 29, 46], [21, 18, 48], [42, 36, 46], [32, 17, 40]], float)
METHODS = ["baseline", "student", "ensemble"]
# Nemenyi p-values of that design (studentized range, Demsar 2006), method order as METHODS.
NEMENYI = np.array(
    [
        [1.0, 0.145535, 0.832229],
        [0.145535, 1.0, 0.037610],
        [0.832229, 0.037610, 1.0],
    ]
)


def long_table(scores=SCORES, methods=METHODS, folds=2) -> pd.DataFrame:
    """One row per data set x method x fold; fold scores spread around the data set's score."""
    rows = []
    for d, row in enumerate(scores):
        for m, name in enumerate(methods):
            for f in range(folds):
                offset = (f - (folds - 1) / 2) * 2.0
                rows.append(
                    {"data": f"ds{d}", "algo": name, "k": f, "acc": row[m] + offset, "note": "x", "seed": 1}
                )
    return pd.DataFrame(rows)


def test_friedman_nemenyi_ranks_on_hand_made_table():
    comp = compare(long_table(), "acc", method_col="algo", dataset_col="data", fold_col="k")
    assert comp.block == "dataset" and comp.means.shape == (6, 3)
    np.testing.assert_allclose(comp.means[METHODS].to_numpy(), SCORES)  # fold means
    stat, p = sps.friedmanchisquare(*SCORES.T)
    assert comp.friedman["statistic"] == pytest.approx(stat) and comp.friedman["pvalue"] == pytest.approx(p)
    assert comp.friedman["statistic"] == pytest.approx(6.869565, rel=1e-6)  # with the tie correction
    n, k, chi2 = 6, 3, comp.friedman["statistic"]
    assert comp.friedman["iman_davenport_F"] == pytest.approx((n - 1) * chi2 / (n * (k - 1) - chi2))
    # average ranks, 1 = best (higher accuracy); the tie in ds1 shares 1.5
    assert comp.average_ranks.to_dict() == pytest.approx(
        {"ensemble": 8.5 / 6, "baseline": 1.75, "student": 17 / 6}
    )
    assert comp.methods == ["ensemble", "baseline", "student"]
    np.testing.assert_allclose(comp.nemenyi.loc[METHODS, METHODS].to_numpy(), NEMENYI, atol=1e-6)
    # the same p-values from the definition: q = |R_i - R_j| / sqrt(k (k + 1) / (6 N)), studentized range
    r = comp.average_ranks
    q = abs(r["ensemble"] - r["student"]) / math.sqrt(k * (k + 1) / (6 * n))
    assert comp.nemenyi.loc["ensemble", "student"] == pytest.approx(
        sps.studentized_range.sf(q * math.sqrt(2), k, np.inf)
    )
    # critical difference: q_0.05 = 2.343 for k = 3 (Demsar 2006, table 5)
    assert comp.cd == pytest.approx(2.343 * math.sqrt(12 / 36), rel=1e-3)
    assert comp.wilcoxon is None


def test_lower_is_better_reverses_ranks():
    comp = compare(long_table(-SCORES), "acc", "algo", "data", "k", higher_is_better=False)
    assert comp.methods == ["ensemble", "baseline", "student"]
    np.testing.assert_allclose(comp.nemenyi.loc[METHODS, METHODS].to_numpy(), NEMENYI, atol=1e-6)


def test_two_methods_get_wilcoxon():
    a = np.array([0.81, 0.77, 0.90, 0.65, 0.72, 0.88, 0.79, 0.70])
    b = a - np.array([0.02, 0.01, 0.03, -0.01, 0.02, 0.04, 0.015, 0.005])
    df = pd.DataFrame(
        [{"dataset": f"d{i}", "method": "ns", "acc": x} for i, x in enumerate(a)]
        + [{"dataset": f"d{i}", "method": "sup", "acc": x} for i, x in enumerate(b)]
    )
    comp = compare(df, "acc")
    ref = sps.wilcoxon(a, b)
    w = comp.wilcoxon
    assert w["statistic"] == pytest.approx(ref.statistic) and w["pvalue"] == pytest.approx(ref.pvalue)
    assert w["better"] == "ns" and w["n_blocks"] == 8 and w["significant"] == (ref.pvalue < 0.05)
    assert comp.friedman is None and comp.nemenyi is None
    assert any("at least 3 methods" in n for n in comp.notes)


def test_one_data_set_compares_over_folds_and_incomplete_blocks_are_dropped():
    df = long_table(folds=4)
    one = df[df["data"] == "ds3"]
    comp = compare(one, "acc", "algo", "data", "k")
    assert comp.block == "fold" and len(comp.means) == 4 and any("optimistic" in n for n in comp.notes)
    with pytest.raises(DataError, match="one data set only"):
        compare(one, "acc", "algo", "data")
    partial = df[~((df["data"] == "ds0") & (df["algo"] == "student"))]
    comp = compare(partial, "acc", "algo", "data", "k")
    assert list(comp.means.index) == [f"ds{i}" for i in range(1, 6)] and "dropped 1 dataset" in comp.notes[0]


def test_compare_cli_report(tmp_path):
    csv = tmp_path / "results.csv"
    long_table().to_csv(csv, index=False)
    out = tmp_path / "report"
    args = ["compare", str(csv), "--metric", "acc", "--method-col", "algo", "--dataset-col", "data"]
    res = runner.invoke(app, [*args, "--fold-col", "k", "--alpha", "0.1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("compare.md", "compare.json", "cd_diagram.png", "nemenyi.csv", "means.csv", "ranks.csv"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "compare.json").read_text())
    assert rep["alpha"] == 0.1 and rep["n_blocks"] == 6 and rep["methods"][0] == "ensemble"
    assert rep["nemenyi"]["ensemble"]["student"] == pytest.approx(0.037610, abs=1e-6)
    assert rep["critical_difference"] == pytest.approx(critical_difference(3, 6, 0.1))
    assert rep["critical_difference"] < critical_difference(3, 6, 0.05)
    md = (out / "compare.md").read_text()
    assert "## Friedman test" in md and "![critical-difference diagram](cd_diagram.png)" in md
    assert "Friedman chi2 = 6.87" in res.output
    # default report folder next to the CSV
    res = runner.invoke(app, [*args])
    assert res.exit_code == 0 and (tmp_path / "results_compare" / "compare.md").is_file()


def test_compare_errors_are_one_line(tmp_path):
    csv = tmp_path / "r.csv"
    df = long_table()
    df.to_csv(csv, index=False)
    base = ["compare", str(csv), "--method-col", "algo", "--dataset-col", "data"]
    cases = [
        ([*base, "--metric", "dice"], f"{csv}: lacks column(s) ['dice']"),
        (["compare", str(tmp_path / "none.csv"), "--metric", "acc"], "none.csv: results file not found"),
    ]
    bad = df.astype({"acc": object})
    bad.loc[3, "acc"] = "n/a"
    bad.to_csv(tmp_path / "nan.csv", index=False)
    cases.append(
        (
            [
                "compare",
                str(tmp_path / "nan.csv"),
                "--metric",
                "acc",
                "--method-col",
                "algo",
                "--dataset-col",
                "data",
            ],
            "nan.csv: column 'acc' has 1 missing or non-numeric value(s), first in data row 4",
        )
    )
    dup = pd.concat([df, df.iloc[:1]])
    dup.to_csv(tmp_path / "dup.csv", index=False)
    cases.append(
        (
            [
                "compare",
                str(tmp_path / "dup.csv"),
                "--metric",
                "acc",
                "--method-col",
                "algo",
                "--dataset-col",
                "data",
            ]
            + ["--fold-col", "k"],
            "dup.csv: has duplicate rows for data 'ds0', algo 'baseline', k '0'",
        )
    )
    for argv, message in cases:
        res = runner.invoke(app, argv)
        assert res.exit_code == 1, res.output
        assert message in res.output and len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
