"""Per-stage containers: hadolint, the Dockerfiles' wiring to the modules, and the per-stage
dependency split (each stage's set installs alone in a fresh venv and its CLIs work from it).

Each image installs the project with its stage's extras (``"/tmp/exllsm-neuronseg[scaling,tf-gpu]"``)
and ``-c containers/constraints.txt``. Here that set is installed into a fresh venv the same way
(same extras, same constraints, TensorFlow's CPU build in place of the CUDA one, only the bin/
scripts the Dockerfile copies), ``pip check`` must pass and every installed package must be pinned.
The images themselves are built and run in tests/containers/test_images.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nfscript import modules
from nftools import ROOT, ToolError, hadolint

CONTAINERS = ROOT / "containers"
# The two TensorFlow images first: their venvs (the slow ones) are built side by side
STAGES = ("segment_volume", "train_unet", "scaling_factor", "create_volume")
TF_STAGES = ("segment_volume", "train_unet")
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/exllsm_neuronseg/__init__.py").read_text()).group(1)
MODEL = ROOT.parent / "shared" / "models" / "neuron_2021.h5"
PIP_QUIET = ["--quiet", "--disable-pip-version-check"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def requirements(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    """containers/constraints.txt: canonical name -> pinned version."""
    return {canonical(k): v for k, v in (line.split("==") for line in requirements(CONTAINERS / "constraints.txt"))}


def project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def stage_extras(stage: str) -> list[str]:
    """The extras the stage's Dockerfile installs the project with."""
    found = set(re.findall(r'"/tmp/exllsm-neuronseg\[([\w,-]+)\]"', (CONTAINERS / stage / "Dockerfile").read_text()))
    assert len(found) == 1, f"{stage}: the project must be installed with one set of extras, found {found}"
    return found.pop().split(",")


