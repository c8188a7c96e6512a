"""Image and mask files: reading with one-line errors, listing, hashing."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from medstudent.atomic import atomic_path
from medstudent.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
JPEG_EXTS = (".jpg", ".jpeg")

# Whole-slide tiles can be large; Pillow's default decompression-bomb guard (89 Mpx) would reject legitimate
# images. Above this, an image is refused (Pillow's warning made an error), never decoded.
MAX_IMAGE_PIXELS = 20_000 * 20_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
MAX_PIXELS_PER_BYTE = 16_384
MIN_PIXELS_RATIO_CHECK = 4096 * 4096  # smaller images are decoded whatever their size on disk

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def os_reason(e: OSError) -> str:
    """An OSError as a short reason: 'Permission denied', 'Too many levels of symbolic links', ..."""
    return e.strerror or type(e).__name__


def require_regular(path: Path, what: str = "file") -> int:
    """Stat `path` (following links) and refuse anything but a regular file *before* opening it: opening a
    FIFO named x.json blocks forever, a folder named x.png fails late. Returns the size in bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(path, f"{what} not found" if what != "file" else "file not found") from None
    except OSError as e:  # ELOOP (symlink loop), EACCES on a parent folder, ENAMETOOLONG, ...
        raise DataError(path, f"cannot read {what} ({os_reason(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a plain file")
        raise DataError(path, f"is {kind}, not a regular {what if what != 'file' else 'file'}")
    return st.st_size


