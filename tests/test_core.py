"""The torch-free inference core on hand-made networks: TTA, tiling, scales, ensembles, the contract,
output names. No model is trained here; the engine-parity suite on trained models is tests/test_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medstudent.config import PostprocessConfig
from medstudent.core import inferer
from medstudent.core.budget import calibrate
from medstudent.core.contract import (
    MemberSpec,
    PipelineSpec,
    PreprocessSpec,
    WindowSpec,
    member_graph,
    read_pipeline,
    sha256_of,
    write_pipeline,
)
from medstudent.core.ensemble import combine
from medstudent.core.folder import output_stems
from medstudent.core.tta import forward_op, inverse_op, tta_ops
from medstudent.core.workflow import predict_images
from medstudent.errors import DataError

SEG_PRE = {"task": "segmentation", "scale": 1.0, "pad_multiple": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
CLS_PRE = {"task": "classification", "image_size": 32, "pad_multiple": 1, "mean": [0.5] * 3, "std": [0.5] * 3}


class PixelEngine:
    """An engine whose 'network' is pointwise: sigmoid(gain * channel mean + bias) per member. Pointwise
    networks commute with every TTA view and with tiling, which gives exact expected answers."""

    device, precision = "cpu", "32"

    def __init__(self, spec: PipelineSpec, gains=(1.0,), biases=(0.0,)):
        self.spec, self.gains, self.biases = spec, gains, biases
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def run(self, member: int, batch: np.ndarray) -> np.ndarray:
        self.calls.append((member, batch.shape))
        z = self.gains[member] * batch.mean(1, keepdims=True) + self.biases[member]
        if self.spec.task == "classification":
            z = np.concatenate([z.mean((2, 3)), -z.mean((2, 3))], axis=1)
            e = np.exp(z - z.max(1, keepdims=True))
            return (e / e.sum(1, keepdims=True)).astype(np.float32)
        return (1 / (1 + np.exp(-z))).astype(np.float32)

    def run_passes(self, member: int, batches: list[np.ndarray]) -> list[np.ndarray]:
        return [self.run(member, b) for b in batches]


def seg_spec(n: int = 1, **kw) -> PipelineSpec:
    members = [MemberSpec(preprocess=PreprocessSpec(**SEG_PRE)) for _ in range(n)]
    return PipelineSpec(
        task="segmentation", class_names=["background", "STAS"], binary=True, members=members, **kw
    )


def test_tta_ops_are_inverted_exactly():
    x = np.arange(2 * 3 * 64 * 96, dtype=np.float32).reshape(2, 3, 64, 96)
    for op in tta_ops("d4"):
        assert np.array_equal(inverse_op(forward_op(x, op), op), x)
    assert len({forward_op(x, op).tobytes() for op in tta_ops("d4")}) == 8  # eight different views


def test_ensembles_on_hand_made_maps():
    a = np.array([[0.9, 0.2], [0.6, 0.1]], np.float32)
    b = np.array([[0.8, 0.7], [0.4, 0.2]], np.float32)
    c = np.array([[0.1, 0.6], [0.7, 0.3]], np.float32)
    np.testing.assert_allclose(combine([a, b, c], "mean"), (a + b + c) / 3)
    vote = combine([a, b, c], "vote", threshold=0.5)
    np.testing.assert_allclose(vote, [[2 / 3, 2 / 3], [2 / 3, 0]])
    assert ((vote > 0.5) == np.array([[1, 1], [1, 0]], bool)).all()
    np.testing.assert_allclose(combine([a, b], "mean", [3, 1]), 0.75 * a + 0.25 * b, atol=1e-7)
    # multi-class vote: argmax per member, fraction of members per class
    p1 = np.array([0.7, 0.2, 0.1]).reshape(3, 1, 1)
    p2 = np.array([0.1, 0.8, 0.1]).reshape(3, 1, 1)
    p3 = np.array([0.6, 0.3, 0.1]).reshape(3, 1, 1)
    np.testing.assert_allclose(combine([p1, p2, p3], "vote")[:, 0, 0], [2 / 3, 1 / 3, 0])
    with pytest.raises(DataError, match="unknown ensemble mode"):
        combine([a, b], "median")


def test_inferer_steps_on_a_pointwise_network():
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    eng = PixelEngine(seg_spec())
    plain = inferer.predict_probs(eng, img, tta="none")
    assert plain.shape == (70, 90) and 0 < plain.min() <= plain.max() < 1
    x = (img.astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(plain, 1 / (1 + np.exp(-x.mean(2))), atol=1e-6)
    for tta in ("flip", "d4"):  # a pointwise network is equivariant: TTA changes nothing
        np.testing.assert_allclose(inferer.predict_probs(eng, img, tta=tta), plain, atol=1e-6)
    eng.calls.clear()
    tiled = inferer.predict_probs(eng, img, tta="flip", tile=32)
    np.testing.assert_allclose(tiled, plain, atol=1e-6)  # Gaussian blending of equal windows
    assert all(shape[0] <= 2 and shape[2:] == (32, 32) for _, shape in eng.calls)  # sw_batch_size windows
    # multi-scale: the mean of the single-scale maps
    ones = [inferer.predict_probs(eng, img, scales=[f]) for f in (1.0, 0.5)]
    np.testing.assert_allclose(inferer.predict_probs(eng, img, scales=[1.0, 0.5]), (ones[0] + ones[1]) / 2)


def test_inferer_ensembles_members_and_classification():
    img = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    eng = PixelEngine(seg_spec(2), gains=(1.0, 3.0), biases=(0.0, -1.0))
    a, b = (inferer.member_probs(eng, k, img) for k in (0, 1))
    assert np.abs(a - b).max() > 0.1
    np.testing.assert_allclose(inferer.predict_probs(eng, img), (a + b) / 2, atol=1e-7)
    np.testing.assert_allclose(inferer.predict_probs(eng, img, members=[1]), b)
    vote = inferer.predict_probs(eng, img, ensemble="vote")
    np.testing.assert_allclose(vote, ((a > 0.5).astype(np.float32) + (b > 0.5)) / 2)
    cls = PipelineSpec(
        task="classification",
        class_names=["a", "b"],
        members=[MemberSpec(preprocess=PreprocessSpec(**CLS_PRE))],
    )
    ce = PixelEngine(cls)
    p = inferer.predict_probs(ce, img, tta="d4")
    assert p.shape == (2,) and abs(p.sum() - 1) < 1e-6
    assert len(ce.calls) == 2  # classification TTA = the image and its mirror, whatever the set


def test_window_rule_and_budget_plan_on_the_core():
    win = WindowSpec(max_full_pixels=64 * 64)
    assert win.tile_for(64, 64) is None and win.tile_for(64, 65) == 512 and win.tile_for(10, 10, 100) == 96
    assert WindowSpec(tile=20).tile_for(10, 10) == 32  # at least 32
    img = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    spec = seg_spec(2, postprocess=PostprocessConfig(min_area=5))
    plan = calibrate(PixelEngine(spec, (1.0, 2.0), (0.0, 0.0)), img, 1000, tta="d4")
    assert (plan.tta, plan.members, plan.fits) == ("d4", [0, 1], True)
    assert all(c["fixed_s"] > 0 and c["pass_s"] > 0 for c in plan.costs) and plan.overhead_s > 0


def _write(tmp: Path, doc: dict) -> Path:
    (tmp / "pipeline.json").write_text(json.dumps(doc))
    return tmp


def test_pipeline_contract_reads_old_files_and_refuses_bad_ones(tmp_path):
    # a version-1 file as exported before multi-scale TTA and the typed contract (no tta_scales)
    old = {
        "format": "medstudent-onnx-pipeline",
        "format_version": 1,
        "task": "segmentation",
        "class_names": ["background", "STAS"],
        "binary": True,
        "tta": "flip",
        "tta_sets": {"none": [[0, False, False]]},
        "ensemble": {"mode": "mean", "weights": [1.0]},
        "postprocess": {"threshold": 0.4},
        "members": [
            {
                "file": "member_0.onnx",
                "weight": 1.0,
                "preprocess": {**SEG_PRE, "version": 1, "layout": "CHW"},
                "sliding_window": {
                    "tile": None,
                    "default_tile": 512,
                    "max_full_pixels": 100,
                    "overlap": 0.25,
                },
            }
        ],
    }
    spec = read_pipeline(_write(tmp_path, old))
    assert spec.scale_factors() == [1.0] and spec.postprocess.threshold == 0.4 and spec.tta_sets  # extra kept
    for change, msg in (
        ({"format_version": 7}, "format_version 7 is not supported (this medstudent reads 1)"),
        ({"format": "other"}, "not a medstudent pipeline"),
        ({"tta": "d8"}, "invalid pipeline: tta"),
        ({"members": []}, "invalid pipeline: members"),
        ({"members": [{"file": "m.onnx"}]}, "invalid pipeline: members.0.preprocess"),
    ):
        with pytest.raises(DataError, match="pipeline.json: ") as e:
            read_pipeline(_write(tmp_path, {**old, **change}))
        assert msg in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "pipeline.json").write_text("[" * 100_000)
    with pytest.raises(DataError, match="not valid JSON"):
        read_pipeline(tmp_path)


def test_member_files_stay_in_their_folder_and_match_their_digest(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "member_0.onnx").write_bytes(b"graph")
    (tmp_path / "outside.onnx").write_bytes(b"graph")
    member = MemberSpec(preprocess=PreprocessSpec(**SEG_PRE), file="member_0.onnx")
    member.sha256 = sha256_of(folder / "member_0.onnx")
    spec = PipelineSpec(task="segmentation", class_names=["b", "f"], binary=True, members=[member])
    pipeline = write_pipeline(spec, folder)
    assert read_pipeline(folder).members[0].sha256 == member.sha256
    assert member_graph(folder, member, False, pipeline) == folder / "member_0.onnx"
    for name in ("../outside.onnx", str(tmp_path / "outside.onnx")):
        with pytest.raises(DataError, match="is not inside the model folder"):
            member_graph(folder, member.model_copy(update={"file": name}), False, pipeline)
    (folder / "member_0.onnx").write_bytes(b"other graph")
    with pytest.raises(DataError, match=r"member_0\.onnx: sha256 differs"):
        member_graph(folder, member, False, pipeline)
    with pytest.raises(DataError, match="no int8 graphs"):
        member_graph(folder, member, True, pipeline)


def test_output_names_never_overwrite_each_other(tmp_path):
    files = [tmp_path / "a.jpg", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "x" / "b.png"]
    assert output_stems(files) == ["a_jpg", "a_png", "b_png", "x_b_png"]
    assert output_stems(files[2:3]) == ["b"]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a.jpg", "a.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(imgs / name)
    summary = predict_images(PixelEngine(seg_spec()), imgs, tmp_path / "out", save_probs=True)
    assert summary["predicted"] == 3
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == [
        "a_jpg.png",
        "a_png.png",
        "c.png",
    ]


def test_engines_follow_the_protocol():
    assert isinstance(PixelEngine(seg_spec()), inferer.Engine)
