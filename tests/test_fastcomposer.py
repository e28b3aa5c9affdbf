"""FastComposer: the released checkpoint layout (tiny widths, random weights) loaded strictly, the post-fuse
MLP against a hand computation, tokenization, delayed conditioning, batching, class words."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.fastcomposer.method import FastComposerFace, FastComposerMethod, object_pixels
from baselines.fastcomposer.model import (
    CheckpointLayoutError, Configs, FastComposerModel, PostfuseModule, configs_of, parameter_counts, vision_config,
)
from f2d_bench.config import config_from_dict
from f2d_bench.engine import PipelineProvider
from f2d_bench.errors import ConfigError
from f2d_bench.faces.faceset import Face
from f2d_bench.grid import ItemKey
from f2d_bench.methods.base import GenerationRequest, MethodContext
from f2d_bench.methods.sd_class import SDClassMethod
from f2d_bench.prompts import load_prompt_set

from conftest import prepared_crops, small_config_dict

#: A small vision tower (224 input as the official, patch 32: 49 patches).
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "patch_size": 32}
# diffusers renamed these in the VAE's attention block; the released file has the old names.
OLD_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def provider():
    return PipelineProvider(config_from_dict(small_config_dict()))


def _official_state(model: FastComposerModel, vae) -> dict[str, torch.Tensor]:
    """The model's tensors in the released pytorch_model.bin layout, written independently of the loader:
    FastComposerModel's attribute names as prefixes, no ``text_model.`` level, int64 position ids, the
    VAE's old attention names."""
    state = {}
    for part in ("text_encoder", "image_encoder", "unet", "postfuse_module"):
        for key, value in getattr(model, part).state_dict().items():
            state[f"{part}.{key}"] = value.clone()
    state["text_encoder.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    state["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(50, dtype=torch.int64)[None]
    for key, value in vae.state_dict().items():
        for new, old in OLD_VAE_NAMES.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[f"vae.{key}"] = value.clone()
    return state


@pytest.fixture(scope="module")
def official_file(provider, tmp_path_factory):
    """A tiny FastComposer with random weights saved in the released layout; returns (path, state)."""
    from diffusers import AutoencoderKL

    pipe = provider()
    torch.manual_seed(7)
    model = FastComposerModel(configs_of(pipe, TINY_VISION))
    vae = AutoencoderKL.from_config(dict(pipe.vae.config))
    state = _official_state(model, vae)
    path = tmp_path_factory.mktemp("fastcomposer") / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


def _method(provider, **params) -> FastComposerMethod:
    params = {"vision_config": TINY_VISION, **params}
    cfg = config_from_dict(small_config_dict(methods=[{"name": "fastcomposer", "params": params}]))
    method = FastComposerMethod(params, MethodContext(cfg, load_prompt_set("smoke"), provider))
    method.label = "fastcomposer"
    return method


def _face(face_id="obama", class_word="man") -> Face:
    return Face(face_id, prepared_crops()[face_id], class_word)


def _request(method, face, prepared, prompt_index=0, seed=0) -> GenerationRequest:
    prompt = load_prompt_set("smoke").prompts[prompt_index]
    return GenerationRequest(ItemKey(method.method_id, face.face_id, prompt.id, seed), prompt, face, prepared,
                             torch.Generator("cpu").manual_seed(seed))


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


# --- sizes -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 15 s: the real-size model built on the meta device
def test_trained_params_at_real_size_match_table_2():
    from transformers import CLIPTextConfig

    from f2d_bench.pipelines.sd14 import sd14_component_configs

    real = sd14_component_configs()  # SD 1.5 has SD 1.4's architecture
    configs = Configs(CLIPTextConfig(**real["text_encoder"]), vision_config(768), real["unet"], real["vae"])
    counts = parameter_counts(configs)
    assert counts["unet"] == 859_520_964
    assert counts["text_encoder"] == 123_060_480
    assert counts["vae"] == 83_653_863
    assert counts["image_encoder"] == 303_966_208  # CLIP ViT-L/14 vision tower + 1024 -> 768 projection
    # LN(1536) + Linear(1536, 768) + Linear(768, 768); LN(768) + 2 x Linear(768, 768); LN(768)
    assert counts["postfuse_module"] == 2_958_336
    assert counts["trained_vision_layers"] == 2 * 12_596_224
    assert counts["trained"] == 887_671_748
    assert f"{counts['trained']:.2e}" == "8.88e+08"  # Table 2's FastComposer #Params


def test_info_counts_the_tiny_architecture(provider, official_file):
    method = _method(provider, weights=str(official_file[0]))
    info = method.info()
    model = method.load()
    by_hand = (sum(p.numel() for p in model.unet.parameters()) + sum(p.numel() for p in model.postfuse_module.parameters())
               + sum(p.numel() for layer in model.image_encoder.vision_model.encoder.layers[-2:] for p in layer.parameters()))
    assert info["trained_params"] == by_hand
    assert info["weights"] == "official"
    assert _method(provider, weights="random").info()["weights"] == "random weights: not meaningful"


# --- the checkpoint ----------------------------------------------------------------------------------------


def test_official_layout_loads_strictly(provider, official_file):
    path, state = official_file
    # The released file's names, as the official FastComposerModel writes them.
    for key in ("text_encoder.embeddings.token_embedding.weight", "text_encoder.embeddings.position_ids",
                "text_encoder.encoder.layers.0.self_attn.q_proj.weight", "text_encoder.final_layer_norm.weight",
                "image_encoder.vision_model.embeddings.class_embedding", "image_encoder.visual_projection.weight",
                "image_encoder.vision_model.post_layernorm.weight", "vae.encoder.mid_block.attentions.0.query.weight",
                "vae.decoder.mid_block.attentions.0.proj_attn.bias", "unet.conv_in.weight",
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "postfuse_module.mlp1.layernorm.weight", "postfuse_module.mlp2.fc2.bias", "postfuse_module.layer_norm.weight"):
        assert key in state, key
    assert state["text_encoder.embeddings.position_ids"].dtype == torch.int64
    model = _method(provider, weights=str(path)).load()
    loaded = model.state_dict()
    for key in ("text_encoder.encoder.layers.1.mlp.fc1.weight", "image_encoder.vision_model.encoder.layers.1.self_attn.v_proj.bias",
                "unet.conv_in.weight", "postfuse_module.mlp1.fc1.weight"):
        assert torch.equal(loaded[key], state[key])
    assert len(loaded) == len([k for k in state if not k.startswith("vae.") and not k.endswith("position_ids")])


@pytest.mark.parametrize("change, named", [
    ("drop", "missing keys 1: 'unet.conv_in.weight'"),
    ("new_vae_names", "unexpected keys"),
    ("text_model", "'text_encoder.text_model.embeddings.token_embedding.weight'"),
    ("shape", "postfuse_module.layer_norm.weight [3]"),
    ("position_ids", "text_encoder.embeddings.position_ids (not 0..76)"),
])
def test_wrong_layouts_are_rejected_naming_keys(provider, official_file, tmp_path, change, named):
    state = dict(official_file[1])
    if change == "drop":
        del state["unet.conv_in.weight"]
    elif change == "new_vae_names":
        state["vae.encoder.mid_block.attentions.0.to_q.weight"] = state.pop("vae.encoder.mid_block.attentions.0.query.weight")
    elif change == "text_model":
        state = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in state.items()}
    elif change == "shape":
        state["postfuse_module.layer_norm.weight"] = torch.ones(3)
    else:
        state["text_encoder.embeddings.position_ids"] = torch.zeros(1, 77, dtype=torch.int64)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointLayoutError) as info:
        _method(provider, weights=str(path)).load()
    assert named in str(info.value) and str(path) in str(info.value)
    if change == "new_vae_names":
        assert "'vae.encoder.mid_block.attentions.0.query.weight'" in str(info.value)


