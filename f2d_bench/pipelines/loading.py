"""Load Stable Diffusion 1.4 (or the tiny stand-in) as a ready-to-run `StableDiffusionPipeline`.

One code path for every source: the tiny model id resolves to its cached local directory, a local
directory is loaded as is, and anything else is a Hugging Face id (downloaded into, or read from, the
Hugging Face cache). All three go through `StableDiffusionPipeline.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from f2d_bench.devices import hub_offline, resolve_device, resolve_dtype
from f2d_bench.errors import ConfigError, ModelUnavailableError
from f2d_bench.pipelines import tiny

TINY_SD14_ID = "f2d-bench/tiny-sd14"
SD14_ID = "CompVis/stable-diffusion-v1-4"

# diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); older versions
# silently ignore `dtype`, so the new name is used only from the version where it was checked to work.
_DTYPE_KWARG_SINCE = (0, 42)


def scheduler_names() -> list[str]:
    """Names of the diffusers schedulers that can drive SD 1.4 (its config's compatible schedulers)."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    # EDM schedulers use a different noise parameterisation than SD 1.4's epsilon/DDPM betas.
    return sorted(
        s.name for s in KarrasDiffusionSchedulers if hasattr(diffusers, s.name) and not s.name.startswith("EDM")
    )


def _scheduler_class(name: str):
    import diffusers

    valid = scheduler_names()
    if name not in valid:
        raise ConfigError(f"unknown scheduler {name!r}; valid names: {', '.join(valid)}")
    return getattr(diffusers, name)


def _unavailable_message(model_id: str, revision: str | None, reason: str) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (
        f"Stable Diffusion model {model_id!r}{rev} is not available: {reason}\n"
        "To make it available:\n"
        f"  - on a machine with access to huggingface.co, run `hf download {model_id}` "
        f"(older clients: `huggingface-cli download {model_id}`); it stores the model in the Hugging Face "
        "cache (~/.cache/huggingface/hub, or $HF_HOME/hub), which you can copy to this machine; or\n"
        f"  - download it into a local directory (`hf download {model_id} --local-dir DIR`) and pass "
        "that directory as the model id.\n"
        "With HF_HUB_OFFLINE=1, loading uses only the local cache and never contacts the Hub. "
        "A gated or private model also needs `hf auth login` on the downloading machine."
    )


def _is_path(model_id: str) -> bool:
    """Whether ``model_id`` can only be a file-system path: a Hugging Face id is ``owner/name``."""
    return model_id.startswith(("/", ".", "~")) or "\\" in model_id or model_id.count("/") > 1


def _check_local_dir(directory: Path) -> None:
    """Raise ConfigError naming `directory` when it lacks model_index.json or a component folder."""
    index = directory / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"model directory {str(directory)!r} has no model_index.json, so it is not a diffusers pipeline "
            "folder (expected model_index.json with text_encoder/, tokenizer/, unet/, vae/, scheduler/, as in "
            f"{SD14_ID}'s repository)"
        )
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {str(index)!r}: {exc}") from exc
    missing = [
        key
        for key, value in components.items()
        if not key.startswith("_") and isinstance(value, list) and value and value[0] is not None
        and not (directory / key).is_dir()
    ]
    if missing:
        raise ConfigError(
            f"model directory {str(directory)!r} is incomplete: model_index.json lists "
            f"{', '.join(missing)} but there is no such folder"
        )


def _is_hub_cached(model_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "model_index.json", revision=revision)
    except Exception:  # e.g. an id that is not a valid repo name: treat as not cached
        return False
    return isinstance(found, str)


def _dtype_kwarg() -> str:
    import diffusers

    version = tuple(int(p) for p in diffusers.__version__.split(".")[:2] if p.isdigit())
    return "dtype" if version >= _DTYPE_KWARG_SINCE else "torch_dtype"


