"""The stage images, built for real with containers/build.sh and run the way the docs run them.

Where: podman (root, chroot isolation for builds, runc for runs; see
../shared/reference/building-images-offline.md), with every image, the stand-in base and the build
cache in ONE fixed store that each run reuses: ``/var/tmp/exllsm-images`` (``EXLLSM_IMAGE_STORE``).
A run with nothing changed rebuilds nothing; after the builds dangling images are removed, so the
store holds one copy of each image and its cached layers. Builds download from PyPI and Debian with
the host's CA bundle and a pip.conf naming it mounted into each build. One lock file serialises runs
that share the store.

The base. No registry can be reached, so ``python:3.11.14-slim-bookworm`` is replaced by a local
stand-in (tests/containers/stand_in_base.sh): Debian bookworm (debootstrap minbase) with Debian's
python3, python3-pip, python3-venv and ca-certificates, ``python``/``pip`` links, Debian's
slim-image apt/dpkg settings, imported under the base's exact name. It differs from the real image
in: the interpreter is Debian's CPython 3.11.2 in /usr/bin, not CPython 3.11.14 built into
/usr/local; pip is Debian's 23.0.1 with setuptools 66.1.1 and wheel 0.38.4 from Debian packages,
and the PEP 668 marker is there (so the stand-in sets ``PIP_BREAK_SYSTEM_PACKAGES=1``; packages land
in /usr/local/lib/python3.11/dist-packages, not site-packages); there is no ``PYTHON_VERSION``,
``PYTHON_SHA256`` or ``GPG_KEY`` env; it is one layer with no registry digest. Everything the
Dockerfiles install on top (procps, every Python package, the library, the scripts) is the same.

What is checked, per image: every stage script it carries answers ``--help`` and ``--version``;
``pip check`` passes; every installed distribution (pip, setuptools and wheel, the base's tools,
and the project itself excepted) is pinned in containers/constraints.txt at exactly its installed
version; matplotlib uses the font cache baked into ``MPLCONFIGDIR`` without rebuilding it. Then
each stage runs on a tiny synthetic volume as the Dockerfile headers' and docs' ``docker run``
lines show (``-u`` a non-root uid:gid, ``-v DATA:/data``, no network), including the host
pipeline's ``/entrypoint.sh volumeSegmentation|volumeScalingFactor`` with the original flags, and
the same commands run in this venv: segmentation is bit-identical; the scaling factor must agree
to 1e-9 relative, not exactly: it is the mean of HuberRegressor fits (scipy's L-BFGS-B iterating
on numpy/OpenBLAS float64 reductions), whose last bits depend on how the reductions are split,
which follows memory alignment and so can change with the interpreter build (the venv's Python is
not the image's; the same wheels run in both). It is often exact; a 2.7e-11 relative difference
has been seen. The training image trains a tiny model for one epoch.

Skips (with the reason) when not root or without podman/debootstrap; under CI=true those fail.
``EXLLSM_IMAGE_TESTS=0`` skips them on purpose.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONTAINERS = ROOT / "containers"
MODEL = ROOT.parent / "shared" / "models" / "neuron_2021.h5"
STORE = Path(os.environ.get("EXLLSM_IMAGE_STORE", "/var/tmp/exllsm-images"))
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/exllsm_neuronseg/__init__.py").read_text()).group(1)
STAGES = sorted(p.parent.name for p in CONTAINERS.glob("*/Dockerfile"))
UID = GID = 1000  # a non-root user, as `-u "$(id -u):$(id -g)"` gives on a workstation
BASE_TOOLS = {"pip", "setuptools", "wheel"}  # the base image's own packaging tools
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = pytest.mark.slow


def image_of(stage: str) -> str:
    return f"ghcr.io/janeliascicomp/exllsm-{stage.replace('_', '-')}:{VERSION}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (CONTAINERS / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def base_image() -> str:
    names = {
        re.search(r"^FROM (\S+)", (CONTAINERS / s / "Dockerfile").read_text(), re.MULTILINE).group(1) for s in STAGES
    }
    assert len(names) == 1, f"the stages use several bases: {names}"
    name = names.pop()
    return name if "/" in name else f"docker.io/library/{name}"


def stage_scripts(stage: str) -> list[str]:
    """The scripts the Dockerfile copies onto PATH (/opt/exllsm/bin/), _cli.py aside."""
    text = (CONTAINERS / stage / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and words[-1] == "/opt/exllsm/bin/":
            found += [Path(w).name for w in words[1:-1] if Path(w).name != "_cli.py"]
    return found


def _log_tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


class Images:
    """The built images and how to run them."""

    def __init__(self) -> None:
        self.engine = [
            "podman",
            "--root",
            str(STORE / "storage"),
            "--runroot",
            str(STORE / "run"),
            "--storage-driver",
            "overlay",
        ]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        hard = 1048576 if hard == resource.RLIM_INFINITY else hard
        # crun cannot set the rlimits here (reference doc): runc, with explicit ulimits
        self.run_prefix = [
            *self.engine,
            "--runtime",
            "runc",
            "run",
            "--rm",
            "--network",
            "none",
            "--ulimit",
            f"nofile={hard}:{hard}",
            "--ulimit",
            "nproc=4096:4096",
        ]
        self.report: dict = {"store": str(STORE)}

    def run(
        self, image: str, *command: str, mounts: tuple[str, ...] = (), user: str = f"{UID}:{GID}", check: bool = True
    ) -> subprocess.CompletedProcess:
        volumes = [arg for mount in mounts for arg in ("-v", mount)]
        proc = subprocess.run(
            [*self.run_prefix, "-u", user, *volumes, image, *command], capture_output=True, text=True, timeout=900
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{image} {' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def size(self, image: str) -> int:
        out = subprocess.run([*self.engine, "image", "inspect", image], capture_output=True, text=True, check=True)
        return int(json.loads(out.stdout)[0]["Size"])


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the image tests must run in CI, but {reason}")
    pytest.skip(reason)


def _pip_conf() -> Path:
    """pip settings for the builds: the host's CA bundle (this network re-signs TLS) and its index."""
    lines = ["[global]"]
    if CA_BUNDLE.is_file():
        lines.append(f"cert = {CA_BUNDLE}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
    )
    if proc.returncode == 0 and proc.stdout.strip().startswith("http"):
        lines.append(f"index-url = {proc.stdout.strip()}")
    path = STORE / "pip.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def images(request) -> Images:
    """Every stage image, built (or found up to date) in the fixed store."""
    if os.environ.get("EXLLSM_IMAGE_TESTS", "1") == "0":
        pytest.skip("EXLLSM_IMAGE_TESTS=0: the image builds and runs are switched off")
    if os.geteuid() != 0:
        _unavailable(
            f"building and running the images needs root (podman with chroot isolation and overlay storage "
            f"in {STORE}); this runs as uid {os.geteuid()}"
        )
    tools = (
        "apt-get install podman buildah crun runc fuse-overlayfs uidmap debootstrap (tests/run.sh does this as root)"
    )
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            _unavailable(f"{tool} is not installed: {tools}; log: {ROOT / '.tools/logs/container-tools.log'}")
    if not MODEL.is_file():
        pytest.fail(f"the published model is required at {MODEL}")

    images = Images()
    logs = STORE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lock = open(STORE / "lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time per store; released when the session ends
    request.addfinalizer(lock.close)

    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(HERE / "stand_in_base.sh"), str(STORE), base_image()],
        stdout=open(logs / "base.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.returncode == 0, f"the stand-in base failed:\n{_log_tail(logs / 'base.log')}"
    images.report["base_s"] = round(time.monotonic() - start, 1)

    build_args = ["--isolation", "chroot", "--pull=never", "-v", f"{_pip_conf()}:/etc/pip.conf:ro"]
    if CA_BUNDLE.is_file():
        build_args += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(CONTAINERS / "build.sh"), "--engine", " ".join(images.engine), "--prune", "--", *build_args],
        stdout=open(logs / "build.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.returncode == 0, f"containers/build.sh failed:\n{_log_tail(logs / 'build.log')}"
    images.report["build_s"] = round(time.monotonic() - start, 1)
    images.report["stage_build_s"] = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^== (\w+) built in (\d+) s$", (logs / "build.log").read_text(), re.MULTILINE)
    }
    images.report["size_mb"] = {stage: round(images.size(image_of(stage)) / 1e6) for stage in STAGES}
    request.config._exllsm_image_report = images.report  # printed in the terminal summary (conftest.py)
    request.addfinalizer(lambda: (logs / "last-run.json").write_text(json.dumps(images.report, indent=2)))
    return images


