"""Tissue detection on a slide thumbnail, so background is never read at full resolution.

Otsu's threshold on saturation (HSV, scikit-image): stained tissue is coloured, glass and most scanner
background are white or grey. Pale slides give Otsu a threshold near zero, so it is floored at
`min_saturation`; then a closing joins tissue cut by air spaces, holes are filled and specks removed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import disk

THUMBNAIL_MPP = 8.0  # um/px of the thumbnail tissue is found on (a 40,000 px slide at 0.5 um/px: 2,500 px)
MIN_SATURATION = 0.05  # floor for Otsu's threshold: white glass and grey scanner background stay out
MIN_TISSUE_UM2 = 20_000.0  # specks smaller than this (about 140 x 140 um) are not tissue


def tissue_mask(
    thumbnail: np.ndarray,
    mpp: float = THUMBNAIL_MPP,
    min_saturation: float = MIN_SATURATION,
    min_area_um2: float = MIN_TISSUE_UM2,
    closing_um: float = 40.0,
) -> np.ndarray:
    """Bool (h, w) tissue mask of an (h, w, 3) uint8 RGB thumbnail taken at `mpp` um/px."""
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        raise ValueError(f"tissue_mask expects an (h, w, 3) RGB thumbnail, got {thumbnail.shape}")
    sat = rgb2hsv(thumbnail)[..., 1]
    # a uniform thumbnail (blank slide) has no threshold: it is all background
    level = threshold_otsu(sat) if np.ptp(sat) > 1e-6 else 1.0
    mask = sat > max(float(level), min_saturation)
    radius = max(1, round(closing_um / mpp))
    mask = ndi.binary_closing(np.pad(mask, radius), disk(radius))[radius:-radius, radius:-radius]
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes * mpp * mpp >= min_area_um2
        keep[0] = False
        mask = keep[labels]
    return mask.astype(bool)
