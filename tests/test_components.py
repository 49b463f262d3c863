"""Connected components over blocks (components.py; bin/label_blocks.py, merge_labels.py, write_labels.py).

The references are computed on the whole volume at once: ``scipy.ndimage.label`` of the thresholded
volume, the size filter, then ids renumbered 1, 2, ... in the order of each object's first voxel in
z,y,x C order (computed here with ``np.unique``, not taken from scipy's own numbering); and
``postprocess.post_process`` for the global post-processing. Every grid of blocks must give exactly
these. Kills happen at named moments through the test hook (EXLLSM_TEST_HOOK), never after a delay.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script
from scipy import ndimage

from exllsm_neuronseg import __version__, testhook
from exllsm_neuronseg import components as C
from exllsm_neuronseg.errors import GeometryError, OutputError, ParameterError
from exllsm_neuronseg.geometry import Box, block_line, read_block_plan
from exllsm_neuronseg.postprocess import post_process
from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume
from exllsm_neuronseg.volume import Volume, create_volume, open_volume

RESOLUTION = [0.104, 0.104, 0.18]


# --------------------------------------------------------------------------------------------
# Volumes, grids and the whole-volume references
# --------------------------------------------------------------------------------------------


def write_n5(path: Path, zyx: np.ndarray, chunks=(8, 8, 8), resolution: bool = True) -> Volume:
    attrs = {"pixelResolution": {"dimensions": RESOLUTION, "unit": "um"}} if resolution else None
    volume = create_volume(path, "p/s0", zyx.shape[::-1], chunks, zyx.dtype, attributes=attrs)
    volume.write_chunked_zyx(volume.box, zyx)
    return volume


def noise_field(shape_zyx, seed: int, sigma: float = 1.5) -> np.ndarray:
    """Smoothed uniform noise scaled to [0, 1] (float32, z,y,x): blobs of every size and shape."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape_zyx), sigma)
    return ((field - field.min()) / (field.max() - field.min())).astype(np.float32)


def tube_field() -> np.ndarray:
    """Probability-like tubes and puncta of exllsm_neuronseg.synthetic (float32 in [0, 1], z,y,x):
    at the host's threshold 0.8 one object of the 10 (26-connected; 11 6-connected) has >= 2000 voxels."""
    image, _ = synthetic_volume(
        SyntheticSpec(shape=(64, 56, 48), n_tubes=5, n_puncta=12, tube_radius=(3.0, 4.5), punctum_radius=(2, 4), seed=0)
    )
    p = np.clip((image.astype(np.float32) - 30) / 1000, 0, 1)
    return ndimage.gaussian_filter(p, 0.7).astype(np.float32).transpose(2, 1, 0).copy()


@pytest.fixture(scope="module")
def noise(tmp_path_factory) -> tuple[Volume, np.ndarray]:
    """41 x 37 x 29 voxels of noise blobs, chunks 8^3, with a pixel resolution."""
    values = noise_field((29, 37, 41), seed=5)
    return write_n5(tmp_path_factory.mktemp("noise") / "in.n5", values), values


@pytest.fixture(scope="module")
def tubes(tmp_path_factory) -> tuple[Volume, np.ndarray]:
    """64 x 56 x 48 voxels of tubes and puncta, chunks 16,16,8."""
    values = tube_field()
    return write_n5(tmp_path_factory.mktemp("tubes") / "in.n5", values, chunks=(16, 16, 8)), values


def structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)


def reference_labels(values: np.ndarray, threshold: float, connectivity: int, min_size: int = 0) -> np.ndarray:
    """Whole-volume labels (z,y,x uint64): label, drop objects under min_size, renumber 1.. by first voxel."""
    labels, n = ndimage.label(values > threshold, structure=structure(connectivity))
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_size
    keep[0] = False
    kept = np.where(keep[labels], labels, 0)
    ids, first = np.unique(kept.ravel(), return_index=True)
    first, ids = first[ids != 0], ids[ids != 0]
    lut = np.zeros(n + 1, dtype=np.uint64)
    lut[ids[np.argsort(first)]] = np.arange(1, len(ids) + 1, dtype=np.uint64)
    return lut[kept]


def grid(cuts: list[list[int]]) -> list[Box]:
    """The blocks between per-axis cuts x, y, z (each list from the region's start to its end)."""
    cx, cy, cz = ([(a, b) for a, b in zip(c[:-1], c[1:])] for c in cuts)
    return [Box((x0, y0, z0), (x1, y1, z1)) for z0, z1 in cz for y0, y1 in cy for x0, x1 in cx]


def random_grid(shape_xyz, seed: int) -> list[Box]:
    """0-4 random cuts per axis (odd sizes and starts come naturally), blocks in random order."""
    rng = np.random.default_rng(seed)
    cuts = [[0, *sorted(rng.choice(np.arange(1, n), size=rng.integers(0, 5), replace=False).tolist()), n] for n in shape_xyz]
    blocks = grid(cuts)
    rng.shuffle(blocks)
    return blocks


