"""The inference contract as typed data: what an engine must do around its network, for every member.

`PipelineSpec` is what `pipeline.json` is written from (`medstudent export`) and read into (the ONNX
engine); the torch engine builds the same object in memory from its runs (`inference.engine`). The steps of
`core.inferer` read nothing else, so both engines preprocess, tile, augment, rescale, combine and
post-process from one description. Like timm's `PretrainedCfg`: a contract is data, checked once when it is
made or read, and a bad or foreign `pipeline.json` is a one-line error naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medstudent.atomic import write_text_atomic
from medstudent.config import PostprocessConfig, valid_tta_scales
from medstudent.core.tta import TTA_SETS
from medstudent.errors import DataError

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "medstudent-onnx-pipeline"
PIPELINE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_TILE = 512  # sliding-window size when an image is too large and no tile is configured
SIGMA_SCALE = 0.125  # Gaussian window sigma as a fraction of the tile (MONAI's default)
SW_BATCH_SIZE = 2  # windows per network call


class _Spec(BaseModel):
    # extra keys are kept: pipeline.json carries notes for people (and older files some more facts)
    model_config = ConfigDict(extra="allow")


class PreprocessSpec(_Spec):
    """The eval transform as facts (`data.transforms.eval_contract`), applied by
    `data.preprocess.apply_eval_contract`."""

    task: Literal["segmentation", "classification"]
    version: int = 1
    scale: float = Field(1.0, gt=0, le=16, allow_inf_nan=False)
    resize: list[Annotated[int, Field(ge=1, le=65536)]] | None = Field(None, min_length=2, max_length=2)
    pad_multiple: int = Field(32, ge=1, le=1024)
    pad_value: int = Field(0, ge=0, le=255)
    grayscale: bool = False
    in_channels: Literal[1, 3] = 3
    center_crop: int | None = Field(None, ge=1, le=65536)
    image_size: int | None = Field(None, ge=1, le=65536)
    mean: list[Annotated[float, Field(allow_inf_nan=False)]]
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> PreprocessSpec:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need {self.in_channels} value(s) each (in_channels)")
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class WindowSpec(_Spec):
    """When and how a segmentation input is predicted window by window (`core.tiling`)."""

    tile: int | None = Field(None, ge=1, le=65536)  # always tile with this size (model resolution)
    default_tile: int = Field(DEFAULT_TILE, ge=1, le=65536)  # the size when an input exceeds max_full_pixels
    max_full_pixels: int = Field(2200 * 2200, ge=1)
    overlap: float = Field(0.25, ge=0, lt=1)
    mode: Literal["gaussian"] = "gaussian"
    sigma_scale: float = Field(SIGMA_SCALE, gt=0, le=10, allow_inf_nan=False)
    sw_batch_size: int = Field(SW_BATCH_SIZE, ge=1, le=1024)

    def tile_for(self, height: int, width: int, tile: int | None = None) -> int | None:
        """The window size for an input of height x width, or None to predict it whole: tile when asked
        to (`tile`, else the configured one) or when it has more than max_full_pixels pixels; sizes are
        rounded down to a multiple of 32 (at least 32)."""
        tile = tile or self.tile
        if tile or height * width > self.max_full_pixels:
            size = int(tile or self.default_tile)
            return max(32, size // 32 * 32)
        return None


class MemberSpec(_Spec):
    """One network of the ensemble. `file`/`int8_file`: its ONNX graphs (exports only), relative to the
    model folder; `sha256` of `file` as written."""

    preprocess: PreprocessSpec
    sliding_window: WindowSpec = Field(default_factory=WindowSpec)
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    file: str | None = None
    int8_file: str | None = None
    sha256: str | None = None
    source: str | None = None
    # segmentation: layer types that make every output pixel depend on the whole input (GroupNorm,
    # squeeze-excitation, ...; models.locality); [] = none of the known types; None = not recorded (older
    # exports)
    whole_input_layers: list[str] | None = None


class EnsembleSpec(_Spec):
    mode: Literal["mean", "vote"] = "mean"
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None


class PipelineSpec(_Spec):
    """Everything around the networks, for every engine."""

    format: Literal["medstudent-onnx-pipeline"] = PIPELINE_FORMAT
    format_version: int = PIPELINE_VERSION
    task: Literal["segmentation", "classification"]
    class_names: list[str] = Field(min_length=1)
    binary: bool = False
    tta: Literal["none", "flip", "d4"] = "none"
    tta_scales: list[float] = Field(default_factory=lambda: [1.0])
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    postprocess: PostprocessConfig | None = None
    # um/px of the images the members were trained on (`data.mpp`); None: unknown. Slides are read at it.
    mpp: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)
    # seconds per image `predict` plans TTA passes, scales and members for by default (None: no plan)
    budget_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    members: list[MemberSpec] = Field(min_length=1)

    @field_validator("tta_scales", mode="before")
    @classmethod
    def _one_scale_by_default(cls, v: Any) -> Any:
        return [1.0] if v is None or v == [] else v  # pipelines exported before multi-scale TTA: one scale

    @field_validator("tta_scales")
    @classmethod
    def _scales_in_range(cls, v: list[float]) -> list[float]:
        if not valid_tta_scales(v):
            raise ValueError(f"tta_scales needs one or more factors in [0.1, 4], got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        if self.ensemble.weights is not None and len(self.ensemble.weights) != len(self.members):
            raise ValueError(
                f"ensemble.weights has {len(self.ensemble.weights)} values for {len(self.members)} members"
            )
        if any(m.preprocess.task != self.task for m in self.members):
            raise ValueError(f"a member's preprocess.task is not the pipeline's task ({self.task})")
        if self.task == "classification" and self.binary:
            raise ValueError("binary is for segmentation pipelines")
        if self.binary and len(self.class_names) != 2:
            raise ValueError("a binary pipeline has two class names (background and foreground)")
        return self

    def member_weights(self) -> list[float]:
        """Each member's weight, normalised (the ensemble's weights when given, else the members')."""
        w = self.ensemble.weights or [m.weight for m in self.members]
        total = sum(w)
        return [float(v) / total for v in w] if total > 0 else [1.0 / len(w)] * len(w)

    def scale_factors(self, scales: list[float] | None = None) -> list[float]:
        """The multi-scale TTA factors: `scales`, else the contract's; classification: one scale."""
        if self.task != "segmentation":
            return [1.0]
        return [float(f) for f in scales] if scales else [float(f) for f in self.tta_scales]

    def whole_input_layers(self) -> list[str] | None:
        """The members' layer types that make a prediction depend on the whole input around it (None:
        some member's export did not record them)."""
        known = [m.whole_input_layers for m in self.members]
        return None if any(k is None for k in known) else sorted({n for k in known for n in k or []})

    def threshold(self) -> float:
        """The probability a vote counts as positive at (the post-processing threshold, else 0.5)."""
        return self.postprocess.threshold if self.postprocess is not None else 0.5


