"""A straight re-implementation of the original volumeSegmentation.py tiling (spec 4.1-4.3).

Test-only: tiles anchored at the block start with stride = output edge, input boxes grown by the
margin, the clamped read window reflect-padded per tile with np.pad(mode='reflect') of the
*intersection*, last tiles overhanging and cropped.  Used to check that our global-grid tiling
gives the original's whole-volume output.
"""

from __future__ import annotations

import itertools

import numpy as np


def original_segment(image_xyz: np.ndarray, predictor, scaling: float, start=(0, 0, 0), end=None) -> np.ndarray:
    shape = image_xyz.shape
    end = end or shape
    out_edge = predictor.output_shape
    margin = predictor.context
    origins = [range(s, e, o) for s, e, o in zip(start, end, out_edge)]
    lo = [max(0, s - m) for s, m in zip(start, margin)]
    hi = [min(n, r[-1] + o + m) for n, r, o, m in zip(shape, origins, out_edge, margin)]
    canvas = image_xyz[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32) * np.float32(scaling)
    result = np.zeros([e - s for s, e in zip(start, end)], dtype=np.float64)
    for origin in itertools.product(*origins):
        box_lo = [o - m for o, m in zip(origin, margin)]
        box_hi = [o + oe + m for o, oe, m in zip(origin, out_edge, margin)]
        inter_lo = [max(a, c) for a, c in zip(box_lo, lo)]
        inter_hi = [min(b, d) for b, d in zip(box_hi, hi)]
        piece = canvas[tuple(slice(a - c, b - c) for a, b, c in zip(inter_lo, inter_hi, lo))]
        pad = [(a - b, c - d) for a, b, c, d in zip(inter_lo, box_lo, box_hi, inter_hi)]
        tile = np.pad(piece, pad, mode="reflect") if any(p != (0, 0) for p in pad) else piece
        pred = predictor.predict(tile)
        dst_lo = [o - s for o, s in zip(origin, start)]
        dst_hi = [min(o + oe, e) - s for o, oe, e, s in zip(origin, out_edge, end, start)]
        result[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = pred[
            tuple(slice(0, b - a) for a, b in zip(dst_lo, dst_hi))
        ]
    return result
