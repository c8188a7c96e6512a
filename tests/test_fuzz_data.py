"""Property-based fuzzing of every data reader (issue 20): >= 1,000 generated malformed data sets per run.

Property: every case ends in exactly one of
  (a) a DataError / ConfigError whose message is one line and names the file (or the data set folder), or
  (b) acceptance, after which reading every item as training does (open_dataset, then each item's image and
      mask / label) succeeds with values in range;
never another exception, never more than CASE_SECONDS, and a case built to be bad is never accepted.
The "ci" profile is derandomised (no example database), so every run tries the same cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from bad_data import png_bytes
from fuzz_cases import labelme_case
from fuzz_cases_more import classification_case, config_case, mask_case, split_case, unlabeled_case
from medstudent.config import RunConfig, load_config
from medstudent.data.check import check_dataset
from medstudent.data.layouts import ClassificationDataset, SegmentationDataset, open_dataset
from medstudent.data.splits import fold_ids, load_split
from medstudent.errors import ConfigError, DataError

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,  # the per-case clock below is the time property; hypothesis' deadline is flaky on 2 cores
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
settings.load_profile("ci")

CASE_SECONDS = 5.0  # "never more than a few seconds per case"
HANG_SECONDS = 30  # SIGALRM turns a hang (a FIFO opened for reading) into a test failure, not a stuck run
EXAMPLES = {
    "labelme": 500,
    "masks": 350,
    "classification": 200,
    "unlabeled": 150,
    "split": 200,
    "config": 200,
}
OUTCOMES: Counter[tuple[str, str]] = Counter()
SECONDS: Counter[str] = Counter()


pytestmark = pytest.mark.filterwarnings("ignore::medstudent.data.labelme.LabelmeWarning")


@pytest.fixture(scope="module", autouse=True)
def _outcome_table(request):
    """Print the outcome table (family x error/accepted) and the time spent, for the issue's report."""
    t = time.perf_counter()
    yield
    total = sum(n for (_, kind), n in OUTCOMES.items() if kind != "known_bad")
    lines = [f"fuzz_data: {total} cases in {time.perf_counter() - t:.1f} s"]
    for fam in EXAMPLES:
        err, ok, known = OUTCOMES[(fam, "error")], OUTCOMES[(fam, "accepted")], OUTCOMES[(fam, "known_bad")]
        lines.append(
            f"  {fam:15s} clean error {err:4d} (built bad {known:4d}) accepted {ok:4d} ({SECONDS[fam]:.1f} s)"
        )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():  # shown without -s
        print("\n" + "\n".join(lines), file=sys.stderr, flush=True)


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _clock(family: str):
    """Per-case time limit: measured (CASE_SECONDS) and enforced against hangs (SIGALRM, POSIX)."""
    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:

        def _raise(signum, frame):
            raise _Hang(f"case still running after {HANG_SECONDS} s")

        old = signal.signal(signal.SIGALRM, _raise)
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    t = time.perf_counter()
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    dt = time.perf_counter() - t
    SECONDS[family] += dt
    assert dt < CASE_SECONDS, f"{family} case took {dt:.1f} s"


def _assert_clean(e: DataError, root: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(root) in msg, f"the message names no file under {root}: {msg}"


def _read_all_like_training(root: Path) -> None:
    """What train/cv/selftrain do with an accepted data set: every item, image and target, in range."""
    ds = open_dataset(root)
    for i in range(len(ds)):
        if isinstance(ds, SegmentationDataset):
            img, mask = ds.load(i)
            assert mask.dtype == np.uint8 and mask.shape == img.shape[:2]
            assert int(mask.max(initial=0)) < ds.num_classes
        else:
            img = ds.load_image(i)
            if isinstance(ds, ClassificationDataset):
                assert 0 <= ds.items[i].label < ds.num_classes
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0


def _dataset_property(family: str, root: Path, bad: bool) -> None:
    OUTCOMES[(family, "known_bad")] += bad
    with _clock(family):
        try:
            rep = check_dataset(root)
        except DataError as e:
            _assert_clean(e, root)
            OUTCOMES[(family, "error")] += 1
            return
        for line in [*rep.errors, *rep.skipped]:
            assert "\n" not in line and str(root) in line, line
        if not rep.ok:
            OUTCOMES[(family, "error")] += 1
            return
        assert not bad, f"a case built to be bad passed `data check`: {sorted(os.listdir(root))}"
        _read_all_like_training(root)
        OUTCOMES[(family, "accepted")] += 1


def _tmp() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="fuzz-")


@settings(max_examples=EXAMPLES["labelme"])
@given(labelme_case())
def test_fuzz_labelme_folders(case):
    with _tmp() as d:
        root = Path(d) / "ds"
        bad = case.build(root)
        _dataset_property("labelme", root, bad)


@settings(max_examples=EXAMPLES["masks"])
@given(mask_case())
def test_fuzz_mask_folders(case):
    with _tmp() as d:
        root = Path(d) / "ds"
        bad = case.build(root)
        _dataset_property("masks", root, bad)


@settings(max_examples=EXAMPLES["classification"])
@given(classification_case())
def test_fuzz_classification_folders(case):
    with _tmp() as d:
        root = Path(d) / "ds"
        bad = case.build(root)
        _dataset_property("classification", root, bad)


@settings(max_examples=EXAMPLES["unlabeled"])
@given(unlabeled_case())
def test_fuzz_unlabeled_folders(case):
    with _tmp() as d:
        root = Path(d) / "ds"
        bad = case.build(root)
        _dataset_property("unlabeled", root, bad)


@settings(max_examples=EXAMPLES["split"])
@given(split_case())
def test_fuzz_split_files(case):
    text, bad = case
    OUTCOMES[("split", "known_bad")] += bad
    with _tmp() as d:
        p = Path(d) / "split.json"
        p.write_bytes(text)
        with _clock("split"):
            try:
                split = load_split(p)
            except DataError as e:
                _assert_clean(e, p)
                OUTCOMES[("split", "error")] += 1
                return
            assert not bad, text[:200]
            for fold in [*range(len(split["folds"])), "all"]:
                for ids in fold_ids(split, fold):
                    assert all(isinstance(i, str) for i in ids)
            OUTCOMES[("split", "accepted")] += 1


@settings(max_examples=EXAMPLES["config"])
@given(config_case())
def test_fuzz_config_yaml(case):
    text, bad = case
    OUTCOMES[("config", "known_bad")] += bad
    with _tmp() as d:
        p = Path(d) / "cfg.yaml"
        p.write_bytes(text)
        with _clock("config"):
            try:
                cfg = load_config(p)
            except ConfigError as e:
                _assert_clean(e, p)
                OUTCOMES[("config", "error")] += 1
                return
            assert not bad, text[:200]
            assert isinstance(cfg, RunConfig)
            yaml.safe_dump(cfg.model_dump(mode="json"))  # a config that loads also saves
            OUTCOMES[("config", "accepted")] += 1


def test_fuzz_case_builders_make_good_data_too(tmp_path):
    """The generators are not all-bad: a clean labelme set from the same builders passes (sanity)."""
    from bad_data import labelme_doc, labelme_set, shape

    root = labelme_set(tmp_path / "ds", {"a": labelme_doc([shape([[1, 1], [9, 1], [9, 9]])])})
    assert check_dataset(root).ok
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    assert check_dataset(tmp_path / "u").ok
    assert json.loads(json.dumps({"ok": True}))["ok"]