# ------------------------------------------------------------------------------------------------
# Each image: its scripts, pip check, the pinned set, matplotlib's cache
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_image_contents(images, stage):
    scripts = stage_scripts(stage)
    assert scripts, stage
    proc = images.run(
        image_of(stage), "python3", "/probe/probe.py", *scripts, mounts=(f"{HERE / 'probe.py'}:/probe/probe.py:ro",)
    )
    found = json.loads(proc.stdout.splitlines()[-1])
    assert (found["uid"], found["gid"]) == (UID, GID)
    for name, runs in found["scripts"].items():
        assert runs["help"]["rc"] == 0 and "Usage:" in runs["help"]["out"], f"{stage}: {name} --help: {runs['help']}"
        assert runs["version"]["rc"] == 0, f"{stage}: {name} --version: {runs['version']}"
        assert runs["version"]["out"].split() == [name, "(exllsm-neuronseg)", VERSION], runs["version"]
    check = found["pip_check"]
    assert check["rc"] == 0, f"{stage}: pip check:\n{check['out']}{check['err']}"

    installed = {canonical(d["name"]): d["version"] for d in found["pip_list"]}
    assert installed.pop("exllsm-neuronseg", None) == VERSION, f"{stage}: the project is not installed"
    pins = constraints()
    differs = {
        name: (version, pins.get(name, "not pinned"))
        for name, version in sorted(installed.items())
        if name not in BASE_TOOLS and pins.get(name) != version
    }
    assert not differs, f"{stage}: installed version vs containers/constraints.txt: {differs}"

    mpl = found.get("matplotlib")
    if "matplotlib" in installed:
        assert mpl, f"{stage}: matplotlib is installed but MPLCONFIGDIR is not set"
    if mpl:
        assert mpl["before"], f"{stage}: no font cache baked into {mpl['dir']}"
        assert mpl["writable"], f"{stage}: {mpl['dir']} is not writable by uid {UID}"
        run = mpl["run"]
        assert run["rc"] == 0 and run["out"].strip() == mpl["dir"], run
        assert "building the font cache" not in run["err"] and "temporary cache" not in run["err"], run["err"]
        assert mpl["after"] == mpl["before"], f"{stage}: matplotlib rewrote its cache: {mpl}"


