#!/usr/bin/env python
"""Images/s of `generate --ray` and `score --ray` with 1, 2, ... N workers, the scaling efficiency, and
Ray's start-up cost.

For each worker count a fresh run directory is generated over a fresh Ray instance (or the cluster at
``--address``). Three times are reported apart: Ray's start (``ray.init``), the workers' start (actor
processes, imports, pipeline loading) and the work itself; images/s and the efficiency
``rate(N) / (N x rate(1))`` count the work only. On the CPU each worker is one process on one core, so
the figures are only meaningful up to the number of free cores. Then the first run's images are scored
over Ray with each worker count (fresh copies without scores; ``--scorers``, tiny offline text models with
the tiny pipeline), reported the same way, the driver's assembly of records.parquet apart.

    python benchmarks/scale_throughput.py                         # CPU workers, tiny pipeline
    python benchmarks/scale_throughput.py --workers 1 2 4 8 --model CompVis/stable-diffusion-v1-4 \\
        --size 512 --faces 8 --seeds 4                            # a node with 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import sys
import tempfile
from pathlib import Path

from f2d_bench.config import config_from_dict
from f2d_bench.faces.source import resolve_face_set
from f2d_bench.launch.ray_executor import run_with_ray
from f2d_bench.pipelines.loading import TINY_SD14_ID


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: a local instance per count)")
    ap.add_argument("--model", default=TINY_SD14_ID, help="model.pretrained (default: the tiny offline pipeline)")
    ap.add_argument("--device", default="auto", help="model.device: auto (GPU workers when there are GPUs) or cpu")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--faces", type=int, default=4, help="how many of the shipped test faces")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shards-per-worker", type=int, default=4)
    ap.add_argument("--scorers", default="clip,siglip", help="scorers timed over Ray ('' to skip scoring)")
    args = ap.parse_args()
    tiny = args.model == TINY_SD14_ID

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per CPU worker, as Ray gives it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        face_dir = Path(tmp) / "faces"
        face_dir.mkdir()
        for f in resolve_face_set("builtin:test-faces")[: args.faces]:
            (face_dir / f"{f.face_id}.png").symlink_to(f.path)
        cfg = config_from_dict({
            "name": "scale", "faces": str(face_dir), "prompts": "smoke", "seeds": list(range(args.seeds)),
            "model": {"pretrained": args.model, "device": args.device},
            "sampling": {"num_inference_steps": args.steps, "height": args.size, "width": args.size},
            "batch_size": args.batch_size, "methods": [{"name": "sd-class"}],
            # With the tiny pipeline, text scorers whose weights need no download.
            "scoring": {"device": args.device, "batch_size": args.batch_size,
                        "settings": {"clip": {"model": "tiny"}, "siglip": {"model": "tiny"}} if tiny else {}},
        })
        for n in args.workers:
            s = run_with_ray("generate", cfg, Path(tmp) / f"run-{n}", address=args.address, workers=n,
                             shards=args.shards_per_worker * n, progress=False)
            assert s.complete and s.written == s.expected, s.text()
            rows.append((n, s))
            print(f"{n} {s.worker_kind} worker(s): {s.images_per_second:.2f} images/s "
                  f"({s.written} images in {s.work_seconds:.1f} s), start-up: Ray {s.init_seconds:.1f} s + "
                  f"first worker ready {s.ready_seconds:.1f} s", flush=True)
        scorers = [n for n in args.scorers.split(",") if n]
        scored = []
        for n in args.workers if scorers else []:
            out = Path(tmp) / f"score-{n}"
            shutil.copytree(Path(tmp) / f"run-{args.workers[0]}", out,
                            ignore=shutil.ignore_patterns("scores", "records.parquet", "table1.csv"))
            t0 = time.perf_counter()
            s = run_with_ray("score", cfg, out, address=args.address, workers=n, scorers=scorers,
                             shards=args.shards_per_worker * n, progress=False)
            assert s.complete and s.scored == s.expected, s.text()
            assemble = time.perf_counter() - t0 - s.init_seconds - s.ready_seconds - s.work_seconds
            scored.append((n, s, assemble))
            print(f"score, {n} worker(s): {s.images_per_second:.2f} images/s ({s.scored} images in "
                  f"{s.work_seconds:.1f} s), assembly {assemble:.1f} s", flush=True)

    base = next((s.images_per_second for n, s in rows if n == 1), None)
    print(f"\n{args.model}, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
          f"{rows[0][1].expected} images per run")
    print(f"{'workers':>7} {'images/s':>9} {'efficiency':>10} {'ray.init s':>10} {'1st worker ready s':>18} {'work s':>7}")
    for n, s in rows:
        eff = f"{100 * s.images_per_second / (n * base):.0f}%" if base else "-"
        print(f"{n:>7} {s.images_per_second:>9.2f} {eff:>10} {s.init_seconds:>10.1f} {s.ready_seconds:>18.1f} "
              f"{s.work_seconds:>7.1f}")
    if scored:
        base = next((s.images_per_second for n, s, _ in scored if n == 1), None)
        print(f"\nscore --ray ({args.scorers}), {scored[0][1].expected} images per run")
        print(f"{'workers':>7} {'images/s':>9} {'efficiency':>10} {'ray.init s':>10} {'1st worker ready s':>18} "
              f"{'work s':>7} {'assembly s':>10}")
        for n, s, assemble in scored:
            eff = f"{100 * s.images_per_second / (n * base):.0f}%" if base else "-"
            print(f"{n:>7} {s.images_per_second:>9.2f} {eff:>10} {s.init_seconds:>10.1f} {s.ready_seconds:>18.1f} "
                  f"{s.work_seconds:>7.1f} {assemble:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
