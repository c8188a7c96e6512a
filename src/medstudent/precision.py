"""Mixed precision that pays off on the machine at hand (`train.precision: auto`, `predict --precision`).

bf16 autocast is a win only where the hardware computes in bf16: CUDA GPUs that support it (Ampere and
newer) and CPUs with AVX512-BF16 or AMX. On a CPU without them (AVX2 only, e.g. many AMD EPYC and laptop
chips) oneDNN emulates bf16, and training runs several times slower than in float32 (measured in
BENCHMARKS.md). `auto` therefore picks bf16 only where it is native, and an explicit `bf16` on such a
CPU is kept (the user asked for it) but warned about once.
"""

from __future__ import annotations

import warnings

PRECISIONS = ("auto", "32", "bf16", "16")
_warned: set[str] = set()


def native_bf16(device_type: str) -> bool:
    """True when `device_type` ("cpu" / "cuda") runs bf16 arithmetic in hardware."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        cpu = torch.cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return False


def resolve_precision(requested: str, device_type: str) -> str:
    """The precision to run ("32", "bf16" or "16") for `requested` (one of PRECISIONS) on `device_type`."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision '{requested}' (one of {', '.join(PRECISIONS)})")
    if requested == "auto":
        return "bf16" if native_bf16(device_type) else "32"
    if requested == "bf16" and not native_bf16(device_type) and device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(
            f"bf16 on this {device_type} is emulated (no AVX512-BF16/AMX or GPU support) and several times "
            "slower than float32; use precision auto or 32",
            stacklevel=2,
        )
    return requested


def accelerator_device_type(accelerator: str) -> str:
    """The torch device type a Lightning `accelerator` setting trains on ("auto": a GPU when there is one)."""
    import torch

    a = str(accelerator).lower()
    if a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"