def test_images_know_their_commit(images):
    """Provenance records made inside an image name the commit it was built from (build.sh passes
    it), the same value the checkout gives outside."""
    probe = "from exllsm_neuronseg.provenance import code_commit; print(code_commit())"
    here = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    if (ROOT / ".git").exists():  # a checkout: the commit is known on both sides
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", here), here
    for stage in STAGES:  # every image carries it ...
        env = images.run(image_of(stage), "python3", "-c", "import os; print(os.environ['EXLLSM_COMMIT'])")
        assert env.stdout.strip() == (here if here != "None" else ""), stage
    for stage in ("create_volume", "segment_volume"):  # ... and the stages that write datasets record it
        assert images.run(image_of(stage), "python3", "-c", probe).stdout.strip() == here, stage


def test_image_sizes(images):
    """Bounds that catch an apt or pip cache, or a second copy of TensorFlow, left in an image."""
    sizes = images.report["size_mb"]
    for stage in STAGES:
        limit = 9000 if stage in ("segment_volume", "train_unet") else 1000
        assert sizes[stage] < limit, f"{stage}: {sizes[stage]} MB (limit {limit} MB)"


# ------------------------------------------------------------------------------------------------
# The stages on a tiny volume, as documented, against this venv
# ------------------------------------------------------------------------------------------------


