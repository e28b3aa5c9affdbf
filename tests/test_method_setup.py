"""Per-method base model and sampling: `methods[].base` and `methods[].sampling: protocol|native`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from f2d_bench.config import config_from_dict
from f2d_bench.engine import PipelineProvider, build_methods, generate_run, method_context
from f2d_bench.errors import ConfigError
from f2d_bench.methods.sd_class import SDClassMethod
from f2d_bench.pipelines.tiny import tiny_sd14_dir
from f2d_bench.prompts import load_prompt_set
from f2d_bench.report.page import setup_text
from f2d_bench.run_dir import RunDir

from conftest import face_dir, small_config_dict

NATIVE = {"scheduler": "DDIMScheduler", "num_inference_steps": 3, "guidance_scale": 5.0}


class _NativeSD(SDClassMethod):
    """sd-class with sampling of its own, as the encoder baselines declare theirs."""

    native_sampling = NATIVE
    released_base = "runwayml/stable-diffusion-v1-5"


def _config(*methods, **overrides):
    return config_from_dict(small_config_dict(methods=list(methods), **overrides))


@pytest.fixture(scope="module")
def second_base(tmp_path_factory):
    """A second base model on disk: the tiny model's files under another name."""
    import shutil

    target = tmp_path_factory.mktemp("bases") / "other-sd"
    shutil.copytree(tiny_sd14_dir(), target)
    return str(target)


def test_native_sampling_takes_the_method_settings_and_the_run_size():
    cfg = _config({"name": "sd-class", "sampling": "native"})
    ctx = method_context(cfg, load_prompt_set("smoke"), cfg.methods[0], _NativeSD, PipelineProvider(cfg))
    assert ctx.sampling_mode == "native"
    assert (ctx.sampling.scheduler, ctx.sampling.num_inference_steps, ctx.sampling.guidance_scale) == (
        "DDIMScheduler", 3, 5.0)
    assert (ctx.sampling.height, ctx.sampling.width) == (cfg.sampling.height, cfg.sampling.width)
    protocol = SDClassMethod({}, method_context(cfg, load_prompt_set("smoke"), cfg.methods[0].replace(
        sampling="protocol"), _NativeSD, PipelineProvider(cfg)))
    native = _NativeSD({}, ctx)
    assert native.identity()["sampling_mode"] == "native" and "sampling_mode" not in protocol.identity()
    assert native.method_id != protocol.method_id


def test_native_sampling_of_a_method_without_one_is_refused():
    with pytest.raises(ConfigError, match=r"methods\[0\] \(sd-class\).*no native sampling.*protocol"):
        build_methods(_config({"name": "sd-class", "sampling": "native"}), load_prompt_set("smoke"))


@pytest.mark.parametrize("entry, message", [
    ({"name": "sd-class", "sampling": "official"}, r"methods\[0\]: sampling: 'official' is not one of protocol, native"),
    ({"name": "sd-class", "base_revision": "main"}, r"methods\[0\]: base_revision is set but base is not"),
])
def test_bad_method_setup_names_the_entry(entry, message):
    with pytest.raises(ConfigError, match=message):
        _config(entry)


def test_defaults_keep_the_config_form_and_the_method_ids():
    plain = _config({"name": "sd-class"})
    assert set(plain.to_dict()["methods"][0]) == {"name", "params", "label"}
    explicit = _config({"name": "sd-class", "base": "f2d-bench/tiny-sd14", "sampling": "protocol"})
    assert explicit.to_dict()["methods"][0]["base"] == "f2d-bench/tiny-sd14"
    [a] = build_methods(plain, load_prompt_set("smoke"))
    [b] = build_methods(explicit, load_prompt_set("smoke"))
    assert a.method_id == b.method_id  # the same model and sampling: the same images


def test_each_base_model_loads_once_and_is_shared(second_base):
    cfg = _config({"name": "sd-class"}, {"name": "sd-class", "label": "other", "base": second_base})
    provider = PipelineProvider(cfg)
    run_sd, other = build_methods(cfg, load_prompt_set("smoke"), provider)
    assert other.context.model.pretrained == second_base and run_sd.context.model == cfg.model
    assert other.method_id != run_sd.method_id  # another base model: other images
    again = method_context(cfg, load_prompt_set("smoke"), cfg.methods[1], _NativeSD, provider)
    assert again.pipeline() is other.context.pipeline()
    assert other.context.pipeline().unet is not run_sd.context.pipeline().unet
    assert provider.loaded() == 2


def test_another_scheduler_shares_the_modules_of_the_loaded_model():
    cfg = _config({"name": "sd-class"})
    provider = PipelineProvider(cfg)
    protocol = provider()
    native = provider.get(cfg.model, "DDIMScheduler")
    assert type(native.scheduler).__name__ == "DDIMScheduler"
    assert type(protocol.scheduler).__name__ == cfg.sampling.scheduler
    assert native.unet is protocol.unet and native.text_encoder is protocol.text_encoder
    assert provider.loaded() == 1 and provider.get(cfg.model, "DDIMScheduler") is native


def test_a_run_records_and_reports_each_methods_base_and_sampling(tmp_path, second_base, monkeypatch):
    from f2d_bench.methods import METHODS
    from f2d_bench.registry import PluginEntry

    # A method with native sampling, registered for this test as a third-party plugin would be.
    monkeypatch.setitem(METHODS._builtins, "native-sd", PluginEntry("native-sd", f"{__name__}:_NativeSD", "", "test"))
    cfg = _config({"name": "sd-class"}, {"name": "native-sd", "sampling": "native", "base": second_base},
                  faces=str(face_dir(tmp_path / "faces", ["obama"])), seeds=[0])
    out = tmp_path / "run"
    summary = generate_run(cfg, out, progress=False)
    assert summary.complete
    native_progress = next(m for m in summary.methods if m.label == "native-sd")
    assert any("released on runwayml/stable-diffusion-v1-5" in p for p in native_progress.problems)
    run = RunDir(out)
    infos = {m["label"]: run.method_info(m["method_id"]) for m in run.read_grid()["methods"]}
    native = infos["native-sd"]
    assert native["sampling_mode"] == "native" and native["identity"]["sampling"]["num_inference_steps"] == 3
    assert native["identity"]["model"]["pretrained"] == second_base
    assert infos["sd-class"]["sampling_mode"] == "protocol"
    line = setup_text({**native["identity"], "sampling_mode": native["sampling_mode"], "replaces": ["unet"]})
    assert line.startswith(second_base) and "with its own unet" in line
    assert "native sampling: DDIM, 3 steps, CFG 5.0, 64x64" in line
    # Native and protocol images differ: another scheduler, steps and CFG on the same noise.
    images = {k.method_id: np.asarray(Image.open(run.store.image_path(k)), dtype=int)
              for k in sorted(run.store.manifest_records(), key=str)}
    assert np.abs(images[infos["sd-class"]["method_id"]] - images[native["method_id"]]).max() > 0
    assert json.loads(run.run_json.read_text())["config"]["methods"][1]["sampling"] == "native"