def read_regular_bytes(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """The content of a regular file of at most max_bytes, every OS failure as a one-line DataError."""
    size = require_regular(path, what)
    if size > max_bytes:
        raise DataError(path, f"{what} is {size} bytes, more than the {max_bytes} read")
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as e:  # PermissionError, EISDIR after a swap, EIO ...
        raise DataError(path, f"cannot read {what} ({os_reason(e)})") from None


def list_images(folder: str | Path) -> list[Path]:
    """Entries directly inside `folder` with an image extension (case-insensitive), sorted by name.

    Non-regular entries (a FIFO or folder named x.png, a broken link, a symlink loop) are listed too, so the
    reader refuses them by name instead of the data set silently shrinking or pairing going wrong.
    """
    folder = Path(folder)
    if not is_folder(folder):
        raise DataError(folder, "not a folder")
    return [p for p in list_dir(folder) if p.suffix.lower() in IMAGE_EXTS]


def list_dir(folder: Path) -> list[Path]:
    """Entries of a folder; an unreadable folder is a DataError naming it."""
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise DataError(folder, f"cannot list folder ({os_reason(e)})") from None


def is_folder(p: Path) -> bool:
    """Path.is_dir without the PermissionError it raises when a parent folder is unreadable."""
    try:
        return p.is_dir()
    except OSError:  # EACCES on stat: not listed as a folder; reading it will say why
        return False


def _refuse_implausible_size(path: Path, width: int, height: int, nbytes: int) -> None:
    """A header can claim up to MAX_IMAGE_PIXELS in a few hundred bytes; JPEG then 'decodes' the missing data
    as grey (a 600-byte file became 400 Mpx, 6 s and 10 GB). Real images, even a blank 1-bit mask, hold at
    least one byte per MAX_PIXELS_PER_BYTE pixels (deflate tops out near 1032:1, x8 for 1-bit), so a large
    claim from a small file is refused before anything is decoded."""
    pixels = width * height
    if pixels > MIN_PIXELS_RATIO_CHECK and pixels > MAX_PIXELS_PER_BYTE * max(nbytes, 1):
        raise DataError(
            path,
            f"image too large for its file: the header claims {width}x{height} pixels in {nbytes} bytes "
            "(a decompression bomb?)",
        )


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    """Open and fully decode, then apply the EXIF orientation (as labelme, and every viewer, shows the image:
    labelme's imageWidth/imageHeight and points are in that oriented frame).

    Every failure inside the decoder is bad input: Pillow raises OSError, SyntaxError, ValueError,
    struct.error, IndexError, ZeroDivisionError, DecompressionBombError... on hostile files, so anything but
    an interrupt becomes a one-line DataError naming the file.
    """
    nbytes = require_regular(path, "file") if data is None else len(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
            _refuse_implausible_size(path, img.width, img.height, nbytes)  # before any pixel is allocated
            img.load()  # decode now so truncated files fail here, naming the file
            ImageOps.exif_transpose(img, in_place=True)  # in place keeps img.format (read_mask needs it)
        return img
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(path, f"image too large ({e})") from None
    except MemoryError:
        raise DataError(path, "image too large to decode (out of memory)") from None
    except Exception as e:  # noqa: BLE001 - see docstring: decoder failures on bad files are bad input
        raise DataError(path, f"cannot read image ({type(e).__name__}: {e})") from None


def image_info(path: str | Path) -> tuple[int, int, str]:
    """(width, height, mode) after a full decode and EXIF orientation, so corrupt files are caught."""
    img = _open(Path(path))
    return img.width, img.height, img.mode


def read_image(path: str | Path, mode: str = "RGB", data: bytes | None = None) -> np.ndarray:
    """Decode an image to a uint8 array: HxWx3 for RGB, HxW for L. 16-bit greyscale is rescaled to 8 bits."""
    path = Path(path)
    img = _open(path, data)
    try:
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            lo = min(float(arr.min(initial=0)), 0.0)
            hi = float(arr.max(initial=0)) - lo
            img = Image.fromarray(((arr - lo) / (hi if hi > 0 else 1.0) * 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA").convert("RGB") if mode == "RGB" else img.convert("L")
        out = np.asarray(img.convert(mode), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - an exotic mode Pillow cannot convert is an unreadable image
        raise DataError(path, f"cannot convert image of mode {img.mode} ({type(e).__name__}: {e})") from None
    if out.ndim not in (2, 3) or 0 in out.shape[:2]:
        raise DataError(path, f"image has shape {out.shape}")
    return out


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as class ids (uint8, HxW).

    PNG 0/255 becomes 0/1, PNG 0/1 (or 0..K class ids) stays, palette PNGs give their palette indices,
    16-bit masks keep their ids (up to 255), JPEG masks (lossy, so values smear around edges) are thresholded
    at 128. The decoded format decides, not the file name: a 0/1 PNG named .jpg stays 0/1.
    """
    path = Path(path)
    img = _open(path)
    try:
        if img.mode == "P":
            return np.asarray(img, dtype=np.uint8)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            raw = np.asarray(img, dtype=np.float64)
            if not np.isfinite(raw).all() or (raw < 0).any() or (raw > 255).any() or (raw % 1).any():
                raise DataError(path, f"{img.mode} mask has values that are no class ids 0..255")
            arr = raw.astype(np.uint8)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - as in read_image
        raise DataError(path, f"cannot convert mask of mode {img.mode} ({type(e).__name__}: {e})") from None
    if img.format in ("JPEG", "MPO"):  # MPO: a JPEG with a second picture, as cameras write
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
    require_regular(Path(path))
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        raise DataError(path, f"cannot read file ({os_reason(e)})") from None
    return h.hexdigest()


def write_mask_png(path: str | Path, mask: np.ndarray, binary_255: bool = True) -> None:
    """Write a class-id mask; binary masks as 0/255 (the competition format), multi-class as ids."""
    mask = np.asarray(mask)
    out = (
        (mask > 0).astype(np.uint8) * 255
        if binary_255 and mask.max(initial=0) <= 1
        else mask.astype(np.uint8)
    )
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")  # the temp name has no suffix
    with atomic_path(path, fsync=False) as tmp:  # one of many per-image files
        Image.fromarray(out).save(tmp, format=fmt)
