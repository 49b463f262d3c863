#!/usr/bin/env python3
"""Benchmark: segment one 512^3 block of a synthetic uint16 N5 volume (128^3 gzip chunks).

Reports end-to-end Mvox/s (output voxels / wall seconds of the whole segment_volume.py process,
TensorFlow start-up included), the seconds spent reading, computing and writing, peak RSS, and,
measured in the same run, this machine's float32 matrix-multiply GFLOP/s (numpy) beside the
model GFLOP/s achieved.

    .venv/bin/python bench/bench_segment.py [--size 512] [--chunk 128] [--model PATH] [-- --name value ...]

Extra ``--name value`` pairs after ``--`` are keyword arguments of ``segment_block`` (values are
Python literals), e.g. ``-- --input_shape "(220,220,220)"`` for the host's tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


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
    scale = size // 128
    spec = SyntheticSpec(shape=(size,) * 3, n_tubes=6 * scale, n_puncta=30 * scale**3, seed=1)
    write_synthetic_n5(str(path), "c1/s0", spec, chunks=(chunk,) * 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "neuron_2021.h5"))
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--scaling", type=float, default=0.00045)
    parser.add_argument("extra", nargs="*", help="segment_block keyword arguments after --: --name value ...")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inp = work / f"input_{args.size}_{args.chunk}.n5"
    t = time.perf_counter()
    make_input(inp, args.size, args.chunk)
    print(f"input {inp} ready in {time.perf_counter() - t:.1f} s", flush=True)

    gflops_machine = matmul_gflops()
    out = work / "output.n5"
    subprocess.run(
        [sys.executable, str(ROOT / "bin" / "create_volume.py"), "-i", str(inp), "-id", "/c1/s0",
         "-o", str(out), "-od", "/seg/s0", "--overwrite"],
        check=True, capture_output=True,
    )
    stats = work / "stats.json"
    child = f"""
import json, resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {str(ROOT / 'src')!r})
from exllsm_neuronseg.segment import segment_block
from exllsm_neuronseg.volume import open_volume
extra = {args.extra!r}
kw = {{}}
for i in range(0, len(extra), 2):
    kw[extra[i].lstrip('-').replace('-', '_')] = eval(extra[i + 1])
src = open_volume({str(inp)!r}, 'c1/s0')
dst = open_volume({str(out)!r}, 'seg/s0', mode='r+')
n = {args.size}
r = segment_block(src, dst, {args.model!r}, (0, 0, 0), (n, n, n), scaling={args.scaling}, skip_done=False, **kw)
wall = time.perf_counter() - t0
json.dump(dict(wall=wall, block_seconds=r.seconds, read=r.read_seconds, compute=r.compute_seconds,
               write=r.write_seconds, tiles=r.tiles, flops=r.flops,
               maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6),
          open({str(stats)!r}, 'w'))
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", child], check=True, env=env)
    process_wall = time.perf_counter() - t
    s = json.loads(stats.read_text())
    voxels = args.size**3
    report = {
        "block": f"{args.size}^3, chunks {args.chunk}^3",
        "end_to_end_mvox_s": voxels / process_wall / 1e6,
        "process_wall_s": process_wall,
        "block_seconds": s["block_seconds"],
        "block_mvox_s": voxels / s["block_seconds"] / 1e6,
        "read_s": s["read"],
        "compute_s": s["compute"],
        "write_s": s["write"],
        "tiles": s["tiles"],
        "peak_rss_gb": s["maxrss_gb"],
        "machine_matmul_gflops": gflops_machine,
        "model_gflops_during_compute": s["flops"] / s["compute"] / 1e9,
        "model_gflops_end_to_end": s["flops"] / process_wall / 1e9,
        "machine_matmul_gflops_after": matmul_gflops(),
    }
    for k, v in report.items():
        print(f"{k:30s} {v:.3f}" if isinstance(v, float) else f"{k:30s} {v}")
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