def test_missing_weights_file_says_where_it_is_published(provider, tmp_path):
    for value in (None, str(tmp_path / "nope.bin")):
        with pytest.raises(ConfigError, match="mit-han-lab/fastcomposer"):
            _method(provider, weights=value)


@pytest.mark.parametrize("params, named", [({"alpha": 1.5}, "alpha"), ({"subject": "a man"}, "subject"),
                                           ({"vision_config": 3}, "vision_config"), ({"weights": 5}, "weights")])
def test_bad_params_are_named(provider, params, named):
    with pytest.raises(ConfigError, match=named):
        _method(provider, **{"weights": "random", **params})


# --- the fusion -----------------------------------------------------------------------------------------------


def test_fused_embedding_equals_a_hand_computation():
    torch.manual_seed(0)
    d = 4
    module = PostfuseModule(d)
    for p in module.parameters():  # non-trivial LayerNorm weights too
        p.data.normal_()
    text = torch.randn(2, 5, d)
    objects = torch.randn(2, d)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    out = module(text, objects, mask)

    def mlp(x, m, residual):
        y = F.layer_norm(x, x.shape[-1:], m.layernorm.weight, m.layernorm.bias, 1e-5)
        y = F.gelu(y @ m.fc1.weight.T + m.fc1.bias) @ m.fc2.weight.T + m.fc2.bias
        return y + x if residual else y

    for row, pos in ((0, 1), (1, 3)):
        t, o = text[row, pos], objects[row]
        x = mlp(torch.cat([t, o]), module.mlp1, False) + t
        x = mlp(x, module.mlp2, True)
        want = F.layer_norm(x, (d,), module.layer_norm.weight, module.layer_norm.bias, 1e-5)
        torch.testing.assert_close(out[row, pos], want)
    keep = ~mask
    assert torch.equal(out[keep], text[keep])
    with pytest.raises(ValueError, match="exactly one"):
        module(text, objects, torch.zeros(2, 5, dtype=torch.bool))


