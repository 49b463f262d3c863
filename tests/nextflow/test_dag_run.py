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


def test_synthetic_run_in_dag_order(analysis, tmp_path):
    if not MODEL.is_file():
        pytest.fail(f"the published model is required at {MODEL}")
    procs = modules()
    args = ext_args()
    groovy = Groovy(tmp_path / "groovy")
    runner = Runner(tmp_path / "work")
    data = tmp_path / "data"
    data.mkdir()
    params = {**TEST_PARAMS, "neuron_stack_dir": str(data / "input.n5"), "output_dir": str(data / "seg.n5")}

    # The DAG order, from the language server's previews of main.nf and the subworkflow
    main_dag, sub_dag = analysis.dags["main"], analysis.dags["subworkflow"]
    assert topological_levels(main_dag.edges, {"MAKE_TEST_VOLUME", "neuron_segmentation"}) == [
        {"MAKE_TEST_VOLUME"},
        {"neuron_segmentation"},
    ]
    assert topological_levels(sub_dag.edges, {"SCALING_FACTOR", "CREATE_VOLUME", "SEGMENT_VOLUME"}) == [
        {"SCALING_FACTOR", "CREATE_VOLUME"},
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

    # -- Planning: the facade's and the subworkflow's own functions ------------------------------
    plan_code = """
        def options = hostOptions()
        def opts = segmentationOptions(options)
        def meta = hostVolume(0, [in_dir, in_ds], [out_dir, out_ds, unsegmented])
        def geometry = datasetGeometry(file(in_dir).toString(), in_ds)
        def region = processedRegion(geometry.dims, opts.partial_volume)
        checkAlignment(meta.id, region, geometry.chunks, opts.partition_size)
        return [opts: opts, meta: meta, geometry: geometry, plan: scalingPlan(geometry.dims, opts),
                blocks: partitionVolume(geometry.dims, opts.partial_volume, opts.partition_size, geometry.chunks)]
    """
    binding = {
        "params": params,
        "in_dir": made[1],
        "in_ds": made[2],
        "out_dir": params["output_dir"],
        "out_ds": params["neuron_output_dataset"],
        "unsegmented": params["unsegmented_dataset"],
    }
    (planned,) = groovy.evaluate([(binding, FUNCTIONS, plan_code)])
    meta, opts, geometry = planned["meta"], planned["opts"], planned["geometry"]
    assert meta == {"id": "seg_segmented_s0", "host": [made[1], "/c1/s0", params["output_dir"], "/segmented/s0"]}
    assert geometry == {"dims": [96, 64, 64], "chunks": [64, 64, 64]}
    assert opts["partition_size"] == [64, 64, 64]
    assert "--set_gpu_mem_growth" not in opts["segmentation_args"]
    assert opts["segmentation_args"].startswith("--model_input_shape 220,220,220 --model_output_shape 132,132,132")
    jobs, blocks = planned["plan"]["jobs"], planned["blocks"]
    # 12 tiles of 32^3, half of them sampled, 4 per job: job edge 32 * cbrt(4 / 0.5) = 64
    assert planned["plan"]["fraction"] == 0.5
    assert [(j["start"], j["end"]) for j in jobs] == [("0,0,0", "64,64,64"), ("64,0,0", "96,64,64")]
    assert [(b["start"], b["end"], b["unaligned"]) for b in blocks] == [
        ("0,0,0", "64,64,64", False),
        ("64,0,0", "96,64,64", False),
    ]
    in_n5, in_ds, out_n5, out_ds = made[1], made[2], params["output_dir"], params["neuron_output_dataset"]
    volume_meta = {**meta, "dims": geometry["dims"], "chunks": geometry["chunks"]}

    # -- SCALING_FACTOR (parallel jobs) and CREATE_VOLUME -----------------------------------------
    scaling_proc, create = procs["SCALING_FACTOR"], procs["CREATE_VOLUME"]
    scaling_inputs = [
        {
            "meta": {**volume_meta, "job": {"index": job["index"], "count": len(jobs)}},
            "n5": in_n5,
            "dataset": in_ds,
            "start": job["start"],
            "end": job["end"],
            "fraction": planned["plan"]["fraction"],
            "partition_size": ",".join(map(str, opts["scaling_partition_size"])),
            "plots_dir": opts["scaling_plots_dir"],
        }
        for job in jobs
    ]
    create_inputs = {
        "meta": volume_meta,
        "in_n5": in_n5,
        "in_ds": in_ds,
        "out_n5": out_n5,
        "out_ds": out_ds,
        "dtype": "uint8" if opts["binary"] else "float32",
    }
    scaling_rendered = groovy.render_many(scaling_proc, [(i, task(scaling_proc.name)) for i in scaling_inputs])
    (create_rendered,) = groovy.render_many(create, [(create_inputs, task(create.name))])
    for rendered in scaling_rendered:
        check_mounts(rendered, [in_n5])
    check_mounts(create_rendered, [in_n5, str(Path(out_n5).parent)])

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        scaling_works = list(pool.map(lambda r: runner.run(scaling_proc, r["script"]), scaling_rendered))
        create_work = runner.run(create, create_rendered["script"])
    factors = []
    for work, inputs in zip(scaling_works, scaling_inputs):
        outputs = check_outputs(runner, scaling_proc, work, inputs)
        value = outputs["scaling"][1]
        assert value == "null" or value == "nan" or float(value) > 0, value
        assert (work / "scaling.log").read_text().splitlines()[-1].startswith("Calculated a scaling factor of ")
        factors.append(value)
    created = check_outputs(runner, create, create_work, create_inputs)["volume"]
    attrs = json.loads((Path(out_n5) / "segmented/s0/attributes.json").read_text())
    source_attrs = json.loads((Path(in_n5) / "c1/s0/attributes.json").read_text())
    assert attrs["dimensions"] == source_attrs["dimensions"] and attrs["blockSize"] == source_attrs["blockSize"]
    assert attrs["dataType"] == "float32" and attrs["compression"]["type"] == "gzip"
    assert created[3] == out_n5

    # -- SEGMENT_VOLUME, one task per block ------------------------------------------------------
    segment = procs["SEGMENT_VOLUME"]
    (scaling,) = groovy.evaluate([({"factors": factors}, FUNCTIONS, "return meanScaling(factors)")])
    valid = [float(f) for f in factors if f not in ("null", "nan")]
    assert scaling and float(scaling) == pytest.approx(sum(valid) / len(valid))
    block_inputs = [
        {
            "meta": {
                **volume_meta,
                "scaling": scaling,
                "block": {"index": b["index"], "count": len(blocks), "unaligned": b["unaligned"]},
            },
            "in_n5": in_n5,
            "in_ds": in_ds,
            "out_n5": out_n5,
            "out_ds": out_ds,
            "start": b["start"],
            "end": b["end"],
            "scaling": scaling,
            "model": MODEL.name,  # staged into the task directory, as a path input is
            "options": opts["segmentation_args"],
        }
        for b in blocks
    ]
    segment_rendered = groovy.render_many(segment, [(i, task(segment.name, cpus=1)) for i in block_inputs])
    for rendered in segment_rendered:
        check_mounts(rendered, [in_n5, out_n5])
        assert f"--scaling {scaling}" in rendered["script"] and "--io-threads 2" in rendered["script"]
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

    # -- Barrier: the volume is done when all of its blocks are, and `done` has the host's strings
    groups: dict[str, list] = {}
    for item in finished:
        groups.setdefault(item[0]["id"], []).append(item)
    assert {k: len(v) for k, v in groups.items()} == {meta["id"]: len(blocks)}
    done = [group[0][0]["host"] for group in groups.values() if len(group) == group[0][0]["block"]["count"]]
    assert done == [[in_n5, "/c1/s0", params["output_dir"], "/segmented/s0"]]

    # -- Re-runs: a finished block is skipped; a block without its marker (killed) is redone ------
    rerun = runner.run(segment, segment_rendered[0]["script"], stage)
    assert "already done (marker present), skipped" in (rerun / ".command.out").read_text()
    marker = Path(out_n5) / "segmented/s0/.exllsm-done" / "64_0_0-96_64_64.json"
    marker.unlink()
    redo = runner.run(segment, segment_rendered[1]["script"], stage)
    assert "tiles in" in (redo / ".command.out").read_text() and marker.is_file()

    # -- Stubs run and declare the same outputs -------------------------------------------------
    stubs = [
        (make, make_rendered),
        (scaling_proc, scaling_rendered[0]),
        (create, create_rendered),
        (segment, segment_rendered[0]),
    ]
    for process, rendered in stubs:
        work = runner.run(process, rendered["stub"])
        if process is scaling_proc:
            assert runner.evaluate(work, process.output("scaling").kinds[1][1]) == "null"
            assert (work / "scaling.log").is_file()


def test_planning_follows_the_host_arithmetic(tmp_path):
    """The subworkflow's planning functions against the host pipeline's numbers (contract 1.2)."""
    n5 = tmp_path / "big.n5" / "c1" / "s0"
    n5.mkdir(parents=True)
    (n5 / "attributes.json").write_text(
        json.dumps({"dimensions": [1000, 1000, 600], "blockSize": [512, 512, 512], "dataType": "uint16"})
    )
    (tmp_path / "big.n5" / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))  # the root: no dims
    (tmp_path / "tiff").mkdir()

    def refused(call: str) -> str:
        return f"try {{ {call}; return 'accepted' }} catch (IllegalStateException e) {{ return e.message }}"

    dims = "[5000, 5000, 5000]"
    jobs = [
        # percent 0.1: job edge int(396 * cbrt(40 / 0.1)) = 2917, so 2 x 2 x 2 jobs
        (
            {},
            f"def p = scalingPlan({dims}, segmentationOptions([scaling_fraction: 0.1])); [p.fraction, p.jobs.size(), p.jobs[1].start, p.jobs[1].end]",
        ),
        # 100 tiles of the 13^3 = 2197 sampling tiles
        ({}, f"scalingPlan({dims}, segmentationOptions([scaling_tiles: 100])).fraction"),
        # inactive: no tiles and a fraction outside (0, 1)
        (
            {},
            f"[scalingPlan({dims}, segmentationOptions([scaling_fraction: 1])).jobs, scalingPlan({dims}, segmentationOptions([:])).jobs]",
        ),
        # blocks: x fastest, end-exclusive, clipped to the volume
        (
            {},
            "partitionVolume([128, 100, 64], '', [64, 64, 64], [64, 64, 64]).collect { b -> [b.start, b.end, b.unaligned] }",
        ),
        # partial_volume x0,y0,z0,dx,dy,dz: the last block ends inside the volume, off the chunk grid
        (
            {},
            "partitionVolume([1000, 1000, 600], '0,0,0,600,512,512', [512, 512, 512], [512, 512, 512]).collect { b -> [b.start, b.end, b.unaligned] }",
        ),
        ({}, refused("checkAlignment('v', processedRegion([1000, 1000, 600], ''), [512, 512, 512], [396, 396, 396])")),
        (
            {},
            refused(
                "checkAlignment('v', processedRegion([1000, 1000, 600], '100,0,0,512,512,512'), [512, 512, 512], [512, 512, 512])"
            ),
        ),
        (
            {},
            "checkAlignment('v', processedRegion([1000, 1000, 600], ''), [512, 512, 512], [1024, 512, 512]); 'accepted'",
        ),
        ({}, "[sizeComponents(512), sizeComponents('256,256,512'), sizeComponents([1, 2, 3])]"),
        (
            {},
            "[meanScaling(['0.5', 'nan', 'null', '1.5']), meanScaling(['null', 'nan']), normaliseScaling(null), normaliseScaling('0.3')]",
        ),
        ({"d": str(tmp_path / "big.n5")}, "datasetGeometry(d, '/c1/s0')"),
        ({"d": str(tmp_path / "big.n5")}, refused("datasetGeometry(d, '')")),
        (
            {"params": {}, "d": str(tmp_path / "tiff")},
            refused("hostVolume(0, [d, ''], ['/o/out.n5', '/s0', '/raw/s0'])"),
        ),
        (
            {"params": {"volume_partition_size": 256, "neuron_segmentation_partition_size": ""}},
            "hostOptions().partition_size",
        ),
        (
            {"params": {"volume_partition_size": 256, "neuron_segmentation_partition_size": "128,128,256"}},
            "hostOptions().partition_size",
        ),
        ({"params": {}}, "hostOptions()"),
        # the mean does not depend on the order in which the jobs finish (0.1 + 0.2 + 0.3 != 0.3 + 0.1 + 0.2)
        ({}, "[['0.1', '0.2', '0.3'], ['0.3', '0.1', '0.2'], ['0.2', '0.3', '0.1']].collect { v -> meanScaling(v) }"),
    ]
    results = Groovy(tmp_path / "groovy").evaluate([(binding, FUNCTIONS, code) for binding, code in jobs])
    fraction, count, start, end = results[0]
    assert (fraction, count, start, end) == (0.1, 8, "2917,0,0", "5000,2917,2917")
    assert results[1] == pytest.approx(100 / 13**3)
    assert results[2] == [[], []]
    assert results[3] == [
        ["0,0,0", "64,64,64", False],
        ["64,0,0", "128,64,64", False],
        ["0,64,0", "64,100,64", False],
        ["64,64,0", "128,100,64", False],
    ]
    assert results[4] == [["0,0,0", "512,512,512", False], ["512,0,0", "600,512,512", True]]
    assert "not a multiple of the output chunk size 512,512,512 on axis x" in results[5]
    assert "not on the chunk grid" in results[6]
    assert results[7] == "accepted"
    assert results[8] == [[512, 512, 512], [256, 256, 512], [1, 2, 3]]
    assert results[9] == ["1.0", "", "", "0.3"]
    assert results[10] == {"dims": [1000, 1000, 600], "chunks": [512, 512, 512]}
    assert "no dimensions/blockSize" in results[11]
    assert "is not an N5 dataset" in results[12]
    assert results[13] == 256 and results[14] == "128,128,256"
    defaults = results[15]
    assert defaults["partition_size"] == 512 and defaults["scaling_partition_size"] == "396,396,396"
    assert defaults["max_scaling_tiles_per_job"] == 40 and defaults["binary"] is False
    assert defaults["segmentation_args"] == (
        "--model_input_shape auto --model_output_shape auto --unet_batch_size 1 --set_gpu_mem_growth "
        "--high_threshold 0.98 --low_threshold 0.2 --small_region_probability_threshold 0.9 --small_region_size_threshold 1000"
    )
    assert len(set(results[16])) == 1, results[16]
