"""Post-processing semantics (spec 4.4) on small hand-made arrays, against a flood-fill reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from exllsm_neuronseg.postprocess import hysteresis, post_process, remove_small_objects


def reference_flood_fill(p, hi, lo):
    """The original clean_floodFill: flood {p>lo} from one seed per component of {p>hi}."""
    p = p.copy()
    s26 = np.ones((3, 3, 3), bool)
    seeds_lab, n = ndimage.label(p > hi, structure=s26)
    lo_map = (p > lo).astype(int)
    for k in range(1, n + 1):
        seed = tuple(np.argwhere(seeds_lab == k)[0])
        if lo_map[seed] == 2:
            continue
        comp, _ = ndimage.label(lo_map == lo_map[seed], structure=s26)
        lo_map[comp == comp[seed]] = 2
    p[lo_map != 2] = 0
    return p


def test_hysteresis_keeps_only_seeded_components():
    p = np.zeros((7, 7, 7), np.float32)
    p[1, 1, 1:4] = [0.99, 0.5, 0.3]  # seeded
    p[5, 5, 4:6] = [0.5, 0.6]  # no seed: removed
    p[3, 3, 3] = 0.1  # below low: zeroed
    p[2, 2, 4] = 0.25  # diagonal neighbour of (1,1,3): 26-connected, kept
    out = hysteresis(p.copy(), 0.98, 0.2)
    assert out[1, 1, 1] == pytest.approx(0.99) and out[1, 1, 3] == pytest.approx(0.3)
    assert out[2, 2, 4] == pytest.approx(0.25)
    assert out[5, 5, 4] == 0 and out[5, 5, 5] == 0 and out[3, 3, 3] == 0


@pytest.mark.parametrize("seed", range(5))
def test_hysteresis_equals_original_flood_fill(seed):
    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter(rng.random((20, 18, 16)), 1.5)
    p = (p - p.min()) / (p.max() - p.min())
    np.testing.assert_array_equal(hysteresis(p.copy(), 0.9, 0.5), reference_flood_fill(p, 0.9, 0.5))


def test_remove_small_objects_uses_26_connectivity_and_keeps_fringes():
    p = np.full((10, 10, 10), 0.5, np.float32)  # fringe below the threshold is untouched
    p[1, 1, 1] = p[2, 2, 2] = p[3, 3, 3] = 0.95  # a diagonal chain of 3: one component
    p[7, 7, 7] = 0.95  # alone
    out = remove_small_objects(p.copy(), 0.9, 3)
    assert out[1, 1, 1] == pytest.approx(0.95) and out[3, 3, 3] == pytest.approx(0.95)
    assert out[7, 7, 7] == 0
    assert out[0, 0, 0] == pytest.approx(0.5)  # background is never size-tested


def test_post_process_order_and_binary_masks():
    p = np.zeros((12, 12, 12), np.float32)
    p[2:5, 2:5, 2:5] = 1.0  # 27 voxels
    p[8, 8, 8] = 1.0
    out = post_process(p.copy(), 0.98, 0.2, 0.9, 10)
    assert out[3, 3, 3] == 1.0 and out[8, 8, 8] == 0
    mask = (p > 0).astype(np.float32)
    assert np.array_equal(hysteresis(mask.copy(), 0.98, 0.2), mask)  # no-op on 0/1 masks
