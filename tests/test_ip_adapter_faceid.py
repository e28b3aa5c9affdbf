"""IP-Adapter-FaceID on the tiny pipeline: official-layout files with random weights at tiny widths, loaded
through diffusers' ``load_ip_adapter`` (LoRA through PEFT), an ONNX recognizer built here and loaded by
insightface, MTCNN keypoints (a working SCRFD cannot be built without its trained weights), the real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
onnx = pytest.importorskip("onnx")

from baselines.ip_adapter_faceid.method import (  # noqa: E402
    ADAPTER_FILES, ADAPTER_NAME, RECOGNIZER_FILE, FaceIDFace, adapter_layout,
    layout_parameter_count,
)
from baselines.ip_adapter_faceid.random_weights import random_adapter_state, random_recognizer_onnx  # noqa: E402
from f2d_bench.errors import ConfigError  # noqa: E402
from f2d_bench.methods import METHODS  # noqa: E402
from f2d_bench.weights import WeightsLayoutError  # noqa: E402

from test_tuning import _face, _method, _pixels, _request  # noqa: E402

RANK = 4  # tiny LoRA rank
CLIP_WIDTH = 48  # tiny CLIP hidden width (ViT-H-14: 1280)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    from f2d_bench.pipelines.tiny import TINY_UNET_CONFIG

    with torch.device("meta"):
        return UNet2DConditionModel(**TINY_UNET_CONFIG)


def _random_state(variant, seed=0, clip_dim=CLIP_WIDTH):
    unet = _tiny_unet()
    layout = adapter_layout(list(unet.attn_processors), unet.config.block_out_channels,
                            unet.config.cross_attention_dim, variant, lora_rank=RANK, clip_dim=clip_dim)
    return random_adapter_state(layout, seed)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faceid")
    pack = root / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    random_recognizer_onnx(pack / RECOGNIZER_FILE)
    for variant in ("faceid", "plus"):
        torch.save(_random_state(variant), root / ADAPTER_FILES[variant])
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=224, patch_size=32, projection_dim=32)).save_pretrained(root / "clip")
    return root


def _cfg(files, variant="faceid", **params):
    file = ADAPTER_FILES["plus" if variant == "plusv2" else variant]
    p = {"variant": variant, "adapter": str(files / file), "model_root": str(files / "insightface"),
         "detector": "mtcnn", **params}
    if variant != "faceid" and "image_encoder" not in params:
        p["image_encoder"] = str(files / "clip")
    return {"name": "ip-adapter-faceid", "params": p}


@pytest.fixture(scope="module")
def method(files):
    return _method(_cfg(files))


def _render(method, faces_prompts, prepared=None):
    prepared = {} if prepared is None else prepared
    reqs = []
    for face_id, prompt_index, seed in faces_prompts:
        face = _face(face_id)
        if face_id not in prepared:
            prepared[face_id] = method.prepare(face)
        reqs.append(_request(method, face, prepared[face_id], prompt_index, seed))
    return [_pixels(im) for im in method.generate(reqs)]


def test_listed_through_its_entry_point():
    assert METHODS.entries()["ip-adapter-faceid"].target.startswith("baselines.ip_adapter_faceid.")


def test_layout_at_sd15_size():
    from diffusers import UNet2DConditionModel

    from f2d_bench.pipelines.sd14 import SD14_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)  # SD 1.5 has SD 1.4's UNet architecture
    names = list(unet.attn_processors)
    plain = adapter_layout(names, unet.config.block_out_channels, 768, "faceid")
    plus = adapter_layout(names, unet.config.block_out_channels, 768, "plus")
    # 32 processors x 8 LoRA tensors + 16 cross-attention x (to_k_ip, to_v_ip); names as the official files.
    assert len(plain["ip_adapter"]) == 32 * 8 + 16 * 2
    assert plain["ip_adapter"]["1.to_k_ip.weight"] == (320, 768)
    assert plain["ip_adapter"]["0.to_q_lora.down.weight"] == (128, 320)
    # diffusers' (and the official code's) processor order ends with the mid block's two (1280 channels).
    assert names[31].startswith("mid_block") and plain["ip_adapter"]["31.to_out_lora.up.weight"] == (1280, 128)
    assert set(plain["image_proj"]) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                        "norm.weight", "norm.bias"}
    assert plain["image_proj"]["proj.2.weight"] == (768 * 4, 1024)
    assert plus["image_proj"]["perceiver_resampler.proj_in.weight"] == (768, 1280)
    assert plus["image_proj"]["perceiver_resampler.layers.3.0.to_kv.weight"] == (2 * 768, 768)
    assert plus["image_proj"]["perceiver_resampler.layers.0.1.3.weight"] == (768, 3072)
    assert layout_parameter_count(plus) > layout_parameter_count(plain) > 0


def test_file_loads_through_diffusers_strictly(method, files):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection

    pipe = method.adapter_pipeline()
    state = torch.load(files / ADAPTER_FILES["faceid"], weights_only=True)
    procs = pipe.unet.attn_processors
    cross = [n for n in procs if n.endswith("attn2.processor")]
    assert all(isinstance(procs[n], IPAdapterAttnProcessor2_0) for n in cross)
    # Processor k of the file is the k-th of the UNet: the first cross-attention one is index 1.
    assert torch.equal(procs[cross[0]].to_k_ip[0].weight, state["ip_adapter"]["1.to_k_ip.weight"])
    [proj] = pipe.unet.encoder_hid_proj.image_projection_layers
    assert isinstance(proj, IPAdapterFaceIDImageProjection)
    assert torch.equal(proj.ff.net[0].proj.weight, state["image_proj"]["proj.0.weight"])
    # The LoRA went through PEFT into the private UNet, with the file's tensors.
    assert ADAPTER_NAME in pipe.unet.peft_config
    q = pipe.unet.get_submodule(cross[0].removesuffix(".processor") + ".to_q")
    assert torch.equal(q.lora_A[ADAPTER_NAME].weight, state["ip_adapter"]["1.to_q_lora.down.weight"])
    assert not any(p.is_meta for p in pipe.unet.parameters())
    # ... and none of it reached the shared pipeline.
    base = method.context.pipeline().unet
    assert base.encoder_hid_proj is None and not getattr(base, "peft_config", None)
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in base.attn_processors.values())


def test_truncated_or_foreign_files_are_rejected(files, tmp_path):
    state = _random_state("faceid")
    del state["ip_adapter"]["3.to_v_ip.weight"]
    state["image_proj"]["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "cut.bin")
    with pytest.raises(WeightsLayoutError, match=r"image_proj: unexpected keys 1: 'extra.weight'; "
                       r"ip_adapter: missing keys 1: '3.to_v_ip.weight'\.$"):
        _method(_cfg(files, adapter=str(tmp_path / "cut.bin"))).adapter_pipeline()
    with pytest.raises(WeightsLayoutError, match="set variant plus or plusv2"):
        _method(_cfg(files, adapter=str(files / ADAPTER_FILES["plus"]))).adapter_pipeline()
    torch.save({"proj.weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(WeightsLayoutError, match="'image_proj' and 'ip_adapter'"):
        _method(_cfg(files, adapter=str(tmp_path / "other.bin"))).adapter_pipeline()


def test_missing_files_say_where_to_get_them(files, tmp_path):
    with pytest.raises(ConfigError, match="ip-adapter-faceid_sd15.bin is published on Hugging Face at h94/IP-Adapter-FaceID"):
        _method(_cfg(files, adapter=None))
    with pytest.raises(ConfigError, match=r"no file at .*nothing.bin.*ip-adapter-faceid-plus_sd15.bin"):
        _method(_cfg(files, "plus", adapter=str(tmp_path / "nothing.bin")))
    with pytest.raises(ConfigError, match=r"w600k_r50.onnx not found in .*models/buffalo_l.*buffalo_l.zip"):
        _method(_cfg(files, model_root=str(tmp_path)))
    with pytest.raises(ConfigError, match="det_10g.onnx"):
        _method(_cfg(files, detector="scrfd"))
    with pytest.raises(ConfigError, match="CLIP-ViT-H-14"):
        _method(_cfg(files, "plus", image_encoder=None))
    with pytest.raises(ConfigError, match="'faceidd'"):
        _method({"name": "ip-adapter-faceid", "params": {**_cfg(files)["params"], "variant": "faceidd"}})


def test_recognizer_through_insightface(method):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    assert isinstance(method.recognizer(), ArcFaceONNX) and method.recognizer().input_size == (112, 112)
    a, b = method.prepare(_face("obama")), method.prepare(_face("biden"))
    assert isinstance(a, FaceIDFace) and a.id_embed.shape == (512,)
    assert abs(float(a.id_embed.norm()) - 1.0) < 1e-5  # normed_embedding
    assert not torch.allclose(a.id_embed, b.id_embed, atol=1e-3)
    assert torch.equal(a.id_embed, method.prepare(_face("obama")).id_embed)


def test_images_batch_faces_and_shared_pipeline(method, files):
    sd_class = _method({"name": "sd-class"})
    face = _face("obama")
    before = _pixels(sd_class.generate([_request(sd_class, face, None)])[0])
    prepared = {}
    batch = _render(method, [("obama", 0, 0), ("biden", 0, 0), ("obama", 1, 1)], prepared)
    alone = [_render(method, [item], prepared)[0] for item in [("obama", 0, 0), ("biden", 0, 0), ("obama", 1, 1)]]
    for x, y in zip(batch, alone):
        assert np.abs(x - y).max() <= 2
    assert np.abs(batch[0] - batch[1]).max() > 10  # different faces, same prompt and seed
    assert np.array_equal(_render(method, [("obama", 0, 0)], prepared)[0], alone[0])
    # The plain sd-class method renders the same images after this method ran in the same process.
    assert np.array_equal(_pixels(sd_class.generate([_request(sd_class, face, None)])[0]), before)
    assert np.abs(before - batch[0]).max() > 10
    info = method.info()
    assert info["weights"] == "random weights: not meaningful"
    assert info["trained_params"] == layout_parameter_count(
        {p: {k: tuple(v.shape) for k, v in d.items()} for p, d in _random_state("faceid").items()})


def test_lora_scale_and_adapter_scale_matter(files):
    item = [("obama", 0, 0)]
    on = _render(_method(_cfg(files)), item)[0]
    off = _render(_method(_cfg(files, lora=False)), item)[0]
    zero = _render(_method(_cfg(files, lora_scale=0.0)), item)[0]
    assert np.abs(on - off).max() > 10
    assert np.abs(zero - off).max() <= 2  # a LoRA weight of 0 is the UNet without it
    no_face = _render(_method(_cfg(files, lora=False, scale=0.0)), item)[0]
    other_face = _render(_method(_cfg(files, lora=False, scale=0.0)), [("biden", 0, 0)])[0]
    assert np.abs(no_face - other_face).max() <= 2  # scale 0: the face no longer matters


@pytest.mark.slow
def test_plus_and_plusv2_render_with_clip(files):
    plus = _method(_cfg(files, "plus"))
    v2 = _method(_cfg(files, "plusv2"))
    prepared = {}
    batch = _render(plus, [("obama", 0, 0), ("biden", 0, 0)], prepared)
    assert prepared["obama"].clip_embeds.shape == (50, CLIP_WIDTH)
    assert np.abs(batch[0] - _render(plus, [("obama", 0, 0)], prepared)[0]).max() <= 2
    assert np.abs(batch[0] - batch[1]).max() > 10
    # PlusV2 adds the ID tokens back (shortcut, s_scale): other images from the same file.
    v2_images = _render(v2, [("obama", 0, 0)], dict(prepared))
    assert np.abs(v2_images[0] - batch[0]).max() > 10
    assert plus.adapter_pipeline().unet.encoder_hid_proj.image_projection_layers[0].clip_embeds is None
    rgb = _method(_cfg(files, "plus", crop_channels="rgb")).prepare(_face("obama"))
    assert not torch.allclose(rgb.clip_embeds, prepared["obama"].clip_embeds)


def test_random_stand_ins_run_offline_through_the_real_loaders():
    """adapter: random and model_root: random (the offline preset): seeded files in the official layout at
    the base's widths, loaded by diffusers and insightface; the same method id on every machine."""
    params = {"adapter": "random", "model_root": "random", "detector": "mtcnn"}
    method = _method({"name": "ip-adapter-faceid", "params": params})
    assert method.info()["weights"] == "random weights: not meaningful"
    assert method.identity()["params"]["adapter"] == {"sha256": "random-0"}
    assert method.recognizer().taskname == "recognition"
    a, b = _render(method, [("obama", 0, 0), ("biden", 0, 0)])
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    with pytest.raises(ConfigError, match="set detector: mtcnn"):
        _method({"name": "ip-adapter-faceid", "params": {**params, "detector": "scrfd"}})


