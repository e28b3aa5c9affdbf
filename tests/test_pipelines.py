"""SD 1.4 pipelines: the real CLIP tokenizer rebuilt offline, the tiny model and its cache, the loader
(same from_pretrained path as the real model), and SD 1.4's full-size configs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch

from f2d_bench import paths
from f2d_bench.errors import ConfigError, ModelUnavailableError
from f2d_bench.devices import hub_offline, resolve_device, resolve_dtype
from f2d_bench.pipelines import loading, tiny
from f2d_bench.pipelines.loading import TINY_SD14_ID, load_sd_pipeline
from f2d_bench.pipelines.random_sd14 import build_random_sd14, build_sd14_components
from f2d_bench.pipelines.sd14 import sd14_component_configs
from f2d_bench.pipelines.tokenizer import write_clip_tokenizer

SENTENCES = [
    "a photo of a cat",
    "A photo of a person eating bread in front of the Eiffel Tower!",
    "f l as a firefighter, wearing a HELMET; 3 dogs & 12 cats",
    "it's the woman's smile, isn't it?",
    "café naïve résumé 😀 — Zürich",
    "   spaces    everywhere\tand\ttabs  ",
]


@pytest.fixture(scope="session")
def pipeline_cache(tmp_path_factory) -> Path:
    """A cache root private to this test session (never the user's cache)."""
    return tmp_path_factory.mktemp("f2d-pipelines-cache")


@pytest.fixture(scope="session")
def tiny_dir(pipeline_cache) -> Path:
    """The tiny model, built once per session into the private cache."""
    start = time.perf_counter()
    directory = tiny.tiny_sd14_dir(pipeline_cache)
    print(f"tiny SD 1.4 build+save: {time.perf_counter() - start:.2f} s")
    return directory


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, pipeline_cache):
    monkeypatch.setenv("F2D_BENCH_CACHE", str(pipeline_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_tokenizer(directory)
    return directory


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_files_match_sd14_layout(tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512  # first merge "i n"
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) == 1 + 48894
    assert lines[1] == "i n"
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 77
    special = json.loads((tokenizer_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special["pad_token"] == "<|endoftext|>"


def test_tokenizer_gives_known_ids(tokenizer_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77
    assert len(tok) == 49408
    padded = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # SD 1.4 pads with <|endoftext|>


def test_tokenizer_agrees_with_open_clip(tokenizer_dir):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    reference = SimpleTokenizer()
    for sentence in SENTENCES:
        expected = [reference.sot_token_id, *reference.encode(sentence), reference.eot_token_id]
        assert tok(sentence).input_ids == expected, sentence


# --- paths ----------------------------------------------------------------------------------------


def test_cache_root_env_override_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("F2D_BENCH_CACHE", str(tmp_path / "c"))
    assert paths.cache_root() == tmp_path / "c"
    monkeypatch.delenv("F2D_BENCH_CACHE")
    assert paths.cache_root() == Path(platformdirs.user_cache_dir("f2d-bench"))


# --- tiny model and its cache -----------------------------------------------------------------


def test_tiny_model_has_sd14_layout(tiny_dir, pipeline_cache):
    assert tiny_dir == pipeline_cache / "models" / "tiny-sd14-v1"
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for weights in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"):
        assert (tiny_dir / weights).is_file(), weights
    assert sorted(p.name for p in (tiny_dir / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    scheduler = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["steps_offset"] == 1
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert not list((pipeline_cache / "models").glob(".tiny-sd14-v1.tmp-*"))  # no leftovers


def test_tiny_model_is_cached(tiny_dir, pipeline_cache, monkeypatch):
    stamp = (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(tiny, "build_tiny_sd14", must_not_build)
    assert tiny.tiny_sd14_dir(pipeline_cache) == tiny_dir
    assert tiny.tiny_sd14_dir() == tiny_dir  # default root comes from F2D_BENCH_CACHE
    assert (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_weights_depend_only_on_seed(tmp_path):
    a = tiny.build_tiny_sd14(tmp_path / "a", seed=3)
    b = tiny.build_tiny_sd14(tmp_path / "b", seed=3)
    c = tiny.build_tiny_sd14(tmp_path / "c", seed=4)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (a / part).read_bytes() == (b / part).read_bytes(), part
        assert (a / part).read_bytes() != (c / part).read_bytes(), part


def test_killed_build_leaves_no_half_model(tmp_path, monkeypatch):
    real_build = tiny.build_tiny_sd14

    def dies_halfway(directory, seed=0):
        (Path(directory) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt  # like a user killing the build

    monkeypatch.setattr(tiny, "build_tiny_sd14", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        tiny.tiny_sd14_dir(tmp_path)
    models = tmp_path / "models"
    assert not (models / "tiny-sd14-v1").exists()
    assert list(models.iterdir()) == []  # its temporary directory was removed too

    monkeypatch.setattr(tiny, "build_tiny_sd14", real_build)
    target = tiny.tiny_sd14_dir(tmp_path)
    assert (target / "model_index.json").is_file() and (target / tiny.BUILD_INFO_FILE).is_file()


def test_concurrent_builder_that_finishes_first_wins(tmp_path, monkeypatch):
    real_build = tiny.build_tiny_sd14
    target = tmp_path / "models" / "tiny-sd14-v1"

    def slow_build(directory, seed=0):
        real_build(target)  # another process completes and renames first ...
        return real_build(directory, seed)  # ... while this one is still building

    monkeypatch.setattr(tiny, "build_tiny_sd14", slow_build)
    assert tiny.tiny_sd14_dir(tmp_path) == target
    assert (target / "model_index.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-sd14-v1"]


@pytest.mark.slow
def test_concurrent_processes_share_one_complete_model(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from f2d_bench.pipelines.tiny import tiny_sd14_dir\n"
        "print(tiny_sd14_dir(Path(sys.argv[1])))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)  # two racers suffice; each costs seconds of imports
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    target = tmp_path / "models" / "tiny-sd14-v1"
    assert {out.strip() for out, _ in results} == {str(target)}
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-sd14-v1"]
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    target = tmp_path / "models" / "tiny-sd14-v1"
    target.mkdir(parents=True)
    (target / "junk.txt").write_text("not a model")
    assert tiny.tiny_sd14_dir(tmp_path) == target
    assert (target / "model_index.json").is_file() and not (target / "junk.txt").exists()


# --- loading ------------------------------------------------------------------------------------


def test_load_tiny_and_generate(tiny_dir):
    from diffusers import EulerAncestralDiscreteScheduler

    start = time.perf_counter()
    pipe = load_sd_pipeline(TINY_SD14_ID, dtype="float32", device="cpu")
    print(f"tiny SD 1.4 load: {time.perf_counter() - start:.2f} s")
    assert pipe.vae_scale_factor == 8
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe._progress_bar_config.get("disable") is True
    assert Path(pipe.config._name_or_path) == tiny_dir

    def generate():
        return pipe("a photo of a cat", num_inference_steps=2, guidance_scale=7.0, height=64, width=64,
                    generator=[torch.Generator().manual_seed(0)], output_type="np").images

    first, second = generate(), generate()
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)  # same generator seed -> same pixels


def test_load_local_directory_and_other_scheduler(tiny_dir):
    from diffusers import DDIMScheduler

    pipe = load_sd_pipeline(str(tiny_dir), dtype="float32", device="cpu", scheduler="DDIMScheduler")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_end == 0.012  # built from the model's own scheduler config


def test_pipeline_is_moved_to_the_requested_device(tiny_dir):
    # "meta" stands in for a GPU here: any non-CPU device must receive every component.
    pipe = load_sd_pipeline(TINY_SD14_ID, device="meta")
    assert {pipe.unet.device.type, pipe.text_encoder.device.type, pipe.vae.device.type} == {"meta"}


def test_float16_on_cpu_works(tiny_dir):
    pipe = load_sd_pipeline(TINY_SD14_ID, dtype="float16", device="cpu")
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_unknown_scheduler_lists_valid_names(monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the scheduler name was checked")

    monkeypatch.setattr(tiny, "tiny_sd14_dir", must_not_load)
    with pytest.raises(ConfigError) as info:
        load_sd_pipeline(TINY_SD14_ID, scheduler="EulerAncestralScheduler")
    message = str(info.value)
    assert "EulerAncestralScheduler" in message
    assert "EulerAncestralDiscreteScheduler" in message and "DDIMScheduler" in message


def test_missing_hub_model_offline_says_how_to_get_it():
    with pytest.raises(ModelUnavailableError) as info:
        load_sd_pipeline("no-such-org/no-such-model", device="cpu")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message
    assert "hf download no-such-org/no-such-model" in message
    assert "huggingface-cli download" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "not in the Hugging Face cache" in message  # decided before asking diffusers


def test_hub_id_loads_from_hf_cache_offline(tiny_dir, tmp_path):
    # The way users run the real SD 1.4 offline: a Hugging Face id served from the HF cache. A subprocess,
    # because huggingface_hub reads HF_HUB_CACHE once, at import.
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--f2d-test--tiny-sd"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from f2d_bench.pipelines.loading import load_sd_pipeline\n"
        "pipe = load_sd_pipeline('f2d-test/tiny-sd', device='cpu')\n"
        "print('LOADED', type(pipe.scheduler).__name__, pipe.vae_scale_factor)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED EulerAncestralDiscreteScheduler 8" in result.stdout


def test_missing_hub_model_when_hub_unreachable(monkeypatch):
    # Not offline, but the download fails the way huggingface_hub fails without a network (an OSError).
    from diffusers import StableDiffusionPipeline

    calls = []

    def no_network(*args, **kwargs):
        calls.append((args, kwargs))
        raise OSError("Cannot reach https://huggingface.co: Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(loading, "hub_offline", lambda: False)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_network)
    with pytest.raises(ModelUnavailableError) as info:
        load_sd_pipeline("CompVis/stable-diffusion-v1-4", revision="main", dtype="float16", device="cpu")
    assert "CompVis/stable-diffusion-v1-4" in str(info.value) and "Name or service not known" in str(info.value)
    (args, kwargs), = calls
    assert args == ("CompVis/stable-diffusion-v1-4",) and kwargs["revision"] == "main"
    assert kwargs["safety_checker"] is None and kwargs["requires_safety_checker"] is False
    assert kwargs.get("dtype", kwargs.get("torch_dtype")) == torch.float16


def test_local_directory_without_model_index(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(ConfigError) as info:
        load_sd_pipeline(str(folder), device="cpu")
    assert str(folder) in str(info.value) and "model_index.json" in str(info.value)


def test_local_directory_missing_a_component(tiny_dir, tmp_path):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(tiny_dir, copy)
    shutil.rmtree(copy / "unet")
    with pytest.raises(ConfigError) as info:
        load_sd_pipeline(str(copy), device="cpu")
    assert str(copy) in str(info.value) and "unet" in str(info.value)


def test_revision_is_for_hub_ids_only(tiny_dir):
    with pytest.raises(ConfigError, match="revision"):
        load_sd_pipeline(TINY_SD14_ID, revision="main", device="cpu")


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a valid torch device"):
        resolve_device("gpu-please")
    assert resolve_device(torch.device("meta")) == torch.device("meta")  # torch objects are checked too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="has 1 CUDA device"):
        resolve_device("cuda:3")


def test_hub_offline_is_read_at_call_time(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16
    assert resolve_dtype("FP32", "cuda") == torch.float32
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="float64"):
        resolve_dtype("float64", "cpu")


# --- full-size SD 1.4 shapes --------------------------------------------------------------------


def test_sd14_configs_give_sd14_parameter_counts():
    configs = sd14_component_configs()
    assert configs["text_encoder"]["hidden_size"] == 768 and configs["text_encoder"]["hidden_act"] == "quick_gelu"
    assert configs["unet"]["cross_attention_dim"] == 768 and configs["vae"]["scaling_factor"] == 0.18215
    modules = build_sd14_components(torch.float16, "meta")  # shapes only: no memory, about a second
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert counts == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    assert all(p.dtype == torch.float16 for m in modules.values() for p in m.parameters())
    assert torch.get_default_dtype() == torch.float32  # the temporary default dtype was restored
    # SD 1.x projects into its transformers with 1x1 convolutions (SD 2.x with Linear: same count).
    assert isinstance(modules["unet"].down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)


def test_build_random_sd14_wiring(tokenizer_dir):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = build_random_sd14("float16", "meta", tokenizer_dir=tokenizer_dir)
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_start == 0.00085
    assert pipe.vae_scale_factor == 8 and pipe.unet.dtype == torch.float16
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.safety_checker is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_sd14_generates_on_gpu(tokenizer_dir):
    pipe = build_random_sd14("float16", "cuda", tokenizer_dir=tokenizer_dir)
    images = pipe(["a photo of a cat"] * 2, num_inference_steps=2, height=512, width=512,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images
    assert images.shape == (2, 512, 512, 3)
