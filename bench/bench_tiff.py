#!/usr/bin/env python3
"""Benchmark: convert a 2048x2048x512 uint16 TIFF series (4 GiB) to N5 with 512^3 gzip chunks.

Two series are made once (and kept in the work folder): uncompressed slices with one strip each,
as ImageJ writes them, and slices with zlib-compressed strips of 32 rows. Each is converted by
``tiff_to_n5`` in a child process; the report gives MB/s of raw image data (wall seconds of the
whole child, Python start-up included) and the child's peak RSS (``ru_maxrss``, mapped file
pages included). The slices are read from the page cache when the machine has the memory to
keep them there (warm cache: this measures the converter, not the disk).

    .venv/bin/python bench/bench_tiff.py [--shape 2048,2048,512] [--chunks 512] [--threads N]
                                         [--memory-gb 1.5] [--compression gzip] [--variants raw,zlib]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHILD = """
import json, sys, time
from exllsm_neuronseg.tiff import tiff_to_n5
args = json.loads(sys.argv[1])
t = time.perf_counter()
r = tiff_to_n5(args["input"], args["output"], "s0", args["chunks"], compression=args["compression"],
               threads=args["threads"], memory_limit=args["memory"], overwrite=True)
print(json.dumps({"chunks": r.chunks_written, "convert_s": time.perf_counter() - t, "bytes": r.bytes_read}))
"""


def make_series(folder: Path, shape: tuple[int, int, int], variant: str) -> None:
    """Slices with microscope-like content: noise around a background, a slowly moving bright blob."""
    import numpy as np
    import tifffile

    done = folder / ".complete"
    if done.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    x, y, z = shape
    rng = np.random.default_rng(0)
    noise = [rng.normal(100, 12, (y, x)).clip(0, 65535).astype(np.uint16) for _ in range(8)]
    yy, xx = np.mgrid[0:y, 0:x]
    kwargs = {"imagej": True, "resolution": (1 / 0.104, 1 / 0.104), "metadata": {"unit": "um"}}
    if variant == "zlib":
        kwargs = {"compression": "zlib", "compressionargs": {"level": 1}, "rowsperstrip": 32, "maxworkers": 2}
    for k in range(z):
        cy, cx = y / 2 + y / 4 * np.sin(k / 40), x / 2 + x / 4 * np.cos(k / 40)
        blob = (2000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (x / 16) ** 2))).astype(np.uint16)
        tifffile.imwrite(folder / f"slice_{k:04d}.tif", np.roll(noise[k % 8], k, axis=1) + blob, **kwargs)
    done.touch()


def convert(folder: Path, out: Path, chunks: int, compression: str, threads: int | None, memory: float) -> dict:
    args = {"input": str(folder), "output": str(out), "chunks": [chunks] * 3, "compression": compression,
            "threads": threads, "memory": int(memory * 1e9)}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    output = proc.stdout.read()
    proc.stdout.close()
    if status != 0:
        raise SystemExit(f"conversion failed (status {status})")
    result = json.loads(output.strip().splitlines()[-1])
    result.update(wall_s=wall, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9, user_s=usage.ru_utime, sys_s=usage.ru_stime)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,2048,512", help="x,y,z")
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-gb", type=float, default=1.5)
    parser.add_argument("--compression", default="gzip")
    parser.add_argument("--variants", default="raw,zlib")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "tiff"))
    parser.add_argument("--keep-output", action="store_true")
    args = parser.parse_args()

    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(args.workdir)
    for variant in args.variants.split(","):
        folder = work / f"series_{variant}_{'x'.join(map(str, shape))}"
        t = time.perf_counter()
        make_series(folder, shape, variant)  # type: ignore[arg-type]
        print(f"{variant}: series {folder} ready in {time.perf_counter() - t:.1f} s", flush=True)
        out = work / f"out_{variant}.n5"
        r = convert(folder, out, args.chunks, args.compression, args.threads, args.memory_gb)
        mb = r["bytes"] / 1e6
        print(
            f"{variant}: {mb:.0f} MB raw, {r['chunks']} chunks of {args.chunks}^3, {args.compression}: "
            f"{r['wall_s']:.1f} s wall = {mb / r['wall_s']:.0f} MB/s (conversion alone {r['convert_s']:.1f} s = "
            f"{mb / r['convert_s']:.0f} MB/s; cpu user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s), "
            f"peak RSS {r['peak_rss_gb']:.2f} GB",
            flush=True,
        )
        if not args.keep_output:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
