"""Training that cannot lose a run, and clear answers to bad training data (issue 12).

* Checkpoints: a kill at chosen moments (``EXLLSM_TEST_HOOK``, never timing) leaves the last
  complete checkpoint whole; ``--resume`` continues the newest complete one **bit for bit** as the
  uninterrupted run (dropout and augmentation included), never overwrites a better ``_best``,
  later epochs, another run or the log's history, and says so when nothing complete is there.
* Output paths of every training stage are checked before any work: one ``error:`` line, exit 2,
  nothing created.
* ``prepare_dataset`` checks every region before writing and replaces the dataset in one step.
* Bad data: non-integer labels, empty labels, regions smaller than a tile, a dataset of another
  tile shape, negative counts.
* CLI: help not cut at 80 columns, one-line range errors, plain progress lines in logs, no
  TensorFlow start-up lines, curves and log every epoch.

Tiny data (two 48^3 regions, 52 -> 12 tiles, 4 training examples) keeps each training run to
seconds; the runs are shared by the tests through module fixtures.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import BIN, run_script
from exllsm_neuronseg.errors import DatasetError, ParameterError
from exllsm_neuronseg.metrics import choose_keys
from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume
from exllsm_neuronseg.training import inspect_checkpoint, load_training_state, read_log, state_path
from exllsm_neuronseg.training_data import Region, prepare_dataset, write_region
from exllsm_neuronseg.unet import read_model_weights

TILES = ((52, 52, 52), (12, 12, 12))  # valid for one block
TRAIN = ["--model-name", "m", "--n-blocks", "1", "--model_input_size", "52,52,52", "--model_output_size", "12,12,12",
         "--seed", "3", "--spatial-dropout", "--parallel-calls", "1"]
EPOCHS = 4
KILLED = -signal.SIGKILL


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (what "unchanged" and "nothing created" compare)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def one_error(proc, *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_model_weights(a), read_model_weights(b)
    return wa.layers.keys() == wb.layers.keys() and all(
        np.array_equal(x, y) for k in wa.layers for pa, pb in zip(wa.layers[k], wb.layers[k]) for x, y in zip(pa, pb)
    )


def region_file(path: Path, shape=(48, 48, 48), seed: int = 0, label=None) -> Path:
    image, lab = synthetic_volume(SyntheticSpec(shape=shape, n_tubes=6, n_puncta=10, seed=seed))
    return write_region(path, image, lab if label is None else label(lab))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    regions = [Region(n, region_file(root / f"{n}.h5", seed=i)) for i, n in enumerate(("A1", "A2"))]
    prepare_dataset(regions, root / "train.h5", None, *TILES, samples_per_region=3, seed=0)
    return root


def train(data: Path, out: Path, *args: str, env: dict | None = None, check: bool = False):
    return run_script("train_unet.py", "--training-dataset", data / "train.h5", "--output-dir", out, *TRAIN, *args,
                      env=env, check=check)


def hook(moment: str) -> dict:
    return {"EXLLSM_TEST_HOOK": f"{moment}=kill"}


@pytest.fixture(scope="module")
def straight(data):
    """The uninterrupted reference run, 4 epochs, with --progress into a pipe (not a terminal)."""
    out = data / "straight"
    proc = train(data, out, "--epochs", str(EPOCHS), "--progress", check=True)
    return out, proc


# =============================================================================================
# 1. Checkpoints and resume
# =============================================================================================


def assert_same_run(a: Path, b: Path, epochs=range(1, EPOCHS + 1)) -> None:
    """Bit-identical weights, best model, optimizer and generator states, and log."""
    for e in epochs:
        assert same_weights(a / f"m{e}.h5", b / f"m{e}.h5"), f"epoch {e}"
    assert same_weights(a / "m_best.h5", b / "m_best.h5")
    last = max(epochs)
    with np.load(state_path(a / f"m{last}.h5")) as sa, np.load(state_path(b / f"m{last}.h5")) as sb:
        arrays = [k for k in sa.files if k.startswith(("var", "model_var"))]
        assert any(k.startswith("model_var") for k in arrays)  # the dropout generators' states are saved
        assert all(np.array_equal(sa[k], sb[k]) for k in arrays)
    assert (a / "m.log").read_text() == (b / "m.log").read_text()


def test_straight_run_commits_complete_checkpoints(straight):
    out, proc = straight
    for e in range(1, EPOCHS + 1):
        status = inspect_checkpoint(out / f"m{e}.h5")
        assert status.complete and status.epoch == e, status
    assert not list(out.glob("*.partial"))
    assert [int(e) for e in read_log(out / "m.log")["epoch"]] == list(range(EPOCHS))
    _, _, info = load_training_state(out / f"m{EPOCHS}.state.npz")
    assert len(info["history"]) == EPOCHS and info["training"] and info["validation"]


def test_progress_and_startup_lines_in_a_log(straight):
    """--progress into a pipe: plain step lines on stderr, no escape codes or carriage returns
    anywhere; TensorFlow's C++ start-up lines are not printed (neither once nor twice)."""
    _, proc = straight
    assert "\x1b" not in proc.stdout + proc.stderr and "\r" not in proc.stdout + proc.stderr
    assert "step 16/16 (100%)" in proc.stderr  # 4 steps x 4 epochs
    for noise in ("oneDNN custom operations", "absl::InitializeLog", "cpu_feature_guard"):
        assert noise not in proc.stderr, proc.stderr


