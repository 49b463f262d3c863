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
from nftools import COMPONENTS, FACADE, POST_PROCESSING, PYRAMID, ROOT, SUBWORKFLOW, UTILS, analysis_or_fail

from exllsm_neuronseg.volume import open_volume


@pytest.fixture(scope="module")
def analysis():
    return analysis_or_fail()


MODEL = ROOT.parent / "shared" / "models" / "neuron_2021.h5"
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/exllsm_neuronseg/__init__.py").read_text()).group(1)
# The subworkflow's functions with the shared block helpers it includes (utils_blocks), and every
# workflow file's functions together (their names are distinct, as the files include each other's).
SUB_FUNCTIONS = section_functions(UTILS) + "\n" + section_functions(SUBWORKFLOW)
FUNCTIONS = "\n".join(section_functions(f) for f in (UTILS, FACADE, SUBWORKFLOW, POST_PROCESSING, COMPONENTS, PYRAMID))

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
    "quicklook": True,
    "outdir": "results",
    "post_processing_scope": "global",  # nextflow.config's: the standalone default
    "post_processing_raw_dataset": "",
    "with_connected_comps": True,
    "neuron_connected_comps": False,
    "connected_dataset": "/connected/s0",
    "min_connected_pixels": 2000,
    "connected_pixels_shape": "box",
    "connected_pixels_threshold": 0.8,
    "connected_comps_block_size": "128,128,64",
    "connected_comps_pyramid": False,
    "segmentation_pyramid": False,
    "resolution": "0.104,0.104,0.18",
    "pyramid_max_levels": 10,
    "plan_only": False,
    "plan_rate_mvox_s": None,
}

