#!/usr/bin/env python3
"""Benchmark: segment one 512^3 block of a synthetic uint16 N5 volume (128^3 gzip chunks).

Reports end-to-end Mvox/s (output voxels / wall seconds of the whole child process, TensorFlow
start-up included), the seconds spent reading, computing and writing, peak RSS, and, measured in
the same run, this machine's float32 matrix-multiply GFLOP/s (numpy, before and after the runs)
beside the model GFLOP/s achieved.

    .venv/bin/python bench/bench_segment.py [--size 512] [--chunk 128] [--model PATH]
                                            [--precision fp32,bf16] [--blocks 4] [-- --name value ...]

``--precision fp32,bf16``: each precision runs in its own child process on the same input, one
after the other, each into its own output dataset.  Per precision the report has the figures
above and, against the reference (fp32 when listed, else the first one): the end-to-end and
compute speed ratios (reference seconds / these seconds: > 1 is faster), max |Δp| over the block,
and agreement of the binary masks (p > 0.5) as a fraction of all voxels and as the Dice
coefficient of the foreground (the foreground is a few percent of the voxels, so the fraction
alone hides disagreement there).

``--blocks N``: the volume is cut into N chunk-aligned blocks (the cut that needs fewest tiles,
z first: 4 blocks of a 512^3 volume are 512x512x128, whole tiles each) and segmented twice, in
the first precision: once by ``segment_blocks`` in one process, once by N processes of one
``segment_block`` each (as N jobs would).  Reported: the wall of each (summed over the N
processes), the saving per block in seconds, and whether both outputs are identical.

Extra ``--name value`` pairs after ``--`` are keyword arguments of ``segment_block`` (values are
Python literals), e.g. ``-- --input_shape "(220,220,220)"`` for the host's tiles.

The input is made once and kept in the work folder (default ``bench/results``); the outputs of
every run (``output.n5``: ``seg_<precision>/s0``, ``blocks_one_process/s0``,
``blocks_per_process/s0``) are replaced on each run; the report is ``report.json`` there.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_MODEL = str(ROOT.parent / "shared" / "models" / "neuron_2021.h5")

# One child process: segment_block on one block, or segment_blocks on several (one model load).
CHILD = """
import ast, json, sys, time
t0 = time.perf_counter()
a = json.loads(sys.argv[1])
kw = ast.literal_eval(sys.argv[2])
sys.path.insert(0, a["src"])
from exllsm_neuronseg.segment import segment_block, segment_blocks
from exllsm_neuronseg.volume import open_volume
src = open_volume(a["input"], a["input_dataset"])
dst = open_volume(a["output"], a["output_dataset"], mode="r+")
common = dict(scaling=a["scaling"], skip_done=False, precision=a["precision"], **kw)
if len(a["blocks"]) == 1 and not a["many"]:
    (start, end), = a["blocks"]
    results = [segment_block(src, dst, a["model"], start, end, **common)]
else:
    results = segment_blocks(src, dst, a["model"], [tuple(b) for b in a["blocks"]], **common)