def _venv(*command: str, cwd: Path | None = None) -> str:
    env = {
        **os.environ,
        "PATH": f"{ROOT / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=cwd)
    assert proc.returncode == 0, f"venv: {' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def _scaling(stdout: str) -> str:
    """Field 6 of the contract line, as the host greps it (host-pipeline-contract.md 2.5)."""
    lines = re.findall(r"Calculated a scaling factor of .* based on .*", stdout)
    assert lines, stdout[-2000:]
    return lines[-1].split(" ")[5]


def _array(container: Path, dataset: str) -> np.ndarray:
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # N5Store is deprecated for zarr 3
        return zarr.open(zarr.N5Store(str(container)), mode="r")[dataset.strip("/")][...]


def _owned_by_user(folder: Path) -> list[str]:
    wrong = []
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        if (st.st_uid, st.st_gid) != (UID, GID):
            wrong.append(f"{path.relative_to(folder)} {st.st_uid}:{st.st_gid}")
    return wrong


def _close(a: str, b: str) -> bool:
    x, y = float(a), float(b)
    return math.isfinite(x) and abs(x - y) <= 1e-9 * abs(y)


def test_stages_run_as_documented(images, tmp_path):
    data = tmp_path / "data"  # the container's /data, written by uid 1000 only
    data.mkdir()
    os.chown(data, UID, GID)
    host = tmp_path / "venv"  # the same commands in this venv
    host.mkdir()
    mounts = (f"{data}:/data",)
    model = (f"{data}:/data", f"{MODEL}:/models/neuron_2021.h5:ro")
    create, scaling, segment = image_of("create_volume"), image_of("scaling_factor"), image_of("segment_volume")

    def in_image(image: str, command: str, mounts: tuple[str, ...] = mounts) -> str:
        return images.run(image, *command.format(d="/data", m="/models/neuron_2021.h5").split(), mounts=mounts).stdout

    # the synthetic input, in the create-volume image; the venv makes its own to compare
    shape = "96,64,64"
    make = "make_test_volume.py -o {d}/sample.n5 -d /c1/s0 --shape %s --chunks 64,64,64" % shape
    in_image(create, make)
    _venv(*make.format(d=host).split())
    assert np.array_equal(_array(data / "sample.n5", "c1/s0"), _array(host / "sample.n5", "c1/s0"))
    src = "-i {d}/sample.n5"

    # plan_blocks.py and tiff_to_n5.py, the create-volume image's other scripts
    plan = "-id /c1/s0 --partition_size 64 --scaling_fraction 0.5 --scaling_partition_size 32"
    in_image(create, f"plan_blocks.py {src} {plan} -o {{d}}/blocks.txt --scaling_output {{d}}/scaling_jobs.txt")
    _venv(*f"plan_blocks.py -i {data}/sample.n5 {plan} -o {host}/blocks.txt --scaling_output {host}/jobs.txt".split())
    assert (data / "blocks.txt").read_text() == (host / "blocks.txt").read_text()
    assert (data / "blocks.txt").read_text().split() == ["0,0,0,64,64,64", "64,0,0,96,64,64"]
    assert (data / "scaling_jobs.txt").read_text() == (host / "jobs.txt").read_text()
    # the pipeline's cost report reads the model file there (h5py, no TensorFlow)
    report = "-o {d}/b2.txt --scaling_output {d}/j2.txt --report {d}/plan.json --model {m}"
    in_image(create, f"plan_blocks.py {src} {plan} {report}", mounts=model)
    _venv(*f"plan_blocks.py -i {data}/sample.n5 {plan} {report}".format(d=host, m=MODEL).split())
    costs = [json.loads((folder / "plan.json").read_text()) for folder in (data, host)]
    assert [(c["tile_runs"], c["empty_tiles"], c["voxels_to_compute"]) for c in costs] == [(2, 0, 96 * 64 * 64)] * 2
    slices = tmp_path / "slices"  # read-only in the container
    slices.mkdir()
    import tifffile

    stack = np.random.default_rng(0).integers(0, 4000, size=(6, 40, 48), dtype=np.uint16)  # z, y, x
    for z, plane in enumerate(stack):
        tifffile.imwrite(slices / f"slice_{z}.tif", plane)
    convert = "-d /raw/s0 -c 32,32,4"
    images.run(create, "tiff_to_n5.py", "-i", "/slices", "-o", "/data/raw.n5", *convert.split(),
               mounts=(*mounts, f"{slices}:/slices:ro"))  # fmt: skip
    _venv(*f"tiff_to_n5.py -i {slices} -o {host}/raw.n5 {convert}".split())
    converted = _array(data / "raw.n5", "raw/s0")
    assert np.array_equal(converted, _array(host / "raw.n5", "raw/s0"))
    assert np.array_equal(converted, stack)  # zarr shows N5's x,y,z dimensions as z,y,x

    # create_volume.py as in its Dockerfile header
    create_flags = "-id /c1/s0 -od /s0 --dtype float32"
    in_image(create, f"create_volume.py {src} -o {{d}}/sample-seg.n5 {create_flags}")
    _venv(*f"create_volume.py -i {data}/sample.n5 -o {host}/sample-seg.n5 {create_flags}".split())

    # scaling_factor.py as in its header, seeded
    flags = "-d /c1/s0 -p 0.5 --partition_size 32,32,32 --seed 0"
    factor_image = _scaling(in_image(scaling, f"scaling_factor.py {src} {flags}"))
    factor = _scaling(_venv(*f"scaling_factor.py -i {data}/sample.n5 {flags}".split()))
    assert _close(factor_image, factor), (factor_image, factor)
    diffs = [abs(float(factor_image) - float(factor)) / float(factor)]

    # the host's volumeScalingFactor with its flags (-n 0, no seed: -p 1 samples every tile)
    legacy = f"-d /c1/s0 -n 0 -p 1 --partition_size 32,32,32 --start 0,0,0 --end {shape}"
    legacy_image = _scaling(
        in_image(segment, f"/entrypoint.sh volumeScalingFactor {src} {legacy} --scaling_plots_dir {{d}}/plots")
    )
    legacy_venv = _scaling(
        _venv(*f"scaling_factor.py -i {data}/sample.n5 {legacy} --scaling_plots_dir {host}/plots".split())
    )
    assert _close(legacy_image, legacy_venv), (legacy_image, legacy_venv)
    diffs.append(abs(float(legacy_image) - float(legacy_venv)) / float(legacy_venv))
    images.report["scaling_rel_diff"] = diffs
    assert sorted(p.name for p in (data / "plots").iterdir()) == sorted(p.name for p in (host / "plots").iterdir())

    # segment_volume.py as in its header (one chunk-aligned block; no GPU here), the same factor
    block = f"-id /c1/s0 -od /s0 --start 0,0,0 --end 64,64,64 --scaling {factor} --set_gpu_mem_growth"
    in_image(segment, f"segment_volume.py {src} -o {{d}}/sample-seg.n5 -m {{m}} {block}", mounts=model)
    _venv(*f"segment_volume.py -i {data}/sample.n5 -o {host}/sample-seg.n5 -m {MODEL} {block}".split())

    # the host's volumeSegmentation with every flag it passes (host-pipeline-contract.md 2.6), the
    # other block
    legacy = (
        f"-id /c1/s0 -od /s0 --image_shape {shape} --start 64,0,0 --end {shape} --scaling {factor} "
        "--set_gpu_mem_growth --unet_batch_size 1 --model_input_shape 220,220,220 "
        "--model_output_shape 132,132,132 --with_post_processing --high_threshold 0.98 --low_threshold 0.2 "
        "--small_region_probability_threshold 0.9 --small_region_size_threshold 1000"
    )
    in_image(segment, f"/entrypoint.sh volumeSegmentation {src} -o {{d}}/sample-seg.n5 -m {{m}} {legacy}", mounts=model)
    _venv(*f"segment_volume.py -i {data}/sample.n5 -o {host}/sample-seg.n5 -m {MODEL} {legacy}".split())

    got, want = _array(data / "sample-seg.n5", "s0"), _array(host / "sample-seg.n5", "s0")
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert got.any(), "the image segmented nothing"
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
        f"segmentation differs from the venv's: {np.count_nonzero(got != want)} voxels, "
        f"max |diff| {np.abs(got - want).max()}"
    )
    markers = sorted(p.name for p in (data / "sample-seg.n5" / "s0" / ".exllsm-done").iterdir())
    assert markers == ["0_0_0-64_64_64.json", "64_0_0-96_64_64.json"], markers
    # everything the containers wrote belongs to the user they ran as
    assert not _owned_by_user(data), _owned_by_user(data)[:20]

    # a run without -u (as root) says, before it writes, that its output will belong to root
    as_root = tmp_path / "as-root"
    as_root.mkdir()
    proc = images.run(create, "create_volume.py", "-i", "/data/sample.n5", "-id", "/c1/s0", "-o", "/out/seg.n5",
                      mounts=(f"{data}:/data", f"{as_root}:/out"), user="0:0")  # fmt: skip
    assert "warning: running as root in the exllsm-create-volume image" in proc.stderr, proc.stderr
    assert '-u "$(id -u):$(id -g)"' in proc.stderr and (as_root / "seg.n5" / "s0").stat().st_uid == 0


