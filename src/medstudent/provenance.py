"""What made a run or an export: library versions, git commit, hardware, seed and precision (`env.json`),
and a fingerprint of the data (a hash over the sorted file names, sizes and annotation files of the items).

Versions are read from the installed distributions' metadata (importlib.metadata), so writing env.json
imports none of the heavy libraries it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from medstudent.atomic import write_text_atomic

LIBRARIES = (
    "medstudent",
    "torch",
    "torchvision",
    "timm",
    "segmentation-models-pytorch",
    "lightning",
    "monai",
    "albumentations",
    "onnxruntime",
    "onnx",
    "numpy",
    "scikit-image",
    "opencv-python-headless",
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(where: Path | None = None) -> str | None:
    """The medstudent checkout's commit (with '+dirty' when it has uncommitted changes), when there is one."""
    folder = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_models() -> list[str]:
    """Names of the CUDA GPUs, only when torch is already imported (no import just to ask)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def environment(seed: int | None = None, precision: str | None = None) -> dict[str, Any]:
    """The env.json record."""
    return {
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpu_models(),
        "git_commit": git_commit(),
        "versions": {name: _version(name) for name in LIBRARIES},
        "seed": seed,
        "precision": precision,
    }


def data_fingerprint(files: Iterable[tuple[str, Path | None, Path | None]]) -> dict[str, Any]:
    """sha256 over (id, image name and size, annotation name and size and content hash) of each item,
    sorted by id: equal fingerprints mean the same images with the same labels."""
    h = hashlib.sha256()
    n = 0
    for item_id, image, annotation in sorted(files, key=lambda f: f[0]):
        parts = [item_id]
        for path, content in ((image, False), (annotation, True)):
            if path is None:
                parts.append("-")
                continue
            parts.append(f"{path.name}:{path.stat().st_size}")
            if content:  # labels are small and change without changing size: hash them
                parts.append(hashlib.sha256(path.read_bytes()).hexdigest())
        h.update(("\t".join(parts) + "\n").encode("utf-8", "surrogateescape"))
        n += 1
    return {
        "sha256": h.hexdigest(),
        "items": n,
        "rule": "sha256 of id, image name:size, label name:size:sha256",
    }


def write_env(path: Path, seed: int | None, precision: str | None, fingerprint: dict | None = None) -> Path:
    """Write the env.json record to `path` (plus the data fingerprint when given)."""
    doc = environment(seed, precision)
    if fingerprint is not None:
        doc["data_fingerprint"] = fingerprint
    write_text_atomic(Path(path), json.dumps(doc, indent=1))
    return Path(path)


def dataset_files(dataset: Any) -> list[tuple[str, Path | None, Path | None]]:
    """(id, image, annotation) of every item of a segmentation or classification data set; a class label
    is part of the id (`id|label`), so moving an image to another class folder changes the fingerprint."""
    out = []
    for it in dataset.items:
        label = getattr(it, "label", None)
        item_id = it.id if label is None else f"{it.id}|{label}"
        out.append((item_id, getattr(it, "image", None), getattr(it, "annotation", None)))
    return out
