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
    "blocks_per_task": 4,
    "segmentation_precision": "fp32",
    "segmentation_mask": "",
    "skip_constant_tiles": True,
}

# Per input kind: the volume, its chunks and blocks, and how the blocks are cut into tasks.
#  n5:   160x64x64 in 32x64x64 chunks and blocks: 5 blocks, 2 per task -> 3 tasks (2 + 2 + 1), and a
#        tissue mask in a container of its own (bound like the N5 paths);
#  tiff: converted into 32x64x64 chunks, 64^3 blocks clipped to the region (x < 80): 2 blocks, 1 per
#        task -> 2 tasks (the old one-task-per-block layout), constant-tile skipping off.
CASES = {
    "n5": {
        "test_volume_shape": "160,64,64",
        "test_volume_chunks": "32,64,64",
        "neuron_segmentation_partition_size": "32,64,64",
        "blocks_per_task": 2,
    },
    "tiff": {
        "block_size": "32,64,64",
        "partial_volume": "0,0,0,80,64,64",
        "blocks_per_task": 1,
        "skip_constant_tiles": False,
    },
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


def volume_barrier(outputs: list) -> list:
    """The subworkflow's per-volume barrier on SEGMENT_VOLUME's ``blocks`` outputs, in the order the
    tasks finish: ``groupKey(meta.id, meta.task.count)`` + ``groupTuple`` releases a volume when its
    task count is reached. Returns (number of outputs seen, meta without ``task``) per release."""
    pending: dict[str, list] = {}
    released = []
    for seen, item in enumerate(outputs, 1):
        meta = item[0]
        group = pending.setdefault(meta["id"], [])
        group.append(item)
        if len(group) == meta["task"]["count"]:
            released.append((seen, {k: v for k, v in meta.items() if k != "task"}))
    return released


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
    """The whole chain on an N5 input (5 blocks in tasks of 2: 3 tasks, the last one shorter), and on
    a TIFF series (converted first, with a partial volume that ends inside a chunk, so a block is
    clipped to the region; one task per block)."""
    if not MODEL.is_file():
        pytest.fail(f"the published model is required at {MODEL}")
    procs = modules()
    args = ext_args()
    groovy = Groovy(tmp_path / "groovy")
    runner = Runner(tmp_path / "work")
    data = tmp_path / "data"
    data.mkdir()
    params = {**TEST_PARAMS, **CASES[source], "neuron_stack_dir": str(data / "input.n5"), "output_dir": str(data / "seg.n5")}
    if source == "n5":
        # a tissue mask in a container of its own, at a coarser resolution: tissue everywhere, so
        # the output is the unmasked one, but the flag, the bind mount and the reading are exercised
        from exllsm_neuronseg.volume import create_volume

        mask_n5 = data / "masks" / "tissue.n5"
        mask_n5.parent.mkdir()
        tissue = create_volume(mask_n5, "/tissue/s0", (5, 2, 2), (5, 2, 2), "uint8")
        tissue.write_zyx((0, 0, 0), np.ones((2, 2, 5), dtype=np.uint8))
        params["segmentation_mask"] = f"{mask_n5}:/tissue/s0"

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
    assert opts["blocks_per_task"] == CASES[source]["blocks_per_task"]
    assert sub["segment"].endswith(
        "--precision fp32 --no-skip-constant" if source == "tiff" else "--precision fp32 --skip-constant"
    )
    assert opts["mask"] == params["segmentation_mask"]
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
        assert raw.shape == (96, 64, 64) and raw.chunks == (32, 64, 64) and raw.dtype == image.dtype
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
        # 32x64x64 chunks (block_size), 64^3 partition on them; the region ends at x = 80, inside a chunk
        assert blocks == [{"start": "0,0,0", "end": "64,64,64", "fraction": ""}, {"start": "64,0,0", "end": "80,64,64", "fraction": ""}]
        # 12 x 32^3 sampling tiles over the region 80,64,64 (3 x 2 x 2), half sampled, 4 per job
        assert [(j["start"], j["end"]) for j in jobs] == [("0,0,0", "64,64,64"), ("64,0,0", "80,64,64")]
    else:
        assert [(b["start"], b["end"]) for b in blocks] == [(f"{x},0,0", f"{x + 32},64,64") for x in range(0, 160, 32)]
        # 20 tiles of 32^3, half of them sampled, 4 per job: job edge 32 * cbrt(4 / 0.5) = 64
        assert [(j["start"], j["end"]) for j in jobs] == [("0,0,0", "64,64,64"), ("64,0,0", "128,64,64"), ("128,0,0", "160,64,64")]
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
    with ThreadPoolExecutor(min(len(jobs), 2)) as pool:
        scaling_works = list(pool.map(lambda r: runner.run(scaling_proc, r["script"]), scaling_rendered))
    factors = []
    for work, inputs in zip(scaling_works, scaling_inputs):
        outputs = check_outputs(runner, scaling_proc, work, inputs)
        value = outputs["scaling"][1]
        assert value == "null" or value == "nan" or float(value) > 0, value
        assert (work / "scaling.log").read_text().splitlines()[-1].startswith("Calculated a scaling factor of ")
        factors.append(value)

    # -- SEGMENT_VOLUME: the blocks in tasks of blocks_per_task, cut by the subworkflow's blockTasks --
    segment = procs["SEGMENT_VOLUME"]
    (scaling,) = groovy.evaluate([({"factors": factors}, FUNCTIONS, "return meanScaling(factors)")])
    valid = [float(f) for f in factors if f not in ("null", "nan")]
    assert scaling and float(scaling) == pytest.approx(sum(valid) / len(valid))
    (groups,) = groovy.evaluate(
        [({"blocks": blocks, "per_task": opts["blocks_per_task"]}, section_functions(SUBWORKFLOW), "blockTasks(blocks, per_task)")]
    )
    if source == "n5":  # 5 blocks, 2 per task: 3 tasks, the last one shorter
        assert [g["task"] for g in groups] == [
            {"index": 0, "count": 3, "range": "0-1", "volume_blocks": 5},
            {"index": 1, "count": 3, "range": "2-3", "volume_blocks": 5},
            {"index": 2, "count": 3, "range": "4", "volume_blocks": 5},
        ]
    else:  # 1 per task: one task per block, as before
        assert [g["task"] for g in groups] == [
            {"index": 0, "count": 2, "range": "0", "volume_blocks": 2},
            {"index": 1, "count": 2, "range": "1", "volume_blocks": 2},
        ]
    # every block in exactly one task, in plan order
    assert [b for g in groups for b in g["blocks"]] == [{"start": b["start"], "end": b["end"]} for b in blocks]
    task_inputs = [
        {
            "meta": {**meta, "scaling": scaling, "task": g["task"]},
            "in_n5": in_n5,
            "in_ds": in_ds,
            "out_n5": out_n5,
            "out_ds": out_ds,
            "blocks": g["blocks"],
            "scaling": scaling,
            "model": MODEL.name,  # staged into the task directory, as a path input is
            "options": sub["segment"],
            "mask": opts["mask"],
            "resources": opts["segmentation_resources"],
        }
        for g in groups
    ]
    segment_rendered = groovy.render_many(segment, [(i, task(segment.name, cpus=1)) for i in task_inputs])
    mask_container = params["segmentation_mask"].rpartition(":")[0]
    for rendered, inputs in zip(segment_rendered, task_inputs):
        check_mounts(rendered, [in_n5, out_n5] + ([mask_container] if mask_container else []))
        script = rendered["script"]
        assert script.count("segment_volume.py") == 1  # one process (one model load) per task
        pairs = re.findall(r"--start (\S+) --end (\S+)", script)
        assert pairs == [(b["start"], b["end"]) for b in inputs["blocks"]]
        assert f"--scaling {scaling}" in script and "--io-threads 2" in script
        assert ("--partial_volume 0,0,0,80,64,64" in script) == (source == "tiff")
        assert (f"--mask {params['segmentation_mask']}" in script) == (source == "n5")
    # the tag names the volume and the task's blocks
    tags = [groovy.render_directives(segment, i, task(segment.name), ["tag"])["tag"] for i in task_inputs[:1]]
    assert tags == [f"{meta['id']}:blocks {groups[0]['task']['range']}"]
    # the host's resource params reach the task (cpus, memory) and the default image is the pinned one
    directives = groovy.render_directives(segment, task_inputs[0], task(segment.name), ["cpus", "memory", "container"])
    assert directives == {"cpus": 4, "memory": "24 GB", "container": f"ghcr.io/janeliascicomp/exllsm-segment-volume:{VERSION}"}
    stage = {MODEL.name: MODEL}
    with ThreadPoolExecutor(2) as pool:
        segment_works = list(pool.map(lambda r: runner.run(segment, r["script"], stage), segment_rendered))

    def marker(block: dict) -> Path:
        start, end = block["start"].replace(",", "_"), block["end"].replace(",", "_")
        return Path(out_n5) / "segmented/s0/.exllsm-done" / f"{start}-{end}.json"

    finished = []
    for work, inputs in zip(segment_works, task_inputs):
        finished.append(check_outputs(runner, segment, work, inputs)["blocks"])
        out = (work / ".command.out").read_text()
        for b in inputs["blocks"]:  # one summary line and one done marker per block
            box = f"block [{b['start']} .. {b['end']}): "
            assert sum(line.startswith(box) and " tiles" in line for line in out.splitlines()) == 1, out
            assert marker(b).is_file()
        if len(inputs["blocks"]) > 1:
            assert f"{len(inputs['blocks'])} blocks: {len(inputs['blocks'])} segmented, 0 already done" in out, out
    output = open_volume(out_n5, "segmented/s0")
    prob = output.read(output.box)
    assert prob.shape == tuple(int(v) for v in params["test_volume_shape"].split(",")) and np.isfinite(prob).all()
    assert 0 <= prob.min() and prob.max() <= 1 and prob.max() > 0.5
    if source == "tiff":
        assert not prob[80:].any() and prob[:80].any()  # only the region is segmented
    else:
        assert all(prob[x : x + 32].any() for x in range(0, 160, 32))  # every block written

    # -- Barrier: the volume is released once, when its last task is done, with the host's strings --
    for order in (finished, finished[::-1]):
        released = volume_barrier(order)
        assert len(released) == 1 and released[0][0] == len(groups), released
        assert "task" not in released[0][1] and released[0][1]["scaling"] == scaling
    done = [meta_out["host"] for _seen, meta_out in volume_barrier(finished)]
    if source == "tiff":
        assert done == [[out_n5, "/raw/s0", out_n5, "/segmented/s0"]]
    else:
        assert done == [[in_n5, "/c1/s0", out_n5, "/segmented/s0"]]
    # a volume of several tasks is not released before its last one
    assert volume_barrier(finished[:-1]) == []

    # -- Re-runs: finished blocks are skipped; a task whose blocks lost a marker (killed) redoes them --
    rerun = runner.run(segment, segment_rendered[0]["script"], stage)
    out = (rerun / ".command.out").read_text()
    assert out.count("already done (marker present), skipped") == len(groups[0]["blocks"]), out
    # a retried task skips the blocks it finished and segments only the one without a marker
    lost = groups[-1]["blocks"][-1] if source == "tiff" else groups[0]["blocks"][-1]
    retried = segment_rendered[-1] if source == "tiff" else segment_rendered[0]
    marker(lost).unlink()
    redo = runner.run(segment, retried["script"], stage)
    out = (redo / ".command.out").read_text()
    assert f"block [{lost['start']} .. {lost['end']}): " in out and marker(lost).is_file()
    assert out.count("already done (marker present), skipped") == (0 if source == "tiff" else 1), out

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
        "--partial_volume 0,0,0,250,250,250 --precision fp32 --skip-constant",
    ]
    assert binary[1:] == ["--dtype uint8 --compression xz --overwrite", "--as_binary_mask --precision fp32 --skip-constant"]
    assert sizes == ["512", "256,256,512", "1,2,3"]
    assert blocks == [
        {"start": "0,0,0", "end": "512,512,512", "fraction": ""},
        {"start": "512,0,0", "end": "600,512,512", "fraction": ""},
    ]
    assert scaling_jobs == [{"start": "0,0,0", "end": "2917,2917,2917", "fraction": "0.1"}]
    assert means == ["1.0", "", "", "0.3"]
    assert len(set(orders)) == 1, orders


