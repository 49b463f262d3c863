"""OME-Zarr output (to_ome_zarr.py, omezarr.py): NGFF 0.4 metadata checked with ome-zarr-models'
pydantic models of the spec, data and labels read back with ome-zarr's own reader (the one napari
uses), the physical scale per level, and bad inputs (one error line, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

from exllsm_neuronseg.volume import create_volume

SHAPE = (50, 40, 30)  # x,y,z
VOXEL = [0.104, 0.104, 0.18]  # x,y,z um
FACTORS = [(1, 1, 1), (2, 2, 1), (4, 4, 2)]


def level_shape(factors) -> tuple[int, int, int]:
    return tuple(-(-n // f) for n, f in zip(SHAPE, factors))


def put(container: Path, dataset: str, data_zyx: np.ndarray, attributes: dict | None = None, chunks=(16, 16, 16)) -> None:
    volume = create_volume(container, dataset, data_zyx.shape[::-1], chunks, data_zyx.dtype, attributes=attributes)
    volume.write_zyx((0, 0, 0), data_zyx)


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> tuple[Path, dict]:
    """seg.n5 with 3-level pyramids /prob (float32), /mask (uint8) and /components (uint64 ids
    beyond 2**53), s0 carrying pixelResolution; returns the container and each level's z,y,x data."""
    container = tmp_path_factory.mktemp("omezarr") / "seg.n5"
    rng = np.random.default_rng(7)
    data: dict[str, list[np.ndarray]] = {}
    for index, factors in enumerate(FACTORS):
        shape_zyx = level_shape(factors)[::-1]
        prob = rng.random(shape_zyx, dtype=np.float32)
        mask = (prob > 0.6).astype(np.uint8)
        mask[: shape_zyx[0] // 2] = 0  # whole empty chunks, which are not written
        components = np.where(mask > 0, np.uint64(2**60) + rng.integers(1, 5, shape_zyx, dtype=np.uint64), 0).astype(np.uint64)
        attributes = {"pixelResolution": {"dimensions": VOXEL, "unit": "um"}}
        if index:
            attributes["downsamplingFactors"] = list(factors)
        for name, array in (("prob", prob), ("mask", mask), ("components", components)):
            put(container, f"{name}/s{index}", array, attributes)
            data.setdefault(name, []).append(array)
    return container, data


def convert(*args: str):
    return run_script("to_ome_zarr.py", *args, "--no-progress")


def group_spec(path: Path) -> dict:
    """A zarr v2 hierarchy on disk as the pydantic-zarr GroupSpec/ArraySpec dicts ome-zarr-models validates."""
    attributes = json.loads((path / ".zattrs").read_text()) if (path / ".zattrs").is_file() else {}
    if (path / ".zarray").is_file():
        return {**json.loads((path / ".zarray").read_text()), "attributes": attributes}
    members = {
        p.name: group_spec(p)
        for p in sorted(path.iterdir())
        if p.is_dir() and ((p / ".zarray").is_file() or (p / ".zgroup").is_file())
    }
    return {"zarr_format": 2, "attributes": attributes, "members": members}


def read_nodes(path: Path) -> dict:
    """ome-zarr's reader on ``path``: node name -> (spec class names, z,y,x arrays per level, metadata)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = {}
    for node in Reader(parse_url(str(path)))():
        name = node.metadata.get("name") or Path(str(node.zarr)).name
        nodes[name] = ({type(s).__name__ for s in node.specs}, [np.asarray(level) for level in node.data], node.metadata)
    return nodes


@pytest.fixture(scope="module")
def converted(seg, tmp_path_factory) -> Path:
    container, _ = seg
    output = tmp_path_factory.mktemp("out") / "seg.ome.zarr"
    proc = convert(
        "-i", str(container), "-id", "/prob/s0",
        "--label", "mask=/mask/s0",
        "--label", f"components={container}:/components/s0",
        "-o", str(output),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {output}: image {container}:/prob/s0"), proc.stdout
    assert "3 levels" in lines[0] and "labels mask, components" in lines[0] and "micrometer" in lines[0]
    assert not proc.stderr.strip()
    return output


def test_reader_opens_image_and_labels_equal_to_the_source(seg, converted):
    _, data = seg
    nodes = read_nodes(converted)
    specs, levels, metadata = nodes["prob"]
    assert "Multiscales" in specs
    assert [a["name"] for a in metadata["axes"]] == ["z", "y", "x"]
    assert len(levels) == 3
    for level, source in zip(levels, data["prob"]):
        assert level.dtype == np.float32 and level.shape == source.shape  # z,y,x: N5's x,y,z reversed
        np.testing.assert_array_equal(level, source)
    assert levels[0].shape == SHAPE[::-1]
    for name in ("mask", "components"):
        specs, levels, _ = nodes[name]
        assert {"Label", "Multiscales"} <= specs, name
        for level, source in zip(levels, data[name]):
            assert level.dtype == source.dtype
            np.testing.assert_array_equal(level, source)
    assert nodes["components"][1][0].max() > 2**60  # uint64 ids kept exactly


def test_metadata_validates_against_the_ngff_04_models(converted):
    from ome_zarr_models.v04 import Image, ImageLabel, Labels

    spec = group_spec(converted)
    image = Image.model_validate(spec)
    labels = spec["members"]["labels"]
    assert Labels.model_validate(labels).attributes.labels == ["mask", "components"]
    for name in ("mask", "components"):
        label = ImageLabel.model_validate(labels["members"][name])
        assert label.attributes.image_label.source.image == "../../"
    multiscale = image.attributes.multiscales[0]
    assert multiscale.version == "0.4"
    assert [(a.name, a.type, a.unit) for a in multiscale.axes] == [("z", "space", "micrometer")] + [
        (axis, "space", "micrometer") for axis in "yx"
    ]
    # zarr v2 with "/" separated chunk keys, as NGFF 0.4 requires
    for array in converted.rglob(".zarray"):
        meta = json.loads(array.read_text())
        assert meta["zarr_format"] == 2 and meta["dimension_separator"] == "/", array


def test_physical_scale_and_level_offsets(converted):
    attributes = json.loads((converted / ".zattrs").read_text())["multiscales"][0]
    label = json.loads((converted / "labels" / "mask" / ".zattrs").read_text())["multiscales"][0]
    for index, (dataset, factors) in enumerate(zip(attributes["datasets"], FACTORS)):
        assert dataset["path"] == str(index)
        transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
        scale = [v * f for v, f in zip(VOXEL, factors)][::-1]  # z,y,x
        np.testing.assert_allclose(transforms["scale"]["scale"], scale)
        if index == 0:
            assert "translation" not in transforms
        else:  # a coarse voxel's centre: (factor - 1) / 2 fine voxels from s0's first centre
            shift = [v * (f - 1) / 2 for v, f in zip(VOXEL, factors)][::-1]
            np.testing.assert_allclose(transforms["translation"]["translation"], shift)
    assert label["datasets"] == attributes["datasets"] and label["axes"] == attributes["axes"]
    assert attributes["metadata"]["source"].endswith("seg.n5:/prob/s0")


def test_empty_chunks_are_not_written(converted, seg):
    _, data = seg
    written = [p for p in (converted / "labels" / "mask" / "0").rglob("*") if p.is_file() and not p.name.startswith(".")]
    nonzero = sum(
        bool(data["mask"][0][z : z + 16, y : y + 16, x : x + 16].any())
        for z in range(0, 30, 16)
        for y in range(0, 40, 16)
        for x in range(0, 50, 16)
    )
    assert 0 < len(written) == nonzero < 3 * 3 * 4


def test_one_level_with_a_given_voxel_size_and_chunks(tmp_path):
    container = tmp_path / "plain.n5"
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE[::-1])
    put(container, "probabilities", image, chunks=(32, 32, 32))  # no pixelResolution, not a pyramid
    output = tmp_path / "plain.ome.zarr"
    proc = convert(
        "-i", str(container), "-id", "probabilities", "-o", str(output),
        "--resolution", "0.2,0.3,0.5", "--unit", "nm", "--chunks", "8,16,8", "--io-threads", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 level," in proc.stdout and "no labels" in proc.stdout
    multiscale = json.loads((output / ".zattrs").read_text())["multiscales"][0]
    assert multiscale["name"] == "probabilities"
    assert multiscale["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.3, 0.2]}]}]
    assert {a["unit"] for a in multiscale["axes"]} == {"nanometer"}
    assert json.loads((output / "0" / ".zarray").read_text())["chunks"] == [8, 16, 8]  # z,y,x of x,y,z 8,16,8
    (_, levels, _) = read_nodes(output)["probabilities"]
    np.testing.assert_array_equal(levels[0], image)


def test_the_data_voxel_size_wins_over_a_given_one(seg, tmp_path):
    container, _ = seg
    output = tmp_path / "x.ome.zarr"
    proc = convert("-i", str(container), "-id", "/prob", "-o", str(output), "--resolution", "1,1,1", "--name", "p")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().startswith("warning: ") and "is ignored" in proc.stderr
    multiscale = json.loads((output / ".zattrs").read_text())["multiscales"][0]
    assert multiscale["name"] == "p" and len(multiscale["datasets"]) == 3  # a group of levels works too
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == VOXEL[::-1]


def test_no_voxel_size_means_voxel_units(tmp_path):
    container = tmp_path / "bare.n5"
    put(container, "s0", np.ones((4, 5, 6), np.float32))
    output = tmp_path / "bare.ome.zarr"
    proc = convert("-i", str(container), "-id", "/s0", "-o", str(output))
    assert proc.returncode == 0, proc.stderr
    multiscale = json.loads((output / ".zattrs").read_text())["multiscales"][0]
    assert multiscale["name"] == "bare" and all("unit" not in a for a in multiscale["axes"])
    assert multiscale["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]


def assert_failed_cleanly(proc, output: Path, *words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not output.exists()
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


@pytest.mark.parametrize(
    "args, words",
    [
        (["-id", "/nothing/s0"], ["/nothing/s0 does not exist"]),
        (["--label", "p=/prob/s0"], ["float32", "integer"]),
        (["--label", "m=/mask/s1"], ["does not have the image's levels"]),
        (["--label", "mask"], ["NAME=CONTAINER:DATASET"]),
        (["--label", "a b=/mask/s0"], ["not a simple name"]),
        (["--resolution", "1,2"], ["three positive numbers"]),
        (["--chunks", "0,8,8"], ["--chunks"]),
        (["--io-threads", "0"], ["--io-threads"]),
    ],
)
def test_bad_inputs_write_nothing(seg, tmp_path, args, words):
    container, _ = seg
    output = tmp_path / "bad.ome.zarr"
    args = ["-id", "/prob/s0", *args] if "-id" not in args else args
    assert_failed_cleanly(convert("-i", str(container), *args, "-o", str(output)), output, *words)


def test_output_over_the_input_is_refused(seg):
    container, _ = seg
    proc = convert("-i", str(container), "-id", "/prob/s0", "-o", str(container), "--overwrite")
    assert proc.returncode == 2 and "is or holds the source container" in proc.stderr
    assert (container / "prob" / "s0" / "attributes.json").is_file()


def test_existing_output_is_replaced_only_on_request(seg, tmp_path):
    container, _ = seg
    output = tmp_path / "again.ome.zarr"
    first = convert("-i", str(container), "-id", "/mask/s0", "-o", str(output), "--name", "first")
    assert first.returncode == 0, first.stderr
    again = convert("-i", str(container), "-id", "/mask/s0", "-o", str(output), "--name", "second")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite replaces it" in again.stderr
    assert json.loads((output / ".zattrs").read_text())["multiscales"][0]["name"] == "first"
    replaced = convert("-i", str(container), "-id", "/mask/s0", "-o", str(output), "--name", "second", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((output / ".zattrs").read_text())["multiscales"][0]["name"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.ome.zarr"]
    # a folder that is not an OME-Zarr image is never replaced
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    proc = convert("-i", str(container), "-id", "/mask/s0", "-o", str(folder), "--overwrite")
    assert proc.returncode == 2 and "is not an OME-Zarr image" in proc.stderr
    assert (folder / "keep.txt").read_text() == "mine"


def test_a_failure_while_copying_leaves_no_output(tmp_path):
    container = tmp_path / "broken.n5"
    put(container, "s0", np.ones((32, 32, 32), np.uint8))
    (container / "s0" / "1" / "1" / "1").write_bytes(b"\x00\x00\x00\x03garbage")  # a truncated chunk
    output = tmp_path / "broken.ome.zarr"
    assert_failed_cleanly(convert("-i", str(container), "-id", "/s0", "-o", str(output)), output, "truncated or corrupt")


def test_units_and_label_specs():
    from exllsm_neuronseg.errors import ParameterError
    from exllsm_neuronseg.omezarr import ngff_unit, parse_label_spec

    warnings: list[str] = []
    assert [ngff_unit(u, warnings.append) for u in ("um", "µm", "micrometer", "nm", "pixel", None, "furlong")] == [
        "micrometer", "micrometer", "micrometer", "nanometer", None, None, None,
    ]  # fmt: skip
    assert len(warnings) == 1 and "furlong" in warnings[0]
    assert parse_label_spec("mask=/m/s0", "/c.n5") == ("mask", "/c.n5", "/m/s0")
    assert parse_label_spec("cc=/d/x.n5:/cc/s0", "/c.n5") == ("cc", "/d/x.n5", "/cc/s0")
    with pytest.raises(ParameterError, match="NAME=CONTAINER:DATASET"):
        parse_label_spec("=", "/c.n5")