def test_tokenization_marks_the_class_word_and_leaves_the_shared_tokenizer(provider):
    method = _method(provider, weights="random")
    shared = provider().tokenizer
    before = len(shared)
    ids, index = method.tokenize("a woman img laughing")
    plain = shared("a woman laughing", padding="max_length", max_length=shared.model_max_length).input_ids
    assert ids == plain  # the image token removed, padded as the pipeline pads
    assert shared.convert_ids_to_tokens(ids[index]) == "woman</w>"
    assert len(shared) == before and "img" not in shared.get_vocab()
    with pytest.raises(Exception, match="once"):
        method.tokenize("a woman laughing")


def test_object_pixels_pad_to_square_then_resize():
    from PIL import Image

    image = Image.new("RGB", (20, 10), (255, 255, 255))
    x = object_pixels(image, 8)
    assert x.shape == (3, 8, 8)
    assert x[:, 0].max() < 0.6 and x[:, 4].min() == 1.0  # black bands above and below, white middle
    assert torch.equal(object_pixels(Image.new("RGB", (8, 8), (10, 20, 30)), 8)[:, 0, 0],
                       torch.tensor([10, 20, 30]) / 255.0)


# --- rendering ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 20 s: five tiny renders plus the built-in faces
def test_batch_equals_alone_and_faces_differ(provider, official_file):
    # alpha 1: every step but the first sees the face (at 4 steps, alpha 0.5 leaves one step to show it).
    method = _method(provider, weights=str(official_file[0]), alpha=1.0)
    faces = [_face("obama", "man"), _face("grace_hopper", "woman")]
    embeds = method.encode_images([__import__("f2d_bench.faces.imageio", fromlist=["x"]).read_image(f.path) for f in faces])
    prepared = {f.face_id: method.prepare(f) for f in faces}
    for f, e in zip(faces, embeds):  # the image encoder batched equals each face alone
        torch.testing.assert_close(prepared[f.face_id].embedding, e, atol=1e-5, rtol=1e-4)
    together = method.generate([_request(method, f, prepared[f.face_id]) for f in faces])
    alone = [method.generate([_request(method, f, prepared[f.face_id])])[0] for f in faces]
    assert max(np.abs(_pixels(a) - _pixels(b)).max() for a, b in zip(together, alone)) <= 3
    again = method.generate([_request(method, faces[0], method.prepare(faces[0]))])[0]
    assert np.array_equal(_pixels(again), _pixels(alone[0]))
    # Same prompt, same seed, same class word: only the face differs.
    other = Face("biden", prepared_crops()["biden"], "man")
    diff = method.generate([_request(method, other, method.prepare(other))])[0]
    assert np.abs(_pixels(diff) - _pixels(alone[0])).max() > 0


def test_the_loaded_file_decides_the_images(provider, official_file):
    """The file's UNet, text encoder and fusion MLP replace the base's: its images are not weights: random's."""
    face = _face()
    loaded, random = _method(provider, weights=str(official_file[0]), alpha=1.0), _method(provider, weights="random", alpha=1.0)
    images = [m.generate([_request(m, face, m.prepare(face))])[0] for m in (loaded, random)]
    assert np.abs(_pixels(images[0]) - _pixels(images[1])).max() > 10
    unet = loaded.load().unet
    assert torch.equal(unet.conv_in.weight, official_file[1]["unet.conv_in.weight"].to(unet.conv_in.weight.dtype))


def test_delayed_conditioning_switches_after_the_text_only_steps(provider):
    method = _method(provider, weights="random", alpha=0.0)
    assert method.merge_step() == 4  # 4 steps: every step text-only
    assert _method(provider, weights="random", alpha=0.5).merge_step() == 2
    face = _face()
    prepared = method.prepare(face)
    image = method.generate([_request(method, face, prepared)])[0]
    # alpha 0: exactly a plain pipeline call on the text-only prompt ("a man  as a chef ...").
    pipe = provider()
    s = method.context.sampling
    plain = pipe(prompt=["a man  as a chef in a restaurant kitchen"], negative_prompt=[""],
                 num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, height=s.height,
                 width=s.width, generator=[torch.Generator("cpu").manual_seed(0)]).images[0]
    assert np.abs(_pixels(image) - _pixels(plain)).max() <= 1
    fused = _method(provider, weights="random", alpha=1.0)
    assert np.abs(_pixels(fused.generate([_request(fused, face, prepared)])[0]) - _pixels(image)).max() > 0


