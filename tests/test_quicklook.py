"""Quick-look pictures (exllsm_neuronseg.quicklook, bin/quicklook.py): the PNG, its size, the
overlay colours where the objects are, the projections against numpy references, reading in bounded
memory, and bad input that leaves no picture."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

from exllsm_neuronseg import quicklook as ql
from exllsm_neuronseg.errors import OutputError
from exllsm_neuronseg.volume import Volume, create_volume, open_volume

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png(path: Path) -> np.ndarray:
    """The picture as RGB floats in [0, 1] (rows, columns, 3), after checking it is a PNG."""
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def write(container: Path, dataset: str, data_xyz: np.ndarray, chunks=(16, 16, 16), attributes=None) -> Volume:
    volume = create_volume(container, dataset, data_xyz.shape, chunks, data_xyz.dtype, attributes=attributes)
    volume.write_zyx((0, 0, 0), np.ascontiguousarray(data_xyz.transpose(2, 1, 0)))
    return volume


@pytest.fixture
def scene(tmp_path):
    """A 60x50x40 raw volume (noise ~100) with two bright rods along z, and its results: a
    probability map (1 on the rods), a 0/1 mask and labels 1 and 2 (one per rod)."""
    rng = np.random.default_rng(0)
    raw = rng.normal(100, 10, (60, 50, 40)).clip(0).astype(np.uint16)
    labels = np.zeros(raw.shape, np.uint64)
    labels[10:14, 10:14, 5:35] = 1  # rod 1 at x,y ~12,12
    labels[40:44, 30:34, 5:35] = 2  # rod 2 at x,y ~42,32
    raw[labels > 0] = 2000
    attrs = {"pixelResolution": {"dimensions": [0.5, 0.5, 1.0], "unit": "um"}}
    raw_volume = write(tmp_path / "in.n5", "c1/s0", raw, attributes=attrs)
    results = {
        "probability": write(tmp_path / "seg.n5", "segmented/s0", (labels > 0).astype(np.float32)),
        "mask": write(tmp_path / "seg.n5", "mask/s0", (labels > 0).astype(np.uint8)),
        "labels": write(tmp_path / "seg.n5", "connected/s0", labels),
    }
    return raw_volume, results


def saturation(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def test_layout_longest_edge_and_pooling():
    layout = ql.plan_layout((3000, 2000, 1000), (1, 1, 1), max_size=512)
    assert max(layout.size) == 512 and min(layout.size) <= 512
    width = ql.MARGIN_LEFT + layout.panel[0] + ql.GAP + layout.panel[2]
    assert abs(layout.size[0] - ql.MARGIN_RIGHT - width) <= 2  # the right margin takes up rounding
    # pooled grid never finer than the panel: f = ceil(voxels / panel pixels)
    assert layout.factors == tuple(math.ceil(n / p) for n, p in zip(layout.shape, layout.panel))
    assert all(g <= p for g, p in zip(layout.grid, layout.panel))
    # physical aspect: z voxels 4x longer make the z panels 4x wider
    iso, aniso = ql.plan_layout((100, 100, 25), (1, 1, 1)), ql.plan_layout((100, 100, 25), (1, 1, 4))
    assert aniso.panel[2] == pytest.approx(aniso.panel[0], abs=1) and iso.panel[2] == pytest.approx(iso.panel[0] / 4, abs=1)
    with pytest.raises(ql.ParameterError, match="at least 256 pixels"):
        ql.plan_layout((10, 10, 10), max_size=100)


def test_voxel_size_from_attributes(tmp_path):
    data = np.zeros((4, 4, 4), np.uint8)
    cases = {
        "a": ({"pixelResolution": {"dimensions": [0.1, 0.1, 0.2], "unit": "um"}}, ((0.1, 0.1, 0.2), "µm")),
        "b": ({"pixelResolution": [2, 2, 3]}, ((2.0, 2.0, 3.0), "")),
        "c": ({"resolution": [1, 1, 5], "units": ["nm", "nm", "nm"]}, ((1.0, 1.0, 5.0), "nm")),
        "d": ({}, ((1.0, 1.0, 1.0), "voxels")),
        "e": ({"pixelResolution": {"dimensions": [0, 1, 1], "unit": "um"}}, ((1.0, 1.0, 1.0), "voxels")),
    }
    for name, (attrs, expected) in cases.items():
        assert ql.voxel_size(write(tmp_path / "v.n5", name, data, attributes=attrs)) == expected, name


@pytest.mark.parametrize("store", ["n5", "zarr"])
def test_probability_picture_from_the_script(tmp_path, store):
    """The script's PNG: the longest edge is --max-size, the overlay is yellow on the objects and
    absent (grey) elsewhere, in all three views."""
    rng = np.random.default_rng(1)
    raw = rng.normal(100, 10, (60, 50, 40)).clip(0).astype(np.uint16)
    prob = np.zeros(raw.shape, np.float32)
    prob[10:14, 10:14, 5:35] = 1.0
    raw[prob > 0] = 2000
    write(tmp_path / f"in.{store}", "c1/s0", raw)
    write(tmp_path / f"seg.{store}", "segmented/s0", prob)
    out = tmp_path / "pics" / "look.png"
    proc = run_script(
        "quicklook.py", "-i", tmp_path / f"in.{store}", "-id", "/c1/s0", "--result", f"{tmp_path}/seg.{store}:/segmented/s0",
        "-o", out, "--max-size", 300, "--no-progress", check=True,
    )
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"picture {out}: ") and "as probability" in proc.stdout
    rgb = png(out)
    layout = ql.plan_layout(raw.shape, max_size=300)
    assert rgb.shape[1::-1] == layout.size and max(layout.size) == 300
    assert [p.name for p in out.parent.iterdir()] == ["look.png"]  # no temporary left
    for panel, on, off in (("xy", (12, 12), (40, 40)), ("xz", (12, 20), (40, 20)), ("zy", (20, 12), (20, 40))):
        r, g, b = rgb[layout.pixel_of(panel, *on)[::-1]]
        assert r > 0.8 and g > 0.7 and b < 0.35, (panel, r, g, b)  # yellow: p = 1
        assert saturation(rgb[layout.pixel_of(panel, *off)[::-1]]) < 0.05, panel  # grey: no overlay


def test_mask_and_labels_colours(scene, tmp_path):
    """auto: uint8 0/1 is a mask (one colour); uint64 is labels, each id its own stable colour."""
    raw, results = scene
    pictures = ql.write_quicklooks(raw, [results["mask"], results["labels"]], f"{tmp_path}/out/", max_size=400)
    mask, labels = pictures
    assert (mask.kind, labels.kind, labels.labels) == ("mask", "labels", 2)
    assert mask.path.name == "seg_mask_s0.png" and labels.path.name == "seg_connected_s0.png"
    layout = mask.layout
    assert layout.unit == "µm" and layout.voxel == (0.5, 0.5, 1.0)
    rod1, rod2 = (12, 12), (42, 32)
    m = png(mask.path)
    c1, c2 = m[layout.pixel_of("xy", *rod1)[::-1]], m[layout.pixel_of("xy", *rod2)[::-1]]
    assert np.allclose(c1, c2, atol=0.02) and c1[1] > c1[0] + 0.3 and c1[1] > c1[2] + 0.3  # the mask's green, both rods
    lab = png(labels.path)
    colours = ql.label_colours(np.array([1, 2]))
    for rod, colour in zip((rod1, rod2), colours):
        for panel, at in (("xy", rod), ("xz", (rod[0], 20)), ("zy", (20, rod[1]))):
            seen = lab[layout.pixel_of(panel, *at)[::-1]]
            expected = (1 - ql.LABEL_OPACITY) * 1.0 + ql.LABEL_OPACITY * colour  # over the rod's white raw
            assert np.allclose(seen, expected, atol=0.03), (panel, seen, expected)
    assert np.abs(colours[0] - colours[1]).max() > 0.3
    # stable: an id has one colour, whatever else is in the picture; consecutive ids differ
    many = ql.label_colours(np.arange(1, 65))
    assert np.allclose(ql.label_colours(np.array([7, 2, 7]))[[0, 2]], many[6])
    assert min(np.abs(many[i] - many[i + 1]).max() for i in range(63)) > 0.25
    # an explicit kind wins over the dtype: the labels drawn as a mask
    (forced,) = ql.write_quicklooks(raw, [results["labels"]], tmp_path / "forced.png", kind="mask", max_size=400)
    assert forced.kind == "mask"


def pooled_reference(data_xyz: np.ndarray, factors, mode: str) -> dict[str, np.ndarray]:
    """Brute force: each pooled pixel from all voxels of its column, in display orientation."""
    fx, fy, fz = factors
    nx, ny, nz = (-(-n // f) for n, f in zip(data_xyz.shape, factors))
    out = {"xy": np.zeros((ny, nx), data_xyz.dtype), "zy": np.zeros((ny, nz), data_xyz.dtype), "xz": np.zeros((nz, nx), data_xyz.dtype)}
    views = {"xy": (2, 1, 0, fy, fx), "zy": (0, 1, 2, fy, fz), "xz": (1, 2, 0, fz, fx)}  # along, rows, columns
    for name, (along, rows, cols, fr, fc) in views.items():
        volume = data_xyz.transpose(along, rows, cols)  # (depth, rows, columns)
        for r in range(out[name].shape[0]):
            for c in range(out[name].shape[1]):
                column = volume[:, r * fr : (r + 1) * fr, c * fc : (c + 1) * fc]
                if mode == "max":
                    out[name][r, c] = column.max()
                    continue
                hits = np.argwhere(column != 0)
                if len(hits):
                    depth = hits[:, 0].min()
                    out[name][r, c] = column[depth][column[depth] != 0].max()
    return out


@pytest.mark.parametrize("factors", [(1, 1, 1), (3, 2, 5), (4, 4, 4)])
def test_projections_equal_the_reference(tmp_path, factors):
    """Chunks that do not line up with the pooled pixels (7,6,5 chunks, odd dims) give exactly the
    brute-force projections: max-pooled maxima, and for labels the first foreground voxel along the
    ray (the nearer object hides the farther; the larger id at equal depth)."""
    rng = np.random.default_rng(2)
    shape = (23, 19, 17)
    values = rng.integers(0, 1000, shape).astype(np.uint16)
    labels = np.where(rng.random(shape) < 0.05, rng.integers(1, 9, shape), 0).astype(np.uint32)
    labels[5, 5, 3], labels[5, 5, 9] = 4, 8  # two objects on one z ray: 4 is nearer z = 0
    v = write(tmp_path / "p.n5", "v", values, chunks=(7, 6, 5))
    lab = write(tmp_path / "p.n5", "l", labels, chunks=(7, 6, 5))
    layout = ql.Layout(shape, (1.0, 1.0, 1.0), "voxels", factors, shape, (0, 0))
    for volume, data, mode in ((v, values, "max"), (lab, labels, "first")):
        got = ql.project(volume, layout, mode, threads=2)
        expected = pooled_reference(data, factors, mode)
        for name in ("xy", "zy", "xz"):
            np.testing.assert_array_equal(getattr(got, name), expected[name], err_msg=f"{mode} {name} {factors}")
    if factors == (1, 1, 1):
        assert ql.project(lab, layout, "first").xy[5, 5] == 4  # rows y, columns x


def test_large_volume_read_chunk_by_chunk_in_bounded_memory(tmp_path, monkeypatch):
    """A 1536x1024x48 volume (75 MB of uint8, 302 MB of float32; chunks 128x128x48) pictured at 256 pixels:
    every chunk is read exactly once, each read is one chunk, and the peak of traced allocations
    stays a small fraction of the volume (a few chunks plus the small pooled planes)."""
    shape, chunks = (1536, 1024, 48), (128, 128, 48)
    raw = create_volume(tmp_path / "big.n5", "raw", shape, chunks, "uint8", compression="raw")
    prob = create_volume(tmp_path / "big.n5", "prob", shape, chunks, "float32", compression="raw")
    block = np.zeros(chunks[::-1], np.uint8)
    block[:, 60:68, :] = 200  # a rod along x in a few chunks; the rest are missing chunks (fill 0)
    for x in (0, 128, 1408):
        raw.write_zyx((x, 512, 0), block)
        prob.write_zyx((x, 512, 0), (block > 0).astype(np.float32))
    reads: list[tuple[str, tuple, tuple]] = []
    original = Volume.read_zyx

    def recording(self, box):
        reads.append((self.dataset, box.start, box.end))
        return original(self, box)

    # matplotlib's first picture loads fonts and modules (~20 MB): done once before measuring
    ql.write_quicklooks(raw, [], tmp_path / "warm-up.png", max_size=256)
    monkeypatch.setattr(Volume, "read_zyx", recording)
    tracemalloc.start()
    try:
        (picture,) = ql.write_quicklooks(open_volume(tmp_path / "big.n5", "raw"), [open_volume(tmp_path / "big.n5", "prob")],
                                         tmp_path / "big.png", max_size=256, threads=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n_chunks = math.prod(-(-n // c) for n, c in zip(shape, chunks))
    for dataset in ("raw", "prob"):
        boxes = [(s, e) for d, s, e in reads if d == dataset]
        assert len(boxes) == len(set(boxes)) == n_chunks, dataset  # each chunk once
        for start, end in boxes:  # each read is one whole chunk (clipped to the image)
            assert all(s % c == 0 and e - s == min(c, n - s) for s, e, c, n in zip(start, end, chunks, shape)), (start, end)
        assert sum(math.prod(e - s for s, e in zip(*b)) for b in boxes) == math.prod(shape)
    # a chunk being read costs ~4 copies of it (the file's bytes, the decoded big-endian block, its
    # native-order copy, the read's result); two threads read at once: 12 chunks cover it, 1/8 of the volume
    chunk_bytes, volume_bytes = math.prod(chunks) * 4, math.prod(shape) * 4  # the float32 result
    assert peak < 12 * chunk_bytes <= volume_bytes / 8, f"peak {peak / 1e6:.1f} MB for {chunk_bytes / 1e6:.1f} MB chunks"
    assert max(picture.size) == 256 and picture.layout.factors[0] > 1 and picture.kind == "probability"
    rgb = png(picture.path)
    assert rgb.shape[1::-1] == picture.size
    assert saturation(rgb[picture.layout.pixel_of("xy", 700, 576)[::-1]]) < 0.05  # no rod where the chunks are missing
    assert rgb[picture.layout.pixel_of("xy", 64, 576)[::-1]][2] < 0.35  # the rod: yellow


def test_bad_inputs_one_line_exit_2_no_picture(scene, tmp_path):
    raw, results = scene
    small = write(tmp_path / "other.n5", "s0", np.zeros((30, 50, 40), np.float32))
    inp = ["-i", raw.container, "-id", "/c1/s0", "--no-progress"]
    seg = f"{results['probability'].container}:/segmented/s0"
    out = tmp_path / "pics"
    out.mkdir()
    cases = [
        (["-id", "/c1/s9", "-o", out / "a.png"], "dataset /c1/s9 does not exist"),
        (["--result", f"{small.container}:/s0", "-o", out / "a.png"], "has dims 30,50,40, but the input"),
        (["--result", seg, "--kind", "labels", "-o", out / "a.png"], "labels need an integer dataset"),
        (["--result", seg, "--kind", "colour", "-o", out / "a.png"], "kind 'colour' is not one of"),
        (["--result", seg, "--max-size", "100", "-o", out / "a.png"], "at least 256 pixels"),
        (["--result", seg, "--result", seg.replace("segmented", "mask"), "-o", out / "a.png"], "must be a folder"),
        (["--result", seg, "--result", seg, "-o", f"{out}/"], "several results would be pictured as seg_segmented_s0.png"),
        (["--result", seg, "-o", out / "a.jpg"], "is not a .png file name"),
        (["--result", "seg.n5", "-o", out / "a.png"], "is not CONTAINER:DATASET"),
        (["--result", seg, "-o", out / "a.png", "--max-size", "big"], "Invalid value for '--max-size'"),
        (["--result", seg], "Missing option '-o'"),
    ]
    for args, message in cases:
        proc = run_script("quicklook.py", *inp, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, (args, proc.stderr)
        assert proc.stdout == "", args
        assert list(out.iterdir()) == [], args


def test_failed_write_leaves_no_picture(scene, tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves neither the picture nor its temporary file."""
    from matplotlib.figure import Figure

    raw, results = scene

    def failing(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", failing)
    with pytest.raises(OutputError, match="No space left on device"):
        ql.write_quicklooks(raw, [results["probability"]], tmp_path / "pics" / "look.png", max_size=300)
    assert list((tmp_path / "pics").iterdir()) == []


def test_raw_alone_and_version(scene, tmp_path):
    raw, _ = scene
    proc = run_script("quicklook.py", "-i", raw.container, "-id", "c1/s0", "-o", f"{tmp_path}/q/", "--no-progress", check=True)
    picture = tmp_path / "q" / "in_c1_s0.png"
    assert proc.stdout.startswith(f"picture {picture}: ") and "+" not in proc.stdout
    rgb = png(picture)
    assert max(rgb.shape[:2]) == 1024 and saturation(rgb).max() < 0.05  # grey only
    version = run_script("quicklook.py", "--version", check=True)
    assert version.stdout.split()[:2] == ["quicklook.py", "(exllsm-neuronseg)"]
