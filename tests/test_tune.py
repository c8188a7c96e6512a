"""`medstudent tune`: search-space validation, pruning, a resumable SQLite study, the CLI on real training,
and two workers sharing one study on a throwaway PostgreSQL server."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_SEG
from medstudent.cli import app
from medstudent.config import load_config
from medstudent.errors import ConfigError, DataError
from medstudent.experiments.hpo import masked_url, objective_value, parse_search, run_study, trial_config

runner = CliRunner()
TINY = [
    *TINY_SEG,
    "augment.scale=0.5",
    "train.limit_train_batches=1",
    "train.epochs=1",
    "train.threads=1",
    "data.test_fraction=4",
    "data.n_folds=2",
    "postprocess.min_area=0",
    "postprocess.fill_holes=false",
    "predict.tta=none",
]
SEARCH = {
    "n_trials": 3,
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "loss.name": {"type": "categorical", "choices": ["dice_bce", "dice_focal"]},
}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def config_file(root, tmp_path, search=None, name="study", *extra) -> Path:
    cfg = load_config(
        "stas_cpu", [f"data.root={root}", f"train.output_dir={tmp_path / 'runs'}", *TINY, *extra]
    )
    doc = cfg.model_dump(mode="json")
    doc["train"]["name"] = name
    doc["search"] = search or SEARCH
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def lr_score(cfg) -> float:
    """A smooth fake CV metric: best at lr = 1e-3."""
    import math

    return 1 - abs(math.log10(cfg.optim.lr) + 3) / 2


# --------------------------------------------------------------------------------------- search space


def test_search_space_validation(synth_stas_dir, tmp_path):
    base = load_config("stas_cpu", [f"data.root={synth_stas_dir}"])

    def parse(search):
        return parse_search(base.model_copy(update={"search": search}), "cfg.yaml")

    space = parse({**SEARCH, "model": {"dropout": {"type": "float", "low": 0, "high": 0.5, "step": 0.1}}})
    assert set(space.params) == {"optim.lr", "loss.name", "model.dropout"} and space.n_trials == 3
    assert space.params["optim.lr"].log and space.direction == "maximize" and space.pruner == "median"
    cases = {
        "has no `search:` section": None,
        r"search\.optim\.lr: low \(0\.1\) must be <= high": {
            "optim.lr": {"type": "float", "low": 0.1, "high": 0.01}
        },
        "search.optim.lr: log scale needs low > 0": {
            "optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}
        },
        "search.n_trial: unknown setting": {"n_trial": 3, **SEARCH},
        "search.direction: Input should be 'maximize' or 'minimize'": {**SEARCH, "direction": "up"},
        r"search\.loss\.name: value 'nope' makes an invalid config": {
            "loss.name": {"type": "categorical", "choices": ["dice", "nope"]}
        },
        r"search\.optim\.lrr: value 0\.1 makes an invalid config \(Extra inputs": {
            "optim.lrr": {"type": "float", "low": 0.1, "high": 0.2}
        },
        r"search\.selftrain\.threshold: the config has no `selftrain:` section": {
            "selftrain.threshold": {"type": "float", "low": 0.4, "high": 0.8}
        },
        "search.banana.x: 'banana' is not a config section": {
            "banana.x": {"type": "int", "low": 1, "high": 2}
        },
        "search.model.encoder: categorical needs a non-empty": {"model.encoder": {"type": "categorical"}},
    }
    for message, search in cases.items():
        with pytest.raises(ConfigError, match=rf"^cfg\.yaml: {message}"):
            parse(search)
    # a selftrain section in the config makes its parameters searchable
    st = load_config("stas_cpu", [f"data.root={synth_stas_dir}", "selftrain.threshold=0.7"])
    search = {
        "selftrain.threshold": {"type": "float", "low": 0.4, "high": 0.8},
        "selftrain.unlabeled_fraction": {"type": "float", "low": 0.05, "high": 0.2},
        "selftrain.num_students": {"type": "int", "low": 1, "high": 3},
        "selftrain.ensemble_size": {"type": "int", "low": 2, "high": 3},
    }
    assert len(parse_search(st.model_copy(update={"search": search})).params) == 4
    # list-valued choices (a crop size) are offered to Optuna as JSON and come back as values
    space = parse({"augment.crop": {"type": "categorical", "choices": [[64, 64], [96, 128]]}})
    trial = optuna.create_study().ask()
    tcfg, values = trial_config(base, space, trial)
    assert values["augment.crop"] in ([64, 64], [96, 128]) and tcfg.augment.crop == tuple(
        values["augment.crop"]
    )
    assert trial.params["augment.crop"] in ("[64, 64]", "[96, 128]") and tcfg.search is None


def test_objective_reports_running_mean_and_prunes(synth_stas_dir, tmp_path):
    cfg = load_config("stas_cpu", [f"data.root={synth_stas_dir}", *TINY, "data.n_folds=3"])
    cfg.train.output_dir = str(tmp_path / "runs")
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    calls: list[tuple[str, int]] = []

    def method(score):
        def run(cfg, split, fold, fold_dir):
            calls.append((cfg.train.name, fold))
            return {"mean_dice": score + fold / 100}

        return run

    good = study.ask()
    cfg.train.name = "good"
    value = objective_value(cfg, method(0.9), good, folds=None)
    study.tell(good, value)
    assert value == pytest.approx(0.91) and good.number == 0
    assert study.trials[0].intermediate_values == pytest.approx({0: 0.9, 1: 0.905, 2: 0.91})
    bad = study.ask()
    cfg.train.name = "bad"
    with pytest.raises(optuna.TrialPruned):
        objective_value(cfg, method(0.2), bad)
    assert [c for c in calls if c[0] == "bad"] == [("bad", 0)]  # stopped after its first fold


# ------------------------------------------------------------------------------------------ SQLite study


def test_sqlite_study_resumes(synth_stas_dir, tmp_path):
    path = config_file(synth_stas_dir, tmp_path, {**SEARCH, "seed": 0, "pruner": "none"})
    cfg = load_config(path)
    out = tmp_path / "study"
    calls: list[tuple[str, int]] = []

    def fake(cfg, split, fold, fold_dir):
        calls.append((cfg.train.name, fold))
        return {"mean_dice": lr_score(cfg)}

    report = run_study(cfg, out=out, run_method=fake, source=path)
    assert report["trials"]["complete"] == 3 and (out / "study.db").is_file()
    first = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}").trials
    # a rerun with a larger budget only adds the missing trials
    report = run_study(cfg, out=out, run_method=fake, n_trials=5)
    trials = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}").trials
    assert len(trials) == 5 and [t.params for t in trials[:3]] == [t.params for t in first]
    assert len(calls) == 5 * 2
    run_study(cfg, out=out, run_method=fake, n_trials=5)
    assert len(calls) == 10  # the budget is reached: nothing runs

    # a trial interrupted after its first fold is resumed with the same parameters, in the same folder
    def interrupted(cfg, split, fold, fold_dir):
        if fold == 1:
            raise KeyboardInterrupt
        return fake(cfg, split, fold, fold_dir)

    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, out=out, run_method=interrupted, n_trials=6)
    storage = f"sqlite:///{out / 'study.db'}"
    broken = optuna.load_study(study_name="study", storage=storage).trials[-1]
    assert broken.state.name == "FAIL" and broken.user_attrs["interrupted"]
    calls.clear()
    report = run_study(cfg, out=out, run_method=fake, n_trials=6)
    resumed = optuna.load_study(study_name="study", storage=storage).trials[-1]
    assert resumed.state.name == "COMPLETE" and resumed.params == broken.params
    assert resumed.user_attrs["folder_trial"] == broken.number
    assert calls == [(f"trial_{broken.number:04d}", 1)]  # fold 0 was not run again
    assert report["trials"]["complete"] == 6 and report["trials"]["fail"] == 1

    best = json.loads((out / "best.json").read_text())
    trials = optuna.load_study(study_name="study", storage=storage).trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert best["best_value"] == pytest.approx(max(t.value for t in done))
    tuned = load_config(out / "best_config.yaml")
    assert tuned.optim.lr == pytest.approx(best["best_params"]["optim.lr"]) and tuned.search is None
    assert (out / "trials.csv").is_file() and (out / "split.json").is_file()


@pytest.mark.slow  # trains trials
def test_tune_cli_trains_trials(synth_stas_dir, tmp_path):
    search = {**SEARCH, "n_trials": 2, "folds": 1}
    path = config_file(synth_stas_dir, tmp_path, search, "clistudy")
    res = runner.invoke(app, ["tune", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "clistudy" / "tune"
    best = json.loads((out / "best.json").read_text())
    assert best["trials"]["complete"] == 2 and best["metric"] == "mean_dice"
    assert 0 <= best["best_value"] <= 1
    for n in (0, 1):
        trial = out / "trials" / f"trial_{n:04d}"
        assert (trial / "fold_0" / "checkpoints" / "best.ckpt").is_file() and not (trial / "fold_1").exists()
        assert (trial / "results.csv").is_file()
    assert "best mean_dice" in res.output
    # a bad search section is a one-line error naming the config file
    bad = config_file(synth_stas_dir, tmp_path, {"optim.lr": {"type": "float", "low": 1}}, "bad")
    res = runner.invoke(app, ["tune", str(bad)])
    assert res.exit_code == 1 and f"{bad}: search.optim.lr: float needs `low` and `high`" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


# --------------------------------------------------------------------------------- PostgreSQL, 2 workers


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(cands[-1]).parent if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster on a free port; yields its SQLAlchemy URL, removed afterwards."""
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (the dev extra brings psycopg[binary])")
    bindir = _pg_bindir()
    root = os.geteuid() == 0
    if bindir is None and root and os.environ.get("CI") == "true" and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "postgresql"], env=env, timeout=600, check=False
            )
        bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server not installed (no initdb/pg_ctl); apt-get install postgresql to run it"
        )
    prefix: list[str] = []
    owner = None
    if root:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to start the server as 'postgres'")
        prefix = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="medstudent-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", _free_port()

    def pg(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, check=False)

    init = pg(
        str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
    )
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1:]}")
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        opts,
        "-l",
        str(base / "log"),
        "-w",
        "-t",
        "60",
        "start",
    )
    if start.returncode != 0:
        log = (base / "log").read_text() if (base / "log").is_file() else start.stderr
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {log.strip().splitlines()[-1:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # the README's form
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


WORKER = textwrap.dedent(
    """
    import math, sys, time
    from pathlib import Path
    from medstudent.config import load_config
    from medstudent.experiments.hpo import run_study

    cfg_path, url, out, me, other = sys.argv[1:]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out).parent / f"ready_{me}").touch()
    deadline = time.time() + 60
    while not (Path(out).parent / f"ready_{other}").exists() and time.time() < deadline:
        time.sleep(0.05)

    def fold(cfg, split, k, fold_dir):
        time.sleep(0.3)  # a "training": long enough for both workers to interleave
        return {"mean_dice": 1 - abs(math.log10(cfg.optim.lr) + 3) / 2}

    run_study(load_config(cfg_path), storage=url, n_trials=8, out=out, run_method=fold)
    """
)


def test_two_workers_share_a_postgresql_study(postgres_url, synth_stas_dir, tmp_path):
    path = config_file(synth_stas_dir, tmp_path, {**SEARCH, "pruner": "none"}, "shared")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(path),
                postgres_url,
                str(tmp_path / f"machine_{me}"),
                me,
                other,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outputs, strict=True):
        assert p.returncode == 0, o[-3000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 8 <= len(finished) <= 9  # a worker may finish one trial past the shared budget
    workers = {t.user_attrs["worker"].split(":")[1] for t in finished}
    assert workers == {str(p.pid) for p in procs}  # both workers contributed trials
    for me in ("a", "b"):  # each "machine" keeps its own trial folders and the study report
        best = json.loads((tmp_path / f"machine_{me}" / "best.json").read_text())
        assert best["storage"].startswith("postgresql://postgres@127.0.0.1")  # the README form, psycopg 3
        assert any((tmp_path / f"machine_{me}" / "trials").iterdir())


def test_storage_urls_never_show_a_password():
    for url, shown in (
        ("postgresql://alice:s3cret@db.example/optuna", "postgresql://alice:***@db.example/optuna"),
        (
            "postgresql://alice:p@ss/w@rd@db.example:5432/optuna",
            "postgresql://alice:***@db.example:5432/optuna",
        ),
        ("postgresql://alice@db.example/optuna", "postgresql://alice@db.example/optuna"),
        ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
    ):
        assert masked_url(url) == shown
        assert "s3cret" not in masked_url(url) and "ss/w" not in masked_url(url)


def test_postgresql_url_of_the_readme_finds_its_driver(tmp_path):
    """SQLAlchemy 2.1 runs postgresql:// with psycopg 3: the dev extra installs it, so a plain URL gets as
    far as connecting (nothing listens on this port) instead of 'database driver missing'."""
    from medstudent.experiments.hpo import _storage

    with pytest.raises(DataError, match="cannot open") as e:
        _storage("postgresql://alice:s3cret@127.0.0.1:1/optuna")
    assert "driver missing" not in str(e.value) and "s3cret" not in str(e.value)
