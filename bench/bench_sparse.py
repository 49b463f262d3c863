#!/usr/bin/env python3
"""Benchmark: a sparse volume (most chunks missing) segmented with constant-tile skipping on and off.

The input is a 1024x1024x512 uint16 N5 volume with 128^3 gzip chunks of which 70% are missing:
never written, so they read as zero, as in stitched ExLLSM volumes where no tile covered that
space.  The present chunks hold the synthetic neurons of :mod:`exllsm_neuronseg.synthetic` (one
synthetic volume of the present chunks' bounding box, written chunk by chunk; background noise
everywhere in them, so no present chunk is constant).

Layout of the present chunks (``--layout``): a compact blob, the ``round((1 - missing) * chunks)``
chunks whose centres lie nearest to a point, distances measured in fractions of the volume's edge
per axis (an ellipsoid shaped like the volume; ties in x-fastest chunk order):

* ``edge`` (default): the point is the middle of the x=0, y=0 edge, (0, 0, 0.5): the tissue fills
  one side of the piece and all of its depth, as a 1024x1024x512 piece cut from the edge of a
  large stitched volume looks;
* ``corner``: the point is the corner (0, 0, 0);
* ``centre``: the centre of the volume (tissue surrounded by a thin empty shell).

The layout decides what skipping can gain.  A tile is skipped only when its whole input window
(its output box plus 44 voxels of context on every side, reflected at the image border) lies in
missing chunks; with the default 348x348x220 tiles each window touches 4x4x3 chunks of 128^3, so
the tissue's boundary layer costs a full tile wherever it passes.  The report therefore gives,
from geometry alone (no model), how many tiles have an all-empty input window and the bound it
puts on the speed-up (tiles / tiles that still run the model), for the chosen layout and for
each of the others; for the defaults: edge 28 of 64 tiles empty (bound 1.78x), corner 13 (1.25x),
centre 0 (1.00x).  No layout of 30% of the chunks does much better: the best axis-aligned box of
at least 30% of them (3x7x4 chunks in a corner) has a bound of 2.0x.  It also gives the share of output
voxels whose own input window touches a present chunk, the bound of a skip exact to the voxel
with no cost per tile: edge 37.0% (2.70x), corner 40.1% (2.49x), centre 48.3% (2.07x).

The volume is segmented twice, each in its own child process (one model load, the volume's
blocks of ``--block``^3 by ``segment_blocks``, as one job of several blocks would): with
``skip_constant=False`` and with ``skip_constant=True``, each into a fresh output dataset (no
recorded constant answers carried over).  Reported: the wall of each process, the speed-up,
model / constant tiles of each, max |Δp| and binary-mask (p > 0.5) agreement between the two
outputs (fraction of voxels and Dice of the foreground), peak RSS, and numpy float32 matmul
GFLOP/s before and after the runs.

    .venv/bin/python bench/bench_sparse.py [--shape 1024,1024,512] [--chunk 128] [--missing 0.7]
        [--layout edge|corner|centre] [--tile X,Y,Z] [--block 512] [--precision fp32]
        [--workdir bench/results/sparse] [--keep]

Without ``--keep`` the input and output containers are deleted at the end (the report stays);
with it they stay and the input is reused by the next run with the same settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_segment import DEFAULT_MODEL, compare_outputs, fresh_output, matmul_gflops, run_child  # noqa: E402

LAYOUTS = {"edge": (0.0, 0.0, 0.5), "corner": (0.0, 0.0, 0.0), "centre": (0.5, 0.5, 0.5)}


def parse_triple(text: str, name: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"error: {name} {text!r}: give x,y,z positive integers")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def present_chunks(counts: tuple[int, int, int], n_present: int, layout: str):
    """Boolean array (x,y,z chunk indices): the ``n_present`` chunks nearest to the layout's point."""
    import numpy as np

    idx = np.array(list(itertools.product(*(range(n) for n in counts))))  # x,y,z per row
    pos = (idx + 0.5) / np.array(counts)
    distance = ((pos - np.array(LAYOUTS[layout])) ** 2).sum(axis=1)
    order = np.lexsort((idx[:, 0], idx[:, 1], idx[:, 2], distance))  # by distance, then z, y, x
    present = np.zeros(counts, dtype=bool)
    for i in order[:n_present]:
        present[tuple(idx[i])] = True
    return present