def named_grid(name: str, shape_xyz) -> list[Box]:
    nx, ny, nz = shape_xyz
    if name == "one block":
        return [Box((0, 0, 0), tuple(shape_xyz))]
    if name == "odd steps":  # every block but the edges 9 wide, starting at 3
        return grid([[0, *range(3, n, 9), n] for n in shape_xyz])
    if name == "1-voxel slices in z":
        return grid([[0, nx], [0, 17, ny], list(range(nz + 1))])
    if name == "1-voxel slabs in x and y":
        return grid([[0, 5, 6, 7, 20, 21, nx], [0, 1, 2, 13, ny], [0, 11, nz]])
    if name.startswith("random"):
        return random_grid(shape_xyz, int(name.split()[-1]))
    raise KeyError(name)


GRIDS = ["one block", "odd steps", "1-voxel slices in z", "1-voxel slabs in x and y", *(f"random {i}" for i in range(6))]


def run_pass(volume: Volume, blocks, records: Path, settings: C.PassSettings, min_size: int = 0, require_seed: bool = False) -> C.MergeResult:
    for block in blocks:
        C.write_block_record(volume, block, settings, records)
    return C.merge_records(volume, blocks, records, min_size, require_seed)


def assemble(volume: Volume, blocks, of_block, dtype) -> np.ndarray:
    out = np.zeros(volume.shape[::-1], dtype=dtype)
    for block in blocks:
        out[block.slices()[::-1]] = of_block(block)
    return out


def partials(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.name.endswith(".partial")]


# --------------------------------------------------------------------------------------------
# 1. Labels equal scipy.ndimage.label of the whole volume, for any grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("connectivity", [6, 26])
def test_labels_equal_whole_volume_label(noise, tmp_path, connectivity, name):
    volume, values = noise
    blocks = named_grid(name, volume.shape)
    C.check_grid(blocks, volume.box)
    expected = reference_labels(values, 0.55, connectivity, min_size=12)
    result = run_pass(volume, blocks, tmp_path, C.PassSettings(0.55, connectivity), min_size=12)
    got = assemble(volume, blocks, lambda b: C.block_labels(volume, b, tmp_path), np.uint64)
    np.testing.assert_array_equal(got, expected)
    assert result.kept == int(expected.max()) and result.dropped_small > 0 and result.kept >= 3
    assert result.objects == ndimage.label(values > 0.55, structure=structure(connectivity))[1]
    assert result.pieces >= result.objects and (result.contacts > 0) == (len(blocks) > 1)
    assert [row["id"] for row in result.rows] == list(range(1, result.kept + 1))
    assert not partials(tmp_path)


def test_the_connectivities_differ_on_this_volume(noise):
    """The 6/26 cases above test something different: the two labellings differ here."""
    _, values = noise
    assert not np.array_equal(reference_labels(values, 0.55, 6, 12), reference_labels(values, 0.55, 26, 12))


@pytest.mark.parametrize("connectivity", [6, 26])
def test_objects_spanning_many_blocks(tubes, tmp_path, connectivity):
    """Tubes crossing many 9-16 voxel blocks, with the size filter at a value that drops some."""
    volume, values = tubes
    blocks = grid([[0, 9, 20, 31, 42, 53, 64], [0, 13, 29, 45, 56], [0, 7, 16, 31, 48]])
    expected = reference_labels(values, 0.5, connectivity, min_size=100)
    run_pass(volume, blocks, tmp_path, C.PassSettings(0.5, connectivity), min_size=100)
    got = assemble(volume, blocks, lambda b: C.block_labels(volume, b, tmp_path), np.uint64)
    np.testing.assert_array_equal(got, expected)
    spans = [sum(bool((got[b.slices()[::-1]] == i).any()) for b in blocks) for i in range(1, int(got.max()) + 1)]
    assert max(spans) >= 6, spans  # objects joined over 6+ blocks


@pytest.mark.parametrize("connectivity", [6, 26])
def test_diagonal_contacts_across_block_corners_and_edges(tmp_path, connectivity):
    """Voxel pairs touching only at a corner (across three block faces) or along an edge (two) join
    with 26-connectivity and stay apart with 6; a pair across a face joins with both."""
    values = np.zeros((12, 12, 12), dtype=np.float32)  # z,y,x; cuts at 5 and 9 on every axis
    for x, y, z in [(4, 4, 4), (5, 5, 5), (8, 8, 1), (9, 9, 1), (2, 4, 10), (2, 5, 10)]:
        values[z, y, x] = 1
    volume = write_n5(tmp_path / "in.n5", values, chunks=(4, 4, 4))
    blocks = grid([[0, 5, 9, 12]] * 3)
    result = run_pass(volume, blocks, tmp_path / "records", C.PassSettings(0.5, connectivity))
    got = assemble(volume, blocks, lambda b: C.block_labels(volume, b, tmp_path / "records"), np.uint64)
    np.testing.assert_array_equal(got, reference_labels(values, 0.5, connectivity))
    assert result.kept == (3 if connectivity == 26 else 5)
    assert (got[4, 4, 4] == got[5, 5, 5]) == (connectivity == 26)
    assert (got[1, 8, 8] == got[1, 9, 9]) == (connectivity == 26)
    assert got[10, 4, 2] == got[10, 5, 2] != 0


