"""Each image's noise drawn ahead from its own seeded CPU generator, moved to the device once per batch.

Given one CPU generator per image, diffusers' StableDiffusionPipeline draws, from each generator in turn:
the initial latents (``prepare_latents`` -> ``randn_tensor``: one ``(1, C, h, w)`` tensor per generator in
the text embeddings' dtype), then, in every ``scheduler.step`` of a stochastic scheduler, one more
``(1, C, h, w)`` tensor per generator in the model output's dtype, each on the CPU followed by a blocking
copy to the device. :func:`draw_ahead` draws the same values in the same order before the call and copies
them once; the pipeline then gets the initial latents as ``latents=`` and a :class:`NoiseFeed` in place of
the generators, which the scheduler's noise draw returns step by step. The values are the same tensors, so
the images are bit-identical to the generator path on the CPU.

Supported: schedulers whose ``step`` takes no generator (PNDM, LMS, Heun, DEIS, UniPC, KDPM2: noise only
at the start), Euler and DDIM (step noise only with ``s_churn`` > 0 / ``eta`` > 0), and the schedulers of ``_STEP_NOISE`` that draw at
most one latent-shaped tensor per generator per step through diffusers' ``randn_tensor``. Others (the
DPM-Solver family, which draws float32 noise for its SDE variants only) keep the generator path.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch

#: Schedulers whose step draws (at most) one latent-shaped noise tensor per generator per call, through
#: their module's ``randn_tensor``, in the model output's dtype. A step that draws nothing (DDPM's last)
#: leaves the drawn-ahead tail unused: each generator's draws are a prefix of the same sequence either way.
_STEP_NOISE = {"EulerAncestralDiscreteScheduler", "DDPMScheduler", "KDPM2AncestralDiscreteScheduler"}
#: Schedulers whose step draws only on options the Stable Diffusion pipeline never passes (Euler: s_churn > 0).
_NO_STEP_NOISE = {"EulerDiscreteScheduler"}


class NoiseFeed:
    """Noise drawn ahead for one pipeline call, handed out in the order the scheduler asks for it.

    ``initial``: (batch, C, h, w) initial latents (before ``init_noise_sigma``); ``steps``: (calls, batch,
    C, h, w) step noise or None. Passed as the pipeline's ``generator``, it reaches ``scheduler.step``.
    """

    def __init__(self, initial: torch.Tensor, steps: torch.Tensor | None):
        self.initial = initial
        self._steps = steps
        self.used = 0  # step-noise tensors handed out so far

    def draw(self, shape: Sequence[int], dtype: torch.dtype | None, device) -> torch.Tensor:
        """The next step's noise; an error (never other values) if the scheduler asks for more or other."""
        if self._steps is None or self.used >= len(self._steps):
            raise RuntimeError(f"the scheduler drew noise {self.used + 1} times in one call; only "
                               f"{0 if self._steps is None else len(self._steps)} were drawn ahead")
        noise = self._steps[self.used]
        if tuple(shape) != tuple(noise.shape) or (dtype is not None and dtype != noise.dtype):
            raise RuntimeError(f"the scheduler asked for noise {tuple(shape)} {dtype}; drawn ahead: "
                               f"{tuple(noise.shape)} {noise.dtype}")
        self.used += 1
        return noise.to(device)


def _feeding_randn_tensor(original):
    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        if isinstance(generator, NoiseFeed):
            return generator.draw(shape, dtype, device)
        return original(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    randn_tensor.feeds_noise = True
    return randn_tensor


def _hook_step(scheduler_cls) -> bool:
    """Make ``scheduler_cls.step``'s ``randn_tensor`` answer a NoiseFeed (everything else unchanged);
    False when its step draws noise some other way."""
    module_globals = inspect.unwrap(scheduler_cls.step).__globals__
    original = module_globals.get("randn_tensor")
    if original is None:
        return False
    if not getattr(original, "feeds_noise", False):
        module_globals["randn_tensor"] = _feeding_randn_tensor(original)
    return True


def step_noise_calls(pipe, call: Mapping[str, Any]) -> int | None:
    """How many step-noise draws per generator to make ahead for this call: 0 for schedulers that draw
    none, the number of scheduler steps for those of ``_STEP_NOISE``, None when not supported."""
    scheduler = pipe.scheduler
    name = type(scheduler).__name__
    if "generator" not in inspect.signature(scheduler.step).parameters:
        return 0
    if name in _NO_STEP_NOISE or (name == "DDIMScheduler" and not call.get("eta")):
        return 0  # e.g. DDIM with eta 0 draws nothing after the initial latents
    if name not in _STEP_NOISE and name != "DDIMScheduler":
        return None
    if not _hook_step(type(scheduler)):
        return None
    steps = type(scheduler).from_config(scheduler.config)  # a copy: the pipeline sets its own timesteps
    steps.set_timesteps(call.get("num_inference_steps", 50), device="cpu")
    return len(steps.timesteps)


def draw_ahead(pipe, call: Mapping[str, Any]) -> NoiseFeed | None:
    """The noise of ``pipe(**call)`` drawn ahead from ``call["generator"]`` (a list of CPU generators, one
    per image), on the pipeline's device; None when this call keeps the generator path (no list of CPU
    generators, latents or timesteps given, several images per prompt, unsupported scheduler)."""
    from diffusers import StableDiffusionPipeline

    generators = call.get("generator")
    if (not isinstance(pipe, StableDiffusionPipeline) or not isinstance(generators, list) or not generators
            or not all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in generators)
            or any(call.get(k) is not None for k in ("latents", "timesteps", "sigmas"))
            or call.get("num_images_per_prompt", 1) != 1):
        return None
    calls = step_noise_calls(pipe, call)
    if calls is None:
        return None
    scale = pipe.vae_scale_factor
    height = call.get("height") or pipe.unet.config.sample_size * scale
    width = call.get("width") or pipe.unet.config.sample_size * scale
    shape = (1, pipe.unet.config.in_channels, int(height) // scale, int(width) // scale)
    # The dtypes the pipeline asks for: its text embeddings' (encode_prompt casts them to the text
    # encoder's) for the latents, the UNet output's for the step noise (NoiseFeed.draw checks it).
    latent_dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.unet.dtype
    step_dtype = pipe.unet.dtype
    initial = torch.empty((len(generators), *shape[1:]), dtype=latent_dtype)
    steps = torch.empty((calls, len(generators), *shape[1:]), dtype=step_dtype) if calls else None
    for i, g in enumerate(generators):  # each generator's draws in the pipeline's order: latents, then steps
        initial[i] = torch.randn(shape, generator=g, dtype=latent_dtype)[0]
        for s in range(calls):
            steps[s, i] = torch.randn(shape, generator=g, dtype=step_dtype)[0]
    device = pipe.device
    if device.type == "cuda":  # one asynchronous copy per batch from page-locked memory
        initial, steps = (None if t is None else t.pin_memory().to(device, non_blocking=True) for t in (initial, steps))
    else:
        initial, steps = (None if t is None else t.to(device) for t in (initial, steps))
    return NoiseFeed(initial, steps)