total = lambda name: sum(getattr(r, name) for r in results)
json.dump(dict(
    wall=time.perf_counter() - t0, block_seconds=total("seconds"), read=total("read_seconds"),
    compute=total("compute_seconds"), write=total("write_seconds"), tiles=total("tiles"),
    model_tiles=total("model_tiles"), constant_tiles=total("constant_tiles"),
    background_tiles=total("background_tiles"), flops=total("flops"),
    per_block_seconds=[r.seconds for r in results],
    # VmHWM: this process's own peak (ru_maxrss would also count the parent's RSS at fork time)
    maxrss_gb=int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1e6,
), open(a["stats"], "w"))
"""


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_input(path: Path, size: int, chunk: int) -> None:
    from exllsm_neuronseg.synthetic import SyntheticSpec, write_synthetic_n5

    if (path / "c1" / "s0" / "attributes.json").is_file():
        return
    scale = max(size // 128, 1)
    spec = SyntheticSpec(shape=(size,) * 3, n_tubes=6 * scale, n_puncta=30 * scale**3, seed=1)
    write_synthetic_n5(str(path), "c1/s0", spec, chunks=(chunk,) * 3)


def parse_extra(extra: list[str]) -> dict:
    """``--name value`` pairs (values Python literals) as segment_block keyword arguments."""
    if len(extra) % 2:
        raise SystemExit(f"error: the extra arguments after -- come in --name value pairs, got {extra}")
    return {extra[i].lstrip("-").replace("-", "_"): ast.literal_eval(extra[i + 1]) for i in range(0, len(extra), 2)}


def fresh_output(container: Path, dataset: str, shape, chunks, dtype: str = "float32") -> None:
    """A new, empty output dataset (an old one is removed first: no chunks, done markers or
    recorded constant answers carry over from an earlier run)."""
    from exllsm_neuronseg.volume import create_volume

    shutil.rmtree(container / dataset.strip("/").split("/")[0], ignore_errors=True)
    create_volume(str(container), dataset, tuple(shape), tuple(chunks), dtype)


def run_child(
    work: Path,
    tag: str,
    *,
    model: str,
    input_path: Path,
    input_dataset: str,
    output_path: Path,
    output_dataset: str,
    blocks: list,
    precision: str,
    scaling: float,
    kwargs: dict,
    many: bool = False,
) -> dict:
    """Run one child process; return its stats plus ``process_wall`` (the parent's clock around the
    whole process) or ``{"error": ...}`` if it failed."""
    stats = work / f"stats_{tag}.json"
    stats.unlink(missing_ok=True)
    args = {
        "src": str(ROOT / "src"), "input": str(input_path), "input_dataset": input_dataset,
        "output": str(output_path), "output_dataset": output_dataset, "model": model,
        "blocks": [[list(s), list(e)] for s, e in blocks], "many": many, "precision": precision,
        "scaling": scaling, "stats": str(stats),
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args), repr(kwargs)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return {**json.loads(stats.read_text()), "process_wall": wall}


def compare_outputs(container: Path, dataset_a: str, dataset_b: str, threshold: float = 0.5) -> dict:
    """Max |Δp| and binary-mask (p > threshold) agreement of two probability datasets of one shape,
    read a row of chunks along x at a time."""
    import numpy as np

    from exllsm_neuronseg.geometry import Box
    from exllsm_neuronseg.volume import open_volume

    a, b = open_volume(str(container), dataset_a), open_volume(str(container), dataset_b)
    if a.shape != b.shape:
        raise ValueError(f"{a} and {b} differ in shape")
    (nx, ny, nz), (_, cy, cz) = a.shape, a.chunks
    max_abs = 0.0
    differing = both = fg_a = fg_b = 0
    for z0, y0 in itertools.product(range(0, nz, cz), range(0, ny, cy)):
        box = Box((0, y0, z0), (nx, min(y0 + cy, ny), min(z0 + cz, nz)))
        pa, pb = a.read_zyx(box), b.read_zyx(box)
        max_abs = max(max_abs, float(np.max(np.abs(pa.astype(np.float64) - pb))))
        ma, mb = pa > threshold, pb > threshold
        differing += int(np.count_nonzero(ma != mb))
        both += int(np.count_nonzero(ma & mb))
        fg_a += int(np.count_nonzero(ma))
        fg_b += int(np.count_nonzero(mb))
    voxels = math.prod(a.shape)
    return {
        "max_abs_dp": max_abs,
        "mask_agreement": 1 - differing / voxels,
        "mask_differing_voxels": differing,
        "dice_foreground": 2 * both / (fg_a + fg_b) if fg_a + fg_b else 1.0,
        "foreground_fraction_reference": fg_a / voxels,
        "foreground_fraction": fg_b / voxels,
    }


def figures(s: dict, voxels: int) -> dict:
    """The per-run figures of the report, from a child's stats."""
    wall = s["process_wall"]
    return {
        "end_to_end_mvox_s": voxels / wall / 1e6,
        "process_wall_s": wall,
        "block_seconds": s["block_seconds"],
        "block_mvox_s": voxels / s["block_seconds"] / 1e6,
        "read_s": s["read"],
        "compute_s": s["compute"],
        "write_s": s["write"],
        "tiles": s["tiles"],
        "model_tiles": s["model_tiles"],
        "constant_tiles": s["constant_tiles"],
        "peak_rss_gb": s["maxrss_gb"],
        "model_gflops_during_compute": s["flops"] / s["compute"] / 1e9 if s["compute"] else 0.0,
        "model_gflops_end_to_end": s["flops"] / wall / 1e9,
    }


