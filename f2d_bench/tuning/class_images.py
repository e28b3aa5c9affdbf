"""Class images for the prior-preservation loss (DreamBooth, CustomDiffusion), made once per run.

The base model renders ``count`` images of the class prompt ("a photo of a person"); every face's tuning
reuses them. Image ``i`` depends on the prompt, the sampling settings and ``seed + i``, so the folder is
named by a hash of those and a larger ``count`` keeps the images already made; and, within float
rounding, on the batch it was rendered in, as the grid's images do on ``batch_size``. Batches are
therefore fixed chunks of indices (``0..B-1``, ``B..2B-1``, ...): a killed run, resumed, renders a
chunk with missing images whole and writes only those, the same bytes an unbroken run writes. Each
image is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from f2d_bench.config import canonical_hash
from f2d_bench.files import atomic_write_bytes, atomic_write_json, exclusive_lock

if TYPE_CHECKING:
    from f2d_bench.config import SamplingConfig


def class_image_paths(folder: Path, pipe, prompt: str, count: int, sampling: "SamplingConfig", *, seed: int,
                      batch_size: int) -> list[Path]:
    """Paths of ``count`` class images of ``prompt`` under ``folder``, rendering the missing ones.

    ``sampling`` is the run's (scheduler, steps, guidance, size): the class images look like the base
    model's own renders at the protocol's settings. The unconditional prompt is empty, as for the grid.
    """
    settings = {"prompt": prompt, "seed": int(seed), "sampling": sampling.to_dict()}
    root = Path(folder) / f"class-{canonical_hash(settings, 8)}"
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{i:04d}.png" for i in range(count)]
    with exclusive_lock(root / ".lock"):
        for start in range(0, count, batch_size):
            chunk = list(range(start, min(start + batch_size, count)))
            if all(paths[i].is_file() for i in chunk):
                continue
            images = pipe(
                prompt=[prompt] * len(chunk), negative_prompt=[""] * len(chunk),
                num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
                height=sampling.height, width=sampling.width,
                generator=[torch.Generator("cpu").manual_seed(int(seed) + i) for i in chunk], output_type="pil",
            ).images
            for i, image in zip(chunk, images):
                if paths[i].is_file():  # made before a kill: kept (the same bytes)
                    continue
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                atomic_write_bytes(paths[i], buffer.getvalue())
        if not (root / "settings.json").is_file():
            atomic_write_json(root / "settings.json", settings)
    return paths


def class_posteriors(folder: Path, pipe, prompt: str, count: int, sampling: "SamplingConfig", *, seed: int,
                     batch_size: int) -> list:
    """The VAE posteriors (``diffusion.Posterior``) of the class images, rendering missing ones first."""
    from f2d_bench.tuning.diffusion import encode_posterior, training_pixels, training_resolution

    paths = class_image_paths(folder, pipe, prompt, count, sampling, seed=seed, batch_size=batch_size)
    size = training_resolution(pipe)
    return [encode_posterior(pipe.vae, training_pixels(path, size)) for path in paths]


class ClassPrior:
    """Mixin of methods with a prior-preservation loss: params ``class_prompt``, ``num_class_images``,
    ``seed``; the class images are rendered once per run into the method's ``shared_dir`` and their
    posteriors encoded once per process."""

    _class_posteriors: list | None = None

    def class_latents(self) -> list:
        if self._class_posteriors is None:
            pipe, p = self.context.pipeline(), self.params
            if self.shared_dir is None:
                raise RuntimeError(f"{self.name}: the run directory is not open (shared_dir unset)")
            self._class_posteriors = class_posteriors(
                self.shared_dir, pipe, p["class_prompt"], p["num_class_images"], self.context.sampling,
                seed=p["seed"], batch_size=self.context.config.batch_size)
        return self._class_posteriors
