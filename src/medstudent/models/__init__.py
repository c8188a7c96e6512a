"""Models: one factory for smp segmentation models over timm encoders and timm classifiers."""

from medstudent.models.deep_supervision import DeepSupervisionModel
from medstudent.models.factory import (
    SEG_ARCHS,
    backbone_module,
    check_model_config,
    create_model,
    model_from_config,
    resolve_encoder,
    seg_out_channels,
)
from medstudent.models.pretrained import (
    BUNDLED,
    BUNDLED_WEIGHTS,
    bundled_lite0_state_dict,
    bundled_state_dict,
    parse_pretrained,
    read_state_dict,
)

__all__ = [
    "BUNDLED",
    "BUNDLED_WEIGHTS",
    "SEG_ARCHS",
    "backbone_module",
    "check_model_config",
    "DeepSupervisionModel",
    "bundled_lite0_state_dict",
    "bundled_state_dict",
    "create_model",
    "model_from_config",
    "parse_pretrained",
    "read_state_dict",
    "resolve_encoder",
    "seg_out_channels",
]