def test_evaluation_progress_in_a_log_and_whole_reports(data, straight, tmp_path):
    """evaluate_unet.py --verbose into a pipe: plain progress lines, no TensorFlow start-up lines;
    an earlier report is replaced by the new one, never left beside new plots."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text("{}")
    proc = run_script("evaluate_unet.py", "--dataset", data / "train.h5", "--model-path", straight[0] / "m_best.h5",
                      "--output-dir", out, "--n-examples", "2", "--verbose", "--visualization-interval", "1", check=True)
    assert "example 2/2 (100%)" in proc.stderr and "\x1b" not in proc.stderr and "\r" not in proc.stderr
    assert "oneDNN" not in proc.stderr and "absl" not in proc.stderr
    assert '"n_examples": 2' in (out / "report.json").read_text() and not list(out.glob("*.partial"))


def test_kill_mid_epoch_then_resume_is_bit_exact(data, straight):
    """Killed in the middle of epoch 3: epochs 1-2 are complete, the log and the curves are there;
    --resume trains epochs 3-4 and ends with exactly the uninterrupted run's weights, best model,
    optimizer and generator states, and log."""
    ref, _ = straight
    out = data / "mid"
    killed = train(data, out, "--epochs", str(EPOCHS), env=hook("train:epoch3:step2"))
    assert killed.returncode == KILLED, killed.stderr
    assert [inspect_checkpoint(out / f"m{e}.h5").complete for e in (1, 2)] == [True, True]
    assert not (out / "m3.h5").exists()
    assert len(read_log(out / "m.log")["epoch"]) == 2  # the log and the curves of a killed run
    assert all((out / name).is_file() for name in ("loss.png", "accuracy.png", "iou.png"))
    resumed = train(data, out, "--epochs", "2", "--resume", check=True)
    assert f"resuming from {out / 'm2.h5'} at epoch 2" in resumed.stderr
    assert "epochs 3-4" in resumed.stdout
    assert_same_run(ref, out)


def test_kill_between_state_and_weights_resumes_the_last_complete_checkpoint(data, straight):
    """Killed after epoch 3's state was committed but before its weights were: epoch 3 is
    incomplete (named in a warning) and --resume continues epoch 2, bit-exact."""
    ref, _ = straight
    out = data / "between"
    killed = train(data, out, "--epochs", str(EPOCHS), env=hook("train:epoch3:state-committed"))
    assert killed.returncode == KILLED
    status = inspect_checkpoint(out / "m3.h5")
    assert not status.complete and "missing" in status.problem
    resumed = train(data, out, "--epochs", "2", "--resume", check=True)
    assert "m3.h5 is incomplete" in resumed.stderr and "resuming from" in resumed.stderr
    assert not list(out.glob("*.partial"))
    assert_same_run(ref, out)


def test_newest_checkpoint_without_state_is_never_restarted_from_epoch_0(data, straight):
    """The reported bug: the newest checkpoint has no optimizer state.  Resuming it explicitly is
    an error that changes nothing; --resume continues the newest complete one (epoch 3) and
    reproduces epoch 4 exactly; the best model and the log's history are never lost."""
    ref, _ = straight
    out = data / "stateless"
    shutil.copytree(ref, out)
    (out / "m4.state.npz").unlink()
    before = tree(out)
    explicit = train(data, out, "--epochs", "1", "--resume", "--pre-trained-model", out / "m4.h5")
    one_error(explicit, "m4.h5 cannot be resumed", "no training state", "m3.h5")
    assert "fresh optimizer" not in explicit.stderr and tree(out) == before
    resumed = train(data, out, "--epochs", "1", "--resume", check=True)
    assert "m4.h5 is incomplete" in resumed.stderr and f"resuming from {out / 'm3.h5'} at epoch 3" in resumed.stderr
    assert_same_run(ref, out)