def test_plain_methods_render_the_same_before_and_after(provider, official_file):
    cfg = config_from_dict(small_config_dict())
    sd = SDClassMethod({}, MethodContext(cfg, load_prompt_set("smoke"), provider))
    face = _face()
    before = sd.generate([_request(sd, face, None)])[0]
    method = _method(provider, weights=str(official_file[0]))
    method.generate([_request(method, face, method.prepare(face))])
    after = sd.generate([_request(sd, face, None)])[0]
    assert np.array_equal(_pixels(before), _pixels(after))
    assert provider().unet is not method.load().unet


# --- class words ---------------------------------------------------------------------------------------------


def test_missing_class_word_is_a_clear_error(provider, tmp_path):
    method = _method(provider, weights="random")
    with pytest.raises(ConfigError, match=r"'obama'.*--class-word"):
        method.prepare(Face("obama", prepared_crops()["obama"]))
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "obama.png").write_bytes(prepared_crops()["obama"].read_bytes())
    params = {"weights": "random", "vision_config": TINY_VISION}
    cfg = config_from_dict(small_config_dict(faces=str(faces), methods=[{"name": "fastcomposer", "params": params}]))
    early = FastComposerMethod(params, MethodContext(cfg, load_prompt_set("smoke"), provider))
    with pytest.raises(ConfigError, match=r"'obama'.*manifest.json"):
        early.preflight(["obama"], ["job-chef"], [0])


def test_class_words_from_the_config_fill_and_override_the_face_sets(provider, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for fid in ("a", "b", "c"):
        (faces / f"{fid}.png").write_bytes(prepared_crops()["obama"].read_bytes())
    (faces / "manifest.json").write_text(json.dumps({"faces": [
        {"face_id": "a", "file": "a.png", "class_word": "woman"}, {"face_id": "b", "file": "b.png"},
        {"face_id": "c", "file": "c.png"}]}))

    def built(words):
        params = {"weights": "random", "vision_config": TINY_VISION, "class_words": words}
        cfg = config_from_dict(small_config_dict(faces=str(faces), methods=[{"name": "fastcomposer", "params": params}]))
        return FastComposerMethod(params, MethodContext(cfg, load_prompt_set("smoke"), provider))

    method = built({"a": "man", "*": "person"})
    assert method.face_class_words() == {"a": "man", "b": "person", "c": "person"}
    assert method.prepare(Face("b", faces / "b.png")).class_word == "person"
    only_b = built({"b": "man"})
    assert only_b.face_class_words() == {"a": "woman", "b": "man", "c": None}
    with pytest.raises(ConfigError, match=r"'c'.*class_words"):
        only_b.preflight(["a", "b", "c"], ["job-chef"], [0])
    # the words are part of the method id (other words, other images); none given keeps the old id
    assert method.method_id != only_b.method_id != built({}).method_id
    assert "class_words" not in built({}).identity()["params"]
    for bad in ({"a": "old man"}, {"a": ""}, ["man"], {"a": 3}):
        with pytest.raises(ConfigError, match="class_words must map face ids"):
            built(bad)


def test_a_changed_class_word_is_another_experiment(tmp_path):
    """The run's grid records each face's class word: reopening a run after one changed is refused."""
    from f2d_bench.engine import open_run
    from f2d_bench.errors import F2DBenchError
    from f2d_bench.grid import UNSHARDED

    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "a.png").write_bytes(prepared_crops()["obama"].read_bytes())
    manifest = {"faces": [{"face_id": "a", "file": "a.png", "class_word": "man"}]}
    (faces / "manifest.json").write_text(json.dumps(manifest))
    cfg = config_from_dict(small_config_dict(faces=str(faces)))
    run = open_run(cfg, tmp_path / "run", shard=UNSHARDED).run
    assert run.read_grid()["faces"][0]["class_word"] == "man"
    open_run(cfg, tmp_path / "run", shard=UNSHARDED)  # unchanged: opens
    manifest["faces"][0]["class_word"] = "woman"
    (faces / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(F2DBenchError, match=r"different settings \(faces differ\)"):
        open_run(cfg, tmp_path / "run", shard=UNSHARDED)


def test_prompt_subject_is_class_word_then_img(provider):
    method = _method(provider, weights="random")
    face = _face("grace_hopper", "woman")
    request = _request(method, face, FastComposerFace(torch.zeros(32), "woman"), prompt_index=2)
    assert method.prompt_text(request) == "a woman img laughing"


def test_registered_with_native_sampling():
    from f2d_bench.methods import METHODS

    cls = METHODS.load("fastcomposer")
    assert cls is FastComposerMethod
    assert cls.native_sampling == {"scheduler": "PNDMScheduler", "num_inference_steps": 50, "guidance_scale": 5.0}
    assert cls.released_base == "runwayml/stable-diffusion-v1-5" and cls.replaces == ("unet", "text_encoder")
