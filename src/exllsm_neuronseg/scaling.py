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

from .errors import OutputError, ParameterError, ScalingError

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


FLOAT32 = np.finfo(np.float32)
# The largest scaled intensity the model takes.  Its convolutions amplify their input: on the
# synthetic test volume, scaled maxima of 3e34 still gave finite probabilities and 3e35 gave NaN
# (float32 overflow inside the network), so finite scaled input is not enough.  1e30 leaves 3e4 of
# headroom below that; real data is scaled to values of order 1-100 (the histogram decays 10x per 0.5).
MAX_SCALED_INTENSITY = 1e30


def check_scaling_factor(value: float, dtype: np.dtype | str | None = None) -> float:
    """A factor must be a finite positive number that float32 holds, and one that keeps the input in
    the range the model's float32 arithmetic takes: anything else turns the image into NaN, inf or 0
    (all-background output).

    The model scales in float32 (``float32(x) * float32(factor)``), so the factor must be a normal
    float32 (``1.2e-38 <= factor <= 3.4e38``).  For an integer ``dtype`` the factor times the
    dtype's largest magnitude (65535 for uint16) must stay within :data:`MAX_SCALED_INTENSITY`,
    which then holds for every voxel: nothing is checked per voxel.  Float inputs can hold any
    magnitude, so their scaled values are checked where each tile is read (:func:`check_scaled_values`).
    Raises :class:`ScalingError`; returns the factor as a float.
    """
    if value is None or not math.isfinite(value) or value <= 0:
        raise ScalingError(
            f"scaling factor {value} cannot be used: it must be a finite number > 0 "
            "(a featureless or all-dark region gives no histogram slope; pass -s with a global factor)"
        )
    value = float(value)
    with np.errstate(over="ignore", under="ignore"):
        as_float32 = np.float32(value)
    if not np.isfinite(as_float32) or as_float32 < FLOAT32.tiny:
        raise ScalingError(
            f"scaling factor {value!r} cannot be used: the model scales in float32, which holds factors from "
            f"{FLOAT32.tiny:.4g} to {FLOAT32.max:.4g} (this one becomes {float(as_float32)!r})"
        )
    if dtype is not None and np.dtype(dtype).kind in "ui":
        info = np.iinfo(np.dtype(dtype))
        peak = max(abs(int(info.min)), int(info.max))
        _check_scaled_peak(value, peak, f"{np.dtype(dtype)} input: its largest value {peak}", "allowed: ", FLOAT32.tiny)
    return value


def _check_scaled_peak(factor: float, peak: float, what: str, allowed: str, low: float | None = None) -> None:
    with np.errstate(over="ignore"):
        scaled = float(np.float32(peak) * np.float32(factor))  # what the model computes
    if not scaled <= MAX_SCALED_INTENSITY:  # inf (float32 overflow) included
        bounds = f"{low:.4g} <= factor <= " if low is not None else "factor <= "
        raise ScalingError(
            f"scaling factor {factor!r} cannot be used for {what} times the factor is {scaled:.4g}, beyond the "
            f"{MAX_SCALED_INTENSITY:.0e} the model's float32 arithmetic takes (larger input overflows inside the "
            f"network to NaN); {allowed}{bounds}{MAX_SCALED_INTENSITY / peak:.4g}"
        )


def check_scaled_values(data: np.ndarray, factor: float) -> bool:
    """For float ``data``: whether every value is finite, and a :class:`ScalingError` when finite
    values times ``factor`` exceed :data:`MAX_SCALED_INTENSITY` (or float32).

    Integer data returns True without looking at it (:func:`check_scaling_factor` checked the
    dtype's range).  Costs one min and one max over the data (no temporary arrays).
    """
    if data.dtype.kind != "f" or data.size == 0:
        return True
    lo, hi = data.min(), data.max()  # NaN propagates, inf shows
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return False
    peak = max(-float(lo), float(hi))
    if peak > float(FLOAT32.max):  # float64 input beyond float32: inf before any factor
        raise ScalingError(
            f"input value {peak:.6g} is beyond float32 (max {FLOAT32.max:.4g}), which the model computes in; "
            "rescale the input"
        )
    if peak > 0:
        _check_scaled_peak(factor, peak, f"this input: its value {peak:.6g}", "allowed here: ")
    return True


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
    try:
        fig.savefig(path, dpi=80)
    except OSError as exc:  # a full or read-only disk: no half-written plot is left
        Path(path).unlink(missing_ok=True)
        raise OutputError(f"cannot write the scaling plot {path}: {exc.strerror or exc}") from exc
    finally:
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


def parse_scaling_factor(text: str) -> float:
    """A scaling factor given as text (a command line): a number; ``null``/``nan``/``none`` (what the
    scaling step prints when no sampled tile gave a factor) and anything else raise
    :class:`ScalingError` saying what to do.  The value itself is checked by :func:`check_scaling_factor`."""
    word = text.strip()
    if word.lower() in ("null", "nan", "none", ""):
        raise ScalingError(
            f"scaling factor {text!r}: that is what the scaling step prints when none of its sampled tiles gave a "
            "factor (too few tiles, or tiles of empty space); sample more tiles or another region, or give a number"
        )
    try:
        return float(word)
    except ValueError:
        raise ScalingError(f"scaling factor {text!r} is not a number (e.g. 0.00045, from the scaling step)") from None


def choose_tiles(total: int, n_tiles: int | None, fraction: float | None, seed: int | None) -> np.ndarray:
    """Pick tile indices like the original: a positive ``n_tiles`` wins, else ``floor(fraction * total)``.

    ``n_tiles`` must be >= 0, ``fraction`` a finite number in [0, 1] (the original took ``min(p, 1)``,
    so ``50`` meant "every tile" without a word) and ``seed`` an integer >= 0 (numpy's seeds); at
    least one of the two must be given (the original printed a ``null`` factor from 0 tiles when
    neither was); :class:`ParameterError` otherwise.  A fraction too small to choose a tile of a
    small region chooses none (the factor is then ``null``, as the pipeline's sampling jobs at the
    volume's edge expect).
    """
    if n_tiles is None and fraction is None:
        raise ParameterError("no sampling asked for: give a number of tiles, or a fraction of them (0.1 = 10%)")
    if n_tiles is not None and n_tiles < 0:
        raise ParameterError(f"number of tiles {n_tiles} must be >= 0")
    if fraction is not None and not (math.isfinite(fraction) and fraction >= 0):
        raise ParameterError(f"fraction of tiles {fraction} must be a finite number >= 0 (0.1 = 10%)")
    if fraction is not None and fraction > 1:
        raise ParameterError(
            f"fraction of tiles {fraction} is above 1: it is a fraction (0.1 = 10%, 1 = every tile), not a percentage"
        )
    if seed is not None and seed < 0:
        raise ParameterError(f"random seed {seed} must be an integer >= 0")
    if n_tiles is not None and n_tiles > 0:
        n = min(n_tiles, total)
    elif fraction is not None and fraction > 0:
        n = int(fraction * total)
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