def test_resume_refuses_what_would_overwrite(data, straight, tmp_path):
    """An older checkpoint of a run with later ones, a new run into a folder holding a run, a
    missing checkpoint, nothing complete: one error line each, nothing changed or created."""
    ref, _ = straight
    before = tree(ref)
    older = train(data, ref, "--epochs", "1", "--resume", "--pre-trained-model", ref / "m2.h5")
    one_error(older, "would overwrite epochs 3-4", "resume from m4.h5")
    fresh = train(data, ref, "--epochs", "1")
    one_error(fresh, "already holds a training run named m", "overwrite")
    missing = train(data, ref, "--epochs", "1", "--resume", "--pre-trained-model", tmp_path / "nope.h5")
    one_error(missing, "nope.h5", "does not exist")
    assert "fresh optimizer" not in missing.stderr and "warning" not in missing.stderr
    assert tree(ref) == before
    empty = train(data, tmp_path / "new", "--epochs", "1", "--resume")
    one_error(empty, "nothing to resume", "no complete checkpoint")
    assert not (tmp_path / "new").exists()


def test_killed_first_epoch_then_fine_tune_with_overwrite(data, straight):
    """Killed while writing epoch 1 (weights written, no state yet): nothing is resumable and a
    new run is refused; --overwrite replaces it.  Fine-tuning a model without a training state
    (the published model's case) starts at epoch 1 with a fresh optimizer, and says so."""
    ref, _ = straight
    out = data / "first"
    killed = train(data, out, "--epochs", "2", env=hook("train:epoch1:weights-written"))
    assert killed.returncode == KILLED
    assert (out / "m1.h5.partial").is_file() and (out / "m_best.h5").is_file() and not (out / "m1.h5").exists()
    one_error(train(data, out, "--epochs", "1", "--resume"), "nothing to resume")
    one_error(train(data, out, "--epochs", "1"), "already holds a training run named m")
    model = data / "published.h5"
    shutil.copy(ref / "m_best.h5", model)  # a model without a training state beside it
    tuned = train(data, out, "--epochs", "1", "--resume", "--pre-trained-model", model, "--overwrite", check=True)
    assert "fresh optimizer from epoch 1" in tuned.stderr and "epochs 1-1" in tuned.stdout
    assert inspect_checkpoint(out / "m1.h5").complete and not list(out.glob("*.partial"))
    assert len(read_log(out / "m.log")["epoch"]) == 1
    # another run's folder is not resumed into
    before = tree(out)
    other = train(data, out, "--epochs", "1", "--resume", "--pre-trained-model", ref / "m4.h5")
    one_error(other, "another run")
    assert tree(out) == before


# =============================================================================================
# 2. Output paths, checked before any work
# =============================================================================================


def stage_args(stage: str, data: Path, out: Path, straight_dir: Path) -> list:
    return {
        "make_training_regions.py": ["--output-dir", out, "--names", "R", "--shape", "8,8,8"],
        "prepare_dataset.py": ["--region-file", data / "A1.h5", "--dataset-dir", out / "d.h5", "--output-dir", out / "diag",
                               "--tile-input-shape", "52,52,52", "--tile-output-shape", "12,12,12"],
        "train_unet.py": ["--training-dataset", data / "train.h5", "--output-dir", out, *TRAIN],
        "evaluate_unet.py": ["--dataset", data / "train.h5", "--model-path", straight_dir / "m_best.h5", "--output-dir", out],
    }[stage]


STAGES = ("make_training_regions.py", "prepare_dataset.py", "train_unet.py", "evaluate_unet.py")


