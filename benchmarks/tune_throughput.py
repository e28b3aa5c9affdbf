#!/usr/bin/env python
"""Seconds of per-face tuning for each tuning baseline, beside the paper's Table 2 (one A100).

Each method tunes one face for ``--steps`` updates on the same pipeline (after a warm-up tuning of one
step); the time per update, times the method's default number of updates, is the projected tuning time
per face at the official settings. Class images (DreamBooth, CustomDiffusion) are rendered once per
run: their time is printed apart and not counted per face. On a shared CPU only the ratios between
methods mean something; run it on a GPU for absolute figures.

    python benchmarks/tune_throughput.py                                  # CPU, tiny pipeline
    python benchmarks/tune_throughput.py --unet-config sd14 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from f2d_bench.config import config_from_dict
from f2d_bench.engine import build_methods
from f2d_bench.faces.source import resolve_face_set
from f2d_bench.prompts import load_prompt_set
from generate_throughput import benchmark_pipeline  # benchmarks/ is this script's folder

#: Table 2 of the paper (seconds per face on one A100); TI and DreamBooth are not in it.
PAPER_SECONDS = {"custom-diffusion": 140.0, "celeb-basis": 220.0}
#: Offline stand-ins for the files a user supplies, and few class images (timed apart).
EXTRA = {"celeb-basis": {"backbone": "random", "names": "random"},
         "custom-diffusion": {"num_class_images": 2}, "dreambooth": {"num_class_images": 2}}
METHODS = ("textual-inversion", "custom-diffusion", "dreambooth", "dreambooth-lora", "celeb-basis")


def method_config(name: str, steps: int) -> dict:
    if name == "dreambooth-lora":
        return {"name": "dreambooth", "label": name, "params": {"variant": "lora", "steps": steps,
                                                                "num_class_images": 2}}
    return {"name": name, "params": {"steps": steps, **EXTRA.get(name, {})}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet-config", choices=["tiny", "sd14"], default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=5, help="updates timed per method")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()

    pipe = benchmark_pipeline(args.unet_config, dtype=args.dtype, device=args.device)
    device = pipe.device
    face = resolve_face_set("builtin:test-faces")[0]
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {pipe.unet.dtype}, unet {args.unet_config}, training at {size}x{size}, {args.steps} timed updates")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            def build(steps):
                cfg = config_from_dict({
                    "name": "bench", "faces": "builtin:test-faces", "prompts": "smoke", "seeds": [0],
                    "model": {"pretrained": f"benchmark/{args.unet_config}", "dtype": "auto", "device": "auto"},
                    "sampling": {"num_inference_steps": 4, "height": size, "width": size},
                    "methods": [method_config(name, steps)]})
                [m] = build_methods(cfg, load_prompt_set("smoke"), pipeline=lambda: pipe)
                m.shared_dir = Path(tmp) / name / "shared"
                return m

            warm = build(1)
            work = Path(tempfile.mkdtemp(dir=tmp))
            sync(); t0 = time.perf_counter()
            warm.tune(face, work)  # class images, kernels, allocator: not counted
            sync(); t_warm = time.perf_counter() - t0
            method = build(args.steps)
            work = Path(tempfile.mkdtemp(dir=tmp))
            sync(); t0 = time.perf_counter()
            facts = method.tune(face, work)
            sync(); seconds = time.perf_counter() - t0
            per_step = seconds / args.steps
            official_steps = type(method).defaults["steps"]
            rows.append((name, per_step, official_steps, per_step * official_steps, facts["trained_params"], t_warm))
            losses = [float(v) for v in facts.get("losses", [])]
            finite = all(v == v and abs(v) != float("inf") for v in losses)
            checks.append(f"{name}: loss scaling {'on' if facts.get('loss_scaling') else 'off'}, losses "
                          f"{', '.join(f'{v:.4g}' for v in losses)} ({'all finite' if finite else 'NOT FINITE'})")

    print(f"{'method':<18} {'s/update':>9} {'updates':>8} {'s/face (proj.)':>15} {'paper A100':>11} {'#params':>12}")
    for name, per_step, steps, projected, params, _ in rows:
        paper = PAPER_SECONDS.get(name)
        print(f"{name:<18} {per_step:9.3f} {steps:8d} {projected:15.1f} "
              f"{(f'{paper:.0f} s' if paper else '-'):>11} {params:12,d}")
    base = rows[0][3] if rows else 0
    if base:
        print("ratios to " + rows[0][0] + ": " + ", ".join(f"{n} {p / base:.2f}x" for n, _, _, p, _, _ in rows))
    print("first tuning of each method (1 update + class images + warm-up): "
          + ", ".join(f"{n} {w:.1f} s" for n, *_, w in rows))
    # In float16 the losses must stay finite under dynamic loss scaling (an overflowing update is skipped).
    print("\n".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
