"""CustomDiffusion on the tiny pipeline and the real test photos; its size at SD 1.4's architecture."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from baselines.custom_diffusion.method import (
    TOKEN_FILE, WEIGHTS_FILE, CustomDiffusionMethod, cross_attention_layers, initializer_id, trained_parameter_count,
)
from f2d_bench.errors import F2DBenchError
from f2d_bench.methods import METHODS
from f2d_bench.tuning.diffusion import DenoisingLoss, encode_posterior, encode_text, training_pixels, training_resolution

from conftest import sha256_file
from test_tuning import _face, _method, _pixels, _request

CD = {"name": "custom-diffusion", "params": {"steps": 3, "num_class_images": 2}}


@pytest.fixture
def method(tmp_path) -> CustomDiffusionMethod:
    m = _method(CD)
    m.shared_dir = tmp_path / "shared"
    return m


def test_listed_through_its_entry_point():
    assert METHODS.entries()["custom-diffusion"].target.startswith("baselines.custom_diffusion.")


def test_trained_parameters_at_sd14_size_are_the_papers():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from f2d_bench.pipelines.sd14 import SD14_TEXT_ENCODER_CONFIG, SD14_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT_ENCODER_CONFIG))
    layers = cross_attention_layers(unet)
    assert len(layers) == 16
    # K and V: 768 -> width, in 5 layers of 320, 5 of 640 and 6 of 1280 channels.
    assert 2 * 768 * (5 * 320 + 5 * 640 + 6 * 1280) == 19_169_280
    assert trained_parameter_count(unet, text_encoder) == 19_169_280 + 49_409 * 768 == 57_115_392


def _fixed_draw_loss(method, face, kv, vectors) -> float:
    pipe = method.context.pipeline()
    posterior = encode_posterior(pipe.vae, training_pixels(face.path, training_resolution(pipe)))
    generator = torch.Generator("cpu").manual_seed(99)
    loss = DenoisingLoss(pipe, generator)
    total = 0.0
    with torch.no_grad(), method._installed(method._processors(kv)):
        for _ in range(12):
            latents = posterior.sample(8, generator, 0.5)
            with method.written(vectors[None].expand(8, -1, -1)):
                text = encode_text(pipe, ["photo of a " + method.subject_text()] * 8)
            total += float(loss(pipe.unet, latents, text))
    return total / 12


def test_the_word_vector_starts_from_the_vocabulary_entry_ktn(method):
    from f2d_bench.errors import ConfigError

    tokenizer = method.context.pipeline().tokenizer  # CLIP's real BPE vocabulary
    # as diffusers' tokenizer.encode(["ktn"]) and Adobe's hard-coded row; the word "ktn" would be two tokens
    assert initializer_id(tokenizer, "ktn") == 42170 == tokenizer.convert_tokens_to_ids("ktn")
    assert tokenizer("ktn", add_special_tokens=False).input_ids == [74, 7248]
    with pytest.raises(ConfigError, match=r"initializer_token: 'ktn person' is not an entry"):
        initializer_id(tokenizer, "ktn person")


def test_tuning_lowers_the_loss_and_keeps_the_base_unet(tmp_path):
    method = _method({"name": "custom-diffusion",
                      "params": {"steps": 15, "num_class_images": 0, "learning_rate": 1e-3, "batch_size": 4}})
    face = _face()
    pipe = method.context.pipeline()
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before_procs = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    start = pipe.text_encoder.get_input_embeddings().weight[[42170]].detach()  # the official start: "ktn"
    (tmp_path / "a").mkdir()
    facts = method.tune(face, tmp_path / "a")
    tuned = method.load_tuned(face, tmp_path / "a")
    assert facts["steps"] == len(facts["losses"]) == 15 and facts["class_images"] == 0
    assert _fixed_draw_loss(method, face, tuned.kv, tuned.vectors) < _fixed_draw_loss(method, face, None, start) - 1e-3
    # Training and rendering leave the shared pipeline as it was.
    method.generate([_request(method, face, tuned)])
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before_procs
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())


def test_artifact_is_diffusers_format_and_renders_the_same(method, tmp_path):
    from diffusers import StableDiffusionPipeline

    face = _face()
    (tmp_path / "a").mkdir()
    facts = method.tune(face, tmp_path / "a")
    assert facts["class_images"] == 2 and len(list((tmp_path / "shared").glob("class-*/*.png"))) == 2
    prepared = method.load_tuned(face, tmp_path / "a")
    request = _request(method, face, prepared)
    ours = _pixels(method.generate([request])[0])

    pipe = method.context.pipeline()
    other = StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
                                       "tokenizer": copy.deepcopy(pipe.tokenizer),
                                       "text_encoder": copy.deepcopy(pipe.text_encoder)})
    # diffusers installs the processors only when given the pipeline (a bare UNet call drops them).
    other.unet.load_attn_procs(str(tmp_path / "a"), weight_name=WEIGHTS_FILE, _pipeline=other)
    assert {type(p).__name__ for n, p in other.unet.attn_processors.items() if "attn2" in n} == \
        {"CustomDiffusionAttnProcessor"}
    other.load_textual_inversion(str(tmp_path / "a"), weight_name=TOKEN_FILE)
    s = method.context.config.sampling
    theirs = other(request.prompt.render("<new1> person"), negative_prompt="",
                   num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, height=s.height,
                   width=s.width, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(_pixels(theirs) - ours).max() <= 3

    sd_class = _method({"name": "sd-class"})
    assert np.abs(_pixels(sd_class.generate([_request(sd_class, face, None)])[0]) - ours).max() > 10


def test_same_seed_same_bytes_and_class_images_made_once(method, tmp_path):
    face = _face()
    for name in "ab":
        (tmp_path / name).mkdir()
    method.tune(face, tmp_path / "a")
    [class_dir] = list((tmp_path / "shared").glob("class-*"))
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")}
    fresh = _method(CD)  # a new process would re-encode, not re-render, the class images
    fresh.shared_dir = tmp_path / "shared"
    fresh.tune(face, tmp_path / "b")
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")} == stamps
    for name in (WEIGHTS_FILE, TOKEN_FILE):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)


def test_a_foreign_weights_file_is_refused(method, tmp_path):
    face = _face()
    (tmp_path / "a").mkdir()
    method.tune(face, tmp_path / "a")
    state = torch.load(tmp_path / "a" / WEIGHTS_FILE, weights_only=True)
    name = next(k for k in state if k.endswith("to_k_custom_diffusion.weight"))
    good = dict(state)
    state[name] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "a" / WEIGHTS_FILE)
    with pytest.raises(F2DBenchError, match="not this UNet's CustomDiffusion weights"):
        method.load_tuned(face, tmp_path / "a")
    # a `--freeze_model crossattn` file (q and out trained too), a file without the self-attention
    # entries, and a filled self-attention entry: each refused, naming the key
    q_name = name.replace("to_k_custom_diffusion", "to_q_custom_diffusion")
    self_attention = next(k for k, v in good.items() if isinstance(v, dict))
    for changed, match in (({**good, q_name: good[name]}, rf"unexpected {re.escape(q_name)}"),
                           ({k: v for k, v in good.items() if not isinstance(v, dict)}, r"missing .*attn1"),
                           ({**good, self_attention: {"weight": torch.zeros(1)}}, "not an empty self-attention")):
        torch.save(changed, tmp_path / "a" / WEIGHTS_FILE)
        with pytest.raises(F2DBenchError, match=match):
            method.load_tuned(face, tmp_path / "a")
    torch.save(good, tmp_path / "a" / WEIGHTS_FILE)
    assert method.load_tuned(face, tmp_path / "a").kv  # the file as written loads
