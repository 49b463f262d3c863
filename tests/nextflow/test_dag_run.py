"""The pipeline's tasks, run in DAG order outside Nextflow: the closest offline stand-in for
``nextflow run main.nf -profile test``.

Each process's ``script:`` section is rendered by Groovy 4 with the input values a small synthetic
run gives it (the planning, i.e. options, geometry, scaling jobs and blocks, comes from the
subworkflow's and facade's own Groovy functions), then executed with bash in its own work
directory, with bin/ on PATH as Nextflow puts it. Every declared output is checked.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from nfscript import Groovy, Process, ext_args, modules, section_functions
from nftools import FACADE, ROOT, SUBWORKFLOW, analysis_or_fail

from exllsm_neuronseg.volume import open_volume


@pytest.fixture(scope="module")
def analysis():
    return analysis_or_fail()


MODEL = ROOT.parent / "shared" / "models" / "neuron_2021.h5"
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/exllsm_neuronseg/__init__.py").read_text()).group(1)
FUNCTIONS = section_functions(FACADE) + "\n" + section_functions(SUBWORKFLOW)

# The test profile's params, scaled down (params names as in nextflow.config / conf/test.config).
TEST_PARAMS = {
    "test_volume": True,
    "test_volume_shape": "96,64,64",
    "test_volume_chunks": "64,64,64",
    "neuron_input_dataset": "/c1/s0",
    "neuron_output_dataset": "/segmented/s0",
    "unsegmented_dataset": "/raw/s0",
    "neuron_model": str(MODEL),
    "volume_partition_size": 64,
    "block_size": "512,512,512",
    "n5_compression": "gzip",
    "input_imgname_pattern": "",
    "default_n5_dataset": "s0",
    "overwrite_output": False,
    "neuron_segmentation_cpus": 4,
    "neuron_segmentation_memory": "24 GB",
    "neuron_scaling_cpus": 1,
    "neuron_scaling_memory": "4 GB",
    "tiff2n5_cpus": 4,
    "tiff2n5_memory": "8 GB",
    "exm_neuron_segmentation_container": "",
    "neuron_segmentation_partition_size": "",
    "partial_volume": "",
    "neuron_scaling_tiles": 0,
    "neuron_percent_scaling_tiles": 0.5,
    "neuron_scaling_partition_size": "32,32,32",
    "max_scaling_tiles_per_job": 4,
    "neuron_scaling_plots_dir": "",
    "user_defined_scaling": "",
    "neuron_mask_as_binary": False,
    "with_neuron_post_segmentation": False,
    "neuron_seg_unet_batch_sz": 1,
    "neuron_seg_model_in_dims": "220,220,220",
    "neuron_seg_model_out_dims": "132,132,132",
    "neuron_seg_high_th": 0.98,
    "neuron_seg_low_th": 0.2,
    "neuron_seg_small_region_prob_th": 0.9,
    "neuron_seg_small_region_size_th": 1000,
    "use_gpu_mem_growth": False,
}


class Runner:
    """Runs rendered tasks the way Nextflow's local executor does: own directory, bash, bin/ on PATH."""

    def __init__(self, root: Path):
        self.root = root
        self.count = 0
        self.env = {
            **os.environ,
            "PATH": f"{ROOT / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONNOUSERSITE": "1",  # the env scope of nextflow.config
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONWARNINGS": "ignore",
        }

    def workdir(self, process: str) -> Path:
        self.count += 1
        path = self.root / process / f"{self.count:02d}"
        path.mkdir(parents=True)
        return path

    def run(self, process: Process, script: str, staged: dict[str, Path] | None = None) -> Path:
        work = self.workdir(process.name)
        for name, target in (staged or {}).items():
            (work / name).symlink_to(target)
        (work / ".command.sh").write_text("#!/bin/bash -ue\n" + script)
        with open(work / ".command.out", "w") as out, open(work / ".command.err", "w") as err:
            rc = subprocess.run(
                ["bash", "-ue", ".command.sh"], cwd=work, env=self.env, stdout=out, stderr=err
            ).returncode
        if rc != 0:
            raise AssertionError(
                f"{process.name} failed ({rc}) in {work}:\n{script}\n{(work / '.command.err').read_text()[-3000:]}"
            )
        return work

    def evaluate(self, work: Path, command: str) -> str:
        """An ``eval(...)`` output: the command's stdout in the task directory, trimmed."""
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=self.env, capture_output=True, text=True)
        assert proc.returncode == 0, f"eval {command!r} failed in {work}: {proc.stderr}"
        return proc.stdout.strip()


