"""Intensity scaling factor: the slope of the log-histogram, as the original tool computes it.

The model expects an image whose intensity histogram decays by 10x per 0.5 intensity units.
``scaling_factor`` fits ``log(count)`` against intensity with scikit-learn's ``HuberRegressor``
(the original's estimator, defaults unchanged) and returns ``slope / (-ln(10)/0.5)``.
Histograms are additive, so a volume can be counted piece by piece (``intensity_histogram``)
and fitted once (``scaling_factor_from_histogram``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import ScalingError

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 1000
HISTOGRAM_RANGE = (0.0, 4000.0)
TARGET_SLOPE = -math.log(10) / 0.5
MIN_OBSERVATIONS = 10


def intensity_histogram(x: np.ndarray) -> np.ndarray:
    """Counts of ``x`` in 1000 bins over [0, 4000] (values outside are ignored)."""
    counts, _ = np.histogram(x.astype(np.float32, copy=False), bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
    return counts


def bin_centres() -> np.ndarray:
    edges = np.histogram_bin_edges(np.zeros(1), bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
    return (edges[:-1] + edges[1:]) / 2


@dataclass
class ScalingFit:
    """The result of one fit; ``factor`` is NaN when the histogram has too few non-empty bins."""

    factor: float
    slope: float = math.nan
    intercept: float = math.nan
    centres: np.ndarray = field(default_factory=lambda: np.empty(0))
    log_counts: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def valid(self) -> bool:
        return math.isfinite(self.factor) and self.factor > 0


def scaling_factor_from_histogram(counts: np.ndarray) -> ScalingFit:
    """Fit the log-histogram with ``HuberRegressor`` and return the scaling factor."""
    from sklearn.linear_model import HuberRegressor

    counts = np.asarray(counts)
    keep = counts > 0
    centres = bin_centres()[keep]
    log_counts = np.log(counts[keep].astype(np.float64))
    if keep.sum() < MIN_OBSERVATIONS:
        log.info("not enough observations for inference of scaling factor from histogram slope")
        return ScalingFit(math.nan, centres=centres, log_counts=log_counts)
    model = HuberRegressor()
    model.fit(centres.reshape(-1, 1), log_counts)
    slope = float(model.coef_[0])
    return ScalingFit(slope / TARGET_SLOPE, slope, float(model.intercept_), centres, log_counts)


def scaling_factor(x: np.ndarray, plot_file: str | Path | None = None) -> float:
    """The original ``calculateScalingFactor``: NaN if fewer than 10 histogram bins are filled."""
    fit = scaling_factor_from_histogram(intensity_histogram(x))
    if plot_file is not None:
        plot_fit(fit, plot_file)
    return fit.factor


def check_scaling_factor(value: float) -> float:
    """A factor must be a finite positive number; anything else would turn the image into NaN or 0."""
    if value is None or not math.isfinite(value) or value <= 0:
        raise ScalingError(
            f"scaling factor {value} cannot be used: it must be a finite number > 0 "
            "(a featureless or all-dark region gives no histogram slope; pass -s with a global factor)"
        )
    return float(value)


def plot_fit(fit: ScalingFit, path: str | Path, title: str | None = None) -> None:
    """Scatter of log counts with the fitted line (the original's expFit plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(fit.centres, fit.log_counts, s=4, label="Counts")
    if math.isfinite(fit.slope):
        xs = np.array([0.0, HISTOGRAM_RANGE[1]])
        ax.plot(xs, fit.intercept + fit.slope * xs, color="red", label="Huber Regression")
    ax.set_ylim(-1, 25)
    ax.set_xlabel("intensity")
    ax.set_ylabel("log(count)")
    ax.set_title(title or f"scaling factor {fit.factor:.6g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@dataclass
class VolumeScaling:
    """Per-tile factors from sampled tiles and their mean (unusable tiles dropped)."""

    factors: list[float]
    selected: int
    total: int

    @property
    def valid_factors(self) -> list[float]:
        """Finite positive factors; NaN (no slope) and non-positive ones (a histogram that rises,
        e.g. a tiny edge tile) would corrupt the mean and are dropped."""
        return [f for f in self.factors if math.isfinite(f) and f > 0]

    @property
    def mean(self) -> float | None:
        """Unweighted mean of the valid per-tile factors; None when no tile was sampled."""
        if not self.factors:
            return None
        valid = self.valid_factors
        return float(np.mean(valid)) if valid else math.nan

    def summary_line(self) -> str:
        """The line the host pipeline greps (field 6 is the value: a float, ``nan`` or ``null``)."""
        mean = self.mean
        token = "null" if mean is None else ("nan" if math.isnan(mean) else repr(mean))
        return f"Calculated a scaling factor of {token} based on {len(self.valid_factors)}/{self.total} tiles"


def choose_tiles(total: int, n_tiles: int | None, fraction: float | None, seed: int | None) -> np.ndarray:
    """Pick tile indices like the original: ``-n`` wins, else ``floor(min(p,1) * total)``."""
    if n_tiles is not None and n_tiles > 0:
        n = min(n_tiles, total)
    elif fraction is not None and fraction > 0:
        n = int(min(fraction, 1.0) * total)
    else:
        n = 0
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, n, replace=False)) if n else np.empty(0, dtype=int)


def sample_scaling(
    tiles: Sequence,
    read_tile: Callable[[object], np.ndarray],
    chosen: Iterable[int],
    plot_path: Callable[[object], Path | None] | None = None,
    on_tile: Callable[[int, object, float], None] | None = None,
) -> VolumeScaling:
    """Compute the factor of each chosen tile (reading with ``read_tile``)."""
    chosen = list(chosen)
    factors = []
    for i in chosen:
        tile = tiles[i]
        data = read_tile(tile)
        fit = scaling_factor_from_histogram(intensity_histogram(data))
        path = plot_path(tile) if plot_path else None
        if path is not None:
            plot_fit(fit, path, title=f"tile {tile}: {fit.factor:.6g}")
        factors.append(fit.factor)
        if on_tile:
            on_tile(i, tile, fit.factor)
    return VolumeScaling(factors, len(chosen), len(tiles))
