#!/usr/bin/env python
"""Images/s of the generation engine against the naive loop of the official scripts, same pipeline.

The naive loop makes one pipeline call per (face, prompt) with ``num_images_per_prompt`` = number of
seeds, as official inference scripts do, and saves each PNG. The engine batches across faces, prompts
and seeds (``--batch-size``) with one generator per image and writes atomically with manifests. Both
render the same grid; the ratio engine/naive is the figure to read (absolute numbers on a shared CPU
mean little).

    python benchmarks/generate_throughput.py                       # CPU, tiny pipeline
    python benchmarks/generate_throughput.py --unet-config sd14 --device cuda --size 512 --faces 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.faces.source import resolve_face_set
from f2d_bench.pipelines.loading import TINY_SD14_ID, load_sd_pipeline
from f2d_bench.prompts import load_prompt_set

# Dense fp16/bf16 tensor-core peak (no sparsity), FLOP/s, by device name.
PEAK_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12}


def peak_for(name: str) -> tuple[str, float] | None:
    for key, value in PEAK_FLOPS.items():
        if all(part in name for part in key.split()):
            return key, value
    if "H100" in name:  # HBM3 SXM parts report as "NVIDIA H100 80GB HBM3"
        return "H100 SXM", PEAK_FLOPS["H100 SXM"]
    return None


def unet_flops_per_image_step(pipe, size: int) -> float:
    """FLOPs of one UNet forward for one image with classifier-free guidance (batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    latent = size // pipe.vae_scale_factor
    dev, dt = unet.device, unet.dtype
    x = torch.randn(2, unet.config.in_channels, latent, latent, device=dev, dtype=dt)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device=dev, dtype=dt)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500, 500], device=dev), encoder_hidden_states=ctx)
    return float(counter.get_total_flops())


def benchmark_pipeline(unet_config: str, *, dtype: str, device: str):
    """``tiny``: the offline tiny pipeline; ``sd14``: SD 1.4's full-size components with random weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if unet_config == "sd14":
        from f2d_bench.pipelines.random_sd14 import build_random_sd14

        pipe = build_random_sd14(dtype=dtype, device=device)
    else:
        pipe = load_sd_pipeline(TINY_SD14_ID, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def naive_loop(pipe, faces, prompt_set, seeds, steps, size, out: Path) -> int:
    """One call per (face, prompt), all seeds at once: the official scripts' shape."""
    n = 0
    subject = prompt_set.class_phrase
    for face in faces:
        for prompt in prompt_set.all_prompts():
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            images = pipe(prompt=prompt.render(subject), num_images_per_prompt=len(seeds), generator=gens,
                          num_inference_steps=steps, guidance_scale=7.0, height=size, width=size).images
            for seed, image in zip(seeds, images):
                image.save(out / f"{face.face_id}-{prompt.id}-{seed}.png")
                n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet-config", choices=["tiny", "sd14"], default="tiny",
                    help="tiny: the offline tiny pipeline; sd14: SD 1.4's full-size components, random weights")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--faces", type=int, default=4, help="how many of the shipped test faces")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--prompts", default="smoke")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[16], help="engine batch size(s) to compare")
    args = ap.parse_args()

    pipe = benchmark_pipeline(args.unet_config, dtype=args.dtype, device=args.device)
    device = pipe.device
    faces = resolve_face_set("builtin:test-faces")[: args.faces]
    prompt_set = load_prompt_set(args.prompts)
    seeds = list(range(args.seeds))
    n_images = len(faces) * len(prompt_set.all_prompts()) * len(seeds)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {pipe.unet.dtype}, unet {args.unet_config}, {args.size}x{args.size}, {args.steps} steps, "
          f"{len(faces)} faces x {len(prompt_set.all_prompts())} prompts x {len(seeds)} seeds = {n_images} images")

    with tempfile.TemporaryDirectory() as tmp:
        face_dir = Path(tmp) / "faces"
        face_dir.mkdir()
        for f in faces:
            (face_dir / f"{f.face_id}.png").symlink_to(f.path)
        cfg = config_from_dict({
            "name": "bench", "faces": str(face_dir), "prompts": args.prompts, "seeds": seeds,
            "model": {"pretrained": f"benchmark/{args.unet_config}", "dtype": "auto", "device": "auto"},
            "sampling": {"num_inference_steps": args.steps, "height": args.size, "width": args.size},
            "batch_size": args.batch_size[0], "methods": [{"name": "sd-class"}],
        })
        # warm-up: kernels, allocator, first-call overheads (not counted)
        pipe(prompt=["warm up"] * 2, num_inference_steps=2, height=args.size, width=args.size,
             generator=[torch.Generator("cpu").manual_seed(0)] * 2)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        naive_dir = Path(tmp) / "naive"
        naive_dir.mkdir()
        sync(); t0 = time.perf_counter()
        n_naive = naive_loop(pipe, faces, prompt_set, seeds, args.steps, args.size, naive_dir)
        sync(); t_naive = time.perf_counter() - t0

        engine_ips = {}
        for bs in args.batch_size:
            cfg = config_from_dict({**cfg.to_dict(), "batch_size": bs})
            sync(); t0 = time.perf_counter()
            summary = generate_run(cfg, Path(tmp) / f"run-{bs}", progress=False, pipeline=lambda: pipe)
            sync(); engine_ips[bs] = n_images / (time.perf_counter() - t0)
            assert summary.written == n_images == n_naive, (summary.written, n_images, n_naive)

    naive_ips = n_naive / t_naive
    print(f"naive loop (1 call per face x prompt, {len(seeds)} images/call): {naive_ips:8.3f} images/s  ({t_naive:.1f} s)")
    for bs, ips in engine_ips.items():
        print(f"engine batch {bs:3d} (prompt_embeds, atomic writes): {ips:8.3f} images/s   ratio engine/naive: {ips / naive_ips:.2f}x")

    if device.type == "cuda":
        flops = unet_flops_per_image_step(pipe, args.size)
        name = torch.cuda.get_device_name(device)
        best_bs = max(engine_ips, key=engine_ips.get)
        achieved = engine_ips[best_bs] * args.steps * flops
        print(f"UNet: {flops / 1e9:.1f} GFLOP per image-step with CFG; engine (batch {best_bs}) achieves "
              f"{achieved / 1e12:.1f} TFLOP/s counting UNet work only")
        peak = peak_for(name)
        if peak:
            print(f"UNet share of the {peak[0]} dense fp16 peak ({peak[1] / 1e12:.0f} TFLOP/s): {100 * achieved / peak[1]:.1f}%")
        else:
            print(f"no peak figure known for {name!r}; share not computed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
