"""Property-based fuzzing of exported model folders (`pipeline.json` + member graphs), the reader the data
fuzz suite (test_fuzz_data.py) does not cover.

Each case mutates a valid export: a key removed, a value replaced by a value of another type or range, a
member file pointing elsewhere, a graph swapped. Property: `OnnxPipeline(folder)` either raises a DataError
whose message is one line and names a file of the folder, or loads, and then predicting a small image gives
finite probabilities in [0, 1] of the image's size (or one per class); never another exception, never more
than a few seconds. Cases built to be bad (a file outside the folder, a changed graph, an unsupported
version) must not load. Same derandomised hypothesis profile as the data fuzz suite.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from medstudent.core.contract import sha256_of
from medstudent.errors import DataError
from medstudent.runner import OnnxPipeline

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")

CASE_SECONDS = 5.0
OUTCOMES: Counter[str] = Counter()
SEG_PRE = {"task": "segmentation", "scale": 0.5, "pad_multiple": 32, "mean": [0.5] * 3, "std": [0.5] * 3}

KEYS = [
    ("format",),
    ("format_version",),
    ("task",),
    ("class_names",),
    ("binary",),
    ("tta",),
    ("tta_scales",),
    ("ensemble",),
    ("ensemble", "mode"),
    ("ensemble", "weights"),
    ("postprocess",),
    ("postprocess", "threshold"),
    ("postprocess", "min_area"),
    ("members",),
    ("members", 0),
    ("members", 0, "file"),
    ("members", 0, "weight"),
    ("members", 0, "sha256"),
    ("members", 0, "preprocess"),
    ("members", 0, "preprocess", "scale"),
    ("members", 0, "preprocess", "resize"),
    ("members", 0, "preprocess", "mean"),
    ("members", 0, "preprocess", "std"),
    ("members", 0, "preprocess", "in_channels"),
    ("members", 0, "preprocess", "pad_multiple"),
    ("members", 0, "sliding_window"),
    ("members", 0, "sliding_window", "tile"),
    ("members", 0, "sliding_window", "overlap"),
    ("members", 0, "sliding_window", "max_full_pixels"),
    ("members", 0, "sliding_window", "sw_batch_size"),
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["../outside.onnx", "/etc/passwd", "member_0.onnx", "d4", "vote", "classification"]),
    st.lists(st.one_of(st.integers(-3, 5000), st.floats(-2, 5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _graph(path: Path) -> None:
    """A tiny graph with the exported interface: NCHW float32 in, sigmoid of the channel mean out."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 1, "height", "width"])
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Sigmoid", ["m"], ["probs"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module", autouse=True)
def _outcome_table(request):
    """Print how the cases ended (shown without -s), for the issue's report."""
    yield
    text = ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES.items()))
    total = OUTCOMES["clean error"] + OUTCOMES["accepted"]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nfuzz_pipeline: {total} cases: {text}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("export")
    _graph(folder / "member_0.onnx")
    doc = {
        "format": "medstudent-onnx-pipeline",
        "format_version": 1,
        "task": "segmentation",
        "class_names": ["background", "lesion"],
        "binary": True,
        "tta": "flip",
        "tta_scales": [1.0],
        "ensemble": {"mode": "mean", "weights": [1.0]},
        "postprocess": {"threshold": 0.5, "min_area": 4},
        "members": [
            {
                "file": "member_0.onnx",
                "sha256": sha256_of(folder / "member_0.onnx"),
                "weight": 1.0,
                "preprocess": dict(SEG_PRE),
                "sliding_window": {"tile": None, "max_full_pixels": 4096, "overlap": 0.25},
            }
        ],
    }
    return folder, doc


def _set(doc: dict, path: tuple, value, delete: bool) -> None:
    node: object = doc
    for key in path[:-1]:  # an earlier edit may have removed or replaced a parent: then nothing to do
        in_dict = isinstance(node, dict) and key in node
        if in_dict or (isinstance(node, list) and isinstance(key, int) and key < len(node)):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        if delete:
            node.pop(last)
        else:
            node[last] = value


@st.composite
def mutation(draw) -> tuple[list, str | None]:
    """Up to three key edits, and maybe a file-level attack; returns (edits, attack)."""
    edits = draw(st.lists(st.tuples(st.sampled_from(KEYS), VALUES, st.booleans()), min_size=0, max_size=3))
    attack = draw(st.sampled_from([None, None, None, "swap_graph", "outside", "version", "not_json", "deep"]))
    return edits, attack


@given(case=mutation())
@settings(max_examples=1000)
def test_exported_folders_load_cleanly_or_fail_in_one_line(case, template, tmp_path_factory):
    edits, attack = case
    src, base = template
    folder = tmp_path_factory.mktemp("case")
    shutil.copy(src / "member_0.onnx", folder / "member_0.onnx")
    doc = copy.deepcopy(base)
    for path, value, delete in edits:
        _set(doc, path, value, delete)
    known_bad = False
    text = json.dumps(doc, allow_nan=True)
    if attack == "swap_graph":
        (folder / "member_0.onnx").write_bytes(b"\x08\x07garbage")
        known_bad = True
    elif attack == "outside":
        shutil.copy(src / "member_0.onnx", folder.parent / "outside.onnx")
        member = (
            doc.get("members", [{}])[0] if isinstance(doc.get("members"), list) and doc["members"] else {}
        )
        if isinstance(member, dict):
            member["file"] = "../outside.onnx"
            member.pop("sha256", None)
            text, known_bad = json.dumps(doc, allow_nan=True), True
    elif attack == "version":
        doc["format_version"] = 2
        text, known_bad = json.dumps(doc, allow_nan=True), True
    elif attack == "not_json":
        text, known_bad = text[: len(text) // 2], True
    elif attack == "deep":
        text, known_bad = "[" * 50_000 + "]" * 50_000, True
    (folder / "pipeline.json").write_text(text)
    t0 = time.perf_counter()
    try:
        pipe = OnnxPipeline(folder, threads=1)
        img = np.random.default_rng(0).integers(0, 255, (30, 41, 3), dtype=np.uint8)
        probs = pipe.predict_probs(img)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and str(folder) in msg, msg
        OUTCOMES["clean error"] += 1
        OUTCOMES["of which built bad"] += known_bad
    else:
        OUTCOMES["accepted"] += 1
        assert not known_bad, f"{attack}: a folder built to be bad loaded"
        assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1
        assert probs.shape in ((30, 41), (2,), (2, 30, 41)), probs.shape
    assert time.perf_counter() - t0 < CASE_SECONDS
