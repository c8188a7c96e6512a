"""`medstudent train`, `selftrain`, `demo`, `cv`, `tune` and `compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medstudent.cli.common import (
    DevicesOpt,
    FoldOpt,
    NodesOpt,
    QuietOpt,
    SetOpt,
    SplitOpt,
    StrategyOpt,
    _cell,
    _fold,
    _kv_table,
    _scale_out,
    app,
    console,
    one_line_errors,
)
from medstudent.config import load_config
from medstudent.rundir import RunDir


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