def test_blocks_per_task_and_model_options(tmp_path):
    """The new segmentation params: blocks_per_task cuts a volume's plan into tasks (indices only),
    precision, mask and constant-tile skipping become flags, the mask's container an absolute path,
    and bad values stop the run with a message naming the param. Defaults equal nextflow.config's."""
    from test_language_server import config_params

    def refused(call: str) -> str:
        return f"try {{ {call}; return 'accepted' }} catch (IllegalStateException e) {{ return e.message }}"

    plan = [{"start": f"{x},0,0", "end": f"{x + 1},1,1", "fraction": ""} for x in range(5)]
    facade = [
        ({"params": {}}, "hostOptions().subMap(['blocks_per_task', 'precision', 'mask', 'skip_constant'])"),
        (
            {
                "params": {
                    "blocks_per_task": "3",  # a params file may give a string
                    "segmentation_precision": "bf16",
                    "segmentation_mask": "masks/brain.n5:/mask/s2",
                    "skip_constant_tiles": False,
                }
            },
            "hostOptions().subMap(['blocks_per_task', 'precision', 'mask', 'skip_constant'])",
        ),
        ({"params": {}}, "[maskSpec(''), maskSpec(null), maskSpec('/a/b.n5:c:/d/s0')]"),
        ({"params": {}}, refused("maskSpec('/data/mask.n5')")),
        ({"params": {}}, refused("maskSpec('/data/mask.n5:')")),
    ]
    sub = [
        ({}, "def o = segmentationOptions([:]); [o.blocks_per_task, segmentArgs(o)]"),
        (
            {},
            "def o = segmentationOptions([blocks_per_task: '3', precision: 'fp16', mask: '/m.n5:/s0', skip_constant: false, "
            "segmentation_args: '--unet_batch_size 2']); [o.blocks_per_task, segmentArgs(o)]",
        ),
        ({}, refused("segmentationOptions([blocks_per_task: 0])")),
        ({}, refused("segmentationOptions([blocks_per_task: 'two'])")),
        ({}, refused("segmentationOptions([precision: 'fp8'])")),
        ({}, refused("segmentationOptions([mask: '/data/mask.n5'])")),
        ({"plan": plan}, "[2, 1, 5, 7].collect { n -> blockTasks(plan, n) }"),
        ({}, "blockTasks([], 4)"),
    ]
    groovy = Groovy(tmp_path / "groovy")
    results = groovy.evaluate([(b, section_functions(FACADE), c) for b, c in facade])
    results += groovy.evaluate([(b, section_functions(SUBWORKFLOW), c) for b, c in sub])
    defaults, custom, masks, no_dataset, empty_dataset = results[:5]
    sub_defaults, sub_custom, zero, words, fp8, bad_mask, cuts, nothing = results[5:]

    config = config_params()
    assert defaults == {
        "blocks_per_task": config["blocks_per_task"],
        "precision": config["segmentation_precision"],
        "mask": config["segmentation_mask"],
        "skip_constant": config["skip_constant_tiles"],
    }
    assert config["blocks_per_task"] == sub_defaults[0]  # the subworkflow's own default is the pipeline's
    assert custom == {
        "blocks_per_task": "3",
        "precision": "bf16",
        "mask": f"{Path.cwd() / 'masks/brain.n5'}:/mask/s2",  # from the launch directory
        "skip_constant": False,
    }
    assert masks == ["", "", "/a/b.n5:c:/d/s0"]  # split at the last colon, as segment_volume.py does
    assert "is not CONTAINER:DATASET" in no_dataset and "segmentation_mask" in no_dataset
    assert "is not CONTAINER:DATASET" in empty_dataset
    assert sub_defaults[1] == "--precision fp32 --skip-constant"
    assert sub_custom == [3, "--unet_batch_size 2 --precision fp16 --no-skip-constant"]  # the mask is the module's input
    assert "blocks_per_task must be a whole number of 1 or more, not '0'" in zero
    assert "blocks_per_task" in words and "segmentation_precision" in fp8 and "segmentation_mask" in bad_mask

    def summary(tasks):
        return [(t["task"]["index"], t["task"]["count"], t["task"]["range"], [b["start"][0] for b in t["blocks"]]) for t in tasks]

    per2, per1, per5, per7 = cuts
    assert summary(per2) == [(0, 3, "0-1", ["0", "1"]), (1, 3, "2-3", ["2", "3"]), (2, 3, "4", ["4"])]
    assert summary(per1) == [(i, 5, str(i), [str(i)]) for i in range(5)]
    assert summary(per5) == summary(per7) == [(0, 1, "0-4", ["0", "1", "2", "3", "4"])]
    assert all(t["task"]["volume_blocks"] == 5 for t in per2 + per1 + per5)
    assert per2[0]["blocks"] == [{"start": "0,0,0", "end": "1,1,1"}, {"start": "1,0,0", "end": "2,1,1"}]  # no fraction
    assert nothing == []