def test_training_image_trains_one_epoch(images, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, GID)
    train = image_of("train_unet")
    steps = {
        "make_training_regions.py": "--output-dir /data/regions --names R1 --shape 84,84,84 --n-tubes 4 --n-puncta 20",
        "prepare_dataset.py": "--region-file /data/regions/R1/R1.h5 --dataset-dir /data/train.h5 "
        "--output-dir /data/diag --samples-per-region 2 --tile-input-shape 44,44,44 --tile-output-shape 4,4,4 "
        "--seed 0",
        # as in the Dockerfile header, with a tiny model
        "train_unet.py": "--training-dataset /data/train.h5 --output-dir /data/model --model-name neuron --epochs 1 "
        "--seed 0 --set_gpu_mem_growth --n-blocks 1 --model_input_size 44,44,44 --model_output_size 4,4,4 "
        "--parallel-calls 1",
        "evaluate_unet.py": "--dataset /data/train.h5 --model-path /data/model/neuron_best.h5 --output-dir /data/eval "
        "--n-examples 0",
    }
    start = time.monotonic()
    for script, flags in steps.items():
        last = images.run(train, script, *flags.split(), mounts=(f"{data}:/data",)).stdout
    images.report["training_chain_s"] = round(time.monotonic() - start, 1)
    assert "evaluated neuron_best.h5 on 2 examples" in last, last
    assert (data / "model" / "neuron_best.h5").is_file() and (data / "eval" / "report.json").is_file()
    assert not _owned_by_user(data), _owned_by_user(data)[:20]