def test_negative_prompt_follows_the_sampling_mode_and_no_guidance_renders(files):
    """Under the protocol every method's negative is the empty prompt; the demo's quality negative comes
    with its native sampling. With CFG 1 diffusers runs the conditional rows only, and so do the face's."""
    assert _method(_cfg(files)).negative_prompt == ""
    native = _method({**_cfg(files), "sampling": "native"})
    assert native.negative_prompt.startswith("monochrome, lowres") and native.context.sampling.guidance_scale == 7.5
    assert _method(_cfg(files, negative_prompt="blurry")).negative_prompt == "blurry"
    unguided = _method(_cfg(files), sampling={"guidance_scale": 1.0})
    a, b = _render(unguided, [("obama", 0, 0), ("biden", 0, 0)])
    assert a.shape == b.shape and np.abs(a - b).max() > 0


def test_face_tokens_equal_the_official_projection_by_hand(method, files):
    """The installed projection is the official MLPProjModel: Linear (512 -> 1024), GELU, Linear (-> 4
    tokens x cross-attention width), each token layer-normalised; computed here from the file's tensors."""
    import torch.nn.functional as F

    state = torch.load(files / ADAPTER_FILES["faceid"], weights_only=True)["image_proj"]
    layer = method.adapter_pipeline().unet.encoder_hid_proj.image_projection_layers[0]
    face = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    hidden = F.gelu(face @ state["proj.0.weight"].T + state["proj.0.bias"])
    tokens = (hidden @ state["proj.2.weight"].T + state["proj.2.bias"]).reshape(3, 4, -1)
    expected = F.layer_norm(tokens, tokens.shape[-1:], state["norm.weight"], state["norm.bias"])
    assert torch.allclose(layer(face), expected, atol=1e-5)
