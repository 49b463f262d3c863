"""The training workflow's tasks, run in DAG order outside Nextflow: the closest offline stand-in for
``nextflow run main.nf -profile test_training``.

The same machinery as test_dag_run.py: each process's ``script:`` is rendered by Groovy 4 with the
inputs the test_training profile gives it (scaled down to 4 examples per region and 1 epoch); the
stage flags come from main.nf's own options map through the subworkflow's ``trainingOptions()``;
the tasks run with bash in their own directories, bin/ on PATH and their path inputs staged as
symlinks, as Nextflow stages them. Every declared output, its name rendered as Nextflow renders it,
must exist; so must the stubs' outputs.
"""

from __future__ import annotations

import csv
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nfscript import Groovy, Process, ext_args, modules, section_functions
from nftools import ROOT, TRAINING_SUBWORKFLOW, analysis_or_fail
from test_dag_run import Runner, check_outputs, topological_levels
from test_language_server import config_params

TEST_TRAINING = ROOT / "conf" / "test_training.config"
FUNCTIONS = section_functions(TRAINING_SUBWORKFLOW)
SCALE = {"training_samples_per_region": 4, "training_epochs": 1}  # the profile's run, smaller


@pytest.fixture(scope="module")
def analysis():
    return analysis_or_fail()


def profile_params():
    """nextflow.config's defaults with the test_training profile's params on top, scaled down."""
    return {**config_params(), **config_params(TEST_TRAINING), **SCALE}


def main_snippets() -> dict[str, str]:
    """The Groovy of main.nf's training branch that builds the stages' inputs (evaluated as is)."""
    text = (ROOT / "main.nf").read_text()
    make = re.search(
        r"^\s*(def heldout = .*?)\n\s*MAKE_TRAINING_REGIONS\(\n"
        r"\s*channel\.of\(\[\[id: '(\w+)'\], (.*?)\]\),\n\s*(.*?),\n\s*(.*?),\n\s*\)",
        text,
        re.MULTILINE,
    )
    options = re.search(r"UNET_TRAINING\(ch_regions, ch_heldout, ch_pretrained, (\[\n.*?\n\s*\])\)", text, re.DOTALL)
    assert make and options, "main.nf's training branch changed shape"
    # the split of the made regions by name, as this test does it
    assert "files.findAll { region -> !heldout.contains(region.baseName) }" in text
    assert "files.findAll { region -> heldout.contains(region.baseName) }" in text
    return {
        "heldout": make.group(1),
        "make_id": make.group(2),
        "make_inputs": f"[{make.group(3)}, {make.group(4)}, {make.group(5)}]",
        "options": options.group(1),
    }


def publish_dirs(config: Path = ROOT / "conf" / "modules.config") -> dict[str, tuple[str, str | None]]:
    """``publishDir`` per process name from conf/modules.config: (path, pattern or None). A path given
    as a closure (``{ "${params.outdir}/plan/${meta.id}" }``, rendered per task) gives its GString."""
    found = {}
    for name, body in re.findall(r"^    withName:\s*'(\w+)'\s*\{\n(.*?)^    \}", config.read_text(), re.MULTILINE | re.DOTALL):
        m = re.search(
            r"publishDir\s*=\s*\[path:\s*(?:\{\s*)?\"([^\"]*)\"(?:\s*\})?,\s*mode:\s*[\w.]+(?:,\s*pattern:\s*'([^']*)')?\]",
            body,
        )
        if m:
            found[name] = (m.group(1), m.group(2) or None)
    return found


def published(process: Process, work: Path, names: dict[str, str]) -> list[str]:
    """What ``publishDir`` copies of a finished task: the declared outputs (relative to the task
    directory) its pattern matches, a glob whose ``*`` does not cross ``/`` as in Nextflow. Every
    output must reach the publish directory, directly or inside a published directory, and none twice."""
    _path, pattern = publish_dirs()[process.name]
    outputs = sorted({p.relative_to(work).as_posix() for name in process.path_outputs for p in work.glob(names[name])})
    regex = re.escape(pattern or "**").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    chosen = [out for out in outputs if re.fullmatch(regex, out)]
    for out in outputs:
        assert any(out == c or out.startswith(c + "/") for c in chosen), f"{process.name}: {out} is not published"
    for a in chosen:
        assert not any(b.startswith(a + "/") for b in chosen), f"{process.name}: {a} and what is in it published twice"
    return chosen