@pytest.mark.parametrize("stage", STAGES)
def test_output_under_a_plain_file(stage, data, straight, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    before = tree(tmp_path)
    proc = run_script(stage, *stage_args(stage, data, tmp_path / "file" / "out", straight[0]))
    one_error(proc, "lies under the file", str(tmp_path / "file"))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("stage", STAGES)
def test_unwritable_output_folder(stage, data, straight):
    """A folder this user cannot write (as root: the child runs as another user)."""
    from other_user import protect, run_as_other_user, shared_tmp

    with shared_tmp() as tmp:
        work = tmp / "data"
        shutil.copytree(data, work, ignore=shutil.ignore_patterns("straight", "mid", "between", "stateless", "first"))
        shutil.copytree(straight[0], tmp / "model")
        for folder in (work, tmp / "model"):
            folder.chmod(0o755)
        (tmp / "ro").mkdir()
        protect(tmp / "ro")
        proc = run_as_other_user([BIN / stage, *stage_args(stage, work, tmp / "ro" / "out", tmp / "model")])
        one_error(proc, "cannot write", "not writable by this user", str(tmp / "ro"))
        assert list((tmp / "ro").iterdir()) == []


def test_dataset_dir_as_a_folder(data, tmp_path):
    """The original README's --dataset-dir /DATASET-DIR/: a file inside the folder."""
    for target, expected in ((f"{tmp_path / 'new'}/", tmp_path / "new" / "training-dataset.h5"),
                             (tmp_path, tmp_path / "training-dataset.h5")):
        proc = run_script("prepare_dataset.py", "--region-file", data / "A1.h5", "--dataset-dir", target,
                          "--tile-input-shape", "52,52,52", "--tile-output-shape", "12,12,12", "--samples-per-region", "2",
                          "--seed", "0", check=True)
        assert proc.stdout.startswith(f"dataset {expected}: wrote 2 examples") and expected.is_file()


# =============================================================================================
# 3. Preparation checks every region first and replaces the dataset in one step
# =============================================================================================


@pytest.fixture()
def existing(data, tmp_path) -> Path:
    path = tmp_path / "d.h5"
    shutil.copy(data / "train.h5", path)
    return path


def prepare(regions, path, tmp_path, **kw):
    return prepare_dataset(regions, path, tmp_path / "diag", *TILES, samples_per_region=2, seed=0, **kw)


def test_a_bad_second_region_leaves_the_dataset_as_it_was(data, existing, tmp_path):
    bad = region_file(tmp_path / "bad.h5", label=lambda lab: lab * 0.7)
    before = tree(tmp_path)
    with pytest.raises(DatasetError, match="region bad: .*non-integer values"):
        prepare([Region("A1", data / "A1.h5"), Region("bad", bad)], existing, tmp_path)
    assert tree(tmp_path) == before  # no examples of A1, no partial file, no diagnostics folder


def test_every_bad_region_is_named_in_one_line(data, existing, tmp_path):
    nan = region_file(tmp_path / "nan.h5", label=lambda lab: np.where(lab > 0, np.nan, 0).astype(np.float32))
    tiny = region_file(tmp_path / "tiny.h5", shape=(4, 48, 48))
    proc = run_script("prepare_dataset.py", "--region-file", data / "A1.h5", "--region-file", nan, "--region-file", tiny,
                      "--dataset-dir", existing, "--tile-input-shape", "52,52,52", "--tile-output-shape", "12,12,12")
    line = one_error(proc, "2 of 3 regions cannot be used", "region nan", "NaN", "region tiny is 4,48,48",
                     "smaller than the tile output 12,12,12", "mirrored")
    assert "region A1" not in line


def test_kill_while_writing_leaves_the_previous_dataset(data, existing, tmp_path):
    before = existing.read_bytes()
    args = ["--region-file", data / "A1.h5", "--region-file", data / "A2.h5", "--dataset-dir", existing,
            "--tile-input-shape", "52,52,52", "--tile-output-shape", "12,12,12", "--samples-per-region", "2"]
    killed = run_script("prepare_dataset.py", *args, env=hook("prepare:region-written"))
    assert killed.returncode == KILLED and existing.read_bytes() == before
    assert len(list(tmp_path.glob("d.h5.*.partial"))) == 1
    run_script("prepare_dataset.py", *args, check=True)
    assert not list(tmp_path.glob("*.partial")) and existing.read_bytes() != before


# =============================================================================================
# 4. Bad data
# =============================================================================================


def test_non_integer_labels_are_an_error_or_thresholded(tmp_path):
    path = region_file(tmp_path / "p.h5", label=lambda lab: (lab * 0.7).astype(np.float32))
    with pytest.raises(DatasetError, match=r"non-integer values \(e.g. 0.7\).*label threshold"):
        prepare([Region("p", path)], tmp_path / "d.h5", tmp_path)
    assert not (tmp_path / "d.h5").exists() and not (tmp_path / "diag").exists()
    summary = prepare([Region("p", path)], tmp_path / "d.h5", tmp_path, label_threshold=0.5)
    with h5py.File(tmp_path / "d.h5") as h5, h5py.File(path) as region:
        assert region["t0/channel2"].dtype == np.float32
        masks = [h5[k]["mask"][...] for k in summary.regions[0].keys]
    assert all(set(np.unique(m)) <= {0, 1} for m in masks) and any(m.any() for m in masks)
    whole = region_file(tmp_path / "w.h5", label=lambda lab: lab.astype(np.float32))  # 0.0 / 1.0: whole numbers
    prepare([Region("w", whole)], tmp_path / "d2.h5", tmp_path)


def test_empty_labels_and_small_regions_are_warned_about(tmp_path, caplog):
    empty = region_file(tmp_path / "e.h5", label=np.zeros_like)
    small = region_file(tmp_path / "s.h5", shape=(40, 48, 48))
    with caplog.at_level("WARNING"):
        summary = prepare([Region("e", empty), Region("s", small)], tmp_path / "d.h5", tmp_path)
    assert [len(r.keys) for r in summary.regions] == [2, 2]
    text = caplog.text
    assert "region e: its ground truth t0/channel2 has no neuron voxels" in text
    assert "region s is 40,48,48, smaller than the tile input 52,52,52 along x,y,z" in text


def test_region_smaller_than_half_a_tile_output_is_refused(tmp_path):
    tiny = region_file(tmp_path / "t.h5", shape=(5, 48, 48))
    with pytest.raises(DatasetError, match="region t is 5,48,48, smaller than the tile output 12,12,12: 58%"):
        prepare([Region("t", tiny)], tmp_path / "d.h5", tmp_path)


def test_appending_another_tile_shape_is_refused_before_reading_regions(data, existing, tmp_path):
    before = tree(tmp_path)
    with pytest.raises(DatasetError, match="holds examples of 52,52,52, these would be 60,60,60"):
        prepare_dataset([Region("A1", tmp_path / "not-read.h5")], existing, tmp_path / "diag", (60,) * 3, (20,) * 3)
    assert tree(tmp_path) == before


def test_negative_counts_are_errors():
    with pytest.raises(ParameterError, match="number of examples -3 must be >= 0"):
        choose_keys(["a", "b"], -3, 0)
    with pytest.raises(ParameterError, match="samples per region -1 must be >= 1"):
        prepare_dataset([Region("x", Path("x.h5"))], "d.h5", samples_per_region=-1)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("evaluate_unet.py", ["--dataset", "d", "--model-path", "m", "--output-dir", "o", "--n-examples", "-3"], "'--n-examples'"),
        ("prepare_dataset.py", ["--dataset-dir", "d", "--samples-per-region", "-3"], "'--samples-per-region'"),
        ("prepare_dataset.py", ["--dataset-dir", "d", "--candidates", "0"], "'--candidates'"),
        ("make_training_regions.py", ["--output-dir", "o", "--n-tubes", "-1"], "'--n-tubes'"),
        ("train_unet.py", ["--training-dataset", "d", "--output-dir", "o", "--epochs", "0"], "'--epochs'"),
        ("train_unet.py", ["--training-dataset", "d", "--output-dir", "o", "--dice-weight", "2"], "'--dice-weight'"),
    ],
)
def test_range_errors_are_one_line(script, args, message, tmp_path):
    proc = run_script(script, *args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: Invalid value for ") and message in proc.stderr


# =============================================================================================
# 5. Help
# =============================================================================================


@pytest.mark.parametrize("script", sorted(p.name for p in BIN.glob("*.py") if not p.name.startswith("_")))
def test_help_is_not_cut_at_80_columns(script):
    """Every flag name appears whole in --help at 80 columns, written to a pipe (plain text)."""
    import re

    proc = run_script(script, "--help", env={"COLUMNS": "80"}, check=True)
    assert "…" not in proc.stdout and "╭" not in proc.stdout and "\x1b" not in proc.stdout
    assert "<bool>" not in proc.stdout and "list[str]" not in proc.stdout  # on/off flags take no value
    source = (BIN / script).read_text()
    flags = set(re.findall(r'"(--[a-z][a-z0-9_-]+)', source)) - {"--help"}
    shown = set(re.findall(r"--[a-z][a-z0-9_/-]*[a-z0-9_]", proc.stdout.replace("/--", " --")))
    assert flags <= shown, sorted(flags - shown)


def test_help_of_train_unet_names_its_long_flags_whole():
    text = run_script("train_unet.py", "--help", env={"COLUMNS": "80"}, check=True).stdout
    for flag in ("--training-dataset", "--spatial-dropout-rate", "--bottleneck-dropout-rate", "--pre-trained-model"):
        assert flag in text