def declared(extras: list[str]) -> list[str]:
    """The requirements of the core plus ``extras``, the project's own extras (``exllsm-neuronseg[n5]``)
    expanded."""
    meta, out, todo, seen = project(), list(project()["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in meta["optional-dependencies"][extra]:
            own = re.fullmatch(r"exllsm-neuronseg\[([\w,-]+)\]", req)
            if own:
                todo += own.group(1).split(",")
            else:
                out.append(req)
    return out


def top_level(stage: str, gpu: bool = True) -> list[str]:
    """What the stage's image asks for by name, pinned: ``name[extras]==version``, sorted. With
    ``gpu=False`` the CPU build of TensorFlow replaces ``tensorflow[and-cuda]`` (extra tf for tf-gpu)."""
    extras = stage_extras(stage)
    if not gpu:
        extras = ["tf" if extra == "tf-gpu" else extra for extra in extras]
    pins, found = constraints(), {}
    for req in declared(extras):
        name, extra = re.match(r"([\w.-]+)(\[[\w,-]+\])?", req).groups()
        assert canonical(name) in pins, f"{stage}: {req} is not pinned in containers/constraints.txt"
        found[canonical(name)] = f"{name}{extra or ''}=={pins[canonical(name)]}"
    return sorted(found.values())


def unpinned(installed: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Installed distributions (name -> version) that the constraints do not pin at that version;
    the installer's own tools and the project itself aside."""
    pins = constraints()
    skip = {"pip", "setuptools", "wheel", "exllsm-neuronseg"}
    return {
        name: (version, pins.get(canonical(name), "not pinned"))
        for name, version in sorted(installed.items())
        if canonical(name) not in skip and pins.get(canonical(name)) != version
    }


def image_of(stage: str) -> str:
    return f"ghcr.io/janeliascicomp/exllsm-{stage.replace('_', '-')}:{VERSION}"


def module_images() -> dict[str, str]:
    """Process name -> the default image of its container directive."""
    found = {}
    for name, process in modules().items():
        m = re.search(r"task\.ext\.container \?:.*?'([^']+)'", process.directive("container") or "")
        assert m, f"{name}: no pinned default image"
        found[name] = m.group(1)
    return found


def test_hadolint_finds_nothing(tmp_path):
    try:
        exe = hadolint()
    except ToolError as exc:
        pytest.fail(f"hadolint is required: {exc}")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    assert "2.15.1" in version, version
    # the gate works: a sloppy Dockerfile is flagged
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM python\nRUN apt-get install procps\nRUN pip install numpy\n")
    assert subprocess.run([exe, str(sloppy)], capture_output=True).returncode != 0
    dockerfiles = sorted(CONTAINERS.glob("*/Dockerfile"))
    assert [p.parent.name for p in dockerfiles] == sorted(STAGES)
    for dockerfile in dockerfiles:
        proc = subprocess.run([exe, "--format", "json", str(dockerfile)], capture_output=True, text=True)
        assert proc.returncode == 0 and json.loads(proc.stdout) == [], f"{dockerfile}: {proc.stdout}{proc.stderr}"


def test_dockerfiles_match_the_modules():
    images = module_images()
    assert images == {
        "SEGMENT_VOLUME": image_of("segment_volume"),
        "SCALING_FACTOR": image_of("scaling_factor"),
        "CREATE_VOLUME": image_of("create_volume"),
        "PLAN_BLOCKS": image_of("create_volume"),
        "TIFF_TO_N5": image_of("create_volume"),
        "MAKE_TEST_VOLUME": image_of("create_volume"),
        "MAKE_TRAINING_REGIONS": image_of("train_unet"),
        "PREPARE_DATASET": image_of("train_unet"),
        "TRAIN_UNET": image_of("train_unet"),
        "EVALUATE_UNET": image_of("train_unet"),
        "QUICKLOOK": image_of("scaling_factor"),
        "LABEL_BLOCKS": image_of("scaling_factor"),
        "MERGE_LABELS": image_of("scaling_factor"),
        "WRITE_LABELS": image_of("scaling_factor"),
        "BUILD_PYRAMID": image_of("create_volume"),
        "TO_OME_ZARR": image_of("create_volume"),
    }
    conda_sets: dict[str, set[str]] = {}
    tf_pin = re.search(r'"tensorflow\[and-cuda\]==([\d.]+)\.\*"', (ROOT / "pyproject.toml").read_text()).group(1)
    for name, image in images.items():
        stage = image.split("/exllsm-")[1].split(":")[0].replace("-", "_")
        dockerfile = CONTAINERS / stage / "Dockerfile"
        text = dockerfile.read_text()
        steps = instructions(dockerfile)
        # header: single-stage usage with the module's image
        header = text.split("\nFROM ")[0]
        assert f"docker build -f containers/{stage}/Dockerfile -t {image} ." in header, stage
        assert "docker run --rm" in header and image in header.split("docker build")[1], stage
        # pinned base image, procps, CLIs on PATH
        base = steps[0]
        assert base[0] == "FROM" and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base[1]), base
        # procps: the upstream release pinned, Debian's revision open (a point release replaces it)
        assert re.search(r"'procps=\d+:[\d.]+-\*'", text) and not re.search(r"procps=\S+-\d", text), stage
        env = " ".join(args for instruction, args in steps if instruction == "ENV")
        assert "PATH=/opt/exllsm/bin:$PATH" in env, stage
        # COPY sources exist; the module's script and _cli.py land on PATH
        copied = []
        for instruction, args in steps:
            if instruction == "COPY":
                *sources, target = args.split()
                for source in sources:
                    assert (ROOT / source).exists(), f"{stage}: COPY {source} does not exist"
                    if target == "/opt/exllsm/bin/":
                        copied.append(Path(source).name)
        script = re.search(
            r"^\s*(\w+\.py)\b", re.findall(r'"""(.*?)"""', modules()[name].script, re.DOTALL)[0], re.MULTILINE
        ).group(1)
        assert script in copied and "_cli.py" in copied, (stage, copied)
        # the project with this stage's extras, every package pinned by the shared constraints; no
        # --no-deps (pip check passes in the image)
        runs = [args for instruction, args in steps if instruction == "RUN"]
        extras = ",".join(stage_extras(stage))
        install = (
            f'pip install --no-cache-dir -c /tmp/exllsm-neuronseg/constraints.txt "/tmp/exllsm-neuronseg[{extras}]"'
        )
        assert sum(install in r for r in runs) == 2, f"{stage}: dependencies, then the library, with {install}"
        assert "--no-deps" not in text, stage
        reqs = top_level(stage)
        has_tf = any(r.startswith("tensorflow") for r in reqs)
        assert has_tf == (stage in TF_STAGES), stage
        if has_tf:
            assert f"tensorflow[and-cuda]=={tf_pin}." in " ".join(reqs)
        # matplotlib's font cache is baked into a world-writable MPLCONFIGDIR where matplotlib is installed
        assert ("MPLCONFIGDIR=/opt/exllsm/matplotlib" in env) == any(r.startswith("matplotlib==") for r in reqs), stage
        # the module's conda environment lists pip packages of its image, pinned the same
        env_yml = (modules()[name].path.parent / "environment.yml").read_text()
        listed = re.findall(r"^\s+- (\S+==\S+)\s*$", env_yml, re.MULTILINE)
        assert set(listed) <= set(reqs), (
            f"{name}: environment.yml pins outside its image's set: {set(listed) - set(reqs)}"
        )
        conda_sets.setdefault(stage, set()).update(listed)
    # and together the modules of an image list all of it
    for stage, listed in conda_sets.items():
        assert listed == set(top_level(stage)), (
            f"{stage}: no module's environment.yml lists {set(top_level(stage)) - listed}"
        )
    entry = CONTAINERS / "segment_volume" / "Dockerfile"
    assert "COPY containers/segment_volume/entrypoint.sh /entrypoint.sh" in entry.read_text()
    assert os.access(CONTAINERS / "segment_volume" / "entrypoint.sh", os.X_OK)


def test_constraints_pin_every_library_dependency():
    """A dependency added to pyproject.toml (core or an extra the images use) must get a pin here,
    and every extra but the test and CPU ones must be in some stage's image."""
    meta = project()
    extras = sorted(set(meta["optional-dependencies"]) - {"test"})
    names = {canonical(re.match(r"[\w.-]+", req).group(0)) for req in declared(extras)}
    pinned = set(constraints())
    assert names <= pinned, f"not pinned in containers/constraints.txt: {sorted(names - pinned)}"
    used = {extra for stage in STAGES for extra in stage_extras(stage)}
    assert set(extras) - used == {"all", "tf"}, f"extras no image installs: {sorted(set(extras) - used)}"
    assert set(declared(["all"])) >= set(declared(sorted(used - {"tf-gpu"}))), "extra all must cover every stage"


def _venv(stage: str, root: Path) -> Path:
    """A fresh venv with exactly what the stage's Dockerfile installs; returns its bin/ folder."""
    venv = root / stage
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the library as the Dockerfile copies it: pyproject.toml, README.md, src/
    source = root / f"{stage}-source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    # The GPU wheels (several GB) are replaced by the CPU build of the same TensorFlow release
    extras = ",".join("tf" if extra == "tf-gpu" else extra for extra in stage_extras(stage))
    pip = [str(python), "-m", "pip", *PIP_QUIET]
    constraints_file = str(CONTAINERS / "constraints.txt")
    proc = subprocess.run(
        [*pip, "install", "-c", constraints_file, f"{source}[{extras}]"], capture_output=True, text=True
    )
    assert proc.returncode == 0, f"{stage}: .[{extras}] does not install:\n{proc.stderr[-3000:]}"
    proc = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    assert proc.returncode == 0, f"{stage}: pip check:\n{proc.stdout}{proc.stderr}"
    proc = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    )
    installed = {d["name"]: d["version"] for d in json.loads(proc.stdout)}
    assert not unpinned(installed), f"{stage}: installed vs containers/constraints.txt: {unpinned(installed)}"
    # only the bin/ scripts the Dockerfile copies onto PATH
    bin_dir = root / f"{stage}-bin"
    bin_dir.mkdir()
    for instruction, args in instructions(CONTAINERS / stage / "Dockerfile"):
        if instruction == "COPY" and args.endswith(" /opt/exllsm/bin/"):
            for src in args.split()[:-1]:
                shutil.copy(ROOT / src, bin_dir)
    return bin_dir


def _run(bin_dir: Path, *command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    venv_bin = bin_dir.parent / bin_dir.name.replace("-bin", "") / "bin"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{venv_bin}{os.pathsep}/usr/bin:/bin",
        "HOME": str(bin_dir.parent),
        "MPLCONFIGDIR": str(bin_dir.parent / "mpl"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONNOUSERSITE": "1",
    }
    return subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=cwd)


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_stage_dependency_sets_install_alone(tmp_path):
    """Each stage's requirements install alone into a fresh venv, and its CLIs run from there."""
    if not MODEL.is_file():
        pytest.fail(f"the published model is required at {MODEL}")
    with ThreadPoolExecutor(2) as pool:
        bins = dict(zip(STAGES, pool.map(lambda stage: _venv(stage, tmp_path), STAGES)))

    clis = {
        "create_volume": ["create_volume.py", "make_test_volume.py", "plan_blocks.py", "tiff_to_n5.py", "build_pyramid.py", "to_ome_zarr.py"],
        "scaling_factor": ["scaling_factor.py", "quicklook.py", "label_blocks.py", "merge_labels.py", "write_labels.py"],
        "segment_volume": ["segment_volume.py", "scaling_factor.py"],
        "train_unet": ["make_training_regions.py", "prepare_dataset.py", "train_unet.py", "evaluate_unet.py", "export_model.py"],
    }
    for stage, names in clis.items():
        assert sorted(p.name for p in bins[stage].glob("*.py")) == sorted(names + ["_cli.py"]), stage
        for name in names:
            assert "Usage:" in _ok(_run(bins[stage], name, "--help"), f"{stage}: {name} --help")
            assert _ok(_run(bins[stage], name, "--version"), f"{stage}: {name} --version").split() == [
                name,
                "(exllsm-neuronseg)",
                VERSION,
            ]

    # the split: no TensorFlow outside the segmentation and training stages, no SciPy/scikit-learn
    # for creation, no N5 stack for training
    def imports(stage: str, module: str) -> bool:
        python = tmp_path / stage / "bin" / "python"
        return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0

    assert not imports("create_volume", "tensorflow") and not imports("scaling_factor", "tensorflow")
    assert not imports("create_volume", "sklearn") and not imports("create_volume", "scipy")
    assert imports("segment_volume", "tensorflow") and imports("train_unet", "tensorflow")
    assert not imports("train_unet", "zarr") and not imports("train_unet", "numcodecs")

    # each stage does its real work from its own set: make + create, scale, segment
    data = tmp_path / "data"
    n5, out = str(data / "in.n5"), str(data / "out.n5")
    _ok(
        _run(
            bins["create_volume"],
            "make_test_volume.py",
            "-o",
            n5,
            "-d",
            "/c1/s0",
            "--shape",
            "96,64,64",
            "--chunks",
            "64,64,64",
        ),
        "make_test_volume",
    )
    _ok(
        _run(bins["create_volume"], "create_volume.py", "-i", n5, "-id", "/c1/s0", "-o", out, "-od", "/s0"),
        "create_volume",
    )
    line = _ok(
        _run(
            bins["scaling_factor"],
            "scaling_factor.py",
            "-i",
            n5,
            "-d",
            "/c1/s0",
            "-p",
            "0.5",
            "--partition_size",
            "32,32,32",
            "--seed",
            "0",
        ),
        "scaling_factor",
    ).splitlines()[-1]
    assert re.fullmatch(r"Calculated a scaling factor of \S+ based on \d+/12 tiles", line), line
    # the host's own command line through the image's entry point (host-pipeline-contract.md 2.6)
    entry = str(CONTAINERS / "segment_volume" / "entrypoint.sh")
    summary = _ok(
        _run(
            bins["segment_volume"],
            entry,
            "volumeSegmentation",
            "-i",
            n5,
            "-id",
            "/c1/s0",
            "-o",
            out,
            "-od",
            "/s0",
            "-m",
            str(MODEL),
            "--image_shape",
            "96,64,64",
            "--start",
            "0,0,0",
            "--end",
            "64,64,64",
            "--scaling",
            line.split()[5],
            "--unet_batch_size",
            "1",
            "--model_input_shape",
            "220,220,220",
            "--model_output_shape",
            "132,132,132",
            "--high_threshold",
            "0.98",
            "--low_threshold",
            "0.2",
            "--small_region_probability_threshold",
            "0.9",
            "--small_region_size_threshold",
            "1000",
        ),
        "volumeSegmentation",
    )
    assert "tiles in" in summary

    # the training image's four stages on one tiny region: make -> prepare -> train -> evaluate
    train = bins["train_unet"]
    stages = {
        "make_training_regions.py": "--output-dir {d}/regions --names R1 --shape 84,84,84 --n-tubes 4 --n-puncta 20",
        "prepare_dataset.py": "--region-file {d}/regions/R1/R1.h5 --dataset-dir {d}/train.h5 --output-dir {d}/diag "
        "--samples-per-region 2 --tile-input-shape 44,44,44 --tile-output-shape 4,4,4 --seed 0",
        "train_unet.py": "--training-dataset {d}/train.h5 --output-dir {d}/model --model-name m --n-blocks 1 "
        "--model_input_size 44,44,44 --model_output_size 4,4,4 --epochs 1 --seed 0 --parallel-calls 1",
        "evaluate_unet.py": "--dataset {d}/train.h5 --model-path {d}/model/m_best.h5 --output-dir {d}/eval "
        "--n-examples 0",
    }
    for script, flags in stages.items():
        last = _ok(_run(train, script, *flags.format(d=data).split()), f"train_unet: {script}")
    assert last.startswith("evaluated m_best.h5 on 2 examples") and (data / "eval/report.json").is_file()


def test_entrypoint_dispatches_the_host_script_names(tmp_path):
    entry = str(CONTAINERS / "segment_volume" / "entrypoint.sh")
    env = {
        **os.environ,
        "PATH": f"{ROOT / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name, script in [("volumeSegmentation", "segment_volume.py"), ("volumeScalingFactor", "scaling_factor.py")]:
        proc = subprocess.run([entry, name, "--version"], capture_output=True, text=True, env=env)
        assert proc.returncode == 0 and proc.stdout.split()[0] == script, proc
    for args in ([], ["tif_to_n5"]):
        proc = subprocess.run([entry, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 2 and proc.stderr.strip(), proc


def test_training_gpu_requirements_are_a_subset_of_the_segmentation_ones():
    """The training image's set is the segmentation image's (resolved with its CUDA wheels below)
    without the N5 stack, so it resolves too: the same pins, fewer top-level packages."""
    train, segment = set(top_level("train_unet")), set(top_level("segment_volume"))
    pins = constraints()
    assert train < segment and sorted(segment - train) == [f"{n}=={pins[n]}" for n in ("isal", "numcodecs", "zarr")]


def test_gpu_requirements_resolve(tmp_path):
    """The real GPU set (tensorflow[and-cuda] with its CUDA wheels) resolves against the constraints,
    and the constraints pin every package it resolves to (the nvidia-* wheels included)."""
    report = tmp_path / "report.json"
    reqs = tmp_path / "segment_volume.txt"
    reqs.write_text("\n".join(top_level("segment_volume")) + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            *PIP_QUIET,
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            "--python-version",
            "3.11",
            "--only-binary",
            ":all:",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_27_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
            "-r",
            str(reqs),
            "-c",
            str(CONTAINERS / "constraints.txt"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"the segmentation image's requirements do not resolve:\n{proc.stderr[-3000:]}"
    installed = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert installed["tensorflow"].startswith("2.21.")
    assert any(name.startswith("nvidia-cudnn") for name in installed), sorted(installed)
    assert "tensorflow-cpu" not in installed
    assert not unpinned(installed), f"resolved vs containers/constraints.txt: {unpinned(installed)}"
