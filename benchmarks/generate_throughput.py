#!/usr/bin/env python
"""Images/s of the generation engine against the naive loop of the official scripts, same pipeline.

The naive loop makes one pipeline call per (face, prompt) with ``num_images_per_prompt`` = number of
seeds, as official inference scripts do, and saves each PNG. The engine batches across faces, prompts
and seeds (``--batch-size``) with one generator per image (noise drawn ahead) and writes atomically with
manifests; "engine + compile" is ``generate --compile`` after a warm-up run that compiles (its time is
printed apart). All render the same grid; the ratios to naive are the figures to read (absolute numbers on
a shared CPU mean little). Also printed: UNet MFU (CUDA), where the engine's wall time goes (a separate
pass with synchronised timers around text encoding, UNet, VAE decode, noise and the writer's waits), the
max pixel difference of each engine run against the naive images, and the estimated wall time of one
method's full protocol (16,400 images) at each rate. ``--score`` adds, at the best batch size, ``score``
of the engine's run alone and ``generate --score`` on a fresh run (scoring overlapped with generation):
the ratio of the latter to generation alone is the overhead of scoring while generating, and its
protocol time is the end-to-end figure (``--full-size-scorers``: the paper's scorer architectures with
random weights, else the smoke preset's).

    python benchmarks/generate_throughput.py                       # CPU, tiny pipeline
    python benchmarks/generate_throughput.py --unet-config sd14 --device cuda --size 512 --faces 2
    python benchmarks/generate_throughput.py --unet-config sd14 --device cuda --size 512 --faces 2 \
        --no-compile --score --full-size-scorers
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.faces.source import resolve_face_set
from f2d_bench.pipelines.loading import TINY_SD14_ID, load_sd_pipeline
from f2d_bench.pipelines import noise
from f2d_bench.prompts import load_prompt_set
from f2d_bench.run_dir import RunDir
from f2d_bench.store import BackgroundWriter

#: Images of one method's full protocol: 100 faces x 41 prompts x 4 seeds.
PROTOCOL_IMAGES = 16_400

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
                image.save(out / f"{face.face_id}-{prompt.id}-{seed}.png")  # same names as _run_pixels
                n += 1
    return n


@contextlib.contextmanager
def wall_breakdown(pipe, sync):
    """Seconds spent (main thread, device synchronised) in text encoding, UNet, VAE decode, noise drawing
    and waiting on the PNG writer, while the block runs; yields the dict it fills."""
    seconds = {"text encoding": 0.0, "UNet": 0.0, "VAE decode": 0.0, "noise": 0.0, "writing (waits)": 0.0}
    patched = []

    def timed(owner, attr, name):
        inner = getattr(owner, attr)
        had_own = attr in vars(owner)

        def wrapper(*args, **kwargs):
            sync(); t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                sync(); seconds[name] += time.perf_counter() - t0

        setattr(owner, attr, wrapper)
        patched.append((owner, attr, inner, had_own))

    timed(pipe.text_encoder, "forward", "text encoding")
    timed(pipe.unet, "forward", "UNet")
    timed(pipe.vae, "decode", "VAE decode")
    timed(noise, "draw_ahead", "noise")
    for attr in ("submit", "flush", "close"):
        timed(BackgroundWriter, attr, "writing (waits)")
    try:
        yield seconds
    finally:
        for owner, attr, inner, had_own in reversed(patched):
            if had_own or isinstance(owner, type) or owner is noise:
                setattr(owner, attr, inner)
            else:
                delattr(owner, attr)  # the instance attribute shadowed the class's method


def _run_pixels(run_dir: Path) -> dict[str, np.ndarray]:
    run = RunDir(run_dir)
    return {f"{k.face_id}-{k.prompt_id}-{k.seed}": np.asarray(Image.open(run.store.image_path(k)))
            for k in run.store.manifest_records()}


def max_pixel_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int:
    """Largest |a - b| over every pixel of the images both hold (0-255); both must hold the same names."""
    assert a.keys() == b.keys(), (len(a), len(b))
    return max(int(np.abs(a[k].astype(np.int16) - b[k].astype(np.int16)).max()) for k in a)


def protocol_time(ips: float) -> str:
    seconds = PROTOCOL_IMAGES / ips
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def scoring_section(full_size: bool) -> dict:
    """The run config's ``scoring:`` for --score: every default scorer the machine can run, offline."""
    from score_throughput import FULL_SETTINGS, SMOKE_SETTINGS, allow_standin_siglip_tokenizer

    from f2d_bench.scorers import DEFAULT_SCORERS

    settings = FULL_SETTINGS if full_size else SMOKE_SETTINGS
    allow_standin_siglip_tokenizer()  # the real SigLIP tokenizer is a Hub download
    names = list(DEFAULT_SCORERS)
    if importlib.util.find_spec("dlib") is None:  # a pip build some GPU machines lack: said and left out
        names.remove("dlib")
        print("--score: dlib is not installed; its scorer is left out")
    return {"device": "auto", "scorers": names, "settings": {n: settings[n] for n in names if n in settings}}


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
    ap.add_argument("--no-compile", action="store_true", help="leave out engine + compile (minutes of compiling)")
    ap.add_argument("--score", action="store_true",
                    help="also time score alone and generate --score at the best batch size")
    ap.add_argument("--full-size-scorers", action="store_true",
                    help="with --score: the paper's scorer architectures, random weights (else the smoke preset's)")
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

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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
            **({"scoring": scoring_section(args.full_size_scorers)} if args.score else {}),
        })
        # warm-up: kernels, allocator, first-call overheads (not counted)
        pipe(prompt=["warm up"] * 2, num_inference_steps=2, height=args.size, width=args.size,
             generator=[torch.Generator("cpu").manual_seed(0)] * 2)

        naive_dir = Path(tmp) / "naive"
        naive_dir.mkdir()
        sync(); t0 = time.perf_counter()
        n_naive = naive_loop(pipe, faces, prompt_set, seeds, args.steps, args.size, naive_dir)
        sync(); t_naive = time.perf_counter() - t0
        naive_pixels = {p.stem: np.asarray(Image.open(p)) for p in naive_dir.glob("*.png")}

        def engine(bs: int, name: str, compile: bool = False) -> tuple[float, dict]:
            config = config_from_dict({**cfg.to_dict(), "batch_size": bs})
            sync(); t0 = time.perf_counter()
            summary = generate_run(config, Path(tmp) / name, progress=False, pipeline=lambda: pipe, compile=compile)
            sync(); seconds = time.perf_counter() - t0
            assert summary.written == n_images == n_naive, (summary.written, n_images, n_naive)
            return seconds, _run_pixels(Path(tmp) / name)

        engine_runs = {bs: engine(bs, f"run-{bs}") for bs in args.batch_size}
        best_bs = min(engine_runs, key=lambda bs: engine_runs[bs][0])
        with wall_breakdown(pipe, sync) as breakdown:
            t_profiled, _ = engine(best_bs, "profiled")
        compiled = None
        if not args.no_compile:
            # Padding makes every call the same shape: one compile (the warm-up run), none in the timed run.
            t_first, _ = engine(best_bs, "compile-warm-up", compile=True)
            compiled = (t_first, *engine(best_bs, "compiled", compile=True))
        overlap = None
        if args.score:
            from f2d_bench.scoring import score_run

            sync(); t0 = time.perf_counter()
            alone = score_run(Path(tmp) / f"run-{best_bs}", progress=False)
            sync(); t_score = time.perf_counter() - t0
            config = config_from_dict({**cfg.to_dict(), "batch_size": best_bs})
            sync(); t0 = time.perf_counter()
            both = generate_run(config, Path(tmp) / "scored", progress=False, pipeline=lambda: pipe, score=True)
            sync(); t_both = time.perf_counter() - t0
            assert both.written == n_images and both.score.assembled
            same = both.score.table.drop(columns=["label"]).equals(alone.table.drop(columns=["label"]))
            overlap = (t_score, t_both, same)

    naive_ips = n_naive / t_naive
    print(f"naive loop (1 call per face x prompt, {len(seeds)} images/call): {naive_ips:8.3f} images/s  ({t_naive:.1f} s)"
          f"   full protocol ({PROTOCOL_IMAGES} images): {protocol_time(naive_ips)}")
    rates = {}
    for bs, (seconds, pixels) in engine_runs.items():
        rates[f"engine batch {bs}"] = ips = n_images / seconds
        print(f"engine batch {bs:3d} (prompt_embeds, noise drawn ahead, background writes): {ips:8.3f} images/s   "
              f"ratio to naive: {ips / naive_ips:.2f}x   max pixel diff vs naive: "
              f"{max_pixel_difference(pixels, naive_pixels)}   full protocol: {protocol_time(ips)}")
    if compiled:
        t_first, seconds, pixels = compiled
        rates[f"engine + compile batch {best_bs}"] = ips = n_images / seconds
        print(f"engine + compile batch {best_bs:3d} (after a {t_first:.1f} s run that compiled): {ips:8.3f} images/s   "
              f"ratio to naive: {ips / naive_ips:.2f}x   max pixel diff vs naive: "
              f"{max_pixel_difference(pixels, naive_pixels)}, vs eager engine: "
              f"{max_pixel_difference(pixels, engine_runs[best_bs][1])}   full protocol: {protocol_time(ips)}")

    if overlap:
        t_score, t_both, same = overlap
        t_gen = engine_runs[best_bs][0]
        print(f"score alone (batch {best_bs}'s run): {n_images / t_score:8.3f} images/s  ({t_score:.1f} s)   "
              f"generate then score: {t_gen + t_score:.1f} s")
        print(f"generate --score batch {best_bs:3d}: {t_both:.1f} s = {t_both / t_gen:.2f}x generation alone "
              f"({t_gen:.1f} s), {t_both / (t_gen + t_score):.2f}x generate then score; per-method means "
              f"{'equal to' if same else 'DIFFERENT from'} score's   full protocol, scored: "
              f"{protocol_time(n_images / t_both)}")

    print(f"wall time of the engine (batch {best_bs}, a separate pass with synchronising timers: {t_profiled:.1f} s):")
    for name, seconds in breakdown.items():
        print(f"  {name:18s} {seconds:8.2f} s  {100 * seconds / t_profiled:5.1f}%")
    rest = t_profiled - sum(breakdown.values())
    print(f"  {'other':18s} {rest:8.2f} s  {100 * rest / t_profiled:5.1f}%  (scheduler, guidance, uint8, run bookkeeping)")

    if device.type == "cuda":
        flops = unet_flops_per_image_step(pipe, args.size)
        name = torch.cuda.get_device_name(device)
        peak = peak_for(name)
        print(f"UNet: {flops / 1e9:.1f} GFLOP per image-step with CFG")
        for label, ips in rates.items():
            achieved = ips * args.steps * flops
            share = f", {100 * achieved / peak[1]:.1f}% of the {peak[0]} dense fp16 peak ({peak[1] / 1e12:.0f} TFLOP/s)" \
                if peak else f" (no peak figure known for {name!r})"
            print(f"  {label}: {achieved / 1e12:.1f} TFLOP/s of UNet work{share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
