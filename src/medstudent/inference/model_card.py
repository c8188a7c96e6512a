"""MODEL_CARD.md of an export, built from what the runs recorded (config, metrics.json, env.json, the
pipeline contract), never typed by hand: intended use, training data and its fingerprint, the metrics with
their CIs where the run has them, the inference contract and the limitations that follow from the record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medstudent.core.contract import PipelineSpec
from medstudent.data.synth.marker import is_synthetic
from medstudent.inference.runs import Predictor
from medstudent.rundir import RunDir


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_dir_of(pred: Predictor) -> RunDir:
    src = Path(pred.source)
    return RunDir(src.parent.parent if src.parent.name == "checkpoints" else src.parent)


def _metrics_lines(rd: RunDir) -> list[str]:
    """The run's own figures: validation metric, and cross-validation / evaluation summaries when present."""
    m = read_json(rd.metrics)
    lines = []
    if m.get("best_val_metric") is not None:
        lines.append(f"- best validation {m.get('metric')}: {m['best_val_metric']:.4f} (checkpoint choice)")
    elif m:
        lines.append("- no validation metric: trained on every non-test image (fold all)")
    for name in ("cv_summary.json", "evaluation/summary.json"):
        doc = read_json(rd.root.parent / name) if name.startswith("cv") else read_json(rd.root / name)
        for key, value in doc.items() if isinstance(doc, dict) else []:
            ci = doc.get(f"{key}_ci95")
            if isinstance(value, float) and not key.endswith("_ci95"):
                extra = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if isinstance(ci, list) and len(ci) == 2 else ""
                lines.append(f"- {name}: {key} = {value:.4f}{extra}")
    return lines or ["- none recorded"]


def limitations(spec: PipelineSpec, preds: list[Predictor], metrics: list[dict]) -> list[str]:
    """Limitations that follow from the record."""
    out = [
        "Research use only; not a medical device. Validate on your own scanner, stain and population first.",
    ]
    n_train = [m.get("n_train") for m in metrics if m.get("n_train")]
    if n_train and max(n_train) < 500:
        out.append(f"Trained on few images ({max(n_train)}): expect wide confidence intervals on new data.")
    pre = spec.members[0].preprocess
    if spec.task == "segmentation" and pre.scale != 1.0:
        out.append(
            f"Predicts at {pre.scale:g}x the input resolution: structures a few pixels wide may be lost."
        )
    if spec.mpp is None:
        slides = " (whole slides need `predict-slide --model-mpp`)" if spec.task == "segmentation" else ""
        out.append(
            f"The training resolution in micrometres per pixel is not recorded: give inputs the same scan "
            f"scale{slides}."
        )
    else:
        out.append(
            f"Trained on images at {spec.mpp:g} um/px: give inputs at that scale (slides are read by it)."
        )
    layers = spec.whole_input_layers()
    if spec.task == "segmentation" and layers:
        out.append(
            f"Has {', '.join(layers)}: a prediction depends on the whole input around it, so whole-slide "
            "regions and single tiles of the same tissue can be predicted differently."
        )
    if any(is_synthetic(p.cfg.data.root) for p in preds):
        out.append("Trained on synthetic data: a demonstration model, not for real images.")
    return out


def model_card(spec: PipelineSpec, preds: list[Predictor]) -> str:
    """The Markdown text of MODEL_CARD.md."""
    dirs = [run_dir_of(p) for p in preds]
    metrics = [read_json(rd.metrics) for rd in dirs]
    envs = [read_json(rd.env) for rd in dirs]
    first = preds[0].cfg
    lines = [
        "# Model card",
        "",
        "Written by `medstudent export` from the runs' records (config.yaml, metrics.json, env.json).",
        "",
        "## Intended use",
        f"- task: {spec.task}; classes: {', '.join(spec.class_names)}",
        f"- input: 2D images read as {'greyscale' if spec.members[0].preprocess.grayscale else 'RGB'}"
        f" ({first.data.task} data like `{first.data.root}`)",
        "",
        "## Training data",
    ]
    for rd, m, env, p in zip(dirs, metrics, envs, preds, strict=True):
        fp = env.get("data_fingerprint") or {}
        lines.append(
            f"- `{rd.root}`: data `{p.cfg.data.root}`, fold {p.cfg.data.fold}, "
            f"{m.get('n_train', '?')} training / {m.get('n_val', '?')} validation / "
            f"{m.get('n_test', '?')} test images, "
            f"{m.get('epochs', '?')} epochs; data fingerprint {fp.get('sha256', 'not recorded')}"
            f" ({fp.get('items', '?')} items)"
        )
    lines += ["", "## Metrics"]
    for rd in dirs:
        lines.append(f"`{rd.root}`:")
        lines += _metrics_lines(rd)
    ens = spec.ensemble
    lines += [
        "",
        "## Inference contract (pipeline.json)",
        f"- members: {len(spec.members)}, ensemble {ens.mode}, weights {ens.weights}",
        f"- TTA {spec.tta} at scales {spec.tta_scales}",
        f"- preprocessing: {spec.members[0].preprocess.model_dump(exclude_none=True)}",
        f"- sliding window: {spec.members[0].sliding_window.model_dump(exclude_none=True)}",
        f"- post-processing: {spec.postprocess.model_dump() if spec.postprocess else 'none'}",
        "",
        "## Environment",
    ]
    env = envs[0] if envs and envs[0] else {}
    if env:
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
        lines += [
            f"- trained with {versions}",
            f"- commit {env.get('git_commit')}, seed {env.get('seed')}, precision {env.get('precision')}",
            f"- hardware: {env.get('cpu')}; GPUs {env.get('gpus') or 'none'}",
        ]
    else:
        lines.append("- not recorded (the run predates env.json)")
    lines += ["", "## Known limitations"]
    lines += [f"- {text}" for text in limitations(spec, preds, metrics)]
    return "\n".join(lines) + "\n"