def test_training_run_in_dag_order(analysis, tmp_path):
    procs = modules()
    args = ext_args()
    groovy = Groovy(tmp_path / "groovy")
    runner = Runner(tmp_path / "work")
    params = profile_params()
    assert params["workflow"] == "training" and params["test_regions"] is True

    # The DAG order, from the language server's previews of main.nf and the training subworkflow
    main_dag, sub_dag = analysis.dags["main"], analysis.dags["training"]
    assert topological_levels(main_dag.edges, {"MAKE_TRAINING_REGIONS", "UNET_TRAINING"}) == [
        {"MAKE_TRAINING_REGIONS"},
        {"UNET_TRAINING"},
    ]
    assert topological_levels(sub_dag.edges, {"PREPARE_DATASET", "TRAIN_UNET", "EVALUATE_UNET"}) == [
        {"PREPARE_DATASET"},
        {"TRAIN_UNET"},
        {"EVALUATE_UNET"},
    ]

    # -- Planning: main.nf's own inputs and options map, the subworkflow's trainingOptions() ------
    snippets = main_snippets()
    plan_code = f"""
        {snippets['heldout']}
        def make = {snippets['make_inputs']}
        return [heldout: heldout, make: make, opts: trainingOptions({snippets['options']})]
    """
    (planned,) = groovy.evaluate([({"params": params}, FUNCTIONS, plan_code)])
    heldout, (names, shape, make_options), opts = planned["heldout"], planned["make"], planned["opts"]
    assert heldout == ["H1"] and names == "A1,A2,H1" and shape == "96,96,96"
    assert make_options == "--raw-dataset t0/channel0 --label-dataset t0/channel2"
    assert opts["prepare_args"] == (
        "--raw-dataset t0/channel0 --label-dataset t0/channel2 --tile-input-shape 84,84,84 "
        "--tile-output-shape 44,44,44 --samples-per-region 4 --above-threshold-ratio 0.9 --seed 0"
    )
    assert opts["train_args"] == (
        "--model_input_size 84,84,84 --model_output_size 44,44,44 --n-blocks 1 --initial-filters 4 "
        "--epochs 1 --batch-size 1 --test-fraction 0.2 --seed 0"
    )
    assert opts["evaluate_args"] == "--model_input_shape 84,84,84 --model_shape 44,44,44 --seed 0"

    def task(name: str) -> dict:
        return {"ext": {"args": args.get(name, "")}, "cpus": 1, "process": name, "attempt": 1}

    # The inputs of every task, as the channels of main.nf and the subworkflow shape them
    make, prepare, train, evaluate = (
        procs[n] for n in ("MAKE_TRAINING_REGIONS", "PREPARE_DATASET", "TRAIN_UNET", "EVALUATE_UNET")
    )
    run = {"id": params["training_model_name"]}
    heldout_meta = {**run, "id": f"{run['id']}_heldout", "heldout_of": run["id"]}
    best, split, dataset = f"{run['id']}_best.h5", f"{run['id']}_split.json", f"{run['id']}.h5"
    inputs = {
        "make": {"meta": {"id": snippets["make_id"]}, "names": names, "shape": shape, "options": make_options},
        "prepare": {"meta": run, "regions": ["A1.h5", "A2.h5"], "options": opts["prepare_args"]},
        "prepare_heldout": {"meta": heldout_meta, "regions": ["H1.h5"], "options": opts["prepare_args"]},
        "train": {"meta": run, "dataset": dataset, "pretrained": [], "options": opts["train_args"]},
        "finetune": {"meta": run, "dataset": dataset, "pretrained": best, "options": opts["train_args"]},
        # with held-out regions: all their examples; without: the run's validation examples
        "evaluate": {
            "meta": run,
            "dataset": f"{heldout_meta['id']}.h5",
            "model": best,
            "keys": [],
            "options": opts["evaluate_args"],
        },
        "evaluate_split": {
            "meta": run,
            "dataset": dataset,
            "model": best,
            "keys": split,
            "options": opts["evaluate_args"],
        },
    }
    process_of = {
        "make": make,
        "prepare": prepare,
        "prepare_heldout": prepare,
        "train": train,
        "finetune": train,
        "evaluate": evaluate,
        "evaluate_split": evaluate,
    }
    rendered = dict(
        zip(
            inputs,
            groovy.render_tasks([(process_of[k], inputs[k], task(process_of[k].name)) for k in inputs]),
        )
    )
    for key, r in rendered.items():
        assert r["containerOptions"] == "", (key, r["containerOptions"])  # staged files only: nothing to bind
    assert "--seed 1 --n-tubes 6 --n-puncta 60" in rendered["make"]["script"]  # ext.args (modules.config)
    outdir = "${params.outdir}/training"
    assert publish_dirs() == {
        "MAKE_TRAINING_REGIONS": (outdir, None),
        "PREPARE_DATASET": (f"{outdir}/datasets", None),
        "TRAIN_UNET": (outdir, "*"),
        "EVALUATE_UNET": (outdir, "*/evaluation"),
        # segmentation's and components' outputs (test_dag_run.py)
        "QUICKLOOK": ("${params.outdir}/quicklook", None),
        "PLAN_BLOCKS": ("${params.outdir}/plan/${meta.id}", "plan.json"),
        "MERGE_LABELS": ("${params.outdir}/components/${meta.id}", None),
    }
    assert "--region-file A1.h5 --region-file A2.h5" in rendered["prepare"]["script"]
    assert "--parallel-calls 1" in rendered["train"]["script"] and "--resume" not in rendered["train"]["script"]
    assert f"--resume --pre-trained-model {best}" in rendered["finetune"]["script"]
    assert "--n-examples 0" in rendered["evaluate"]["script"] and "--keys-file" not in rendered["evaluate"]["script"]
    assert f"--keys-file {split}" in rendered["evaluate_split"]["script"]

    # -- MAKE_TRAINING_REGIONS (main.nf, test_training profile) ---------------------------------
    work = runner.run(make, rendered["make"]["script"])
    made = check_outputs(runner, make, work, inputs["make"], rendered["make"]["outputs"])["regions"][1]
    assert [p.relative_to(work).as_posix() for p in made] == [f"regions/{n}/{n}.h5" for n in ("A1", "A2", "H1")]
    regions = {p.stem: p for p in made}
    assert published(make, work, rendered["make"]["outputs"]) == [f"regions/{n}/{n}.h5" for n in ("A1", "A2", "H1")]

    # -- PREPARE_DATASET: the training regions and the held-out ones, in parallel ---------------
    def prepare_task(key: str) -> Path:
        staged = {name: regions[Path(name).stem] for name in inputs[key]["regions"]}
        return runner.run(prepare, rendered[key]["script"], staged)

    with ThreadPoolExecutor(2) as pool:
        keys = ("prepare", "prepare_heldout")
        prepare_works = dict(zip(keys, pool.map(prepare_task, keys)))
    datasets = {}
    for key, work in prepare_works.items():
        out = check_outputs(runner, prepare, work, inputs[key], rendered[key]["outputs"])
        datasets[key] = out["dataset"][1]
        assert out["dataset"][0] == inputs[key]["meta"]
        meta_id = inputs[key]["meta"]["id"]
        assert published(prepare, work, rendered[key]["outputs"]) == [f"{meta_id}.h5", f"{meta_id}_diagnostics"]
        diagnostics = sorted(p.name for p in out["diagnostics"][1].iterdir())
        for region in inputs[key]["regions"]:
            assert f"region_{Path(region).stem}_hist.png" in diagnostics, diagnostics
    assert datasets["prepare"].name == dataset and datasets["prepare_heldout"].name == "test_model_heldout.h5"
    assert "wrote 8 examples from 2 region(s) [A1,A2]" in (prepare_works["prepare"] / ".command.out").read_text()

    # -- TRAIN_UNET ------------------------------------------------------------------------------
    work = runner.run(train, rendered["train"]["script"], {dataset: datasets["prepare"]})
    trained = check_outputs(runner, train, work, inputs["train"], rendered["train"]["outputs"])
    _, model, split_file = trained["model"]
    assert published(train, work, rendered["train"]["outputs"]) == ["test_model"]  # the directory, once
    assert model.name == best and split_file.name == split
    with open(trained["log"][1]) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0"]
    split_keys = json.loads(split_file.read_text())
    assert len(split_keys["validation"]) == 2 and len(split_keys["training"]) == 6 and split_keys["seed"] == 0
    checkpoints = sorted(p.name for p in trained["checkpoints"][1].iterdir())
    assert {"test_model1.h5", "test_model1.state.npz", "loss.png"} <= set(checkpoints), checkpoints

    # -- EVALUATE_UNET: on the held-out dataset (the profile's path) and on the validation split --
    def evaluate_task(key: str) -> Path:
        staged = {best: model}
        if key == "evaluate":
            staged[inputs[key]["dataset"]] = datasets["prepare_heldout"]
        else:
            staged[dataset], staged[split] = datasets["prepare"], split_file
        return runner.run(evaluate, rendered[key]["script"], staged)

    with ThreadPoolExecutor(2) as pool:
        keys = ("evaluate", "evaluate_split")
        eval_works = dict(zip(keys, pool.map(evaluate_task, keys)))
    examples = {}
    for key, work in eval_works.items():
        out = check_outputs(runner, evaluate, work, inputs[key], rendered[key]["outputs"])
        report = json.loads(out["report"][1].read_text())
        assert 0 <= report["pixel_accuracy"] <= 1 and "threshold_baseline" in report, key
        assert "PrecisionRecall.png" in {p.name for p in out["evaluation"][1].iterdir()}, key
        examples[key] = sorted(report["keys"])
        assert published(evaluate, work, rendered[key]["outputs"]) == ["test_model/evaluation"]
    assert len(examples["evaluate"]) == 4 and all(k.startswith("H1") for k in examples["evaluate"])
    assert examples["evaluate_split"] == sorted(split_keys["validation"])

    # -- Fine-tuning: TRAIN_UNET from a given model (no resume state: a fresh optimizer) ---------
    work = runner.run(train, rendered["finetune"]["script"], {dataset: datasets["prepare"], best: model})
    check_outputs(runner, train, work, inputs["finetune"], rendered["finetune"]["outputs"])
    assert "fresh optimizer" in (work / ".command.err").read_text()

    # -- Stubs run and leave every declared output ----------------------------------------------
    for key, r in rendered.items():
        process = process_of[key]
        staged = {}
        for name in (inputs[key].get(k) for k in ("regions", "dataset", "pretrained", "model", "keys")):
            for item in name if isinstance(name, list) else [name]:
                if item:
                    staged[item] = datasets["prepare"]  # stubs do not read their inputs
        work = runner.run(process, r["stub"], staged)
        check_outputs(runner, process, work, inputs[key], r["outputs"])


def test_training_options_defaults(tmp_path):
    """trainingOptions() without options gives the training scripts' own defaults (seed 0)."""
    (opts,) = Groovy(tmp_path / "groovy").evaluate([({}, FUNCTIONS, "trainingOptions([:])")])
    assert opts["prepare_args"] == (
        "--raw-dataset t0/channel0 --label-dataset t0/channel2 --tile-input-shape 220,220,220 "
        "--tile-output-shape 132,132,132 --samples-per-region 50 --above-threshold-ratio 0.9 --seed 0"
    )
    assert opts["train_args"] == (
        "--model_input_size 220,220,220 --model_output_size 132,132,132 --n-blocks 2 --initial-filters 4 "
        "--epochs 10 --batch-size 1 --test-fraction 0.2 --seed 0"
    )
    assert opts["evaluate_args"] == "--model_input_shape 220,220,220 --model_shape 132,132,132 --seed 0"
    # the pipeline's defaults are the same (nextflow.config), except the host's GPU memory growth
    params = config_params()
    for key in ("model_in_dims", "model_out_dims", "samples_per_region", "n_blocks", "epochs", "seed"):
        assert params[f"training_{key}"] == opts[key], key