def with_scheduler(pipe, scheduler: str):
    """A pipeline sharing every module of ``pipe`` (no copy of any weight) with another scheduler, built
    from ``pipe``'s own scheduler config as ``load_sd_pipeline`` builds it."""
    scheduler_cls = _scheduler_class(scheduler)
    components = {**pipe.components, "scheduler": scheduler_cls.from_config(pipe.scheduler.config)}
    view = type(pipe)(**components)
    view.set_progress_bar_config(disable=True)
    return view


def load_sd_pipeline(
    model_id: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    scheduler: str = "EulerAncestralDiscreteScheduler",
):
    """Load a Stable Diffusion pipeline, swap its scheduler, move it to `device`, silence its progress bar.

    `model_id`: `TINY_SD14_ID` (the tiny model, built into the cache on first use), an existing local
    directory in diffusers layout, or a Hugging Face id such as "CompVis/stable-diffusion-v1-4".
    `revision` (branch, tag or commit) applies to Hugging Face ids only. `dtype`/`device`: see
    `resolve_dtype` / `resolve_device` in `f2d_bench.devices`. `scheduler`: a diffusers scheduler class
    name from `scheduler_names()`, built from the model's own scheduler config (same betas and timestep
    spacing).
    The safety checker is not loaded (as in the official F2D inference).

    Raises ConfigError for bad names or a malformed local directory, ModelUnavailableError when a
    Hugging Face model is neither cached nor downloadable.
    """
    from diffusers import StableDiffusionPipeline

    scheduler_cls = _scheduler_class(scheduler)  # fail fast, before any weights load
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    if model_id == TINY_SD14_ID:  # the one id this loader builds itself; the builder knows no ids
        source, is_local = tiny.tiny_sd14_dir(), True
    elif Path(model_id).expanduser().is_dir():
        source, is_local = Path(model_id).expanduser(), True
    elif _is_path(model_id):
        raise ModelUnavailableError(
            f"model directory {model_id!r} does not exist (looked for {Path(model_id).expanduser().resolve()}). "
            f"Give an existing directory in diffusers' layout, or a Hugging Face id such as {SD14_ID}"
        )
    else:
        source, is_local = model_id, False

    kwargs = {_dtype_kwarg(): torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    if is_local:
        if revision is not None:
            raise ConfigError(
                f"revision {revision!r} applies to Hugging Face ids only, not to local model {model_id!r}"
            )
        _check_local_dir(Path(source))
        with _no_loading_bars():
            pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
    else:
        cached = _is_hub_cached(model_id, revision)
        offline = hub_offline()
        if offline and not cached:
            raise ModelUnavailableError(
                _unavailable_message(
                    model_id, revision, "it is not in the Hugging Face cache and HF_HUB_OFFLINE=1"
                )
            )
        try:
            with _no_loading_bars():
                pipe = StableDiffusionPipeline.from_pretrained(
                    model_id, revision=revision, local_files_only=offline, **kwargs
                )
        except OSError as exc:  # huggingface_hub's errors (not found, gated, no network) are OSErrors
            if cached and offline:
                raise  # the cache had it: a damaged cache is a different problem; keep the original error
            raise ModelUnavailableError(
                _unavailable_message(
                    model_id, revision, f"it could not be read from the cache or downloaded ({exc})"
                )
            ) from exc

    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if torch_device.type != "cpu":
        # from_pretrained leaves weights on the CPU; skipping the no-op move there also skips diffusers'
        # warning that float16 cannot run on a CPU, which is no longer true (see resolve_dtype).
        pipe = pipe.to(torch_device)
        if torch_device.type == "cuda":
            import torch

            # NHWC convolutions run on tensor cores without layout transposes; on the CPU the default
            # layout is kept, so CPU images stay bit-identical to earlier versions.
            pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _no_loading_bars():
    """diffusers' and transformers' "Loading ..." bars off while a pipeline loads (they would print
    through --no-progress, and say nothing a summary does not); download bars are huggingface_hub's and
    stay. Each library's setting is restored after."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in was:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in was:
            if enabled:
                lib.enable_progress_bar()