# Per input kind: the volume, its chunks and blocks, and how the blocks are cut into tasks.
#  n5:   160x64x64 in 32x64x64 chunks and blocks: 5 blocks, 2 per task -> 3 tasks (2 + 2 + 1), and a
#        tissue mask in a container of its own (bound like the N5 paths);
#        Global post-processing: the blocks go to /segmented_raw/s0, then the hysteresis and size
#        passes (3 label tasks each) and 3 write tasks into /segmented/s0. Connected components in
#        32^3 label chunks: the segmentation's plan is on that grid, so it is the labels' plan too;
#        a pyramid of the labels (3 levels, anisotropic voxel).
#  tiff: converted into 32x64x64 chunks, 64^3 blocks clipped to the region (x < 80): 2 blocks, 1 per
#        task -> 2 tasks (the old one-task-per-block layout), constant-tile skipping off. No
#        post-processing. Connected components with the host's defaults (128,128,64 label chunks:
#        the 64^3 plan is not on that grid, so the labels get their own plan, one block); a pyramid
#        of the probabilities; a measured rate for the cost report.
CASES = {
    "n5": {
        "test_volume_shape": "160,64,64",
        "test_volume_chunks": "32,64,64",
        "neuron_segmentation_partition_size": "32,64,64",
        "blocks_per_task": 2,
        "with_neuron_post_segmentation": True,
        "neuron_seg_small_region_size_th": 50,
        "connected_comps_block_size": "32,32,32",
        "min_connected_pixels": 50,
        "connected_comps_pyramid": True,
    },
    "tiff": {
        "block_size": "32,64,64",
        "partial_volume": "0,0,0,80,64,64",
        "blocks_per_task": 1,
        "skip_constant_tiles": False,
        "segmentation_pyramid": True,
        "plan_rate_mvox_s": 120,
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
        if out.optional and not any(
            kind == "path" and (sorted(work.glob(names[name] if names else name)) or (work / (names[name] if names else name)).exists())
            for kind, name in out.kinds
        ):
            values[out.emit] = None  # an optional output the task left out: Nextflow emits nothing
            continue
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


def publish_path(name: str) -> str:
    """The ``publishDir`` path of a process in conf/modules.config, as a Groovy GString to render with
    ``params`` and the task's inputs (``meta``), as Nextflow renders a closure path."""
    from test_training_run import publish_dirs

    return '"' + publish_dirs()[name][0] + '"'


def publish(root: Path, folder: str, files: list[Path]) -> list[Path]:
    """Nextflow's publishDir (mode copy), emulated: the files copied into ``root/folder``."""
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for f in files:
        (target / f.name).write_bytes(f.read_bytes())
        copies.append(target / f.name)
    return copies


class Stages:
    """Renders and runs tasks of the modules as the DAG run does: inputs checked against the declared
    outputs, bind mounts checked, tasks of one step in parallel (2 at a time)."""

    def __init__(self, groovy: Groovy, runner: Runner, procs: dict, args: dict):
        self.groovy, self.runner, self.procs, self.args = groovy, runner, procs, args

    def task(self, name: str, cpus: int = 1) -> dict:
        return {"ext": {"args": self.args.get(name, "")}, "cpus": cpus, "process": name, "attempt": 1}

    def run(self, module: str, inputs: list[dict], name: str | None = None, cpus: int = 1, staged=None, mounts=None):
        """Run one step (every task given): returns [(rendered, work, outputs per emit)] in task order."""
        process = self.procs[module]
        rendered = self.groovy.render_many(process, [(i, self.task(name or module, cpus)) for i in inputs])
        for r, i in zip(rendered, inputs):
            check_mounts(r, mounts(i) if mounts else [])
        with ThreadPoolExecutor(2) as pool:
            works = list(pool.map(lambda r: self.runner.run(process, r["script"], staged), rendered))
        return [(r, w, check_outputs(self.runner, process, w, i)) for r, w, i in zip(rendered, works, inputs)]


def released_once(outputs: list) -> dict:
    """The per-volume barrier (``whenTasksDone``) on a step's outputs, in finishing order and reversed:
    the volume is released exactly once, after its last task, with the task dropped from its meta."""
    for order in (outputs, outputs[::-1]):
        released = volume_barrier(order)
        assert len(released) == 1 and released[0][0] == len(outputs), released
    assert volume_barrier(outputs[:-1]) == []
    return volume_barrier(outputs)[0][1]


def run_global_post_processing(chain: Stages, opts: dict, meta: dict, out_n5: str, raw_ds: str, out_ds: str, plan: Path, blocks: list) -> np.ndarray:
    """GLOBAL_POST_PROCESSING as its DAG orders it, with its own Groovy (options, flags, records
    folders, tasks): create the output and the hysteresis pass's tasks; the hysteresis merge once
    all of them are done; the size pass (restricted to the hysteresis objects); its merge; the
    write tasks; the barrier. Returns the output dataset (x,y,z)."""
    (g,) = chain.groovy.evaluate(
        [
            (
                {"options": opts, "meta": meta, "n5": out_n5, "raw_ds": raw_ds, "out_ds": out_ds, "plan": plan.read_text()},
                FUNCTIONS,
                """
                def o = postProcessingOptions(globalPostProcessingOptions(options))
                def hyst = recordsFolder(n5, out_ds, 'hysteresis')
                def size = recordsFolder(n5, out_ds, 'size')
                def blocks = planLines(plan)
                return [opts: o, create: outputArgs(o), hyst: hyst, size: size,
                        hyst_label: hysteresisLabelArgs(o), hyst_merge: hysteresisMergeArgs(),
                        size_label: sizeLabelArgs(o), size_merge: sizeMergeArgs(o),
                        hyst_tasks: passTasks(meta, n5, raw_ds, hyst, '', blocks, o.blocks_per_task as int),
                        size_tasks: passTasks(meta, n5, raw_ds, size, hyst, blocks, o.blocks_per_task as int),
                        writes: blockTasks(blocks, o.blocks_per_task as int)]
                """,
            )
        ]
    )
    o = g["opts"]
    assert g["hyst_label"] == "--threshold 0.2 --seed-threshold 0.98 --connectivity 26"  # the original's 26-connectivity
    assert g["size_label"] == "--threshold 0.9 --connectivity 26"
    assert g["hyst_merge"] == "--min-size 0 --require-seed" and g["size_merge"] == "--min-size 50"
    assert g["create"] == "--dtype float32 --compression gzip"
    records = Path(out_n5) / ".exllsm-records" / out_ds.strip("/").replace("/", "_")
    assert g["hyst"] == str(records / "hysteresis") and g["size"] == str(records / "size") and records.is_dir()
    # the pass tasks are the segmentation's plan, blocks_per_task at a time
    assert [b for task in g["hyst_tasks"] for b in task[5]] == [{"start": b["start"], "end": b["end"]} for b in blocks]
    assert [task[4] for task in g["size_tasks"]] == [g["hyst"]] * len(g["size_tasks"])  # restricted to the first pass

    def label_inputs(tasks, options):
        return [
            {"meta": m, "in_n5": n5, "in_ds": ds, "records": rec, "restrict": restrict, "blocks": bl, "options": options, "resources": o["resources"]}
            for m, n5, ds, rec, restrict, bl in tasks
        ]

    def merge(records, options, name):
        inputs = {"meta": meta, "in_n5": out_n5, "in_ds": raw_ds, "records": records, "plan": "blocks.txt", "options": options, "resources": o["merge_resources"]}
        ((_r, work, outputs),) = chain.run("MERGE_LABELS", [inputs], name=name, staged={"blocks.txt": plan}, mounts=lambda i: [out_n5, records])
        assert outputs["merged"] == [meta, out_n5, raw_ds, records]
        return (work / "merge.log").read_text()

    mounts = lambda i: [i["in_n5"], str(Path(i["records"]).parent)] + ([i["restrict"]] if i["restrict"] else [])  # noqa: E731
    # CREATE_VOLUME and the hysteresis pass have no edge between them: the output is created beside it
    create = {"meta": meta, "in_n5": out_n5, "in_ds": raw_ds, "out_n5": out_n5, "out_ds": out_ds, "options": g["create"]}
    chain.run("CREATE_VOLUME", [create], mounts=lambda i: [out_n5])
    hyst = chain.run("LABEL_BLOCKS", label_inputs(g["hyst_tasks"], g["hyst_label"]), name="HYSTERESIS_LABEL_BLOCKS", mounts=mounts)
    assert released_once([out["blocks"] for _r, _w, out in hyst]) == meta
    assert "without a seed voxel" in merge(g["hyst"], g["hyst_merge"], "HYSTERESIS_MERGE_LABELS")
    size = chain.run("LABEL_BLOCKS", label_inputs(g["size_tasks"], g["size_label"]), name="SIZE_LABEL_BLOCKS", mounts=mounts)
    assert all(f"--restrict {g['hyst']}" in r["script"] for r, _w, _o in size)
    assert released_once([out["blocks"] for _r, _w, out in size]) == meta
    assert "dropped as too small" in merge(g["size"], g["size_merge"], "SIZE_MERGE_LABELS")
    writes = [
        {
            "meta": {**meta, "task": w["task"]}, "in_n5": out_n5, "in_ds": raw_ds, "out_n5": out_n5, "out_ds": out_ds,
            "records": [g["hyst"], g["size"]], "blocks": w["blocks"], "options": "", "resources": o["resources"],
        }
        for w in g["writes"]
    ]
    written = chain.run("WRITE_LABELS", writes, mounts=lambda i: [out_n5] + i["records"])
    assert all(f"--post-processing {g['hyst']} {g['size']}" in r["script"] for r, _w, _o in written)
    assert released_once([out["blocks"] for _r, _w, out in written]) == meta
    final = open_volume(out_n5, out_ds)
    assert final.dtype == np.float32 and final.chunks == open_volume(out_n5, raw_ds).chunks
    return final.read(final.box)


def run_components(chain: Stages, params: dict, request: list, tmp_path: Path, seg_plan: list) -> dict:
    """CONNECTED_COMPONENTS as main.nf runs it after the facade's `done` (with_connected_comps), with
    its own Groovy: the labels dataset, its plan, label tasks, the merge after all of them, write
    tasks, the barrier, the published object table and the labels' picture. The labels are checked
    against the scripts run by hand on the whole volume as one block (README "Neurons as objects")."""
    from test_training_run import publish_dirs

    (c,) = chain.groovy.evaluate(
        [
            (
                {"params": params, "request": request},
                FUNCTIONS,
                """
                def v = hostComponentsVolume(request)
                def o = componentsOptions(hostComponentsOptions())
                return [volume: v, opts: o, create: labelsCreateArgs(o), plan: labelsPlanArgs(o), label: labelArgs(o),
                        merge: labelsMergeArgs(o), pyramid: pyramidOptions(labelsPyramidOptions(o)),
                        records: recordsFolder(v.labels_n5, v.labels_ds, 'components')]
                """,
            )
        ]
    )
    v, o = c["volume"], c["opts"]
    meta, seg_n5, seg_ds, labels_n5, labels_ds = v["meta"], v["seg_n5"], v["seg_ds"], v["labels_n5"], v["labels_ds"]
    chunks = params["connected_comps_block_size"]
    assert labels_ds == "/connected/s0" and labels_n5 == seg_n5 and meta == {"id": f"{Path(seg_n5).stem}_connected_s0"}
    assert c["create"] == f"--dtype uint64 --chunks {chunks} --compression gzip"
    assert c["label"] == f"--threshold 0.8 --inclusive --connectivity {params['connected_pixels_shape']}"
    assert c["merge"] == f"--min-size {params['min_connected_pixels']}"

    # the labels dataset: uint64, the segmentation's dims, the label chunks
    create = {"meta": meta, "in_n5": seg_n5, "in_ds": seg_ds, "out_n5": labels_n5, "out_ds": labels_ds, "options": c["create"]}
    chain.run("CREATE_VOLUME", [create], mounts=lambda i: [seg_n5])
    labels = open_volume(labels_n5, labels_ds)
    seg = open_volume(seg_n5, seg_ds)
    assert labels.dtype == np.uint64 and labels.shape == seg.shape and labels.chunks == tuple(int(x) for x in chunks.split(","))
    # its plan, on the label chunk grid, with the segmentation's block edge and region
    plan_inputs = {"meta": meta, "n5": labels_n5, "dataset": labels_ds, "model": [], "options": c["plan"]}  # no model
    ((_r, _w, planned),) = chain.run("PLAN_BLOCKS", [plan_inputs], name="PLAN_LABEL_BLOCKS", mounts=lambda i: [labels_n5])
    plan = planned["plan"][1]
    (blocks, groups) = chain.groovy.evaluate(
        [
            ({"text": plan.read_text()}, FUNCTIONS, "planLines(text)"),
            ({"text": plan.read_text(), "n": o["blocks_per_task"]}, FUNCTIONS, "blockTasks(planLines(text), n)"),
        ]
    )
    records = c["records"]
    assert records == f"{labels_n5}/.exllsm-records/connected_s0/components"

    label_inputs = [
        {"meta": {**meta, "task": g["task"]}, "in_n5": seg_n5, "in_ds": seg_ds, "records": records, "restrict": "",
         "blocks": g["blocks"], "options": c["label"], "resources": o["resources"]}
        for g in groups
    ]
    labelled = chain.run("LABEL_BLOCKS", label_inputs, mounts=lambda i: [seg_n5, str(Path(records).parent)])
    assert released_once([out["blocks"] for _r, _w, out in labelled]) == meta
    merge = {"meta": meta, "in_n5": seg_n5, "in_ds": seg_ds, "records": records, "plan": "blocks.txt", "options": c["merge"],
             "resources": o["merge_resources"]}
    ((_r, merge_work, merged),) = chain.run("MERGE_LABELS", [merge], staged={"blocks.txt": plan}, mounts=lambda i: [seg_n5, records])
    write_inputs = [
        {"meta": {**meta, "task": g["task"]}, "in_n5": seg_n5, "in_ds": seg_ds, "out_n5": labels_n5, "out_ds": labels_ds,
         "records": [records], "blocks": g["blocks"], "options": "", "resources": o["resources"]}
        for g in groups
    ]
    written = chain.run("WRITE_LABELS", write_inputs, mounts=lambda i: [seg_n5, labels_n5, records])
    assert all(f"--records {records}" in r["script"] for r, _w, _o in written)
    assert released_once([out["blocks"] for _r, _w, out in written]) == meta
    result = labels.read(labels.box)

    # the scripts by hand, on the whole volume as one block: the same labels and the same object table
    direct = tmp_path / "direct"
    direct.mkdir()
    big = ",".join(str(s) for s in seg.shape)
    commands = [
        f"plan_blocks.py -i {seg_n5} -id {seg_ds} --partition_size {big} -o {direct}/one.txt --scaling_output {direct}/jobs.txt",
        f"label_blocks.py -i {seg_n5} -id {seg_ds} --records {direct}/cc --blocks {direct}/one.txt {c['label']}",
        f"merge_labels.py -i {seg_n5} -id {seg_ds} --records {direct}/cc --blocks {direct}/one.txt {c['merge']} --objects {direct}/objects.csv",
        f"create_volume.py -i {seg_n5} -id {seg_ds} -o {direct}/labels.n5 -od /connected/s0 --dtype uint64 --chunks {chunks}",
        f"write_labels.py -i {seg_n5} -id {seg_ds} --records {direct}/cc -o {direct}/labels.n5 -od /connected/s0 --blocks {direct}/one.txt",
    ]
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], env=chain.runner.env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
    by_hand = open_volume(direct / "labels.n5", "/connected/s0")
    np.testing.assert_array_equal(result, by_hand.read(by_hand.box))
    objects_csv, objects_json = merged["objects"][1], merged["objects"][2]
    assert objects_csv.read_text() == (direct / "objects.csv").read_text()
    table = json.loads(objects_json.read_text())
    assert result.max() == len(table["objects"]) > 0  # ids 1..n, the kept objects
    assert "kept" in (merge_work / "merge.log").read_text()

    # the object table, published as conf/modules.config says
    (folder,) = chain.groovy.evaluate([({"params": params, "meta": meta}, "", publish_path("MERGE_LABELS"))])
    assert folder == f"{params['outdir']}/components/{meta['id']}" and publish_dirs()["MERGE_LABELS"][1] is None
    published = publish(tmp_path, folder, [objects_csv, objects_json, merge_work / "merge.log"])
    assert published[0].read_text().startswith("id,voxels,")

    # the labels' picture: the input with one colour per object
    look = {"meta": meta, "in_n5": request[0], "in_ds": request[1], "result_n5": labels_n5, "result_ds": labels_ds,
            "kind": "labels", "resources": o["quicklook_resources"]}
    ((_r, look_work, pictures),) = chain.run("QUICKLOOK", [look], cpus=2, mounts=lambda i: [i["in_n5"], labels_n5])
    (picture,) = pictures["picture"][1]
    assert picture.name == f"{meta['id']}.png" and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    publish(tmp_path, f"{params['outdir']}/quicklook", [picture])
    return {"meta": meta, "blocks": blocks, "labels": result, "pyramid": c["pyramid"], "opts": o}


def run_pyramid(chain: Stages, meta: dict, n5: str, dataset: str, pyramid_options: dict) -> int:
    """PYRAMID as its DAG orders it: the 'create' task plans the levels; then level after level, each
    level's tasks (its plan cut by blockTasks) run only once every task of the level before is done
    (the per-dataset barrier). Returns the number of levels."""
    (args,) = chain.groovy.evaluate([({"o": pyramid_options}, FUNCTIONS, "pyramidArgs(o)")])
    assert f"--max-levels {pyramid_options['max_levels']}" in args and "--resolution 0.104,0.104,0.18" in args
    create = {"meta": meta, "n5": n5, "dataset": dataset, "level": "create", "blocks": [], "options": args}
    ((rendered, _w, created),) = chain.run("BUILD_PYRAMID", [create], mounts=lambda i: [n5])
    assert "--create-only --plans-dir pyramid" in rendered["script"]
    plan_files = created["plans"][1]
    (levels,) = chain.groovy.evaluate([({"files": [str(f) for f in plan_files]}, FUNCTIONS, "levelPlans(files.collect { f -> file(f) })")])
    assert sorted(int(k) for k in levels) == list(range(1, len(plan_files) + 1))
    group = Path(n5) / dataset.strip("/").rpartition("/")[0]
    for k in range(1, len(levels) + 1):
        (tasks,) = chain.groovy.evaluate([({"plan": levels[str(k)], "n": pyramid_options["blocks_per_task"]}, FUNCTIONS, "blockTasks(plan, n)")])
        inputs = [
            {"meta": {**meta, "task": g["task"]}, "n5": n5, "dataset": dataset, "level": str(k), "blocks": g["blocks"], "options": args}
            for g in tasks
        ]
        done = chain.run("BUILD_PYRAMID", inputs, name=f"BUILD_PYRAMID_S{k}", mounts=lambda i: [n5])
        assert all(f"--level {k} " in r["script"] for r, _w, _o in done)
        # level k+1 starts from the barrier's release, after the last task of level k
        assert released_once([out["done"] for _r, _w, out in done]) == meta
        level = json.loads((group / f"s{k}" / "attributes.json").read_text())
        assert len(level["downsamplingFactors"]) == 3 and (group / f"s{k}" / ".exllsm-done").is_dir()
    attrs = json.loads((group / "attributes.json").read_text())
    assert attrs["multiScale"] is True and len(attrs["scales"]) == len(levels) + 1
    assert not (group / f"s{len(levels) + 1}").exists()
    return len(levels)


@pytest.mark.parametrize("source", ["n5", "tiff"])
def test_synthetic_run_in_dag_order(analysis, tmp_path, source):
    """The whole chain on an N5 input (5 blocks in tasks of 2: 3 tasks, the last one shorter), and on
    a TIFF series (converted first, with a partial volume that ends inside a chunk, so a block is
    clipped to the region; one task per block)."""
    if not MODEL.is_file():
        pytest.fail(f"the published model is required at {MODEL}")
    from test_training_run import publish_dirs

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
    assert topological_levels(main_dag.edges, {"MAKE_TEST_VOLUME", "neuron_segmentation", "CONNECTED_COMPONENTS"}) == [
        {"MAKE_TEST_VOLUME"},
        {"neuron_segmentation"},
        {"CONNECTED_COMPONENTS"},  # standalone: with_connected_comps, after the facade's `done`
    ]
    assert topological_levels(facade_dag.edges, {"TIFF_TO_N5", "NEURON_SEGMENTATION", "done", "CONNECTED_COMPONENTS"}) == [
        {"TIFF_TO_N5"},
        {"NEURON_SEGMENTATION"},
        {"done"},
        {"CONNECTED_COMPONENTS"},  # only with neuron_connected_comps (never with the host's defaults)
    ]
    stages = {"PLAN_BLOCKS", "SCALING_FACTOR", "CREATE_VOLUME", "SEGMENT_VOLUME", "GLOBAL_POST_PROCESSING", "QUICKLOOK", "PYRAMID"}
    assert topological_levels(sub_dag.edges, stages) == [
        {"PLAN_BLOCKS", "CREATE_VOLUME"},
        {"SCALING_FACTOR"},
        {"SEGMENT_VOLUME"},
        {"GLOBAL_POST_PROCESSING"},
        {"QUICKLOOK", "PYRAMID"},
    ]
    post_stages = {"CREATE_VOLUME", "HYSTERESIS_LABEL_BLOCKS", "HYSTERESIS_MERGE_LABELS", "SIZE_LABEL_BLOCKS", "SIZE_MERGE_LABELS", "WRITE_LABELS"}
    assert topological_levels(analysis.dags["post_processing"].edges, post_stages) == [
        {"CREATE_VOLUME", "HYSTERESIS_LABEL_BLOCKS"},
        {"HYSTERESIS_MERGE_LABELS"},
        {"SIZE_LABEL_BLOCKS"},
        {"SIZE_MERGE_LABELS"},
        {"WRITE_LABELS"},
    ]
    cc_stages = {"CREATE_VOLUME", "PLAN_LABEL_BLOCKS", "LABEL_BLOCKS", "MERGE_LABELS", "WRITE_LABELS", "QUICKLOOK", "PYRAMID"}
    assert topological_levels(analysis.dags["components"].edges, cc_stages) == [
        {"CREATE_VOLUME"},
        {"PLAN_LABEL_BLOCKS"},
        {"LABEL_BLOCKS"},
        {"MERGE_LABELS"},
        {"WRITE_LABELS"},
        {"QUICKLOOK", "PYRAMID"},
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
                {"options": facade["options"], "out_ds": params["neuron_output_dataset"], "params": params},
                FUNCTIONS,
                "def o = segmentationOptions(options); [opts: o, plan: planArgs(o), create: createArgs(o), segment: segmentArgs(o), "
                "seg_ds: blocksDataset(o, out_ds), our_components: ourConnectedComponents()]",
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
    # the dataset the blocks write: the output, or with global post-processing its raw sibling
    seg_ds = sub["seg_ds"]
    if source == "n5":
        assert opts["post_processing_mode"] == "global" and seg_ds == "/segmented_raw/s0"
        assert "--with_post_processing" not in sub["segment"]  # the passes do it, over the whole volume
    else:
        assert opts["post_processing_mode"] == "none" and seg_ds == out_ds
        assert sub["plan"].endswith("--rate-mvox-s 120 --model_input_shape 220,220,220")  # plan_rate_mvox_s; the blocks' tiles
    assert sub["our_components"] is False  # the facade creates no labels: main.nf runs them (below)

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
    plan_inputs = {"meta": meta, "n5": in_n5, "dataset": in_ds, "model": MODEL.name, "options": sub["plan"]}
    create_inputs = {"meta": meta, "in_n5": in_n5, "in_ds": in_ds, "out_n5": out_n5, "out_ds": seg_ds, "options": sub["create"]}
    (plan_rendered,) = groovy.render_many(plan_proc, [(plan_inputs, task(plan_proc.name))])
    (create_rendered,) = groovy.render_many(create, [(create_inputs, task(create.name))])
    check_mounts(plan_rendered, [in_n5])
    check_mounts(create_rendered, [in_n5, str(Path(out_n5).parent)])
    assert f"--model {MODEL.name} " in plan_rendered["script"]
    plan_work = runner.run(plan_proc, plan_rendered["script"], {MODEL.name: MODEL})
    create_work = runner.run(create, create_rendered["script"])
    plan_outputs = check_outputs(runner, plan_proc, plan_work, plan_inputs)
    planned = plan_outputs["plan"]
    # the run's cost (plan.json): logged in one line, and published as conf/modules.config says
    report = plan_outputs["report"][1]
    cost = json.loads(report.read_text())
    n_blocks = 5 if source == "n5" else 2
    assert cost["blocks"] == n_blocks and cost["rate_mvox_s"] == (120 if source == "tiff" else 4.7)
    assert cost["model"]["path"].endswith(MODEL.name) and cost["tile_runs"] > 0 and cost["empty_tiles"] is not None
    (summary, plan_dir) = groovy.evaluate(
        [
            ({"report": report.read_text(), "id": meta["id"]}, FUNCTIONS, "planSummary(id, report, false)"),
            ({"params": params, "meta": meta}, "", publish_path("PLAN_BLOCKS")),
        ]
    )
    assert summary.startswith(f"plan of {meta['id']}: {n_blocks} blocks, {cost['voxels_to_compute']} of ") and "per device" in summary
    assert summary.endswith(f"; {cost['empty_tiles']} of {cost['tile_runs']} tiles wholly in empty space")
    assert plan_dir == f"{params['outdir']}/plan/{meta['id']}" and publish_dirs()["PLAN_BLOCKS"][1] == "plan.json"
    publish(tmp_path, plan_dir, [report])
    assert json.loads((tmp_path / plan_dir / "plan.json").read_text()) == cost
    created = check_outputs(runner, create, create_work, create_inputs)["volume"]
    (lines,) = groovy.evaluate(
        [
            (
                {"blocks": Path(planned[1]).read_text(), "jobs": Path(planned[2]).read_text()},
                SUB_FUNCTIONS,
                "[planLines(blocks), planLines(jobs)]",
            )
        ]
    )
    blocks, jobs = lines
    attrs = json.loads((Path(out_n5) / seg_ds.strip("/") / "attributes.json").read_text())
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
        [({"blocks": blocks, "per_task": opts["blocks_per_task"]}, SUB_FUNCTIONS, "blockTasks(blocks, per_task)")]
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
            "out_ds": seg_ds,
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
        return Path(out_n5) / seg_ds.strip("/") / ".exllsm-done" / f"{start}-{end}.json"

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
    output = open_volume(out_n5, seg_ds)
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
    chain = Stages(groovy, runner, procs, args)
    segmented_meta = volume_barrier(finished)[0][1]

    # -- GLOBAL_POST_PROCESSING (n5): hysteresis and size passes over the raw volume, then the write --
    if opts["post_processing_mode"] == "global":
        final = run_global_post_processing(chain, opts, segmented_meta, out_n5, seg_ds, out_ds, planned[1], blocks)
        raw = open_volume(out_n5, seg_ds).read(open_volume(out_n5, seg_ds).box)
        from exllsm_neuronseg.postprocess import post_process

        expected = post_process(raw.copy(), 0.98, 0.2, 0.9, 50)  # the whole volume as one block
        np.testing.assert_array_equal(final, expected)
        assert (expected != raw).any() and expected.any()  # something removed, something kept
        assert (Path(out_n5) / out_ds.strip("/") / "attributes.json").is_file()
    # the facade's part (segmentation, post-processing) created no labels: the host's Spark step may run
    assert not (Path(out_n5) / "connected").exists()

    # -- QUICKLOOK: the released volume's picture, its input with the segmentation overlaid ----------
    assert opts["quicklook"] is True  # params.quicklook, on in the test profile
    look = procs["QUICKLOOK"]
    look_inputs = {
        "meta": segmented_meta,
        "in_n5": in_n5,
        "in_ds": in_ds,
        "result_n5": out_n5,
        "result_ds": out_ds,
        "kind": "auto",
        "resources": opts["quicklook_resources"],
    }
    (look_rendered,) = groovy.render_many(look, [(look_inputs, task(look.name, cpus=2))])
    check_mounts(look_rendered, [in_n5, out_n5])
    look_work = runner.run(look, look_rendered["script"])
    (picture,) = check_outputs(runner, look, look_work, look_inputs)["picture"][1]
    assert picture.name == f"{meta['id']}.png"
    assert "as probability" in (look_work / ".command.out").read_text()
    # published as conf/modules.config says (Nextflow's publishDir, emulated: a copy)
    assert publish_dirs()["QUICKLOOK"] == ("${params.outdir}/quicklook", None)
    (published,) = publish(tmp_path, f"{params['outdir']}/quicklook", [picture])
    from PIL import Image

    assert published.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(published) as image:
        image.verify()
    with Image.open(published) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert max(rgb.shape[:2]) == 1024
    assert ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 100).sum() > 100  # the probability overlay shows

    # -- CONNECTED_COMPONENTS (main.nf: with_connected_comps, after `done`), then the pyramids -------
    main_text = (ROOT / "main.nf").read_text()
    assert "if (params.with_connected_comps && !params.neuron_connected_comps && !params.plan_only) {" in main_text
    assert params["with_connected_comps"] and not params["neuron_connected_comps"]
    cc = run_components(chain, params, segmented_meta["host"], tmp_path, blocks)
    if source == "n5":
        # the segmentation's plan is on the 32^3 label grid: it is the labels' plan too
        assert cc["blocks"] == blocks
        levels = run_pyramid(chain, cc["meta"], out_n5, "/connected/s0", cc["pyramid"])
        assert levels == 3  # 160x64x64 in 32^3 chunks, voxel 0.104x0.104x0.18: until a level fits one chunk
        s0 = cc["labels"]
        for k in range(1, levels + 1):  # labels are never averaged: every id of a level is one of s0
            level = open_volume(out_n5, f"/connected/s{k}")
            assert level.dtype == np.uint64 and set(np.unique(level.read(level.box))) <= set(np.unique(s0))
    else:
        # 64^3 blocks are not on the 128,128,64 label grid: the labels have their own plan (one block)
        assert cc["blocks"] == [{"start": "0,0,0", "end": "80,64,64", "fraction": ""}] != blocks
        (pyramid_options,) = groovy.evaluate([({"opts": opts}, FUNCTIONS, "pyramidOptions(segmentationPyramidOptions(opts))")])
        assert opts["pyramid"] is True and pyramid_options["partition_size"] == 64
        levels = run_pyramid(chain, segmented_meta, out_n5, out_ds, pyramid_options)
        assert levels == 2
        s1 = open_volume(out_n5, "/segmented/s1")
        assert s1.dtype == np.float32 and s1.read(s1.box).max() == prob.max()  # max downsampling keeps the peaks

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
    assert open_volume(out_n5, seg_ds).dtype == np.float32  # untouched

    # -- Stubs run and declare the same outputs -------------------------------------------------
    stubs = [
        (make, make_rendered),
        (plan_proc, plan_rendered),
        (scaling_proc, scaling_rendered[0]),
        (create, create_rendered),
        (segment, segment_rendered[0]),
        (look, look_rendered),
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
        if process is look:
            assert (work / f"{meta['id']}.png").is_file()


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
    results += groovy.evaluate([(b, SUB_FUNCTIONS, c) for b, c in sub])
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
        "--scaling_partition_size 396,396,396 --max_scaling_tiles_per_job 40 --model_input_shape auto",
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
    results += groovy.evaluate([(b, SUB_FUNCTIONS, c) for b, c in sub])
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


def workflow_calls(text: str) -> list[tuple[str, int]]:
    """The process and workflow calls in a workflow body (``NAME(`` at a statement's start), with
    their offsets."""
    return [(m.group(1), m.start()) for m in re.finditer(r"^\s+([A-Z][A-Z0-9_]+)\(", text, re.MULTILINE)]


def block_span(text: str, opening: str) -> tuple[int, int]:
    """The span of the block that starts at ``opening`` (which ends with '{'), to its closing brace."""
    start = text.index(opening) + len(opening)
    depth, i = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return start, i


def test_plan_only_stops_after_the_plan(tmp_path):
    """plan_only: PLAN_BLOCKS runs with --plan-only (the cost printed in its log and written to
    plan.json, logged as one line), and every later step of the subworkflow, and the standalone
    connected components, are inside the blocks plan_only leaves out."""
    groovy = Groovy(tmp_path / "groovy")
    (options,) = groovy.evaluate([({"params": {"plan_only": True, "plan_rate_mvox_s": 50}}, section_functions(FACADE), "hostOptions()")])
    (sub,) = groovy.evaluate([({"options": options}, SUB_FUNCTIONS, "def o = segmentationOptions(options); [o.plan_only, planArgs(o)]")])
    assert sub[0] is True and sub[1].endswith("--rate-mvox-s 50 --model_input_shape auto --plan-only")

    # every step after the plan is inside `if (!opts.plan_only) { ... }`
    text = SUBWORKFLOW.read_text()
    body = text[text.index("workflow NEURON_SEGMENTATION {") : text.index("    emit:\n    segmented")]
    start, end = block_span(body, "    // plan_only: a dry run, every step after the plan is left out\n    if (!opts.plan_only) {")
    calls = workflow_calls(body)
    assert {name for name, _ in calls} == {
        "PLAN_BLOCKS", "SCALING_FACTOR", "CREATE_VOLUME", "SEGMENT_VOLUME", "GLOBAL_POST_PROCESSING", "QUICKLOOK", "PYRAMID",
    }
    assert [name for name, at in calls if not start <= at < end] == ["PLAN_BLOCKS"]
    main_text = (ROOT / "main.nf").read_text()
    start, end = block_span(main_text, "if (params.with_connected_comps && !params.neuron_connected_comps && !params.plan_only) {")
    assert [name for name, at in workflow_calls(main_text) if name == "CONNECTED_COMPONENTS" and start <= at < end] == ["CONNECTED_COMPONENTS"]

    # the plan itself: printed, written, logged
    procs = modules()
    runner = Runner(tmp_path / "work")
    n5 = tmp_path / "in.n5"
    subprocess.run(
        ["bash", "-c", f"make_test_volume.py -o {n5} --shape 96,64,64 --chunks 32,64,64"], env=runner.env, check=True, capture_output=True
    )
    plan = procs["PLAN_BLOCKS"]
    inputs = {"meta": {"id": "in_s0"}, "n5": str(n5), "dataset": "/c1/s0", "model": MODEL.name, "options": sub[1]}
    (rendered,) = groovy.render_many(plan, [(inputs, {"ext": {"args": ""}, "cpus": 1, "process": plan.name, "attempt": 1})])
    work = runner.run(plan, rendered["script"], {MODEL.name: MODEL})
    outputs = check_outputs(runner, plan, work, inputs)
    log = (work / ".command.out").read_text()
    assert "voxels to compute: 393,216" in log and "at 50 Mvox/s" in log
    cost = json.loads(outputs["report"][1].read_text())
    assert cost["blocks"] == 1 and cost["rate_mvox_s"] == 50
    (summary,) = groovy.evaluate([({"report": outputs["report"][1].read_text()}, FUNCTIONS, "planSummary('in_s0', report, true)")])
    assert summary.startswith("plan of in_s0: 1 blocks, 393216 of 393216 voxels to compute") and summary.endswith(
        "plan_only: nothing runs after the plan"
    )


def test_host_facade_leaves_connected_components_to_the_host(tmp_path):
    """With the host's own params (with_connected_comps true: its Spark step, which refuses an existing
    /connected/s0), the facade creates no labels dataset and changes nothing of the host's
    segmentation (per-block post-processing, no pyramid, no plan_only); only neuron_connected_comps
    runs this project's components, with the host's connected-components params."""
    from test_language_server import HOST_DEFAULTS

    host = dict(HOST_DEFAULTS)
    assert host["with_connected_comps"] is True and host["connected_dataset"] == "/connected/s0"
    groovy = Groovy(tmp_path / "groovy")

    def refused(call: str) -> str:
        return f"try {{ {call}; return 'accepted' }} catch (IllegalStateException e) {{ return e.message }}"

    jobs = [
        ({"params": host}, "ourConnectedComponents()"),
        ({"params": {**host, "neuron_connected_comps": True, "with_connected_comps": False}}, "ourConnectedComponents()"),
        ({"params": {**host, "neuron_connected_comps": "yes"}}, refused("ourConnectedComponents()")),
        ({"params": host}, "def o = segmentationOptions(hostOptions()); [o, segmentArgs(o), blocksDataset(o, '/s0')]"),
        (
            {"params": {**host, "with_neuron_post_segmentation": True}},
            "def o = segmentationOptions(hostOptions()); [o.post_processing_mode, segmentArgs(o), blocksDataset(o, '/s0')]",
        ),
        ({"params": host}, "def o = componentsOptions(hostComponentsOptions()); [o, labelsCreateArgs(o), labelArgs(o), labelsMergeArgs(o)]"),
        ({"params": {**host, "connected_comps_block_size": ""}}, "labelsCreateArgs(componentsOptions(hostComponentsOptions()))"),
        ({"params": host}, "hostComponentsVolume(['/data/in.n5', '/c1/s0', '/data/out.n5', '/s0'])"),
    ]
    off, on, bad, default, per_block, components, no_chunks, volume = groovy.evaluate([(b, FUNCTIONS, c) for b, c in jobs])
    assert off is False and on is True and "neuron_connected_comps must be true or false" in bad
    opts, segment_args, dataset = default
    assert "connected" not in json.dumps(opts)  # nothing of the segmentation names a labels dataset
    assert opts["post_processing_scope"] == "block" and opts["post_processing_mode"] == "none" and dataset == "/s0"
    assert opts["pyramid"] is False and opts["plan_only"] is False and opts["quicklook"] is False
    assert "--with_post_processing" not in segment_args
    # the host's legacy per-block post-processing is unchanged: the blocks write the output themselves
    assert per_block == ["block", per_block[1], "/s0"] and "--with_post_processing" in per_block[1]
    # our components, when switched on, use the host's params and names
    copts, create, label, merge = components
    assert (copts["threshold"], copts["shape"], copts["min_size"], copts["chunks"]) == ("0.8", "box", 2000, "128,128,64")
    assert copts["pyramid"] is False and copts["pyramid_resolution"] == "0.104,0.104,0.18"
    assert create == "--dtype uint64 --chunks 128,128,64 --compression gzip"
    assert label == "--threshold 0.8 --inclusive --connectivity box" and merge == "--min-size 2000"
    assert no_chunks == "--dtype uint64 --compression gzip"  # '' = the segmentation's chunks, as the host's -b
    assert volume == {
        "meta": {"id": "out_connected_s0"},
        "in_n5": "/data/in.n5", "in_ds": "/c1/s0", "seg_n5": "/data/out.n5", "seg_ds": "/s0",
        "labels_n5": "/data/out.n5", "labels_ds": "/connected/s0",
    }
    # the facade's only components call is behind that switch; `done` does not wait for it
    text = FACADE.read_text()
    start, end = block_span(text, "if (ourConnectedComponents()) {")
    assert [at for name, at in workflow_calls(text) if name == "CONNECTED_COMPONENTS"] and all(
        start <= at < end for name, at in workflow_calls(text) if name == "CONNECTED_COMPONENTS"
    )
    assert text.index("done = NEURON_SEGMENTATION.out.segmented") < start


def test_post_processing_components_and_pyramid_options(tmp_path):
    """The new options: the raw dataset of global post-processing, refusals naming the param, a
    binary mask post-processed per block, the pyramid's level bound, and defaults equal to
    nextflow.config's for standalone runs."""
    from test_language_server import config_params

    def refused(call: str) -> str:
        return f"try {{ {call}; return 'accepted' }} catch (IllegalStateException e) {{ return e.message }}"

    global_pp = "[post_processing: true, post_processing_scope: 'global']"
    jobs = [
        ({}, "['/segmented/s0', '/s0', 'a/b/c/s0', '/seg/'].collect { d -> rawDataset(d) }"),
        ({}, f"def o = segmentationOptions({global_pp}); [o.post_processing_mode, blocksDataset(o, '/segmented/s0'), segmentArgs(o)]"),
        ({}, f"blocksDataset(segmentationOptions({global_pp} + [post_processing_dataset: '/raw_prob/s0']), '/s0')"),
        ({}, refused(f"blocksDataset(segmentationOptions({global_pp} + [post_processing_dataset: 's0/']), '/s0')")),
        ({}, refused("segmentationOptions([post_processing_scope: 'volume'])")),
        ({}, refused("segmentationOptions([pyramid: 'yes'])")),
        ({}, f"def o = segmentationOptions({global_pp} + [binary: true]); [o.post_processing_mode, segmentArgs(o), outputArgs(postProcessingOptions(globalPostProcessingOptions(o)))]"),
        ({}, "def o = postProcessingOptions(globalPostProcessingOptions(segmentationOptions([small_region_size_threshold: '50']))); [o.small_region_size_threshold, sizeMergeArgs(o)]"),
        ({}, refused("postProcessingOptions([small_region_size_threshold: 2.5])")),
        ({}, refused("pyramidOptions([max_levels: 0])")),
        ({}, refused("pyramidOptions([max_levels: maxPyramidLevels() + 1])")),
        ({}, "pyramidArgs(pyramidOptions([method: 'mean', resolution: '1, 1, 2', overwrite: true]))"),
        ({}, refused("componentsOptions([shape: 'sphere'])")),
        ({}, refused("componentsOptions([min_size: -1])")),
        ({}, refused("componentsOptions([threshold: 'high'])")),
        ({}, "labelsPlanArgs(componentsOptions([partition_size: 512, partial_volume: '0,0,0,100,100,100']))"),
        ({"params": config_params()}, "[hostOptions().post_processing_scope, hostOptions().pyramid_max_levels, hostComponentsOptions().chunks]"),
    ]
    groovy = Groovy(tmp_path / "groovy")
    results = groovy.evaluate([(b, FUNCTIONS, c) for b, c in jobs])
    raw, global_mode, named, itself, scope, pyramid, binary, size, fraction, zero, many, args, shape, negative, threshold, plan, config = results
    assert raw == ["/segmented_raw/s0", "/s0_raw", "/a/b/c_raw/s0", "/seg_raw"]
    assert global_mode[:2] == ["global", "/segmented_raw/s0"] and "--with_post_processing" not in global_mode[2]
    assert named == "/raw_prob/s0"
    assert "is the output dataset itself" in itself and "post_processing_raw_dataset" in itself
    assert "post_processing_scope must be 'block' or 'global'" in scope
    assert "segmentation_pyramid must be true or false" in pyramid
    assert binary[0] == "global" and "--with_post_processing" not in binary[1]
    assert binary[2] == "--dtype uint8 --compression gzip"  # the post-processed mask stays a uint8 mask
    assert size == [50, "--min-size 50"]
    assert "neuron_seg_small_region_size_th" in fraction
    assert "pyramid_max_levels must be a whole number from 1 to 10" in zero and "from 1 to 10" in many
    assert args == "--method mean --resolution 1,1,2 --max-levels 10 --partition-size 512 --overwrite"
    assert "connected_pixels_shape" in shape and "min_connected_pixels" in negative and "connected_pixels_threshold" in threshold
    assert plan == "--partition_size 512 --partial_volume 0,0,0,100,100,100"
    # standalone (nextflow.config): global post-processing; the host facade's own default is 'block'
    assert config == ["global", 10, "128,128,64"]


def test_component_and_pyramid_stubs(tmp_path):
    """The stubs of the stages wired here run and leave the outputs they declare (a -stub run goes
    through the components and a pyramid level)."""
    procs = modules()
    groovy = Groovy(tmp_path / "groovy")
    runner = Runner(tmp_path / "work")
    meta = {"id": "v", "task": {"index": 0, "count": 1, "range": "0", "volume_blocks": 1}}
    block = [{"start": "0,0,0", "end": "1,1,1"}]
    res = {"cpus": 1, "memory": "1 GB", "container": ""}
    cases = [
        ("LABEL_BLOCKS", {"meta": meta, "in_n5": "/d/s.n5", "in_ds": "/s0", "records": "/d/s.n5/r/p", "restrict": "", "blocks": block, "options": "", "resources": res}),
        ("MERGE_LABELS", {"meta": meta, "in_n5": "/d/s.n5", "in_ds": "/s0", "records": "/d/r", "plan": "blocks.txt", "options": "", "resources": res}),
        ("WRITE_LABELS", {"meta": meta, "in_n5": "/d/s.n5", "in_ds": "/s0", "out_n5": "/d/s.n5", "out_ds": "/c/s0", "records": ["/d/r"], "blocks": block, "options": "", "resources": res}),
        ("BUILD_PYRAMID", {"meta": meta, "n5": "/d/s.n5", "dataset": "/c/s0", "level": "create", "blocks": [], "options": ""}),
        ("BUILD_PYRAMID", {"meta": meta, "n5": "/d/s.n5", "dataset": "/c/s0", "level": "1", "blocks": block, "options": ""}),
    ]
    for name, inputs in cases:
        process = procs[name]
        (rendered,) = groovy.render_many(process, [(inputs, {"ext": {"args": ""}, "cpus": 1, "process": name, "attempt": 1})])
        work = runner.run(process, rendered["stub"])
        outputs = check_outputs(runner, process, work, inputs)
        if name == "BUILD_PYRAMID":
            assert (outputs["plans"] is not None) == (inputs["level"] == "create")