def split_blocks(size: int, chunk: int, n: int, grid) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``n`` chunk-aligned blocks of equal shape covering the ``size``^3 volume: of the cuts
    ``nx*ny*nz == n`` the one with fewest tiles in all (blocks that cut tiles redo them), then the
    one cut most along z, then y."""
    from exllsm_neuronseg.geometry import Box, grid_cells

    per_axis = size // chunk
    best = None
    for nx, ny, nz in itertools.product(range(1, n + 1), repeat=3):
        if nx * ny * nz != n or any(per_axis % k for k in (nx, ny, nz)):
            continue
        edge = (size // nx, size // ny, size // nz)
        boxes = grid_cells(Box((0, 0, 0), (size,) * 3), edge)
        key = (sum(grid.count(b) for b in boxes), -nz, -ny)
        if best is None or key < best[0]:
            best = (key, boxes)
    if best is None:
        raise SystemExit(f"error: {size}^3 with {chunk}^3 chunks cannot be cut into {n} equal chunk-aligned blocks")
    return [(b.start, b.end) for b in best[1]]


def print_table(rows: dict[str, dict], keys: list[str]) -> None:
    names = list(rows)
    print(f"{'':32s}" + "".join(f"{n:>14s}" for n in names))
    for k in keys:
        cells = []
        for n in names:
            v = rows[n].get(k, "")
            cells.append(f"{v:14.6g}" if isinstance(v, float) else f"{v!s:>14s}")
        print(f"{k:32s}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--scaling", type=float, default=0.00045)
    parser.add_argument("--precision", default="fp32", help="comma list of fp32, bf16, fp16; each in its own process")
    parser.add_argument("--blocks", type=int, default=0, help="also segment N blocks in one process vs one process each")
    parser.add_argument("extra", nargs="*", help="segment_block keyword arguments after --: --name value ...")
    args = parser.parse_args()
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or len(set(precisions)) != len(precisions):
        parser.error(f"--precision {args.precision!r}: give distinct names, e.g. fp32,bf16")
    kwargs = parse_extra(args.extra)
    reference = "fp32" if "fp32" in precisions else precisions[0]

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inp = work / f"input_{args.size}_{args.chunk}.n5"
    t = time.perf_counter()
    make_input(inp, args.size, args.chunk)
    print(f"input {inp} ready in {time.perf_counter() - t:.1f} s", flush=True)

    gflops_machine = matmul_gflops()
    print(f"machine matmul: {gflops_machine:.1f} GFLOP/s (float32, numpy)", flush=True)
    out = work / "output.n5"
    shape, chunks = (args.size,) * 3, (args.chunk,) * 3
    voxels = args.size**3
    common = dict(model=args.model, input_path=inp, input_dataset="c1/s0", output_path=out,
                  scaling=args.scaling, kwargs=kwargs)
    whole = [((0, 0, 0), shape)]

    runs: dict[str, dict] = {}
    for precision in precisions:
        dataset = f"seg_{precision}/s0"
        fresh_output(out, dataset, shape, chunks)
        s = run_child(work, precision, output_dataset=dataset, blocks=whole, precision=precision, **common)
        if "error" in s:
            print(f"{precision}: failed: {s['error']}", flush=True)
            runs[precision] = {"error": s["error"]}
            continue
        runs[precision] = figures(s, voxels)
        print(f"{precision}: {runs[precision]['end_to_end_mvox_s']:.3f} Mvox/s end to end", flush=True)
    ref = runs.get(reference, {})
    for precision, r in runs.items():
        if "error" in r or "error" in ref or precision == reference:
            continue
        r["speed_ratio_vs_" + reference] = ref["process_wall_s"] / r["process_wall_s"]
        r["compute_ratio_vs_" + reference] = ref["compute_s"] / r["compute_s"] if r["compute_s"] else 0.0
        cmp = compare_outputs(out, f"seg_{reference}/s0", f"seg_{precision}/s0")
        r.update({f"{k}_vs_{reference}" if not k.startswith("foreground") else k: v for k, v in cmp.items()})

    blocks_report = None
    if args.blocks:
        from exllsm_neuronseg.inference import Predictor

        tile_kw = {k: kwargs[k] for k in ("input_shape", "output_shape") if k in kwargs}
        grid = Predictor(args.model, image_shape=shape, axes="zyx", **tile_kw).grid
        blocks = split_blocks(args.size, args.chunk, args.blocks, grid)
        precision = precisions[0]
        print(f"{len(blocks)} blocks of {'x'.join(map(str, (e - s for s, e in zip(*blocks[0]))))} ({precision}): "
              "one process, then one process per block", flush=True)
        fresh_output(out, "blocks_one_process/s0", shape, chunks)
        one = run_child(work, "blocks_one", output_dataset="blocks_one_process/s0", blocks=blocks,
                        precision=precision, many=True, **common)
        fresh_output(out, "blocks_per_process/s0", shape, chunks)
        each = [run_child(work, f"block_{i}", output_dataset="blocks_per_process/s0", blocks=[b],
                          precision=precision, **common) for i, b in enumerate(blocks)]
        failed = [s["error"] for s in [one, *each] if "error" in s]
        if failed:
            blocks_report = {"error": failed[0]}
            print(f"blocks: failed: {failed[0]}", flush=True)
        else:
            one_wall, each_wall = one["process_wall"], sum(s["process_wall"] for s in each)
            same = compare_outputs(out, "blocks_one_process/s0", "blocks_per_process/s0")
            blocks_report = {
                "precision": precision,
                "blocks": [list(s) + list(e) for s, e in blocks],
                "tiles": one["tiles"],
                "one_process_wall_s": one_wall,
                "one_process_per_block_seconds": one["per_block_seconds"],
                "one_process_peak_rss_gb": one["maxrss_gb"],
                "process_per_block_wall_s": each_wall,
                "process_per_block_walls_s": [s["process_wall"] for s in each],
                "process_per_block_block_seconds": [s["block_seconds"] for s in each],
                "saving_s": each_wall - one_wall,
                "saving_per_block_s": (each_wall - one_wall) / len(blocks),
                "one_process_mvox_s": voxels / one_wall / 1e6,
                "process_per_block_mvox_s": voxels / each_wall / 1e6,
                "outputs_identical": same["max_abs_dp"] == 0.0,
                "max_abs_dp_between": same["max_abs_dp"],
            }

    gflops_after = matmul_gflops()
    first = runs[precisions[0]]
    report = {
        "block": f"{args.size}^3, chunks {args.chunk}^3",
        "precision": precisions[0],
        **{k: v for k, v in first.items() if "_vs_" not in k and not k.startswith("foreground")},
        "machine_matmul_gflops": gflops_machine,
        "machine_matmul_gflops_after": gflops_after,
        "segment_block_options": {k: repr(v) for k, v in kwargs.items()},
        "reference_precision": reference,
        "by_precision": runs,
    }
    if blocks_report is not None:
        report["blocks_in_one_process"] = blocks_report

    print()
    print(f"{'block':32s} {report['block']}")
    print(f"{'machine_matmul_gflops':32s} {gflops_machine:.1f} before, {gflops_after:.1f} after")
    ok = {p: r for p, r in runs.items() if "error" not in r}
    if ok:
        keys = list(dict.fromkeys(k for r in ok.values() for k in r))
        print_table(ok, keys)
    for p, r in runs.items():
        if "error" in r:
            print(f"{p}: error: {r['error']}")
    if blocks_report is not None:
        print()
        for k, v in blocks_report.items():
            if isinstance(v, float):
                print(f"{k:32s} {v:.3f}")
            elif isinstance(v, list) and v and isinstance(v[0], float):
                print(f"{k:32s} {', '.join(f'{x:.2f}' for x in v)}")
            elif k != "blocks":
                print(f"{k:32s} {v}")
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nreport: {work / 'report.json'}")


if __name__ == "__main__":
    main()
