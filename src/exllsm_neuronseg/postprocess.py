"""Post-processing of probability maps: hysteresis, then small-object removal (26-connectivity).

Both follow the original tool's semantics exactly (its postProcessing.py) but label once (O(N)) instead of
flood-filling once per seed.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import ParameterError

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def check_thresholds(
    high: float, low: float, probability_threshold: float, size_threshold: float
) -> tuple[float, float, float, int]:
    """Validate post-processing settings; the one check every caller uses.

    Allowed: finite numbers with ``0 <= low <= high <= 1`` (hysteresis), ``0 <= probability_threshold
    <= 1`` and a whole ``size_threshold >= 0`` (voxels).  A threshold above 1 would remove every
    object (an all-zero mask), a negative one keep the whole background.  Returns the values as
    ``(high, low, probability_threshold, size_threshold)``; raises :class:`ParameterError`.
    """
    values = {"high threshold": high, "low threshold": low, "small-region probability threshold": probability_threshold}
    for name, value in values.items():
        if not isinstance(value, numbers.Real) or not math.isfinite(value) or not 0 <= value <= 1:
            raise ParameterError(f"{name} {value!r} must be a finite number in [0, 1]")
    if low > high:
        raise ParameterError(f"low threshold {low!r} is above the high threshold {high!r}: 0 <= low <= high <= 1 is required")
    size_ok = isinstance(size_threshold, numbers.Real) and math.isfinite(size_threshold) and size_threshold == int(size_threshold)
    if not size_ok or size_threshold < 0:
        raise ParameterError(f"small-region size threshold {size_threshold!r} must be a whole number of voxels >= 0")
    return float(high), float(low), float(probability_threshold), int(size_threshold)


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage  # imported on use: segmenting without post-processing never needs it

    labels = np.empty(mask.shape, dtype=np.int32)
    n = ndimage.label(mask, structure=STRUCTURE_26, output=labels)
    return labels, int(n)


def hysteresis(prob: np.ndarray, high: float = 0.98, low: float = 0.2) -> np.ndarray:
    """Keep a voxel with p > low iff its 26-connected component of {p > low} holds a voxel with p > high.

    Everything else is set to 0; kept voxels keep their probability.  Works in place and returns
    ``prob``.  With ``high <= low`` the original flooded the background from low seeds; here such
    a call keeps exactly the components of {p > low} that contain a seed, which is the same
    wherever the original is well defined.
    """
    labels, n = _label(prob > low)
    if n == 0:
        prob[...] = 0
        return prob
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[np.unique(labels[prob > high])] = True
    seeded[0] = False
    prob[~seeded[labels]] = 0
    return prob


def remove_small_objects(prob: np.ndarray, probability_threshold: float = 0.9, size_threshold: int = 1000) -> np.ndarray:
    """Zero every 26-connected component of {p > threshold} with fewer than ``size_threshold`` voxels.

    Voxels with p <= threshold are left alone (the original also size-tested the background
    label 0 and zeroed it when it was small; that quirk is not reproduced).  In place; returns
    ``prob``.
    """
    labels, n = _label(prob > probability_threshold)
    if n == 0:
        return prob
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < size_threshold
    small[0] = False
    prob[small[labels]] = 0
    return prob


def post_process(
    prob: np.ndarray,
    high: float = 0.98,
    low: float = 0.2,
    probability_threshold: float = 0.9,
    size_threshold: int = 1000,
) -> np.ndarray:
    """Hysteresis, then small-object removal, in place (settings checked by :func:`check_thresholds`)."""
    high, low, probability_threshold, size_threshold = check_thresholds(high, low, probability_threshold, size_threshold)
    hysteresis(prob, high, low)
    return remove_small_objects(prob, probability_threshold, size_threshold)