def check_outputs(runner: Runner, process: Process, work: Path, inputs: dict, names: dict[str, str] | None = None) -> dict:
    """Every declared output of a finished task: val from its inputs, path present (``names`` maps a
    declared path to its rendered name or glob), eval runs; returns the values per emit name."""
    values = {}
    for out in process.outputs:
        items = []
        for kind, name in out.kinds:
            if kind == "val":
                if name.startswith("${") or name == "exllsm-neuronseg":
                    items.append(name)
                else:
                    assert name in inputs, f"{process.name}: output val({name}) is not an input"
                    items.append(inputs[name])
            elif kind == "path":
                pattern = names[name] if names is not None else name
                if glob.has_magic(pattern):
                    found = sorted(work.glob(pattern))
                    assert found, f"{process.name}: declared output {pattern} matches nothing in {work}"
                    items.append(found)
                else:
                    assert (work / pattern).exists(), f"{process.name}: declared output {pattern} missing in {work}"
                    items.append(work / pattern)
            elif kind == "eval":
                items.append(runner.evaluate(work, name))
            else:
                raise AssertionError(f"{process.name}: unexpected output kind {kind}")
        values[out.emit] = items
        if out.topic == "versions":
            assert items[-1] == VERSION, f"{process.name}: version {items[-1]!r}"
    return values


def covered(path: str, options: str, engine: str) -> bool:
    mounts = re.findall(r"-v (\S+):\S+", options) if engine == "docker" else re.findall(r"-B (\S+)", options)
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_mounts(rendered: dict, paths: list[str]) -> None:
    for engine, options in rendered["containerOptions"].items():
        for path in paths:
            assert covered(path, options, engine), f"{path} is not bound by {engine} options {options!r}"


def topological_levels(edges: set[tuple[str, str]], nodes: set[str]) -> list[set[str]]:
    levels, done = [], set()
    while done != nodes:
        level = {n for n in nodes - done if not any(b == n and a in nodes - done for a, b in edges)}
        assert level, f"cycle among {nodes - done}"
        levels.append(level)
        done |= level
    return levels


