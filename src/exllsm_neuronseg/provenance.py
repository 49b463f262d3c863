"""Where a dataset came from: what made it, from what, with which code, image and settings.

A dataset's provenance has two parts, each written once by its one writer, so parallel jobs never
race on a shared file:

* **The creation record**, attribute ``exllsmProvenance`` of the dataset, written when the dataset
  is created (``create_volume.py`` and every stage that makes a dataset): the stage, the time, the
  project version and commit, the container image (name, and the reference Nextflow ran, digest
  included when the pipeline pins one), the source dataset (container, dataset, identity) and the
  source's own creation record, so a chain (raw → probabilities → labels → pyramid level) can be
  followed back; plus the stage's settings known at creation.
* **The block records**: each finished block's done marker (``<dataset>/.exllsm-done/*.json``)
  holds every setting that changed its values (model checksum and name, scaling, tile shape,
  precision, thresholds, mask, input identity). A block skipped on a re-run keeps its marker, so
  the record survives re-runs.

:func:`read_provenance` joins both: the creation record and the distinct block settings with how
many blocks used each (one entry when the whole dataset was made one way).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

from . import __version__
from .volume import PROVENANCE_ATTRIBUTE as ATTRIBUTE


def code_commit() -> str | None:
    """The project's git commit: ``EXLLSM_COMMIT`` (set in the stage images), else the checkout's
    ``git rev-parse HEAD`` when running from one, else None."""
    if os.environ.get("EXLLSM_COMMIT"):
        return os.environ["EXLLSM_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def stage_record(stage: str, settings: dict | None = None, source=None) -> dict:
    """The creation record of a dataset a stage makes (``source``: the Volume it is derived from)."""
    record: dict = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": __version__,
        "commit": code_commit(),
        "image": os.environ.get("EXLLSM_IMAGE"),
        "container": os.environ.get("EXLLSM_CONTAINER"),  # what Nextflow ran: name:tag or name@sha256:digest
        "settings": settings or {},
    }
    if source is not None:
        from .volume import dataset_identity

        record["source"] = {
            "container": str(Path(source.container).resolve()),
            "dataset": "/" + source.dataset,
            "identity": dataset_identity(source),
            "provenance": creation_record(source),
        }
    return record


def creation_record(volume) -> dict | None:
    """The dataset's creation record, or None (made by another tool or an older version)."""
    try:
        value = volume.array.attrs.get(ATTRIBUTE)
    except (ValueError, KeyError):
        return None
    return value if isinstance(value, dict) else None


def block_settings(volume) -> list[dict]:
    """The distinct settings of the dataset's finished blocks (from their done markers), each with
    the number of blocks and the voxels they cover, most blocks first."""
    from .segment import DONE_DIR

    folder = volume.path / DONE_DIR
    groups: Counter = Counter()
    voxels: Counter = Counter()
    extra: dict[str, dict] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            marker = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        settings = marker.get("settings")
        if not isinstance(settings, dict):
            continue
        key = json.dumps(settings, sort_keys=True, default=str)
        groups[key] += 1
        block = marker.get("block")
        if isinstance(block, list) and len(block) == 2:
            size = 1
            for a, b in zip(*block):
                size *= max(int(b) - int(a), 0)
            voxels[key] += size
        extra.setdefault(key, {k: marker[k] for k in ("model_name",) if k in marker})
    return [
        {"blocks": n, "voxels": voxels[key], "settings": json.loads(key), **extra[key]}
        for key, n in groups.most_common()
    ]


def read_provenance(volume) -> dict:
    """Everything known about how ``volume`` was made (see the module docstring)."""
    return {
        "dataset": f"{Path(volume.container).resolve()}:/{volume.dataset}",
        "creation": creation_record(volume),
        "blocks": block_settings(volume),
    }


def describe(provenance: dict) -> str:
    """A few readable lines of a provenance record (the JSON holds everything)."""
    lines = [f"dataset {provenance['dataset']}"]
    record = provenance.get("creation")
    if not isinstance(record, dict):
        lines.append("no creation record (another tool or an older version made it)")
    depth = 0
    while isinstance(record, dict):
        indent = "  " * depth
        commit = (record.get("commit") or "unknown commit")[:12]
        image = record.get("container") or record.get("image") or "no image"
        lines.append(
            f"{indent}made by {record.get('stage')} (exllsm-neuronseg {record.get('version')}, {commit}, {image}, "
            f"{record.get('created')})"
        )
        source = record.get("source")
        if not isinstance(source, dict):
            break
        lines.append(f"{indent}  from {source.get('container')}:{source.get('dataset')}")
        record, depth = source.get("provenance"), depth + 1
    blocks = provenance.get("blocks") or []
    if not blocks:
        lines.append("no finished blocks recorded")
    for group in blocks:
        s = group["settings"]
        shown = ", ".join(f"{k} {v}" for k, v in s.items() if k != "input")
        lines.append(f"{group['blocks']} block(s), {group['voxels']} voxels: {shown}")
    if len(blocks) > 1:
        lines.append(f"warning: the blocks were made with {len(blocks)} different settings")
    return "\n".join(lines)