def test_blocks_covering_part_of_the_volume(noise, tmp_path):
    """A grid over a sub-box (a partial volume): the labels of that sub-box alone."""
    volume, values = noise
    blocks = grid([[3, 10, 24, 30], [5, 20, 33], [2, 9, 27]])
    run_pass(volume, blocks, tmp_path, C.PassSettings(0.55, 26), min_size=5)
    got = np.concatenate([C.block_labels(volume, b, tmp_path).reshape(-1) for b in blocks])
    sub = values[2:27, 5:33, 3:30]
    expected = reference_labels(sub, 0.55, 26, 5)
    flat = np.concatenate([expected[z0 - 2 : z1 - 2, y0 - 5 : y1 - 5, x0 - 3 : x1 - 3].reshape(-1)
                           for (x0, y0, z0), (x1, y1, z1) in ((b.start, b.end) for b in blocks)])
    np.testing.assert_array_equal(got, flat)


def test_a_mask_and_the_host_names(tmp_path):
    """A 0/1 uint8 mask (threshold None: value != 0, or any threshold below 1), and the host's
    connected_pixels_shape names."""
    mask = (noise_field((20, 22, 24), seed=2) > 0.5).astype(np.uint8)
    volume = write_n5(tmp_path / "in.n5", mask)
    blocks = random_grid(volume.shape, 3)
    for threshold, shape in ((None, "box"), (0.8, "diamond")):
        records = tmp_path / f"r{threshold}"
        run_pass(volume, blocks, records, C.PassSettings(threshold, C.connectivity_of(shape)))
        got = assemble(volume, blocks, lambda b, r=records: C.block_labels(volume, b, r), np.uint64)
        np.testing.assert_array_equal(got, reference_labels(mask, 0.5, C.HOST_SHAPES[shape]))
    assert [C.connectivity_of(v) for v in ("box", "diamond", "BOX", 6, "26")] == [26, 6, 26, 6, 26]
    for bad in ("8", "cube", 18):
        with pytest.raises(ParameterError, match="not 6 .diamond"):
            C.connectivity_of(bad)


def test_inclusive_threshold_is_the_host_spark_apps(tmp_path):
    """``inclusive``: foreground is value >= threshold (N5ConnectedComponentsSpark's test): a 0/1
    mask with threshold 1 keeps its ones, and voxels exactly at a probability threshold count."""
    mask = (noise_field((20, 22, 24), seed=4) > 0.5).astype(np.uint8)
    volume = write_n5(tmp_path / "mask.n5", mask)
    blocks = random_grid(volume.shape, 5)
    for inclusive in (True, False):
        records = tmp_path / f"mask-{inclusive}"
        run_pass(volume, blocks, records, C.PassSettings(1.0, 26, inclusive=inclusive))
        got = assemble(volume, blocks, lambda b, r=records: C.block_labels(volume, b, r), np.uint64)
        np.testing.assert_array_equal(got, reference_labels(mask, 0.5, 26) if inclusive else np.zeros_like(got))
    # probabilities quantised to steps of 1/8, so many voxels sit exactly at the threshold 0.5
    values = (np.round(noise_field((20, 22, 24), seed=6) * 8) / 8).astype(np.float32)
    at = int((values == np.float32(0.5)).sum())
    assert at > 100
    volume = write_n5(tmp_path / "p.n5", values)
    records = tmp_path / "p"
    run_pass(volume, blocks, records, C.PassSettings(0.5, 6, inclusive=True))
    got = assemble(volume, blocks, lambda b: C.block_labels(volume, b, records), np.uint64)
    expected = reference_labels(values, np.nextafter(np.float32(0.5), np.float32(0)), 6)
    np.testing.assert_array_equal(got, expected)
    assert int((got > 0).sum()) == int((values >= 0.5).sum()) > int((values > 0.5).sum())
    # the default (exclusive) pass keeps the key records had before the choice existed
    assert "inclusive" not in C.PassSettings(0.8, 26).key()
    assert C.PassSettings(0.8, 26, inclusive=True).key()["inclusive"] is True


# --------------------------------------------------------------------------------------------
# 2. Global post-processing equals post_process of the whole volume
# --------------------------------------------------------------------------------------------

THRESHOLD_SETS = {  # high, low, probability threshold, size threshold
    "noise 0.9/0.6/0.7/40": ("noise", (0.9, 0.6, 0.7, 40)),
    "noise 0.8/0.45/0.5/200": ("noise", (0.8, 0.45, 0.5, 200)),
    "noise p-threshold below low": ("noise", (0.95, 0.7, 0.65, 10)),
    "tubes, the host's defaults": ("tubes", (0.98, 0.2, 0.9, 1000)),
}


def post_process_passes(volume, blocks, folder: Path, high, low, pt, size) -> tuple[Path, Path]:
    hysteresis, small = folder / "hysteresis", folder / "size"
    run_pass(volume, blocks, hysteresis, C.PassSettings(low, 26, seed_threshold=high), 0, require_seed=True)
    run_pass(volume, blocks, small, C.PassSettings(pt, 26, restrict=str(hysteresis)), size)
    return hysteresis, small


