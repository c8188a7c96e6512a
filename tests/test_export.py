"""ONNX export + torch-free runner: contract, parity with the torch predictor (TTA, tiles, ensembles),
no torch import, time budget, classification, int8, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from medstudent.cli import app
from medstudent.config import PostprocessConfig, load_config
from medstudent.core.budget import choose_plan, pass_rounds, passes_cost
from medstudent.core.contract import read_pipeline, sha256_of
from medstudent.core.postprocess import postprocess
from medstudent.core.tiling import sliding_window
from medstudent.data.io import read_image
from medstudent.errors import DataError
from medstudent.inference.export import export_model
from medstudent.inference.predict import load_predictor, predict_probs
from medstudent.runner import OnnxPipeline, predict_onnx_folder
from medstudent.training.train import train
from test_training import TINY

runner = CliRunner()
FORBIDDEN = (
    "torch",
    "torchvision",
    "monai",
    "timm",
    "segmentation_models_pytorch",
    "lightning",
    "albumentations",
)
TUNED = PostprocessConfig(threshold=0.45, closing=2, fill_holes=True, min_area=20)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Many small forward passes: with 2 threads on a busy 2-core machine torch's thread pool spins and
    becomes ~10x slower; one thread keeps this module fast (speed is measured in benchmarks/, not here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seg_runs(synth_stas_dir, tmp_path_factory) -> list[Path]:
    """A trained tiny FPN with tuned post-processing, and a second member: its checkpoint with a shifted
    head bias (a different model in the real checkpoint format, without a second training)."""
    tmp = tmp_path_factory.mktemp("export_train")
    cfg = load_config(
        "stas_cpu",
        [
            f"data.root={synth_stas_dir}",
            f"train.output_dir={tmp / 'runs'}",
            *TINY,
            "train.epochs=2",
            "train.name=tiny",
            "optim.lr=0.003",
        ],
    )
    run = train(cfg, progress=False)
    torch.set_num_threads(1)  # train() sets the thread count to the core count
    (run / "postprocess.json").write_text(TUNED.model_dump_json())
    second = tmp / "second"
    (second / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    heads = [k for k in ckpt["state_dict"] if "segmentation_head" in k and k.endswith("bias")]
    assert heads
    for k in heads:
        ckpt["state_dict"][k] = ckpt["state_dict"][k] + 0.7
    torch.save(ckpt, second / "checkpoints" / "best.ckpt")
    return [run, second]


@pytest.fixture(scope="module")
def seg_model(seg_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    args = ["export", *map(str, seg_runs), "-o", str(out), "--tta", "flip", "--weights", "1,1"]
    res = runner.invoke(app, [*args, "--int8", "dynamic"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def few_images(synth_stas_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("few")
    for p in sorted((synth_stas_dir / "Train_Images").glob("*.jpg"))[:3]:
        shutil.copy(p, d / p.name)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (97, 131, 3), dtype=np.uint8)).save(d / "odd_size.png")
    return d


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_export_writes_graphs_and_contract(seg_model, seg_runs, tmp_path):
    spec = json.loads((seg_model / "pipeline.json").read_text())
    assert spec["task"] == "segmentation" and spec["binary"] and spec["class_names"][0] == "background"
    assert spec["tta"] == "flip" and spec["ensemble"] == {"mode": "mean", "weights": [0.5, 0.5]}
    assert PostprocessConfig.model_validate(spec["postprocess"]) == TUNED  # the run's tuned file
    assert {"torch", "onnx", "onnxruntime", "medstudent", "opset"} <= set(spec["versions"])
    assert len(spec["members"]) == 2 and spec["int8"]["available"] and not spec["int8"]["use"]
    for m in spec["members"]:
        pre = m["preprocess"]
        assert pre["task"] == "segmentation" and pre["pad_multiple"] == 32 and len(pre["mean"]) == 3
        assert m["sliding_window"]["overlap"] == 0.25 and m["sliding_window"]["mode"] == "gaussian"
        assert m["export_max_abs_diff"] < 1e-5  # checked at export on two sizes
        graph = onnx.load(str(seg_model / m["file"]))
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
        dims = [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", "", "height", "width"]  # dynamic except the channel axis
        # FPN's merge of the four levels is a chain of Adds, not Concat + ReduceSum over a stacked copy
        ops = [n.op_type for n in graph.graph.node]
        assert "ReduceSum" not in ops and ops.count("Add") >= 3
        assert (seg_model / m["int8_file"]).is_file()
    # the merge is traced as additions only during the export; the model keeps smp's forward
    pred = load_predictor(seg_runs[0])
    export_model(pred, tmp_path / "again.onnx")
    assert all("forward" not in vars(m) for m in pred.model.modules())


# The engine-parity suite: each case runs the torch engine (run folders) and the ONNX engine (the export)
# through the same core on the same images; they must agree within float32 rounding and give equal masks.
PARITY_CASES = {  # tta, ensemble, tile, scales (None: the pipeline's), images (indices into few_images)
    "no-tta": ("none", "mean", None, [1.0], slice(None)),
    "flip-mean": ("flip", "mean", None, None, slice(None)),
    "d4-vote": ("d4", "vote", None, [1.0], slice(-2, None)),
    "flip-tiles": ("flip", "mean", 64, [1.0], slice(0, 1)),
    "flip-two-scales": ("flip", "mean", None, [1.0, 0.75], slice(0, 2)),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_engines_agree(case, seg_model, seg_runs, few_images):
    tta, ensemble, tile, scales, which = PARITY_CASES[case]
    preds = [load_predictor(r) for r in seg_runs]
    pipe = OnnxPipeline(seg_model)
    for path in sorted(few_images.iterdir())[which]:
        img = read_image(path)
        ref = predict_probs(preds, img, tta=tta, ensemble=ensemble, tile=tile, scales=scales)
        got = pipe.predict_probs(img, tta=tta, ensemble=ensemble, tile=tile, scales=scales)
        assert got.shape == ref.shape == img.shape[:2]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        assert np.array_equal(postprocess(got, TUNED), postprocess(ref, TUNED)), path.name


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_onnx_scales_members_and_weights(seg_model, seg_runs, few_images):
    preds = [load_predictor(r) for r in seg_runs]
    pipe = OnnxPipeline(seg_model)
    img = read_image(sorted(few_images.iterdir())[0])
    # multi-scale TTA: the exported default is the run's, and a second scale changes the map
    assert pipe.tta_scales == preds[0].cfg.predict.tta_scales
    two = pipe.predict_probs(img, tta="flip", scales=[1.0, 0.75])
    assert np.abs(two - pipe.predict_probs(img, tta="flip", scales=[1.0])).max() > 1e-3
    # the two members really differ, so the ensemble is not a trivial average of equal maps
    a, b = (pipe.member_probs(k, img, "none") for k in (0, 1))
    assert np.abs(a - b).max() > 0.05
    # members=[1] gives member 1 alone
    one = pipe.predict_probs(img, tta="none", members=[1], scales=[1.0])
    np.testing.assert_allclose(one, b, atol=1e-6)


def test_sliding_window_is_monai_in_numpy():
    from monai.inferers import sliding_window_inference

    rng = np.random.default_rng(0)

    def f_np(a: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(a[:, :2] * 2 + a.mean(axis=(1, 2, 3), keepdims=True))))

    def f_t(t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(t[:, :2] * 2 + t.mean(dim=(1, 2, 3), keepdim=True))

    for h, w, tile, overlap in (
        (96, 160, 64, 0.25),
        (33, 47, 64, 0.1),
        (40, 200, 64, 0.5),
        (128, 96, 32, 0.25),
    ):
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        ref = sliding_window_inference(
            torch.from_numpy(x),
            (tile, tile),
            2,
            f_t,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
        ).numpy()
        np.testing.assert_allclose(sliding_window(x, tile, f_np, overlap, 2), ref, atol=1e-6, rtol=0)


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_cli_onnx_engine_same_files_as_torch_without_importing_torch(
    seg_model, seg_runs, few_images, tmp_path
):
    out_t, out_o = tmp_path / "torch", tmp_path / "onnx"
    res = runner.invoke(
        app, ["predict", *map(str, seg_runs), "-i", str(few_images), "-o", str(out_t), "--probs", "--labelme"]
    )
    assert res.exit_code == 0, res.output
    code = textwrap.dedent(
        f"""
        import json, sys
        from typer.testing import CliRunner
        from medstudent.cli import app
        r = CliRunner().invoke(app, ["predict", "--engine", "onnx", {str(seg_model)!r}, "-i",
                                     {str(few_images)!r}, "-o", {str(out_o)!r}, "--probs", "--labelme"])
        print(json.dumps({{"code": r.exit_code, "output": r.output,
                          "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["code"] == 0, rep["output"]
    assert rep["loaded"] == []  # the whole ONNX path ran without torch, MONAI, timm, albumentations
    assert "TTA flip" in rep["output"] and "2 model(s)" in rep["output"]
    masks = sorted(p.name for p in (out_t / "masks").glob("*.png"))
    assert len(masks) == 4 and masks == sorted(p.name for p in (out_o / "masks").glob("*.png"))
    for name in masks:
        assert np.array_equal(
            np.asarray(Image.open(out_t / "masks" / name)), np.asarray(Image.open(out_o / "masks" / name))
        )
        pt = np.asarray(Image.open(out_t / "probs" / name), dtype=int)
        po = np.asarray(Image.open(out_o / "probs" / name), dtype=int)
        assert np.abs(pt - po).max() <= 1  # 8-bit rounding of maps equal to 1e-4
        stem = Path(name).stem
        lt = json.loads((out_t / "labelme" / f"{stem}.json").read_text())
        lo = json.loads((out_o / "labelme" / f"{stem}.json").read_text())
        assert lt["shapes"] == lo["shapes"]
        assert (out_o / "overlays" / name).is_file()


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_tta_passes_side_by_side_match_sequential(seg_model, few_images):
    """With two threads the runner runs TTA passes concurrently on single-threaded sessions; the
    probabilities are those of the passes run one after another."""
    img = read_image(sorted(few_images.glob("*.jpg"))[0])
    side = OnnxPipeline(seg_model, threads=2)
    seq = OnnxPipeline(seg_model, threads=2, parallel_passes=False)
    for tta in ("flip", "d4"):
        np.testing.assert_allclose(
            side.predict_probs(img, tta=tta), seq.predict_probs(img, tta=tta), atol=1e-5, rtol=0
        )
    assert all(m.solo is not None for m in side.members) and all(m.solo is None for m in seq.members)
    assert OnnxPipeline(seg_model, threads=1).parallel_passes is False
    plan = side.calibrate(img, 1000, tta="d4")
    assert all(c["round_s"] > 0 and c["threads"] == 2 for c in plan.costs)


def test_budget_plan_rule():
    costs = [{"fixed_s": 0.1, "pass_s": 1.0}, {"fixed_s": 0.1, "pass_s": 2.0}]
    kw = {"task": "segmentation", "max_tta": "d4", "overhead_s": 0.2}
    full = choose_plan(100, costs, **kw)
    assert (full.tta, full.members, full.fits) == ("d4", [0, 1], True)
    assert full.estimate_s == pytest.approx(0.2 + 0.2 + 8 * 3)
    # 3.5 s: flip x member 0 (3.3 s, 3 passes) beats both members without TTA (3.4 s, 2 passes)
    mid = choose_plan(3.5, costs, **kw)
    assert (mid.tta, mid.members) == ("flip", [0])
    # weights decide which member is kept first
    assert choose_plan(2.5, costs, weights=[0.2, 0.8], **kw).members == [1]
    # a tie in passes goes to more members: none x 3 models and flip x 1 model are 3 passes each
    tie = choose_plan(3.3, [{"fixed_s": 0, "pass_s": 1.0}] * 3, task="segmentation", max_tta="flip")
    assert (tie.tta, tie.members) == ("none", [0, 1, 2])  # 3 passes either way: 3 members preferred
    cheap = choose_plan(0.01, costs, **kw)
    assert not cheap.fits and (cheap.tta, cheap.members) == ("none", [0]) and "exceeds" in cheap.summary()
    cls = choose_plan(2.5, [{"fixed_s": 0, "pass_s": 1.0}], task="classification", max_tta="d4")
    assert cls.tta == "flip" and cls.estimate_s == 2.0  # classification TTA = image + mirror
    # passes side by side: 2 threads run d4's 8 passes in 4 rounds, flip's 3 in 1 round + 1 pass alone
    assert [pass_rounds(n, 2) for n in (1, 3, 8)] == [(0, 1), (1, 1), (4, 0)] and pass_rounds(8, 1) == (0, 8)
    side = {"fixed_s": 0.0, "pass_s": 1.0, "round_s": 1.25, "threads": 2}
    assert [passes_cost(side, n) for n in (1, 3, 8)] == [1.0, 2.25, 5.0]
    assert choose_plan(5.0, [side], task="segmentation", max_tta="d4").tta == "d4"  # 8 x 1.0 would not fit


def test_budget_plan_chooses_scales():
    """With each scale measured on its own, the plan may drop trailing scales: more TTA views at one scale
    beat fewer views at two when both fit, and the plan says which scales it kept."""
    one, two = {"factor": 1.0, "fixed_s": 0.1, "pass_s": 0.2}, {"factor": 1.25, "fixed_s": 0.1, "pass_s": 0.3}
    cost = {"fixed_s": 0.2, "pass_s": 0.5, "scales": [one, two]}
    kw = {"task": "segmentation", "max_tta": "d4"}
    plan = choose_plan(2.0, [cost], **kw)  # d4 at 1x: 1.7 s (8 passes); flip at both: 1.2 s (4 passes)
    assert (plan.tta, plan.scales, plan.estimate_s) == ("d4", [1.0], pytest.approx(1.7))
    assert "TTA d4 x scales [1.0], 1/1 model(s)" in plan.summary()
    full = choose_plan(5.0, [cost], **kw)  # d4 at both scales: 0.2 + 8 x 0.5 = 4.2 s
    assert (full.tta, full.scales, full.estimate_s) == ("d4", [1.0, 1.25], pytest.approx(4.2))
    small = choose_plan(0.35, [cost], **kw)
    assert (small.tta, small.scales) == ("none", [1.0])
    assert choose_plan(5.0, [{"fixed_s": 0.2, "pass_s": 0.5}], **kw).scales is None  # not measured per scale


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_budget_seconds_measures_and_reports(seg_model, seg_runs, few_images, tmp_path):
    one = next(few_images.glob("*.jpg"))
    s = predict_onnx_folder(
        seg_model, one, tmp_path / "a", tta="d4", budget_seconds=1000, save_overlays=False
    )
    plan = s["plan"]
    assert (plan["tta"], plan["members"], plan["fits"]) == ("d4", [0, 1], True) and s["tta"] == "d4"
    assert all(c["pass_s"] > 0 and c["fixed_s"] > 0 for c in plan["costs"])  # measured on the image
    expect = plan["overhead_s"] + sum(c["fixed_s"] + passes_cost(c, 8) for c in plan["costs"])
    assert plan["estimate_s"] == pytest.approx(expect)
    for engine, model, budget, shown in (
        ("onnx", [str(seg_model)], "0.000001", "TTA none x scales [1.0], 1/2 model(s) [0], estimated"),
        # the runs' tta: flip, at the preset's two scales
        ("torch", list(map(str, seg_runs)), "1000", "TTA flip x scales [1.0, 1.25], 2/2 model(s) [0, 1]"),
    ):
        args = ["predict", "--engine", engine, *model, "-i", str(one), "-o", str(tmp_path / engine)]
        res = runner.invoke(app, [*args, "--budget-seconds", budget, "--no-overlays"])
        assert res.exit_code == 0, res.output
        assert shown in res.output, res.output
        assert ("exceeds the budget" in res.output) == (engine == "onnx")  # 1 microsecond cannot be met
    # a run's predict.budget_seconds is predict's default (kept in pipeline.json); --budget-seconds 0: none
    budgeted = tmp_path / "budgeted"
    shutil.copytree(seg_runs[0], budgeted)
    ckpt_path = budgeted / "checkpoints" / "best.ckpt"  # a run keeps its config in its checkpoints
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["predict"]["budget_seconds"] is None
    ckpt["hyper_parameters"]["config"]["predict"]["budget_seconds"] = 1000.0
    torch.save(ckpt, ckpt_path)
    res = runner.invoke(app, ["export", str(budgeted), "-o", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "exp" / "pipeline.json").read_text())["budget_seconds"] == 1000.0
    for extra, planned in (([], True), (["--budget-seconds", "0"], False)):
        args = ["predict", "--engine", "onnx", str(tmp_path / "exp"), "-i", str(one)]
        res = runner.invoke(app, [*args, "-o", str(tmp_path / "p"), "--no-overlays", *extra])
        assert res.exit_code == 0, res.output
        assert ("budget 1000.00 s/image" in res.output) == planned, res.output


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_int8_graphs_run_close_to_fp32(seg_model, few_images):
    img = read_image(next(few_images.glob("*.jpg")))
    fp32 = OnnxPipeline(seg_model).predict_probs(img, tta="none")
    q = OnnxPipeline(seg_model, int8=True)
    assert q.int8 and all(m.file.name.endswith(".int8.onnx") for m in q.members)
    got = q.predict_probs(img, tta="none")
    assert got.shape == fp32.shape and np.abs(got - fp32).mean() < 0.02


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_static_int8_quantises_the_decoder_only(seg_runs, few_images, tmp_path):
    """--int8 static: calibrated QDQ graph whose convolutions with int8 weights are exactly the
    decoder's (the encoder's and the head's stay float32); it runs close to float32; without calibration
    images it is a one-line error."""
    from medstudent.inference.export import _in_decoder

    out = tmp_path / "static"
    args = ["export", str(seg_runs[0]), "-o", str(out), "--int8", "static"]
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and "--calibrate" in res.output.strip().splitlines()[-1]
    res = runner.invoke(app, [*args, "--calibrate", str(few_images)])
    assert res.exit_code == 0, res.output
    spec = json.loads((out / "pipeline.json").read_text())
    assert spec["int8"]["method"].startswith("onnxruntime quantize_static") and not spec["int8"]["use"]
    graph = onnx.load(str(out / spec["members"][0]["int8_file"])).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantised = {n.name: producer.get(n.input[1]) == "DequantizeLinear" for n in convs}  # the weights
    assert any(quantised.values()) and not all(quantised.values())
    wrong = [name for name, q in quantised.items() if q != _in_decoder(name)]
    assert not wrong, wrong
    # only convolutions run in int8: ONNX Runtime fuses them to QLinearConv and nothing else is quantised
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(out / spec["members"][0]["int8_file"]), so, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    assert "QLinearConv" in fused and not fused & {"QLinearAdd", "QLinearMul", "QLinearConcat"}, fused
    img = read_image(next(few_images.glob("*.jpg")))
    fp32 = OnnxPipeline(out, int8=False).predict_probs(img, tta="none")
    got = OnnxPipeline(out, int8=True).predict_probs(img, tta="none")
    assert got.shape == fp32.shape and np.abs(got - fp32).mean() < 0.02
    # predict --int8 runs the int8 graphs; an export without them says so in one line
    args = ["predict", "--engine", "onnx", "-i", str(few_images), "--tta", "none", "--no-overlays", "--probs"]
    res = runner.invoke(app, [*args, str(out), "-o", str(tmp_path / "q"), "--int8"])
    assert res.exit_code == 0, res.output
    stem = next(few_images.glob("*.jpg")).stem
    written = np.asarray(Image.open(tmp_path / "q" / "probs" / f"{stem}.png"), dtype=np.float32) / 255
    assert np.abs(written - got).max() <= 0.5 / 255 + 1e-6  # the int8 map, rounded to 8 bits
    fp32_only = tmp_path / "fp32_only"
    res = runner.invoke(app, ["export", str(seg_runs[0]), "-o", str(fp32_only)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, str(fp32_only), "-o", str(tmp_path / "r"), "--int8"])
    assert res.exit_code == 1 and "no int8 graphs" in res.output, res.output


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_classification_export_and_onnx_predict_csv(synth_oct_dir, tmp_path):
    cfg = load_config(
        "oct_cpu",
        [
            f"data.root={synth_oct_dir}",
            "augment.image_size=64",
            "model.arch=resnet10t",
            "model.pretrained=none",
            "train.epochs=1",
            "train.limit_train_batches=2",
            "train.batch_size=16",
            "train.max_minutes=null",
            f"train.output_dir={tmp_path / 'runs'}",
            "train.name=cls",
        ],
    )
    run = train(cfg, progress=False)
    torch.set_num_threads(1)  # train() sets the thread count to the core count
    model = tmp_path / "model"
    res = runner.invoke(app, ["export", str(run), "-o", str(model), "--tta", "flip"])
    assert res.exit_code == 0, res.output
    spec = read_pipeline(model)
    assert spec.task == "classification" and spec.postprocess is None
    assert spec.members[0].preprocess.image_size == 64
    test_dir = synth_oct_dir / "test"
    for engine, args, out in (("torch", [str(run)], "t"), ("onnx", [str(model)], "o")):
        r = runner.invoke(
            app,
            [
                "predict",
                "--engine",
                engine,
                *args,
                "-i",
                str(test_dir),
                "-o",
                str(tmp_path / out),
                "--tta",
                "flip",
            ],
        )
        assert r.exit_code == 0, r.output
    dt, do = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("t", "o"))
    assert list(dt.columns) == list(do.columns) and list(dt["id"]) == list(do["id"])
    cols = [c for c in dt.columns if c.startswith("p_")]
    np.testing.assert_allclose(do[cols].to_numpy(), dt[cols].to_numpy(), atol=1e-4, rtol=0)
    assert (dt["predicted"] == do["predicted"]).all()


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_bad_inputs_give_one_line_errors_naming_the_file(seg_model, few_images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty/pipeline\.json: missing"):
        OnnxPipeline(empty)
    (empty / "pipeline.json").write_text("{not json")
    with pytest.raises(DataError, match=r"pipeline\.json: not valid JSON"):
        read_pipeline(empty)
    broken = tmp_path / "broken"
    shutil.copytree(seg_model, broken)
    (broken / "member_1.onnx").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"member_1\.onnx: sha256 differs from pipeline\.json"):
        OnnxPipeline(broken)  # a graph swapped after export is refused before ONNX Runtime reads it
    doc = json.loads((broken / "pipeline.json").read_text())
    doc["members"][1]["sha256"] = sha256_of(broken / "member_1.onnx")
    (broken / "pipeline.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"member_1\.onnx: cannot load ONNX graph"):
        OnnxPipeline(broken)
    (broken / "member_1.onnx").unlink()
    res = runner.invoke(
        app, ["predict", "--engine", "onnx", str(broken), "-i", str(few_images), "-o", str(tmp_path / "x")]
    )
    assert res.exit_code == 1 and "member_1.onnx: missing" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    for extra, msg in (
        (["--tta", "d8"], "unknown TTA 'd8'"),
        (["--engine", "tf"], "--engine must be"),
        (["--tta-scales", "1,big"], "--tta-scales expects comma-separated numbers"),
        (["--tta-scales", "0"], "--tta-scales: each factor must be in [0.1, 4]"),
    ):
        args = ["predict", "--engine", "onnx", str(seg_model), "-i", str(few_images), "-o", str(tmp_path)]
        res = runner.invoke(app, [*args, *extra])
        assert res.exit_code == 1 and msg in res.output, res.output
    res = runner.invoke(app, ["export", str(tmp_path / "no_run"), "-o", str(tmp_path / "y")])
    assert res.exit_code == 1 and "no_run: no such run folder or checkpoint" in res.output
    # an unreadable image is skipped and named; the others are predicted
    imgs = tmp_path / "imgs"
    shutil.copytree(few_images, imgs)
    (imgs / "corrupt.jpg").write_bytes(b"not an image")
    summary = predict_onnx_folder(seg_model, imgs, tmp_path / "z", tta="none", save_overlays=False)
    assert (
        summary["predicted"] == 4 and len(summary["skipped"]) == 1 and "corrupt.jpg" in summary["skipped"][0]
    )


@pytest.mark.slow  # trains the tiny models (module fixtures)
def test_predict_slide_engines_agree_with_predict_on_the_tiles(seg_model, seg_runs, few_images, tmp_path):
    """predict-slide through the CLI with the torch and the ONNX engine on a slide made of the images:
    the engines agree, and the slide's mask cropped back to each image agrees with `predict` on it."""
    from medstudent.data.synth.slide import Canvas, Island, write_pyramid_tiff

    files = sorted(few_images.glob("*.jpg"))
    canvas = Canvas(2400, 1600)
    places = [(200, 200), (1200, 300), (400, 900)]
    for (x, y), f in zip(places, files, strict=True):
        canvas.islands.append(Island(x, y, read_image(f)))
    write_pyramid_tiff(tmp_path / "slides" / "case.tif", canvas, mpp=1.0)  # tissue islands > 20,000 um^2
    tile_out = tmp_path / "tiles"
    res = runner.invoke(app, ["predict", *map(str, seg_runs), "-i", str(few_images), "-o", str(tile_out)])
    assert res.exit_code == 0, res.output
    outs = {}
    for engine, model in (("torch", list(map(str, seg_runs))), ("onnx", [str(seg_model)])):
        outs[engine] = tmp_path / engine
        args = ["predict-slide", *model, "-s", str(tmp_path / "slides"), "-o", str(outs[engine])]
        res = runner.invoke(app, [*args, "--engine", engine, "--model-mpp", "1.0", "--region", "512"])
        assert res.exit_code == 0, res.output
        assert "1 slide(s) predicted" in res.output
        # the tiny FPN normalises over the whole input: the user is told, and summary.json records it
        said = " ".join(res.output.split())  # rich wraps long lines
        assert "GroupNorm" in said and "predicts regions independently" in said
        layers = json.loads((outs[engine] / "case" / "summary.json").read_text())["whole_input_layers"]
        assert "GroupNorm" in layers
    pt = tifffile.imread(outs["torch"] / "case" / "prob.tif").astype(int)
    po = tifffile.imread(outs["onnx"] / "case" / "prob.tif").astype(int)
    assert np.abs(pt - po).max() <= 2
    mask = tifffile.imread(outs["torch"] / "case" / "mask.tif") > 0
    step = 4  # scale 1.0: map pixels are 4 model pixels
    for (x, y), f in zip(places, files, strict=True):
        tile = np.asarray(Image.open(tile_out / "masks" / f"{f.stem}.png")) > 0
        h, w = (tile.shape[0] // step) * step, (tile.shape[1] // step) * step
        ref = tile[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3)) > 0.5
        crop = mask[y // step : y // step + h // step, x // step : x // step + w // step]
        inter, total = (crop & ref).sum(), crop.sum() + ref.sum()
        assert total == 0 or 2 * inter / total > 0.9, f.name