@pytest.mark.parametrize("source", ["n5", "tiff"])
def test_synthetic_run_in_dag_order(analysis, tmp_path, source):
    """The whole chain on an N5 input, and on a TIFF series (converted first, with a partial volume
    that ends inside a chunk, so a block is clipped to the region)."""
    if not MODEL.is_file():
        pytest.fail(f"the published model is required at {MODEL}")
    procs = modules()
    args = ext_args()
    groovy = Groovy(tmp_path / "groovy")
    runner = Runner(tmp_path / "work")
    data = tmp_path / "data"
    data.mkdir()
    params = {**TEST_PARAMS, "neuron_stack_dir": str(data / "input.n5"), "output_dir": str(data / "seg.n5")}
    if source == "tiff":
        params["partial_volume"] = "0,0,0,80,64,64"

    # The DAG order, from the language server's previews of main.nf, the facade and the subworkflow
    main_dag, facade_dag, sub_dag = analysis.dags["main"], analysis.dags["facade"], analysis.dags["subworkflow"]
    assert topological_levels(main_dag.edges, {"MAKE_TEST_VOLUME", "neuron_segmentation"}) == [
        {"MAKE_TEST_VOLUME"},
        {"neuron_segmentation"},
    ]
    assert topological_levels(facade_dag.edges, {"TIFF_TO_N5", "NEURON_SEGMENTATION"}) == [
        {"TIFF_TO_N5"},
        {"NEURON_SEGMENTATION"},
    ]
    stages = {"PLAN_BLOCKS", "SCALING_FACTOR", "CREATE_VOLUME", "SEGMENT_VOLUME"}
    assert topological_levels(sub_dag.edges, stages) == [
        {"PLAN_BLOCKS", "CREATE_VOLUME"},
        {"SCALING_FACTOR"},
        {"SEGMENT_VOLUME"},
    ]

    def task(name: str, cpus: int = 1) -> dict:
        return {"ext": {"args": args.get(name, "")}, "cpus": cpus, "process": name, "attempt": 1}

    # -- MAKE_TEST_VOLUME (main.nf, test profile) ---------------------------------------------
    make = procs["MAKE_TEST_VOLUME"]
    input_n5 = params["neuron_stack_dir"]
    make_inputs = {
        "meta": {"id": "test_volume"},
        "n5": input_n5,
        "dataset": params["neuron_input_dataset"],
        "shape": params["test_volume_shape"],
        "chunks": params["test_volume_chunks"],
    }
    (make_rendered,) = groovy.render_many(make, [(make_inputs, task(make.name))])
    check_mounts(make_rendered, [str(data)])
    work = runner.run(make, make_rendered["script"])
    made = check_outputs(runner, make, work, make_inputs)["volume"]
    assert (Path(made[1]) / "c1/s0/attributes.json").is_file()
    image = open_volume(made[1], made[2]).read_zyx(open_volume(made[1], made[2]).box)  # z,y,x
    request = [made[1], made[2]]
    if source == "tiff":
        # the same image as a TIFF series, one slice per z, named by an integer stem
        import tifffile

        folder = data / "slices"
        folder.mkdir()
        for z, plane in enumerate(image):
            tifffile.imwrite(folder / f"{z}.tif", plane)
        request = [str(folder), ""]

    # -- The facade's and the subworkflow's own functions -----------------------------------------
    plan_code = """
        def meta = hostVolume(0, [in_dir, in_ds], [out_dir, out_ds, unsegmented])
        return [meta: meta, options: hostOptions(), tiff: tiffArgs(),
                tiff_resources: hostResources('tiff2n5_cpus', 4, 'tiff2n5_memory', '8 GB', '')]
    """
    binding = {
        "params": params,
        "in_dir": request[0],
        "in_ds": request[1],
        "out_dir": params["output_dir"],
        "out_ds": params["neuron_output_dataset"],
        "unsegmented": params["unsegmented_dataset"],
    }
    (facade,) = groovy.evaluate([(binding, section_functions(FACADE), plan_code)])
    meta = facade["meta"]
    (sub,) = groovy.evaluate(
        [
            (
                {"options": facade["options"]},
                section_functions(SUBWORKFLOW),
                "def o = segmentationOptions(options); [opts: o, plan: planArgs(o), create: createArgs(o), segment: segmentArgs(o)]",
            )
        ]
    )
    opts = sub["opts"]
    assert "--set_gpu_mem_growth" not in opts["segmentation_args"]
    assert opts["segmentation_args"].startswith("--model_input_shape 220,220,220 --model_output_shape 132,132,132")
    out_n5, out_ds = params["output_dir"], params["neuron_output_dataset"]

    # -- TIFF_TO_N5 (facade): the TIFF series becomes <output_dir>/raw/s0 -------------------------
    if source == "tiff":
        assert meta == {
            "id": "seg_segmented_s0",
            "tiff": str(data / "slices"),
            "host": [out_n5, "/raw/s0", out_n5, "/segmented/s0"],
        }
        convert = procs["TIFF_TO_N5"]
        convert_inputs = {
            "meta": meta,
            "tiff_dir": meta["tiff"],
            "out_n5": out_n5,
            "out_ds": "/raw/s0",
            "options": facade["tiff"],
            "resources": facade["tiff_resources"],
        }
        (convert_rendered,) = groovy.render_many(convert, [(convert_inputs, task(convert.name))])
        check_mounts(convert_rendered, [meta["tiff"], str(data)])
        work = runner.run(convert, convert_rendered["script"])
        converted = check_outputs(runner, convert, work, convert_inputs)["volume"]
        in_n5, in_ds = converted[1], converted[2]
        raw = open_volume(in_n5, in_ds)
        assert raw.shape == (96, 64, 64) and raw.chunks == (512, 512, 512) and raw.dtype == image.dtype
        # the region is converted bit for bit; the rest stays empty (the host's --subvol)
        np.testing.assert_array_equal(raw.read_zyx(raw.box)[:, :, :80], image[:, :, :80])
        assert not raw.read_zyx(raw.box)[:, :, 80:].any()
        assert convert.directive("cpus") and "resources.cpus" in convert.directive("cpus")
    else:
        assert meta == {"id": "seg_segmented_s0", "tiff": "", "host": [made[1], "/c1/s0", out_n5, "/segmented/s0"]}
        in_n5, in_ds = made[1], made[2]

    # -- PLAN_BLOCKS and CREATE_VOLUME ------------------------------------------------------------
    plan_proc, create = procs["PLAN_BLOCKS"], procs["CREATE_VOLUME"]
    plan_inputs = {"meta": meta, "n5": in_n5, "dataset": in_ds, "options": sub["plan"]}
    create_inputs = {"meta": meta, "in_n5": in_n5, "in_ds": in_ds, "out_n5": out_n5, "out_ds": out_ds, "options": sub["create"]}
    (plan_rendered,) = groovy.render_many(plan_proc, [(plan_inputs, task(plan_proc.name))])
    (create_rendered,) = groovy.render_many(create, [(create_inputs, task(create.name))])
    check_mounts(plan_rendered, [in_n5])
    check_mounts(create_rendered, [in_n5, str(Path(out_n5).parent)])
    plan_work = runner.run(plan_proc, plan_rendered["script"])
    create_work = runner.run(create, create_rendered["script"])
    planned = check_outputs(runner, plan_proc, plan_work, plan_inputs)["plan"]
    created = check_outputs(runner, create, create_work, create_inputs)["volume"]
    (lines,) = groovy.evaluate(
        [
            (
                {"blocks": Path(planned[1]).read_text(), "jobs": Path(planned[2]).read_text()},
                section_functions(SUBWORKFLOW),
                "[planLines(blocks), planLines(jobs)]",
            )
        ]
    )
    blocks, jobs = lines
    attrs = json.loads((Path(out_n5) / "segmented/s0/attributes.json").read_text())
    source_attrs = json.loads((Path(in_n5) / in_ds.strip("/") / "attributes.json").read_text())
    assert attrs["dimensions"] == source_attrs["dimensions"] and attrs["blockSize"] == source_attrs["blockSize"]
    assert attrs["dataType"] == "float32" and attrs["compression"]["type"] == "gzip"
    assert created[3] == out_n5
    if source == "tiff":
        # 512^3 chunks (block_size), 64^3 partition rounded up to them; the region ends at x = 80
        assert blocks == [{"start": "0,0,0", "end": "80,64,64", "fraction": ""}]
        # 12 x 32^3 sampling tiles over the region 80,64,64 (3 x 2 x 2), half sampled, 4 per job
        assert [(j["start"], j["end"]) for j in jobs] == [("0,0,0", "64,64,64"), ("64,0,0", "80,64,64")]
    else:
        assert [(b["start"], b["end"]) for b in blocks] == [("0,0,0", "64,64,64"), ("64,0,0", "96,64,64")]
        # 12 tiles of 32^3, half of them sampled, 4 per job: job edge 32 * cbrt(4 / 0.5) = 64
        assert [(j["start"], j["end"]) for j in jobs] == [("0,0,0", "64,64,64"), ("64,0,0", "96,64,64")]
    assert {j["fraction"] for j in jobs} == {"0.5"}

    # -- SCALING_FACTOR (parallel jobs) -----------------------------------------------------------
    scaling_proc = procs["SCALING_FACTOR"]
    scaling_inputs = [
        {
            "meta": {**meta, "job": {"index": index, "count": len(jobs)}},
            "n5": in_n5,
            "dataset": in_ds,
            "start": job["start"],
            "end": job["end"],
            "fraction": job["fraction"],
            "partition_size": "32,32,32",
            "plots_dir": opts["scaling_plots_dir"],
            "resources": opts["scaling_resources"],
        }
        for index, job in enumerate(jobs)
    ]
    scaling_rendered = groovy.render_many(scaling_proc, [(i, task(scaling_proc.name)) for i in scaling_inputs])
    for rendered in scaling_rendered:
        check_mounts(rendered, [in_n5])
    with ThreadPoolExecutor(len(jobs)) as pool:
        scaling_works = list(pool.map(lambda r: runner.run(scaling_proc, r["script"]), scaling_rendered))
    factors = []
    for work, inputs in zip(scaling_works, scaling_inputs):
        outputs = check_outputs(runner, scaling_proc, work, inputs)
        value = outputs["scaling"][1]
        assert value == "null" or value == "nan" or float(value) > 0, value
        assert (work / "scaling.log").read_text().splitlines()[-1].startswith("Calculated a scaling factor of ")
        factors.append(value)

    # -- SEGMENT_VOLUME, one task per block ------------------------------------------------------
    segment = procs["SEGMENT_VOLUME"]
    (scaling,) = groovy.evaluate([({"factors": factors}, FUNCTIONS, "return meanScaling(factors)")])
    valid = [float(f) for f in factors if f not in ("null", "nan")]
    assert scaling and float(scaling) == pytest.approx(sum(valid) / len(valid))
    block_inputs = [
        {
            "meta": {**meta, "scaling": scaling, "block": {"index": index, "count": len(blocks)}},
            "in_n5": in_n5,
            "in_ds": in_ds,
            "out_n5": out_n5,
            "out_ds": out_ds,
            "start": b["start"],
            "end": b["end"],
            "scaling": scaling,
            "model": MODEL.name,  # staged into the task directory, as a path input is
            "options": sub["segment"],
            "resources": opts["segmentation_resources"],
        }
        for index, b in enumerate(blocks)
    ]
    segment_rendered = groovy.render_many(segment, [(i, task(segment.name, cpus=1)) for i in block_inputs])
    for rendered in segment_rendered:
        check_mounts(rendered, [in_n5, out_n5])
        assert f"--scaling {scaling}" in rendered["script"] and "--io-threads 2" in rendered["script"]
        assert ("--partial_volume 0,0,0,80,64,64" in rendered["script"]) == (source == "tiff")
    # the host's resource params reach the task (cpus, memory) and the default image is the pinned one
    directives = groovy.render_directives(segment, block_inputs[0], task(segment.name), ["cpus", "memory", "container"])
    assert directives == {"cpus": 4, "memory": "24 GB", "container": f"ghcr.io/janeliascicomp/exllsm-segment-volume:{VERSION}"}
    stage = {MODEL.name: MODEL}
    with ThreadPoolExecutor(2) as pool:
        segment_works = list(pool.map(lambda r: runner.run(segment, r["script"], stage), segment_rendered))
    finished = []
    for work, inputs in zip(segment_works, block_inputs):
        finished.append(check_outputs(runner, segment, work, inputs)["block"])
        assert "tiles in" in (work / ".command.out").read_text()
        start, end = inputs["start"].replace(",", "_"), inputs["end"].replace(",", "_")
        assert (Path(out_n5) / "segmented/s0/.exllsm-done" / f"{start}-{end}.json").is_file()
    output = open_volume(out_n5, "segmented/s0")
    prob = output.read(output.box)
    assert prob.shape == (96, 64, 64) and np.isfinite(prob).all()
    assert 0 <= prob.min() and prob.max() <= 1 and prob.max() > 0.5
    if source == "tiff":
        assert not prob[80:].any() and prob[:80].any()  # only the region is segmented

    # -- Barrier: the volume is done when all of its blocks are, and `done` has the host's strings
    groups: dict[str, list] = {}
    for item in finished:
        groups.setdefault(item[0]["id"], []).append(item)
    assert {k: len(v) for k, v in groups.items()} == {meta["id"]: len(blocks)}
    done = [group[0][0]["host"] for group in groups.values() if len(group) == group[0][0]["block"]["count"]]
    if source == "tiff":
        assert done == [[out_n5, "/raw/s0", out_n5, "/segmented/s0"]]
    else:
        assert done == [[in_n5, "/c1/s0", out_n5, "/segmented/s0"]]

    # -- Re-runs: a finished block is skipped; a block without its marker (killed) is redone ------
    rerun = runner.run(segment, segment_rendered[0]["script"], stage)
    assert "already done (marker present), skipped" in (rerun / ".command.out").read_text()
    marker = Path(out_n5) / "segmented/s0/.exllsm-done" / f"{blocks[-1]['start'].replace(',', '_')}-{blocks[-1]['end'].replace(',', '_')}.json"
    marker.unlink()
    redo = runner.run(segment, segment_rendered[-1]["script"], stage)
    assert "tiles in" in (redo / ".command.out").read_text() and marker.is_file()

    # -- A re-run into an output of another dtype stops and names the param that replaces it --------
    binary_create = {**create_inputs, "options": sub["create"].replace("float32", "uint8")}
    (binary_rendered,) = groovy.render_many(create, [(binary_create, task(create.name))])
    work = runner.workdir(create.name)
    (work / ".command.sh").write_text(binary_rendered["script"])
    proc = subprocess.run(["bash", "-ue", ".command.sh"], cwd=work, env=runner.env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "already exists" in proc.stderr and "the pipeline param overwrite_output replaces it" in proc.stderr
    assert open_volume(out_n5, "segmented/s0").dtype == np.float32  # untouched

    # -- Stubs run and declare the same outputs -------------------------------------------------
    stubs = [
        (make, make_rendered),
        (plan_proc, plan_rendered),
        (scaling_proc, scaling_rendered[0]),
        (create, create_rendered),
        (segment, segment_rendered[0]),
    ]
    if source == "tiff":
        stubs.append((convert, convert_rendered))
    for process, rendered in stubs:
        work = runner.run(process, rendered["stub"])
        if process is scaling_proc:
            assert runner.evaluate(work, process.output("scaling").kinds[1][1]) == "null"
            assert (work / "scaling.log").is_file()
        if process is plan_proc:
            assert (work / "blocks.txt").is_file() and (work / "scaling_jobs.txt").is_file()


def test_facade_and_subworkflow_functions(tmp_path):
    """The Groovy that is left: the host's params become flags and resources, the input kind is
    detected by the host's rule, plan files are read, and scaling factors are averaged. The block
    and scaling-job geometry is Python's (tests/test_geometry.py)."""
    big = tmp_path / "big.n5"
    (big / "c1" / "s0").mkdir(parents=True)
    (big / "c1" / "s0" / "attributes.json").write_text(
        json.dumps({"dimensions": [1000, 1000, 600], "blockSize": [512, 512, 512], "dataType": "uint16"})
    )
    (big / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))  # the root: no dims
    (big / "c2").mkdir()
    (big / "c2" / "attributes.json").write_text(json.dumps({"pixelResolution": {"dimensions": [0.1, 0.1, 0.2], "unit": "um"}}))
    (tmp_path / "tiff").mkdir()
    (tmp_path / "stack.tif").write_bytes(b"II*\x00")
    zarr_ds = tmp_path / "in.zarr" / "raw"
    zarr_ds.mkdir(parents=True)
    (zarr_ds / ".zarray").write_text("{}")

    def refused(call: str) -> str:
        return f"try {{ {call}; return 'accepted' }} catch (IllegalStateException e) {{ return e.message }}"

    out = ["/o/out.n5", "/s0", "/raw/s0"]
    host = f"hostVolume(0, [d, ds], {out!r})".replace("'", "'")
    jobs = [
        # an N5 dataset: read in place, `done` names it
        ({"params": {}, "d": str(big), "ds": "/c1/s0"}, host),
        # a zarr array too
        ({"params": {}, "d": str(tmp_path / "in.zarr"), "ds": "raw"}, host),
        # a folder of TIFF slices, and a multi-page TIFF: converted into <out><unsegmented_dataset>
        ({"params": {}, "d": str(tmp_path / "tiff"), "ds": ""}, host),
        ({"params": {}, "d": str(tmp_path), "ds": "stack.tif"}, host),
        # empty unsegmented_dataset: default_n5_dataset
        (
            {"params": {"default_n5_dataset": "raw0"}, "d": str(tmp_path / "tiff"), "ds": ""},
            "hostVolume(1, [d, ds], ['/o/out.n5', '/s0', ''])",
        ),
        # the host's pitfall (the container root) and a missing input are refused with a message
        ({"params": {}, "d": str(big), "ds": ""}, refused(host)),
        ({"params": {}, "d": str(tmp_path / "nowhere"), "ds": ""}, refused(host)),
        # a group whose attributes hold a nested "dimensions" (pixelResolution) is still a group
        ({"params": {}, "d": str(big), "ds": "c2"}, refused(host)),
        # an output that is the input, or a converted input that would be the output: refused
        ({"params": {}, "d": str(big), "ds": "/c1/s0/"}, refused(f"hostVolume(0, [d, ds], ['{big}', 'c1//s0', ''])")),
        ({"params": {}, "d": str(tmp_path / "tiff"), "ds": ""}, refused("hostVolume(0, [d, ds], ['/o/out.n5', '/s0', ''])")),
        # the host's params: defaults, and each one set
        ({"params": {}}, "hostOptions()"),
        (
            {
                "params": {
                    "volume_partition_size": 256,
                    "neuron_segmentation_partition_size": "128,128,256",
                    "n5_compression": "bzip2",
                    "overwrite_output": True,
                    "neuron_segmentation_cpus": 8,
                    "neuron_segmentation_memory": "32 GB",
                    "neuron_scaling_cpus": 2,
                    "neuron_scaling_memory": "3 G",
                    "exm_neuron_segmentation_container": "registry.example/exllsm-segment-volume:0.1.0",
                }
            },
            "hostOptions()",
        ),
        ({"params": {"volume_partition_size": 256, "neuron_segmentation_partition_size": ""}}, "hostOptions().partition_size"),
        # the host fills the container param with the original tool's image: that means "not set"
        (
            {"params": {"exm_neuron_segmentation_container": "public.ecr.aws/janeliascicomp/exm-analysis/neuron-segmentation:1.0.0"}},
            "hostContainer()",
        ),
        ({"params": {}}, "[tiffArgs(), hostResources('tiff2n5_cpus', 4, 'tiff2n5_memory', '8 GB', '')]"),
        (
            {
                "params": {
                    "input_imgname_pattern": "slice_*.tiff",
                    "block_size": "250, 250, 250",
                    "partial_volume": "0,0,0, 250,250,250",
                    "n5_compression": "raw",
                    "overwrite_output": True,
                    "tiff2n5_cpus": 24,
                    "tiff2n5_memory": "126 G",
                }
            },
            "[tiffArgs(), hostResources('tiff2n5_cpus', 4, 'tiff2n5_memory', '8 GB', '')]",
        ),
    ]
    sub = [
        ({}, "def o = segmentationOptions([partition_size: 250, partial_volume: '0,0,0,250,250,250', scaling_fraction: 0.1]); [planArgs(o), createArgs(o), segmentArgs(o)]"),
        ({}, "def o = segmentationOptions([binary: true, compression: 'xz', overwrite: true, segmentation_args: '--as_binary_mask']); [planArgs(o), createArgs(o), segmentArgs(o)]"),
        ({}, "[sizeText(512), sizeText('256, 256, 512'), sizeText([1, 2, 3])]"),
        ({}, "planLines('0,0,0,512,512,512\\n512,0,0,600,512,512\\n\\n')"),
        ({}, "planLines('0,0,0,2917,2917,2917 0.1\\n')"),
        (
            {},
            "[meanScaling(['0.5', 'nan', 'null', '1.5']), meanScaling(['null', 'nan']), normaliseScaling(null), normaliseScaling('0.3')]",
        ),
        # the mean does not depend on the order in which the jobs finish (0.1 + 0.2 + 0.3 != 0.3 + 0.1 + 0.2)
        ({}, "[['0.1', '0.2', '0.3'], ['0.3', '0.1', '0.2'], ['0.2', '0.3', '0.1']].collect { v -> meanScaling(v) }"),
    ]
    groovy = Groovy(tmp_path / "groovy")
    results = groovy.evaluate([(b, section_functions(FACADE), c) for b, c in jobs])
    results += groovy.evaluate([(b, section_functions(SUBWORKFLOW), c) for b, c in sub])
    n5, zarr, tiffs, stack, fallback, root, missing, group, itself, raw_is_output = results[:10]
    defaults, custom, partition, original, tiff_default, tiff_custom = results[10:16]
    assert "is an N5 container or group, not a dataset" in group
    assert "is the input dataset itself" in itself and "neuron_output_dataset" in itself
    assert "would be the output dataset /s0 itself" in raw_is_output and "unsegmented_dataset" in raw_is_output
    assert n5 == {"id": "out_s0", "tiff": "", "host": [str(big), "/c1/s0", "/o/out.n5", "/s0"]}
    assert zarr["tiff"] == "" and zarr["host"][:2] == [str(tmp_path / "in.zarr"), "raw"]
    assert tiffs == {"id": "out_s0", "tiff": str(tmp_path / "tiff"), "host": ["/o/out.n5", "/raw/s0", "/o/out.n5", "/s0"]}
    assert stack["tiff"] == str(tmp_path / "stack.tif") and stack["host"][:2] == ["/o/out.n5", "/raw/s0"]
    assert fallback == {"id": "out_s0-1", "tiff": str(tmp_path / "tiff"), "host": ["/o/out.n5", "raw0", "/o/out.n5", "/s0"]}
    assert "is an N5 container or group, not a dataset" in root and "neuron_input_dataset" in root
    assert "does not exist" in missing
    assert defaults["partition_size"] == 512 and defaults["scaling_partition_size"] == "396,396,396"
    assert defaults["max_scaling_tiles_per_job"] == 40 and defaults["binary"] is False
    assert defaults["compression"] == "gzip" and defaults["overwrite"] is False
    assert defaults["segmentation_resources"] == {"cpus": 4, "memory": "24 GB", "container": ""}
    assert defaults["scaling_resources"] == {"cpus": 1, "memory": "4 GB", "container": ""}
    assert defaults["segmentation_args"] == (
        "--model_input_shape auto --model_output_shape auto --unet_batch_size 1 --set_gpu_mem_growth "
        "--high_threshold 0.98 --low_threshold 0.2 --small_region_probability_threshold 0.9 --small_region_size_threshold 1000"
    )
    assert custom["partition_size"] == "128,128,256" and custom["compression"] == "bzip2" and custom["overwrite"] is True
    image = "registry.example/exllsm-segment-volume:0.1.0"
    assert custom["segmentation_resources"] == {"cpus": 8, "memory": "32 GB", "container": image}
    assert custom["scaling_resources"] == {"cpus": 2, "memory": "3 G", "container": image}
    assert partition == 256
    assert original == ""
    assert tiff_default == [
        "--input_name_pattern '*.tif' --chunks 512,512,512 --compression gzip",
        {"cpus": 4, "memory": "8 GB", "container": ""},
    ]
    assert tiff_custom == [
        "--input_name_pattern 'slice_*.tiff' --chunks 250,250,250 --subvol 0,0,0,250,250,250 --compression raw --overwrite",
        {"cpus": 24, "memory": "126 G", "container": ""},
    ]
    host_example, binary, sizes, blocks, scaling_jobs, means, orders = results[16:]
    assert host_example == [
        "--partition_size 250 --partial_volume 0,0,0,250,250,250 --scaling_tiles 0 --scaling_fraction 0.1 "
        "--scaling_partition_size 396,396,396 --max_scaling_tiles_per_job 40",
        "--dtype float32 --compression gzip",
        "--partial_volume 0,0,0,250,250,250",
    ]
    assert binary[1:] == ["--dtype uint8 --compression xz --overwrite", "--as_binary_mask"]
    assert sizes == ["512", "256,256,512", "1,2,3"]
    assert blocks == [
        {"start": "0,0,0", "end": "512,512,512", "fraction": ""},
        {"start": "512,0,0", "end": "600,512,512", "fraction": ""},
    ]
    assert scaling_jobs == [{"start": "0,0,0", "end": "2917,2917,2917", "fraction": "0.1"}]
    assert means == ["1.0", "", "", "0.3"]
    assert len(set(orders)) == 1, orders