def check_choices(tta: str, ensemble: str) -> None:
    """One-line errors for a TTA set or ensemble mode that does not exist (the CLI's --tta/--ensemble)."""
    if tta not in TTA_SETS:
        raise DataError(None, f"unknown TTA '{tta}' (none, flip, d4)")
    if ensemble not in ("mean", "vote"):
        raise DataError(None, f"unknown ensemble mode '{ensemble}' (mean, vote)")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_pipeline(spec: PipelineSpec, folder: Path) -> Path:
    """Write `folder/pipeline.json` (temp file + rename, so a crash never leaves half a file)."""
    path = Path(folder) / PIPELINE_FILE
    write_text_atomic(path, json.dumps(spec.model_dump(mode="json", exclude_none=False), indent=1))
    return path


def read_pipeline(model_dir: str | Path) -> PipelineSpec:
    """Parse and check `model_dir/pipeline.json` (a DataError naming the file on any problem)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise DataError(model_dir, "no such exported model folder")
    path = model_dir if model_dir.is_file() else model_dir / PIPELINE_FILE
    if not path.is_file():
        raise DataError(path, "missing: not an exported model folder (make one with `medstudent export`)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise DataError(path, f"not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != PIPELINE_FORMAT:
        raise DataError(path, f"not a medstudent pipeline (format is not '{PIPELINE_FORMAT}')")
    if doc.get("format_version") not in SUPPORTED_VERSIONS:
        raise DataError(
            path,
            f"pipeline format_version {doc.get('format_version')!r} is not supported "
            f"(this medstudent reads {', '.join(map(str, SUPPORTED_VERSIONS))})",
        )
    try:
        return PipelineSpec.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "pipeline"
        raise DataError(path, f"invalid pipeline: {where}: {err['msg']}") from None


def member_graph(folder: Path, member: MemberSpec, int8: bool, pipeline: Path) -> Path:
    """The ONNX graph of `member` inside `folder`: a name outside the folder is refused, and the float32
    graph must match the sha256 recorded at export (a swapped or damaged file is a one-line error)."""
    name = member.int8_file if int8 else member.file
    if not name:
        raise DataError(
            pipeline, "int8 requested but the export has no int8 graphs" if int8 else "member has no file"
        )
    root = folder.resolve()
    file = (folder / name).resolve()
    if file.parent != root:
        raise DataError(pipeline, f"member file '{name}' is not inside the model folder")
    if not file.is_file():
        raise DataError(folder / name, "missing (listed in pipeline.json)")
    if not int8 and member.sha256 and sha256_of(file) != member.sha256:
        raise DataError(folder / name, "sha256 differs from pipeline.json (file changed after export)")
    return folder / name
