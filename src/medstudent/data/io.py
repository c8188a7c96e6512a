"""Image and mask files: reading with one-line errors, listing, hashing."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medstudent.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
JPEG_EXTS = (".jpg", ".jpeg")

# Whole-slide tiles can be large; Pillow's decompression-bomb guard would reject legitimate images.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (case-insensitive extension match)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
            img.load()  # decode now so truncated files fail here, naming the file
        return img
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise DataError(path, f"cannot read image ({type(e).__name__}: {e})") from e


def image_info(path: str | Path) -> tuple[int, int, str]:
    """(width, height, mode) after a full decode, so corrupt files are caught."""
    img = _open(Path(path))
    return img.width, img.height, img.mode


def read_image(path: str | Path, mode: str = "RGB", data: bytes | None = None) -> np.ndarray:
    """Decode an image to a uint8 array: HxWx3 for RGB, HxW for L. 16-bit greyscale is rescaled to 8 bits."""
    path = Path(path)
    img = _open(path, data)
    if img.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray((arr / hi * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA").convert("RGB") if mode == "RGB" else img.convert("L")
    return np.asarray(img.convert(mode))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as class ids (uint8, HxW).

    PNG 0/255 becomes 0/1, PNG 0/1 (or 0..K class ids) stays, palette PNGs give their palette indices,
    JPEG masks (lossy, so values smear around edges) are thresholded at 128.
    """
    path = Path(path)
    img = _open(path)
    if img.mode == "P":
        return np.asarray(img, dtype=np.uint8)
    arr = np.asarray(img.convert("L"), dtype=np.uint8)
    if path.suffix.lower() in JPEG_EXTS:
        return (arr >= 128).astype(np.uint8)
    values = np.unique(arr)
    if values.max(initial=0) == 255 and set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if values.max(initial=0) > 50:
        raise DataError(
            path,
            f"mask values {values[:8].tolist()}... are neither 0/255 nor small class ids; "
            "save masks as 0/255, 0..K ids or a palette PNG",
        )
    return arr


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-1 of the file content, for duplicate detection."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_mask_png(path: str | Path, mask: np.ndarray, binary_255: bool = True) -> None:
    """Write a class-id mask; binary masks as 0/255 (the competition format), multi-class as ids."""
    mask = np.asarray(mask)
    out = (
        (mask > 0).astype(np.uint8) * 255
        if binary_255 and mask.max(initial=0) <= 1
        else mask.astype(np.uint8)
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(path)
