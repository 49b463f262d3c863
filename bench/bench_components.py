#!/usr/bin/env python3
"""Benchmark: connected components over blocks against ``scipy.ndimage.label`` of the whole volume.

The input is a float32 N5 probability-like volume (``--shape``, default 768x768x384, 128^3 gzip
chunks): the synthetic neurons and puncta of :mod:`exllsm_neuronseg.synthetic` scaled to [0, 1],
so objects cross block faces, edges and corners.  It is cut into a grid of ``--block`` blocks (the
default 256^3 gives 3x3x2 = 18 blocks, the last layer in z of 128) and labelled at the host's
settings (threshold 0.8, 26-connectivity, minimum size ``--min-size``):

* ``label``: one process per block (:func:`.components.write_block_record`), as the pipeline runs it;
* ``merge``: one process (:func:`.components.merge_records`, which also builds the object table);
* ``write``: one process per block (:func:`.components.block_labels` written to a uint64 dataset);
* ``reference``: one process reading the whole volume, ``scipy.ndimage.label`` with the same
  structure, the size filter and the canonical renumbering.

Reported per stage: the wall of each process (sum and largest), and each process's own peak RSS
(``VmHWM``; the largest for per-block stages), the pieces and contacts the merge joined, and whether
the blocks' labels equal the reference voxel for voxel.  numpy float32 matmul GFLOP/s is measured in
the same run, before and after.

    .venv/bin/python bench/bench_components.py [--shape 768,768,384] [--block 256] [--min-size 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_segment import matmul_gflops  # noqa: E402

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
a = json.loads(sys.argv[1])
sys.path.insert(0, a["src"])
import numpy as np
from exllsm_neuronseg import components as C
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.volume import open_volume
vol = open_volume(a["input"], "p/s0")
blocks = [Box(tuple(s), tuple(e)) for s, e in a["blocks"]]
settings = C.PassSettings(a["threshold"], a["connectivity"])
out = {}
if a["stage"] == "label":
    out["objects"] = C.write_block_record(vol, blocks[a["index"]], settings, a["records"])
elif a["stage"] == "merge":
    m = C.merge_records(vol, blocks, a["records"], a["min_size"])
    out.update(objects=m.objects, kept=m.kept, pieces=m.pieces, contacts=m.contacts)
elif a["stage"] == "write":
    dst = open_volume(a["input"], "labels/s0", mode="r+")
    block = blocks[a["index"]]
    dst.write_chunked_zyx(block, C.block_labels(vol, block, a["records"]))
elif a["stage"] == "reference":
    from scipy import ndimage
    p = vol.read_zyx(vol.box)
    labels, n = ndimage.label(p > a["threshold"], structure=C.structure(a["connectivity"]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= a["min_size"]
    keep[0] = False
    new = np.zeros(n + 1, np.uint64)
    new[keep] = np.arange(1, keep.sum() + 1, dtype=np.uint64)
    labels = new[labels]
    out.update(objects=int(n), kept=int(keep.sum()))
    if a.get("compare"):  # after the peak above is taken: the comparison reads a second volume
        out["peak_rss_gb_before_compare"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1e6
        got = open_volume(a["input"], "labels/s0").read_zyx(vol.box)
        out["equal"] = bool(np.array_equal(got, labels))
out["wall"] = time.perf_counter() - t0
out["peak_rss_gb"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1e6
print(json.dumps(out))
"""


def run(args: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: stage {args['stage']} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - t
    return result


def make_input(path: Path, shape: tuple[int, int, int], chunk: int, seed: int) -> None:
    import numpy as np

    from exllsm_neuronseg.geometry import Box
    from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume
    from exllsm_neuronseg.volume import create_volume

    if (path / "p" / "s0" / "attributes.json").is_file():
        return
    scale = max(min(shape) // 128, 1)
    spec = SyntheticSpec(shape=shape, n_tubes=8 * scale, n_puncta=40 * scale**3, seed=seed)
    image, _ = synthetic_volume(spec)
    p = np.clip(image.astype(np.float32) / 1200.0, 0, 1)  # neurites and puncta near 1, background ~0.03
    attrs = {"pixelResolution": {"dimensions": [0.104, 0.104, 0.18], "unit": "um"}}
    vol = create_volume(str(path), "p/s0", shape, (chunk,) * 3, "float32", attributes=attrs, overwrite=True)
    vol.write_chunked_zyx(Box((0, 0, 0), shape), p.transpose(2, 1, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="768,768,384", help="x,y,z")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--connectivity", type=int, default=26, choices=(6, 26))
    parser.add_argument("--min-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "components"))
    args = parser.parse_args()

    from exllsm_neuronseg.geometry import Box, grid_cells
    from exllsm_neuronseg.volume import create_volume

    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inp = work / f"input_{'x'.join(map(str, shape))}_{args.chunk}_{args.seed}.n5"
    t = time.perf_counter()
    make_input(inp, shape, args.chunk, args.seed)
    print(f"input {inp} ready in {time.perf_counter() - t:.1f} s", flush=True)
    blocks = grid_cells(Box((0, 0, 0), shape), (args.block,) * 3)
    records = work / "records"
    shutil.rmtree(records, ignore_errors=True)
    shutil.rmtree(inp / "labels", ignore_errors=True)
    create_volume(str(inp), "labels/s0", shape, (args.chunk,) * 3, "uint64")
    common = {"src": str(ROOT / "src"), "input": str(inp), "blocks": [[list(b.start), list(b.end)] for b in blocks],
              "threshold": args.threshold, "connectivity": args.connectivity, "records": str(records),
              "min_size": args.min_size}

    gflops_before = matmul_gflops()
    stages = {}
    for stage in ("label", "merge", "write"):
        if stage == "merge":
            runs = [run({**common, "stage": stage})]
        else:
            runs = [run({**common, "stage": stage, "index": i}) for i in range(len(blocks))]
        stages[stage] = runs
        print(f"{stage}: {len(runs)} process(es), {sum(r['process_wall'] for r in runs):.1f} s", flush=True)
    reference = run({**common, "stage": "reference", "compare": True})
    gflops_after = matmul_gflops()

    merge = stages["merge"][0]
    report = {
        "volume": f"{'x'.join(map(str, shape))} float32, chunks {args.chunk}^3, {len(blocks)} blocks of {args.block}^3 (grid)",
        "settings": f"threshold {args.threshold}, {args.connectivity}-connectivity, min size {args.min_size}",
        "machine_matmul_gflops": f"{gflops_before:.1f} before, {gflops_after:.1f} after",
        "objects": merge["objects"], "kept": merge["kept"], "pieces": merge["pieces"], "contacts": merge["contacts"],
        "equal_to_whole_volume_scipy_label": reference["equal"],
    }
    for stage, runs in stages.items():
        report[f"{stage}_processes"] = len(runs)
        report[f"{stage}_wall_sum_s"] = round(sum(r["process_wall"] for r in runs), 2)
        report[f"{stage}_wall_max_s"] = round(max(r["process_wall"] for r in runs), 2)
        report[f"{stage}_peak_rss_gb_max"] = round(max(r["peak_rss_gb"] for r in runs), 3)
    report["reference_wall_s"] = round(reference["process_wall"], 2)
    report["reference_peak_rss_gb"] = round(reference["peak_rss_gb_before_compare"], 3)
    report["reference_objects"] = reference["objects"]
    report["reference_kept"] = reference["kept"]
    for k, v in report.items():
        print(f"{k:36s} {v}")
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nreport: {work / 'report.json'}")


if __name__ == "__main__":
    main()