def tile_census(shape, chunk: int, present, grid, blocks) -> dict:
    """Tiles of the run (per block, as segment counts them) and how many have an input window
    (reflected at the image border) that touches no present chunk."""
    import numpy as np

    from exllsm_neuronseg.geometry import reflect_index

    total = empty = 0
    for block in blocks:
        for index in grid.tiles(block):
            total += 1
            box = grid.input_box(index)
            touched = [
                np.unique(reflect_index(np.arange(s, e), n) // chunk) for s, e, n in zip(box.start, box.end, shape)
            ]
            if not present[np.ix_(*touched)].any():
                empty += 1
    return {
        "tiles": total,
        "empty_window_tiles": empty,
        "speedup_bound": total / (total - empty) if total > empty else math.inf,
    }


def voxel_census(shape, chunk: int, present, context) -> dict:
    """The share of output voxels whose own input window (the voxel +- the context) touches a
    present chunk: what even a skip exact to the voxel, at no cost per tile, would still run.
    Computed on a grid of the greatest common divisor of the chunk edge and the context (exact:
    present chunks and their dilation both end on that grid); the window clipped at the image
    border is the same set as reflected (the reflected part lies inside the voxel's own window)."""
    import numpy as np
    from scipy import ndimage

    cells = []
    for n, c in zip(shape, context):
        cells.append(math.gcd(chunk, c, n))
    fine = present
    for axis, cell in enumerate(cells):
        fine = np.repeat(fine, chunk // cell, axis=axis)
    fine = fine[tuple(slice(0, -(-n // cell)) for n, cell in zip(shape, cells))]
    size = [2 * (c // cell) + 1 for c, cell in zip(context, cells)]
    needed = ndimage.maximum_filter(fine, size=size, mode="constant", cval=False)
    weights = [np.minimum(cell, n - np.arange(0, n, cell)) for n, cell in zip(shape, cells)]  # edge cells
    w = weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]
    share = float((w * needed).sum() / w.sum())
    return {"needed_voxel_fraction": share, "voxel_speedup_bound": 1 / share if share else math.inf}


def make_input(path: Path, shape, chunk: int, present, seed: int) -> float:
    """Write the present chunks (one synthetic volume of their bounding box); return seconds."""
    import numpy as np

    from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume
    from exllsm_neuronseg.volume import create_volume

    marker = path / ".complete"
    if marker.is_file():
        return 0.0
    t = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    vol = create_volume(str(path), "c1/s0", tuple(shape), (chunk,) * 3, "uint16")
    where = np.argwhere(present)
    lo = where.min(axis=0) * chunk
    hi = np.minimum((where.max(axis=0) + 1) * chunk, shape)
    extent = tuple(int(v) for v in hi - lo)
    scale = (math.prod(extent) / 128**3) ** (1 / 3)  # the density of bench_segment's 512^3 input
    spec = SyntheticSpec(shape=extent, n_tubes=max(1, round(6 * scale)), n_puncta=round(30 * scale**3), seed=seed)
    image, _ = synthetic_volume(spec)  # x,y,z
    for c in where:
        start = c * chunk
        end = np.minimum(start + chunk, shape)
        piece = image[tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(start, end, lo))]
        vol.write_chunk(tuple(int(v) for v in start), np.ascontiguousarray(piece.transpose(2, 1, 0)))
    del image
    marker.write_text("")
    return time.perf_counter() - t


def count_chunk_files(path: Path) -> int:
    """Chunk files of the N5 dataset at ``path`` (x/y/z numbered files)."""
    return sum(1 for p in path.rglob("*") if p.is_file() and p.name.isdigit() and p.parent.name.isdigit())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024,1024,512", help="volume x,y,z")
    parser.add_argument("--size-x", type=int)
    parser.add_argument("--size-y", type=int)
    parser.add_argument("--size-z", type=int)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--missing", type=float, default=0.7, help="fraction of chunks never written")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="edge")
    parser.add_argument("--tile", help="model input tile x,y,z (default: the library's choice for the volume)")
    parser.add_argument("--block", type=int, default=512, help="block edge (a multiple of the chunk)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--scaling", type=float, default=0.00045)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "sparse"))
    parser.add_argument("--keep", action="store_true", help="keep the input and outputs (the input is reused)")
    args = parser.parse_args()

    import numpy as np

    from exllsm_neuronseg.geometry import Box, grid_cells
    from exllsm_neuronseg.inference import Predictor

    shape = list(parse_triple(args.shape, "--shape"))
    for axis, v in enumerate((args.size_x, args.size_y, args.size_z)):
        if v is not None:
            shape[axis] = v
    shape = tuple(shape)
    if not 0 <= args.missing < 1:
        parser.error("--missing must be in [0, 1)")
    if args.block % args.chunk:
        parser.error(f"--block {args.block} must be a multiple of --chunk {args.chunk}")
    counts = tuple(-(-s // args.chunk) for s in shape)
    n_chunks = math.prod(counts)
    n_present = max(1, round((1 - args.missing) * n_chunks))
    present = present_chunks(counts, n_present, args.layout)

    tile = parse_triple(args.tile, "--tile") if args.tile else None
    grid = Predictor(args.model, tile, image_shape=shape, axes="zyx").grid  # reads the model file only
    blocks = grid_cells(Box((0, 0, 0), shape), (args.block,) * 3)
    census = tile_census(shape, args.chunk, present, grid, blocks)
    voxels_needed = voxel_census(shape, args.chunk, present, grid.context)
    other_layouts = {
        name: tile_census(shape, args.chunk, present_chunks(counts, n_present, name), grid, blocks)
        for name in LAYOUTS
        if name != args.layout
    }
    print(
        f"volume {'x'.join(map(str, shape))}, {n_present} of {n_chunks} chunks of {args.chunk}^3 present "
        f"({args.layout}); tiles {'x'.join(map(str, grid.input_shape))}: {census['tiles']} in "
        f"{len(blocks)} blocks, {census['empty_window_tiles']} with an all-empty input window "
        f"(speed-up bound {census['speedup_bound']:.2f}x); voxels whose window touches tissue "
        f"{voxels_needed['needed_voxel_fraction']:.1%} (bound of a skip exact to the voxel "
        f"{voxels_needed['voxel_speedup_bound']:.2f}x)",
        flush=True,
    )

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{'x'.join(map(str, shape))}_{args.chunk}_{args.missing:g}_{args.layout}_{args.seed}"
    inp = work / f"sparse_input_{tag}.n5"
    gen_s = make_input(inp, shape, args.chunk, present, args.seed)
    files = count_chunk_files(inp / "c1" / "s0")
    print(f"input {inp}: {files} chunk files" + (f", written in {gen_s:.1f} s" if gen_s else " (kept)"), flush=True)
    if files != n_present:
        raise SystemExit(f"error: {inp} holds {files} chunk files, expected {n_present}")

    gflops_before = matmul_gflops()
    print(f"machine matmul: {gflops_before:.1f} GFLOP/s (float32, numpy)", flush=True)
    out = work / "sparse_output.n5"
    kw = {"input_shape": grid.input_shape} if tile else {}
    common = dict(model=args.model, input_path=inp, input_dataset="c1/s0", output_path=out,
                  scaling=args.scaling, precision=args.precision, many=True,
                  blocks=[(b.start, b.end) for b in blocks])
    runs = {}
    for name, skip in (("skip_off", False), ("skip_on", True)):
        fresh_output(out, f"{name}/s0", shape, (args.chunk,) * 3)
        s = run_child(work, name, output_dataset=f"{name}/s0", kwargs={**kw, "skip_constant": skip}, **common)
        if "error" in s:
            raise SystemExit(f"error: the {name} run failed: {s['error']}")
        runs[name] = s
        print(f"{name}: {s['process_wall']:.1f} s, {s['model_tiles']} model tiles, {s['constant_tiles']} constant",
              flush=True)
    cmp = compare_outputs(out, "skip_off/s0", "skip_on/s0")
    gflops_after = matmul_gflops()

    voxels = math.prod(shape)
    off, on = runs["skip_off"], runs["skip_on"]
    per_run = {
        name: {
            "process_wall_s": s["process_wall"],
            "end_to_end_mvox_s": voxels / s["process_wall"] / 1e6,
            "block_seconds": s["block_seconds"],
            "read_s": s["read"],
            "compute_s": s["compute"],
            "write_s": s["write"],
            "tiles": s["tiles"],
            "model_tiles": s["model_tiles"],
            "constant_tiles": s["constant_tiles"],
            "peak_rss_gb": s["maxrss_gb"],
            "per_block_seconds": s["per_block_seconds"],
        }
        for name, s in runs.items()
    }
    report = {
        "volume": f"{'x'.join(map(str, shape))} uint16, chunks {args.chunk}^3",
        "chunks": n_chunks,
        "chunks_present": n_present,
        "missing_fraction": 1 - n_present / n_chunks,
        "layout": args.layout,
        "layout_point": LAYOUTS[args.layout],
        "present_chunk_bounding_box_chunks": [np.argwhere(present).min(0).tolist(), (np.argwhere(present).max(0) + 1).tolist()],
        "tile_input_shape": grid.input_shape,
        "blocks": len(blocks),
        "block_edge": args.block,
        "precision": args.precision,
        "geometry": census,
        "geometry_per_voxel": voxels_needed,
        "geometry_other_layouts": other_layouts,
        "machine_matmul_gflops": gflops_before,
        "machine_matmul_gflops_after": gflops_after,
        "skip_off": per_run["skip_off"],
        "skip_on": per_run["skip_on"],
        "speedup": off["process_wall"] / on["process_wall"],
        "speedup_block_seconds": off["block_seconds"] / on["block_seconds"],
        "constant_tiles_match_geometry": on["constant_tiles"] == census["empty_window_tiles"],
        **cmp,
    }
    report["foreground_fraction_skip_off"] = report.pop("foreground_fraction_reference")
    report["foreground_fraction_skip_on"] = report.pop("foreground_fraction")

    print()
    print(f"{'volume':30s} {report['volume']}, {n_present}/{n_chunks} chunks present, layout {args.layout}")
    print(f"{'machine_matmul_gflops':30s} {gflops_before:.1f} before, {gflops_after:.1f} after")
    print(f"{'tiles (all-empty window)':30s} {census['tiles']} ({census['empty_window_tiles']}), "
          f"bound {census['speedup_bound']:.2f}x; other layouts: "
          + ", ".join(f"{k} {v['empty_window_tiles']} ({v['speedup_bound']:.2f}x)" for k, v in other_layouts.items()))
    print(f"{'voxels needing the model':30s} {voxels_needed['needed_voxel_fraction']:.1%}, "
          f"bound of a per-voxel skip {voxels_needed['voxel_speedup_bound']:.2f}x")
    print(f"{'':30s}{'skip_off':>14s}{'skip_on':>14s}")
    for k in ("process_wall_s", "end_to_end_mvox_s", "block_seconds", "read_s", "compute_s", "write_s",
              "model_tiles", "constant_tiles", "peak_rss_gb"):
        a, b = per_run["skip_off"][k], per_run["skip_on"][k]
        print(f"{k:30s}" + "".join(f"{v:14.3f}" if isinstance(v, float) else f"{v:14d}" for v in (a, b)))
    for k in ("speedup", "speedup_block_seconds", "constant_tiles_match_geometry", "max_abs_dp", "mask_agreement",
              "mask_differing_voxels", "dice_foreground", "foreground_fraction_skip_off",
              "foreground_fraction_skip_on"):
        v = report[k]
        print(f"{k:30s} {v:.6g}" if isinstance(v, float) else f"{k:30s} {v}")
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nreport: {work / 'report.json'}")
    if not args.keep:
        shutil.rmtree(inp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        for name in runs:
            (work / f"stats_{name}.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
