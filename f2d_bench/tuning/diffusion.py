"""The denoising loss every per-face tuning method trains with, and its seeded optimisation loop.

As in the diffusers training examples: the image is encoded by the frozen VAE, a latent is sampled from
its posterior and scaled by ``vae.config.scaling_factor``; a timestep is drawn uniformly from the
training schedule (DDPM with the base model's betas), noise is added, and the UNet's prediction is
compared (mean squared error) with the noise, or with the velocity for a v-prediction model.

All randomness (flips, posterior samples, timesteps, noise) comes from one CPU ``torch.Generator``
seeded by the caller, so tuning the same face with the same settings gives the same bytes on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from f2d_bench.faces.imageio import read_image


def training_resolution(pipe) -> int:
    """Image side (pixels) the pipeline's UNet was trained at: 512 for SD 1.4, 64 for the tiny model."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def training_pixels(path: Path, size: int) -> torch.Tensor:
    """The face photo as a (1, 3, size, size) float32 tensor in [-1, 1] (bicubic resize of the aligned face)."""
    image = read_image(path).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


@dataclass
class Posterior:
    """The VAE posterior of the image and of its mirror: means and standard deviations, (2, 4, h, w)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, batch: int, generator: torch.Generator, flip_p: float) -> torch.Tensor:
        """``batch`` scaled latents: each mirrored with probability ``flip_p``, then sampled."""
        flips = (torch.rand(batch, generator=generator) < flip_p).long()
        noise = torch.randn((batch, *self.mean.shape[1:]), generator=generator)
        return self.mean[flips] + self.std[flips] * noise.to(self.mean)


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> Posterior:
    """Encode ``pixels`` (1, 3, H, W) and its horizontal mirror once; the VAE stays frozen while tuning."""
    both = torch.cat([pixels, pixels.flip(-1)]).to(vae.device, vae.dtype)
    dist = vae.encode(both).latent_dist
    scale = float(vae.config.scaling_factor)
    return Posterior(mean=(dist.mean * scale).float().cpu(), std=(dist.std * scale).float().cpu())


class DenoisingLoss:
    """The training loss of a UNet on latents, with the base model's training noise schedule."""

    def __init__(self, pipe, generator: torch.Generator):
        from diffusers import DDPMScheduler

        self.schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        self.generator = generator

    def __call__(self, unet, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Mean squared error (a 0-d float32 tensor) for latents (B, 4, h, w) and text (B, 77, width)."""
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator)
        steps = torch.randint(0, self.schedule.config.num_train_timesteps, (batch,), generator=self.generator)
        latents = latents.to(noise)
        noisy = self.schedule.add_noise(latents, noise, steps)
        if self.schedule.config.prediction_type == "v_prediction":
            target = self.schedule.get_velocity(latents, noise, steps)
        else:
            target = noise
        device, dtype = unet.device, unet.dtype
        pred = unet(noisy.to(device, dtype), steps.to(device), encoder_hidden_states=text.to(device, dtype)).sample
        return F.mse_loss(pred.float(), target.to(device).float())


def encode_text(pipe, texts: Sequence[str]) -> torch.Tensor:
    """Last hidden state (B, 77, width) of the text encoder, with gradients (slots may be trainable)."""
    tok = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def optimise(
    parameters: Iterable[torch.nn.Parameter], *, steps: int, learning_rate: float, accumulation: int,
    loss: Callable[[], torch.Tensor], weight_decay: float = 1e-2, max_grad_norm: float | None = None,
    after_step: Callable[[], None] | None = None, loss_scaling: bool = False,
) -> list[float]:
    """AdamW (betas 0.9/0.999, eps 1e-8, constant rate, as the diffusers examples) for ``steps`` updates.

    Each update averages ``accumulation`` calls of ``loss()``; gradients are clipped to a total norm of
    ``max_grad_norm`` when given. ``after_step`` runs after each update. Returns each update's loss.
    ``loss_scaling``: dynamic loss scaling (``torch.amp.GradScaler``: from 2**16, an update whose
    gradients overflow is skipped and the scale halved), as the examples get from accelerate in float16:
    the loss's gradients flowing back through a float16 UNet (of order 1e-5 per element) would otherwise
    fall below float16's smallest normal number (6e-5), losing precision or rounding to 0 (see
    :func:`needs_loss_scaling`). Off, it changes nothing.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(params[0].device.type, enabled=loss_scaling)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accumulation):
            value = loss() / accumulation
            scaler.scale(value).backward()
            total += float(value.detach())
        scaler.unscale_(optimizer)  # the true gradients before clipping
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step()
        history.append(total)
    return history


def needs_loss_scaling(pipe) -> bool:
    """Whether training through ``pipe``'s UNet needs loss scaling: it computes in float16 (bfloat16 has
    float32's range; float32 needs none)."""
    return pipe.unet.dtype == torch.float16


def face_seed(seed: int, face_id: str) -> int:
    """A 63-bit seed for tuning ``face_id`` with the method's ``seed``: the same on every machine."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}:{face_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class frozen:
    """Context: the given modules' parameters need no gradient inside (restored after)."""

    def __init__(self, *modules: torch.nn.Module):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.before = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.before):
            p.requires_grad_(flag)
        return False