@pytest.mark.parametrize(
    "case, grid_name", [(case, name) for case in THRESHOLD_SETS for name in ("one block", "random 1", "random 4")]
    + [("noise 0.9/0.6/0.7/40", "odd steps"), ("noise 0.8/0.45/0.5/200", "1-voxel slabs in x and y")],
)
def test_global_post_processing_equals_whole_volume(request, tmp_path, case, grid_name):
    which, (high, low, pt, size) = THRESHOLD_SETS[case]
    volume, values = request.getfixturevalue(which)
    expected = post_process(values.transpose(2, 1, 0).copy(), high, low, pt, size).transpose(2, 1, 0)
    assert 0 < np.count_nonzero(expected) < np.count_nonzero(values > low)  # something kept, something removed
    blocks = named_grid(grid_name, volume.shape)
    hysteresis, small = post_process_passes(volume, blocks, tmp_path, high, low, pt, size)
    got = assemble(volume, blocks, lambda b: C.post_process_block(volume, b, hysteresis, small), np.float32)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("grid_name", ["one block", "random 2", "odd steps"])
def test_global_post_processing_of_a_binary_mask(tmp_path, grid_name):
    """A uint8 0/1 mask (the binary segmentation) post-processed in blocks equals ``post_process``
    of the whole mask, and is written as uint8 into a uint8 dataset (float32 is refused for it)."""
    mask = (noise_field((30, 34, 40), seed=8) > 0.55).astype(np.uint8)
    volume = write_n5(tmp_path / "mask.n5", mask)
    expected = post_process(mask.transpose(2, 1, 0).copy(), 0.98, 0.2, 0.9, 30).transpose(2, 1, 0)
    assert expected.dtype == np.uint8 and 0 < np.count_nonzero(expected) < np.count_nonzero(mask)  # small objects went
    blocks = named_grid(grid_name, volume.shape)
    hysteresis, small = post_process_passes(volume, blocks, tmp_path, 0.98, 0.2, 0.9, 30)
    got = assemble(volume, blocks, lambda b: C.post_process_block(volume, b, hysteresis, small), np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert C.post_process_block(volume, blocks[0], hysteresis, small).dtype == np.uint8
    if grid_name != "one block":  # written only in blocks aligned to the chunks: the one block
        return
    out = create_volume(tmp_path / "out.n5", "pp/s0", volume.shape, volume.chunks, "uint8")
    C.write_blocks(volume, out, blocks, post_processing=(hysteresis, small))
    np.testing.assert_array_equal(out.read_zyx(volume.box), expected)
    wrong = create_volume(tmp_path / "out.n5", "f/s0", volume.shape, volume.chunks, "float32")
    with pytest.raises(OutputError, match="post-processed masks are written into a uint8 dataset"):
        C.write_blocks(volume, wrong, blocks, post_processing=(hysteresis, small))


def test_post_processing_needs_the_size_pass_restricted_to_the_hysteresis_pass(noise, tmp_path):
    volume, _ = noise
    blocks = named_grid("odd steps", volume.shape)
    hysteresis, _ = post_process_passes(volume, blocks, tmp_path, 0.9, 0.6, 0.7, 40)
    run_pass(volume, blocks, tmp_path / "unrestricted", C.PassSettings(0.7, 26), 40)
    with pytest.raises(C.RecordError, match="was not restricted to the hysteresis pass"):
        C.post_process_block(volume, blocks[0], hysteresis, tmp_path / "unrestricted")
    # the hysteresis pass merged again differently: the size pass made on the old one is refused
    C.merge_records(volume, blocks, hysteresis, min_size=5, require_seed=True)
    with pytest.raises(C.RecordError, match="made from another input or with other settings"):
        C.post_process_block(volume, blocks[0], hysteresis, tmp_path / "size")
    with pytest.raises(C.RecordError, match="other settings or input"):
        C.merge_records(volume, blocks, tmp_path / "size", 40)


# --------------------------------------------------------------------------------------------
# 3. The object table
# --------------------------------------------------------------------------------------------


def test_object_table_matches_numpy_on_the_whole_volume(tubes, tmp_path):
    volume, values = tubes
    blocks = random_grid(volume.shape, 11)
    result = run_pass(volume, blocks, tmp_path / "records", C.PassSettings(0.5, 26), 30)
    labels = reference_labels(values, 0.5, 26, 30)
    assert result.kept == int(labels.max()) >= 5
    assert result.columns == list(result.rows[0]) == C.object_columns(True, "um")
    for row in result.rows:
        z, y, x = np.nonzero(labels == row["id"])
        v = values[z, y, x].astype(np.float64)
        assert row["voxels"] == len(x)
        assert [row[k] for k in ("x0", "y0", "z0", "x1", "y1", "z1")] == [x.min(), y.min(), z.min(), x.max() + 1, y.max() + 1, z.max() + 1]
        centroid = [x.mean(), y.mean(), z.mean()]
        assert [row["centroid_x"], row["centroid_y"], row["centroid_z"]] == pytest.approx(centroid, rel=1e-12)
        assert row["mean_value"] == pytest.approx(v.mean(), rel=1e-12) and row["max_value"] == v.max()
        res = np.array(RESOLUTION)
        assert [row[f"centroid_{a}_um"] for a in "xyz"] == pytest.approx(list(np.array(centroid) * res), rel=1e-12)
        assert [row[f"{a}0_um"] for a in "xyz"] == pytest.approx(list(np.array([x.min(), y.min(), z.min()]) * res))
        assert [row[f"{a}1_um"] for a in "xyz"] == pytest.approx(list((np.array([x.max(), y.max(), z.max()]) + 1) * res))
        assert row["volume_um3"] == pytest.approx(len(x) * res.prod())

    csv_path, json_path = C.write_object_table(result, tmp_path / "out" / "objects.csv", {"input": str(volume)})
    assert json_path == tmp_path / "out" / "objects.json"
    with open(csv_path) as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == result.columns and len(read) == result.kept
    for got, row in zip(read, result.rows):
        assert {k: (int(v) if k in ("id", "voxels", "x0", "y0", "z0", "x1", "y1", "z1") else float(v)) for k, v in got.items()} == row
    content = json.loads(json_path.read_text())
    assert content["objects"] == result.rows and content["columns"] == result.columns and content["input"] == str(volume)
    assert content["summary"] == {"objects": result.objects, "kept": result.kept, "dropped_small": result.dropped_small,
                                  "dropped_unseeded": 0, "pieces": result.pieces, "contacts": result.contacts}
    assert not partials(tmp_path)
    for bad in (tmp_path / "out" / "objects.json", tmp_path / "out"):
        with pytest.raises(OutputError, match="must name a CSV file"):
            C.write_object_table(result, bad)


def test_object_table_without_a_resolution(tmp_path):
    values = noise_field((9, 10, 11), seed=1)
    volume = write_n5(tmp_path / "in.n5", values, resolution=False)
    result = run_pass(volume, [volume.box], tmp_path / "r", C.PassSettings(0.5, 6))
    assert result.columns == C.object_columns(False) and all(list(row) == result.columns for row in result.rows)
    assert not any(c.endswith(("_um", "_um3")) for c in result.columns)


def test_a_volume_without_foreground(tmp_path):
    """No object anywhere (a 1-voxel-thin volume): empty table, header-only CSV, all-zero labels."""
    volume = write_n5(tmp_path / "in.n5", np.zeros((7, 1, 10), dtype=np.float32), chunks=(4, 1, 4))
    blocks = grid([[0, 4, 10], [0, 1], [0, 4, 7]])
    result = run_pass(volume, blocks, tmp_path / "r", C.PassSettings(0.5), 3)
    assert result.summary() == "0 objects (0 pieces in blocks, 0 contacts across faces): 0 kept, 0 dropped as too small"
    csv_path, json_path = C.write_object_table(result, tmp_path / "objects.csv")
    assert csv_path.read_text() == ",".join(C.object_columns(True)) + "\n"
    assert json.loads(json_path.read_text())["objects"] == []
    out = create_volume(tmp_path / "out.n5", "l/s0", volume.shape, (4, 1, 4), "uint64")
    assert [r.voxels for r in C.write_blocks(volume, out, blocks, records=tmp_path / "r")] == [0, 0, 0, 0]
    assert not out.read_zyx(out.box).any()


# --------------------------------------------------------------------------------------------
# 4. Records that do not belong together are refused
# --------------------------------------------------------------------------------------------


def test_records_of_other_settings_input_or_grid_are_refused(noise, tmp_path):
    volume, values = noise
    blocks = named_grid("odd steps", volume.shape)
    records = tmp_path / "records"
    run_pass(volume, blocks, records, C.PassSettings(0.55, 26))
    with pytest.raises(C.RecordError, match=r"made with other settings or input \(e\.g\."):
        C.merge_records(volume, blocks, records, settings=C.PassSettings(0.6, 26))
    C.write_block_record(volume, blocks[4], C.PassSettings(0.55, 6), records)  # one block redone otherwise
    with pytest.raises(C.RecordError, match=rf"1 record\(s\) were made with other settings or input \(e\.g\. \[{blocks[4].start[0]},"):
        C.merge_records(volume, blocks, records)
    # the same values in another dataset: another input
    other = write_n5(tmp_path / "other.n5", values)
    C.write_block_record(volume, blocks[4], C.PassSettings(0.55, 26), records)
    C.merge_records(volume, blocks, records)
    with pytest.raises(C.RecordError, match="other settings or input"):
        C.merge_records(other, blocks, records)
    with pytest.raises(C.RecordError, match="made from another input"):
        C.block_labels(other, blocks[0], records)
    # blocks that are not a grid, or not the plan's
    with pytest.raises(GeometryError, match="do not form a grid"):
        C.merge_records(volume, blocks[1:], records)
    with pytest.raises(GeometryError, match="not one of the"):
        C.block_labels(volume, Box((0, 0, 0), (4, 4, 4)), records)
    with pytest.raises(C.RecordError, match="no merge table"):
        C.block_labels(volume, blocks[0], tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# 5. The scripts: the README's sequence, the host's defaults and names
# --------------------------------------------------------------------------------------------


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def ok(proc) -> list[str]:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip().splitlines()


def one_error_line(proc, message: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0], lines[0]
    return lines[0]


class Run:
    """The tubes volume in its own folder with a plan of 24 blocks (32,16,16; chunks 16,16,8)."""

    def __init__(self, folder: Path, values: np.ndarray) -> None:
        self.folder, self.values = folder, values
        self.input = folder / "in.n5"
        self.volume = write_n5(self.input, values, chunks=(16, 16, 8))
        self.plan = folder / "blocks.txt"
        ok(run_script("plan_blocks.py", "-i", self.input, "-id", "p/s0", "--partition_size", "32,16,16",
                      "-o", self.plan, "--scaling_output", folder / "jobs.txt"))
        self.blocks = read_block_plan(self.plan.read_text())

    def io(self) -> list:
        return ["-i", self.input, "-id", "p/s0"]

    def label(self, records="records", *args, env=None):
        return run_script("label_blocks.py", *self.io(), "--records", self.folder / records, "--blocks", self.plan, *args, env=env)

    def merge(self, records="records", *args, env=None):
        return run_script("merge_labels.py", *self.io(), "--records", self.folder / records, "--blocks", self.plan,
                          "--objects", self.folder / f"{records}-objects.csv", *args, env=env)

    def output(self, dataset="labels/s0", dtype="uint64") -> Volume:
        ok(run_script("create_volume.py", *self.io(), "-o", self.folder / "out.n5", "-od", dataset, "--dtype", dtype))
        return open_volume(self.folder / "out.n5", dataset)

    def write(self, *args, dataset="labels/s0", env=None):
        return run_script("write_labels.py", *self.io(), "-o", self.folder / "out.n5", "-od", dataset, *args, env=env)

    def read(self, dataset="labels/s0") -> np.ndarray:
        return open_volume(self.folder / "out.n5", dataset).read_zyx(self.volume.box)


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tubes) -> Run:
    """The three stages run once with the host's defaults (threshold 0.8, box, minimum 2000 voxels)."""
    run = Run(tmp_path_factory.mktemp("cli"), tubes[1])
    lines = ok(run.label())
    assert len(lines) == 25 and lines[0].startswith(f"block {run.blocks[0]}: ") and " objects, record written in " in lines[0]
    assert lines[-1].startswith("24 blocks: ")
    run.merge_lines = ok(run.merge())
    run.output()
    run.write_lines = ok(run.write("--records", run.folder / "records", "--blocks", run.plan))
    return run


def test_the_scripts_with_the_host_defaults(cli):
    assert C.records_settings(cli.folder / "records", cli.blocks) == C.PassSettings(0.8, 26)  # box
    expected = reference_labels(cli.values, 0.8, 26, 2000)
    assert expected.max() == 1
    np.testing.assert_array_equal(cli.read(), expected)
    line = cli.merge_lines[-1]
    assert line.startswith("10 objects (") and ": 1 kept, 9 dropped as too small in " in line, line
    assert float(line.split("peak memory ")[1].split(" MB")[0]) > 10
    assert line.endswith(f"table {cli.folder / 'records-objects.csv'} and records-objects.json")
    rows = list(csv.DictReader(open(cli.folder / "records-objects.csv")))
    assert len(rows) == 1 and int(rows[0]["voxels"]) == int((expected == 1).sum())
    assert len(cli.write_lines) == 25 and cli.write_lines[-1].startswith("24 blocks: 24 written, 0 already done, ")
    assert int(cli.write_lines[-1].split(", ")[2].split()[0]) == int((expected > 0).sum())
    # written blocks are skipped on a re-run, and written again with --redo
    again = ok(cli.write("--records", cli.folder / "records", "--blocks", cli.plan, "--block-index", "3,5"))
    assert again == [f"block {cli.blocks[i]}: already done (marker present), skipped" for i in (3, 5)] + [again[-1]]
    redo = ok(cli.write("--records", cli.folder / "records", "--start", "32,16,0", "--end", "64,32,16", "--redo"))
    assert len(redo) == 1 and redo[0].startswith("block [32,16,0 .. 64,32,16): ") and " labelled in " in redo[0]
    np.testing.assert_array_equal(cli.read(), expected)


def test_label_blocks_inclusive(cli, tmp_path):
    """``--inclusive`` (what the pipeline passes for the host's connected components) is recorded in
    the pass's settings; a 0/1 mask with threshold 1 keeps its ones."""
    assert "--inclusive" in run_script("label_blocks.py", "--help").stdout
    ok(cli.label("inclusive", "--threshold", "0.8", "--inclusive", "--block-index", "0"))
    assert C.records_settings(cli.folder / "inclusive", cli.blocks[:1]) == C.PassSettings(0.8, 26, inclusive=True)
    mask = (cli.values > 0.8).astype(np.uint8)
    run = Run(tmp_path, mask)
    ok(run.label("records", "--threshold", "1", "--inclusive"))
    ok(run.merge())
    run.output()
    ok(run.write("--records", run.folder / "records", "--blocks", run.plan))
    np.testing.assert_array_equal(run.read(), reference_labels(mask, 0.5, 26, 2000))  # merge_labels keeps >= 2000 voxels


def test_diamond_is_6_connectivity(cli):
    ok(cli.label("diamond", "--connectivity", "diamond", "--block-index", "0-23"))
    assert C.records_settings(cli.folder / "diamond", cli.blocks) == C.PassSettings(0.8, 6)
    line = ok(cli.merge("diamond", "--min-size", "0"))[-1]
    assert line.startswith("11 objects (") and ": 11 kept, 0 dropped as too small" in line, line


def test_global_post_processing_with_the_scripts(cli):
    """The README's two passes: hysteresis (seeds) and the size pass restricted to it."""
    high, low, pt, size = 0.98, 0.2, 0.9, 1000
    ok(cli.label("hysteresis", "--threshold", low, "--seed-threshold", high))
    assert "without a seed voxel" in ok(cli.merge("hysteresis", "--min-size", "0", "--require-seed"))[-1]
    ok(cli.label("size", "--threshold", pt, "--restrict", cli.folder / "hysteresis"))
    ok(cli.merge("size", "--min-size", size))
    cli.output("post/s0", "float32")
    lines = ok(cli.write("--post-processing", cli.folder / "hysteresis", cli.folder / "size", "--blocks", cli.plan, dataset="post/s0"))
    assert " voxels kept by post-processing, written in " in lines[0]
    expected = post_process(cli.values.transpose(2, 1, 0).copy(), high, low, pt, size).transpose(2, 1, 0)
    np.testing.assert_array_equal(cli.read("post/s0"), expected)


def test_create_volume_makes_uint64_label_datasets(cli):
    out = open_volume(cli.folder / "out.n5", "labels/s0")
    assert out.dtype == np.uint64 and out.shape == cli.volume.shape and out.chunks == cli.volume.chunks
    line = ok(run_script("create_volume.py", *cli.io(), "-o", cli.folder / "out.n5", "-od", "labels/s0", "--dtype", "uint64"))[0]
    assert "(existing, kept)" in line and "uint64" in line
    one_error_line(run_script("create_volume.py", *cli.io(), "-o", cli.folder / "x.n5", "--dtype", "int16"), "uint64 (labels)")


# --------------------------------------------------------------------------------------------
# 6. Killed and run again
# --------------------------------------------------------------------------------------------


def merge_counts(line: str) -> str:
    """A merge summary line without its time, memory and paths."""
    return re.sub(r" in [\d.]+ s, peak memory .*", "", line)


def kill_at(moment: str) -> dict:
    return {testhook.ENV: f"{moment}=kill"}


def test_a_block_killed_before_its_record_is_renamed(cli, tubes, tmp_path):
    run = Run(tmp_path, tubes[1])
    ok(run.label("records", "--block-index", "0-4,6-23"))
    killed = run.label("records", "--block-index", "5", env=kill_at("record:temporary-written"))
    assert killed.returncode == -9 and killed.stdout == ""
    assert len(partials(tmp_path / "records")) == 1
    line = one_error_line(run.merge(), f"1 block(s) have no record (e.g. {run.blocks[5]})")
    assert "run those blocks (again) first" in line and not (tmp_path / "records" / "table.npz").exists()
    ok(run.label("records", "--block-index", "5"))
    assert not partials(tmp_path)
    assert merge_counts(ok(run.merge())[-1]) == merge_counts(cli.merge_lines[-1])
    assert (tmp_path / "records-objects.csv").read_bytes() == (cli.folder / "records-objects.csv").read_bytes()
    with np.load(tmp_path / "records" / "table.npz") as new, np.load(cli.folder / "records" / "table.npz") as old:
        for key in ("mapping", "offsets", "counts"):
            np.testing.assert_array_equal(new[key], old[key])


@pytest.mark.parametrize("moment", ["merge:table-temporary-written", "merge:objects-temporary-written"])
def test_a_merge_killed_before_its_renames(cli, tubes, tmp_path, moment):
    run = Run(tmp_path, tubes[1])
    ok(run.label())
    killed = run.merge(env=kill_at(moment))
    assert killed.returncode == -9 and killed.stdout == ""
    assert not (tmp_path / "records-objects.csv").exists() and partials(tmp_path)
    if moment == "merge:table-temporary-written":
        run.output()
        one_error_line(run.write("--records", tmp_path / "records", "--blocks", run.plan), "no merge table at")
    ok(run.merge())
    assert not partials(tmp_path)
    assert (tmp_path / "records-objects.csv").read_bytes() == (cli.folder / "records-objects.csv").read_bytes()
    assert json.loads((tmp_path / "records-objects.json").read_text())["objects"] == json.loads(
        (cli.folder / "records-objects.json").read_text())["objects"]


def test_a_write_killed_after_a_block_and_run_again(cli, tubes, tmp_path):
    run = Run(tmp_path, tubes[1])
    ok(run.label())
    ok(run.merge())
    out = run.output()
    killed = run.write("--records", tmp_path / "records", "--blocks", run.plan, env=kill_at("write:block-written"))
    assert killed.returncode == -9
    assert not (out.path / ".exllsm-done").exists()  # the first block's data is there, its marker is not
    lines = ok(run.write("--records", tmp_path / "records", "--blocks", run.plan))
    assert lines[-1].startswith("24 blocks: 24 written, 0 already done")
    np.testing.assert_array_equal(run.read(), cli.read())
    assert not partials(tmp_path) and len(list((out.path / ".exllsm-done").glob("*.json"))) == 24


# --------------------------------------------------------------------------------------------
# 7. Bad input: one error line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


def test_bad_label_blocks_input_writes_nothing(cli, tmp_path):
    not_a_grid = tmp_path / "not-a-grid.txt"
    not_a_grid.write_text(block_line(Box((0, 0, 0), (32, 56, 48))) + "\n" + block_line(Box((32, 0, 0), (64, 28, 48))) + "\n")
    cases = {
        "connectivity '8' is not 6 (diamond: faces) or 26": ["--connectivity", "8"],
        "do not form a grid": ["--blocks", not_a_grid],
        "no merge table at": ["--restrict", tmp_path / "nothing"],
        "not both": ["--blocks", cli.plan, "--start", "0,0,0", "--end", "32,16,16"],
        "give --blocks too": ["--block-index", "0"],
        "lies outside the image": ["--start", "0,0,0", "--end", "65,16,16"],
        "threshold nan must be a finite number": ["--threshold", "nan"],
        "dataset /q/s0 does not exist": ["-id", "q/s0"],
    }
    for message, args in cases.items():
        proc = run_script("label_blocks.py", "-i", cli.input, "-id", "p/s0", "--records", tmp_path / "records", *args)
        one_error_line(proc, message)
        assert not (tmp_path / "records").exists(), message


def test_bad_merge_input_writes_nothing(cli, tmp_path):
    not_a_grid = tmp_path / "not-a-grid.txt"
    not_a_grid.write_text("".join(block_line(b) + "\n" for b in cli.blocks[1:]))
    other = write_n5(tmp_path / "other.n5", cli.values, chunks=(16, 16, 8))
    before = tree_digest(cli.folder / "records")
    cases = {
        "no block of the plan has a record in": ["-i", cli.input, "--records", tmp_path / "missing"],
        "do not form a grid": ["-i", cli.input, "--blocks", not_a_grid],
        "24 record(s) were made with other settings or input": ["-i", other.container],
        "cannot seed": ["-i", cli.input, "--require-seed", None],
        "must name a CSV file": ["-i", cli.input, "--objects", tmp_path / "objects.json"],
        "Invalid value for '--min-size'": ["-i", cli.input, "--min-size", "-1"],
    }
    for message, args in cases.items():
        base = {"--records": cli.folder / "records", "--blocks": cli.plan, "-id": "p/s0"}
        for i in range(0, len(args), 2):
            base[args[i]] = args[i + 1]
        proc = run_script("merge_labels.py", *[str(v) for kv in base.items() for v in kv if v is not None])
        if message == "cannot seed":
            message = "objects can only be required to hold a seed voxel when the pass has a seed threshold"
        one_error_line(proc, message)
        assert tree_digest(cli.folder / "records") == before, message
    assert not list(tmp_path.glob("objects*")) and not (tmp_path / "missing").exists()


def test_bad_write_labels_input_writes_nothing(cli, tmp_path):
    # records of a plan whose blocks do not end on the output's chunk grid (16 in x), post-processing
    # passes, and outputs of the wrong dtype and dims
    odd = tmp_path / "odd"
    odd_blocks = grid([[0, 20, 64], [0, 56], [0, 48]])
    run_pass(cli.volume, odd_blocks, odd, C.PassSettings(0.8, 26))
    hysteresis, size = post_process_passes(cli.volume, cli.blocks, tmp_path, 0.98, 0.2, 0.9, 1000)
    create_volume(cli.folder / "out.n5", "small/s0", (64, 56, 40), (16, 16, 8), "uint64")
    create_volume(cli.folder / "out.n5", "post/s0", (64, 56, 48), (16, 16, 8), "float32")
    records = ["--records", cli.folder / "records"]
    cases = {
        "is float32: labels are written into a uint64 dataset": ["-od", "post/s0", *records],
        "has dims 64,56,40, but the input has 64,56,48": ["-od", "small/s0", *records],
        "is uint64: post-processed probabilities are written into a float32 dataset": ["--post-processing", hysteresis, size],
        "is not one of the 24 blocks of the plan": [*records, "--start", "0,0,0", "--end", "16,16,8"],
        "is not aligned to the output chunk grid": ["--records", odd, "--start", "0,0,0", "--end", "20,56,48"],
        "give --records DIR (labels) or --post-processing": [],
        "one of them": [*records, "--post-processing", odd, odd],
        "no merge table at": ["--records", tmp_path / "missing"],
        "does not exist in": ["-od", "nothing/s0", *records],
        "is given twice": [*records, "--start", "0,0,0", "--end", "32,16,16", "--start", "0,0,0", "--end", "32,16,16"],
    }
    before = tree_digest(cli.folder / "out.n5")
    for message, args in cases.items():
        flags = ["-i", cli.input, "-id", "p/s0", "-o", cli.folder / "out.n5", "-od", "labels/s0"]
        if "-od" in args:
            flags = flags[:-2]
        proc = run_script("write_labels.py", *flags, *args)
        one_error_line(proc, message)
        assert tree_digest(cli.folder / "out.n5") == before, message


def test_help_and_version(cli):
    for script in ("label_blocks.py", "merge_labels.py", "write_labels.py"):
        assert "Usage" in ok(run_script(script, "--help"))[0]
        assert ok(run_script(script, "--version"))[0].split() == [script, "(exllsm-neuronseg)", __version__]
