"""ELITE: its official checkpoint layouts (at tiny widths), mappers, attention processor and rendering on
the tiny pipeline with the real test photos; its size at SD 1.4 / ViT-L/14 scale."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from baselines.elite.attention import ELITEAttnProcessor, LocalContext
from baselines.elite.mappers import GlobalMapper, LocalMapper, cross_attention_shapes, parameter_count
from baselines.elite.method import ELITEFace, ELITEMethod, box_mask, mask_to_grid
from f2d_bench.config import config_from_dict
from f2d_bench.engine import build_methods
from f2d_bench.errors import ConfigError
from f2d_bench.methods import METHODS
from f2d_bench.prompts import load_prompt_set
from f2d_bench.weights import WeightsLayoutError

from conftest import small_config_dict
from test_tuning import _face, _pixels, _request

VISION_WIDTH = TEXT_WIDTH = 32
#: The tiny pipeline's cross-attentions (TINY_UNET_CONFIG: one CrossAttn block down, one up, one mid), as
#: diffusers names the modules; the official files key them with "." replaced by "_".
TINY_ATTN2 = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2": 32,
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2": 32,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2": 32,
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2": 32,
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2": 32,
    "mid_block.attentions.0.transformer_blocks.0.attn2": 64,
}


def official_state(seed: int, vision=VISION_WIDTH, text=TEXT_WIDTH, attn=TINY_ATTN2, scale=0.05) -> OrderedDict:
    """A mapper checkpoint written from the official naming, independently of our classes: five
    ``mapping_{i}`` / ``mapping_patch_{i}`` Sequentials (weights at indices 0, 1, 3, 4, 6; hidden width 1024)
    followed by ``<attn2 name with _>_to_k.weight`` / ``_to_v.weight`` (text width -> inner width)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for i in range(5):
        for branch in (f"mapping_{i}", f"mapping_patch_{i}"):
            for index, shape in ((0, (1024, vision)), (1, (1024,)), (3, (1024, 1024)), (4, (1024,)), (6, (text, 1024))):
                state[f"{branch}.{index}.weight"] = torch.randn(shape, generator=g) * (1.0 if index in (1, 4) else scale)
                state[f"{branch}.{index}.bias"] = torch.randn(shape[:1], generator=g) * scale
    for name, inner in attn.items():
        stem = name.replace(".", "_")
        state[f"{stem}_to_k.weight"] = torch.randn((inner, text), generator=g) * 0.3
        state[f"{stem}_to_v.weight"] = torch.randn((inner, text), generator=g) * 0.3
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny same-architecture CLIPVisionModel directory (16 layers, 224 px, patch 14) and both mapper
    files in the official layout."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("elite")
    torch.manual_seed(3)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=64, num_hidden_layers=16,
                                               num_attention_heads=4, image_size=224, patch_size=14,
                                               projection_dim=32))
    encoder.save_pretrained(root / "clip-vision")
    paths = {"image_encoder": str(root / "clip-vision")}
    for seed, key in enumerate(("global_mapper", "local_mapper")):
        torch.save(official_state(seed + 10), root / f"{key}.pt")
        paths[key] = str(root / f"{key}.pt")
    return paths


def _elite(files, **params) -> ELITEMethod:
    cfg = config_from_dict(small_config_dict(methods=[{"name": "elite", "params": {**files, **params}}]))
    [method] = build_methods(cfg, load_prompt_set("smoke"))
    return method


@pytest.fixture(scope="module")
def method(files) -> ELITEMethod:
    return _elite(files)


@pytest.fixture(scope="module")
def prepared(method):
    return {fid: method.prepare(_face(fid)) for fid in ("obama", "biden")}


def test_registered_with_official_settings():
    cls = METHODS.load("elite")
    assert METHODS.entries()["elite"].target == "baselines.elite.method:ELITEMethod"
    assert cls.released_base == "CompVis/stable-diffusion-v1-4"
    assert cls.native_sampling == {"scheduler": "LMSDiscreteScheduler", "num_inference_steps": 100,
                                   "guidance_scale": 5.0}
    assert cls.defaults["llambda"] == 0.8 and cls.defaults["image_encoder"] == "openai/clip-vit-large-patch14"


def test_official_layouts_load_strictly(method, files):
    models = method.load()
    for key, mapper in (("global_mapper", models.global_mapper), ("local_mapper", models.local_mapper)):
        saved = torch.load(files[key], weights_only=True)
        loaded = mapper.state_dict()
        assert list(loaded) == list(saved)  # same names, same order as the official torch.save
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    k, v = models.global_mapper.projections(name)
    saved = torch.load(files["global_mapper"], weights_only=True)
    assert torch.equal(k.weight, saved[f"{name.replace('.', '_')}_to_k.weight"]) and v.weight.shape == (64, 32)
    assert {a.name for a in cross_attention_shapes(method.context.pipeline().unet)} == set(TINY_ATTN2)
    assert method.info()["weights"] == "official"


@pytest.mark.parametrize("damage, named", [
    ("drop", "missing keys 1: 'mapping_patch_4.6.weight'"),
    ("extra", "unexpected keys 1: 'mapping_5.0.weight'"),
    ("prefix", "'module.' prefix"),
    ("width", "wrong shapes"),
    ("unet", "missing keys 2: 'up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k.weight'"),
])
def test_wrong_layouts_are_rejected_naming_keys(files, tmp_path, damage, named):
    state = official_state(10)
    if damage == "drop":
        del state["mapping_patch_4.6.weight"]
    elif damage == "extra":
        state["mapping_5.0.weight"] = torch.zeros(1024, 32)
    elif damage == "prefix":
        state = OrderedDict((f"module.{k}", v) for k, v in state.items())
    elif damage == "width":  # a file for SD 1.x's 768-wide text encoder
        state = official_state(10, text=768)
    else:  # made for another UNet (one cross-attention fewer)
        state = official_state(10, attn={k: v for k, v in TINY_ATTN2.items() if "attentions.2" not in k})
    torch.save(state, tmp_path / "bad.pt")
    method = _elite({**files, "global_mapper": str(tmp_path / "bad.pt")})
    with pytest.raises(WeightsLayoutError) as err:
        method.load()
    assert named in str(err.value) and "bad.pt" in str(err.value)


def test_missing_files_say_where_they_are_published(files, tmp_path):
    with pytest.raises(ConfigError, match=r"params.global_mapper: no ELITE global mapper.*ELITE-library/ELITE"):
        _elite({**files, "global_mapper": None})
    with pytest.raises(ConfigError, match=r"local_mapper.*nope.pt.*does not exist.*huggingface.co/ELITE-library"):
        _elite({**files, "local_mapper": str(tmp_path / "nope.pt")})
    method = _elite({**files, "image_encoder": str(tmp_path / "no-encoder")})
    with pytest.raises(Exception, match="openai/clip-vit-large-patch14"):
        method.load()


@pytest.mark.parametrize("params, named", [({"llambda": -1}, "llambda"), ({"llambda": "0.8"}, "llambda"),
                                           ({"mask": "segmentation"}, "'segmentation'"),
                                           ({"subject": "a person"}, "'a person'"), ({"steps": 3}, "'steps'")])
def test_bad_params_are_named(files, params, named):
    with pytest.raises(ConfigError, match=named):
        _elite({**files, **params})


def _mlp_by_hand(seq, x):
    """Linear, LayerNorm, LeakyReLU(0.01), Linear, LayerNorm, LeakyReLU, Linear written out."""
    def ln(y, norm):
        mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        return (y - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias

    def leaky(y):
        return torch.where(y > 0, y, 0.01 * y)

    y = leaky(ln(x @ seq[0].weight.T + seq[0].bias, seq[1]))
    y = leaky(ln(y @ seq[3].weight.T + seq[3].bias, seq[4]))
    return y @ seq[6].weight.T + seq[6].bias


def test_mappers_equal_a_hand_computation():
    torch.manual_seed(0)
    g, loc = GlobalMapper(3, 2, hidden=4), LocalMapper(3, 2, hidden=4)
    for mapper in (g, loc):  # non-trivial LayerNorm affine
        for p in mapper.parameters():
            p.data.normal_()
    embs = [torch.randn(2, 1 + 4, 3) for _ in range(5)]
    words = g(embs)
    assert words.shape == (2, 5, 2)
    for i, e in enumerate(embs):
        cls_part = _mlp_by_hand(getattr(g, f"mapping_{i}"), e[:, 0])
        patch_part = sum(_mlp_by_hand(getattr(g, f"mapping_patch_{i}"), e[:, 1 + j]) for j in range(4)) / 4
        torch.testing.assert_close(words[:, i], cls_part + patch_part)
    local = loc(embs)
    assert local.shape == (2, 4, 2)
    for j in range(4):
        want = sum(_mlp_by_hand(getattr(loc, f"mapping_{i}"), e[:, 0])
                   + _mlp_by_hand(getattr(loc, f"mapping_patch_{i}"), e[:, 1 + j]) for i, e in enumerate(embs)) / 5
        torch.testing.assert_close(local[:, j], want)


def _attention():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    attn.set_processor(AttnProcessor2_0())
    linear = lambda: torch.nn.Linear(6, 8, bias=False)  # noqa: E731
    k_g, v_g = linear(), linear()
    k_g.weight.data.copy_(attn.to_k.weight)
    v_g.weight.data.copy_(attn.to_v.weight)
    return attn, k_g, v_g, linear(), linear()


@torch.no_grad()
def test_processor_with_llambda_0_is_the_stock_attention():
    attn, k_g, v_g, k_l, v_l = _attention()
    hidden, text = torch.randn(4, 9, 8), torch.randn(4, 7, 6)
    stock = attn(hidden, encoder_hidden_states=text)
    local = LocalContext(words=torch.randn(2, 5, 6), index=torch.tensor([1, 3]), llambda=0.0)
    attn.set_processor(ELITEAttnProcessor(k_g, v_g, k_l, v_l, local))
    torch.testing.assert_close(attn(hidden, encoder_hidden_states=text), stock)
    # With other global projections only the text keys/values change.
    k_g.weight.data.normal_()
    assert not torch.allclose(attn(hidden, encoder_hidden_states=text), stock)


def _stock(attn, hidden, text=None):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()(attn, hidden, text)


@torch.no_grad()
def test_local_term_equals_a_hand_computation():
    attn, k_g, v_g, k_l, v_l = _attention()
    b, n, heads, d = 2, 9, 2, 4
    hidden, text = torch.randn(2 * b, n, 8), torch.randn(2 * b, 7, 6)  # guidance layout: uncond, then cond
    words, index, lam = torch.randn(b, 5, 6), torch.tensor([1, 4]), 0.7
    attn.set_processor(ELITEAttnProcessor(k_g, v_g, k_l, v_l, LocalContext(words, index, lam)))
    ours = attn(hidden, encoder_hidden_states=text)
    stock = _stock(attn, hidden, text)
    torch.testing.assert_close(ours[:b], stock[:b])  # no local term on the unconditional rows
    s = d ** -0.5
    for row in range(b):
        x = hidden[b + row]
        q = (x @ attn.to_q.weight.T).view(n, heads, d)
        kg, kl = (text[b + row] @ k_g.weight.T).view(7, heads, d), (words[row] @ k_l.weight.T).view(5, heads, d)
        vl = (words[row] @ v_l.weight.T).view(5, heads, d)
        at_word = torch.stack([torch.softmax(q[:, h] @ kg[:, h].T * s, -1)[:, index[row]] for h in range(heads)])
        at_word = at_word / at_word.max()  # (heads, n), the maximum over this prompt's heads and queries
        term = torch.stack([lam * (torch.softmax(q[:, h] @ kl[:, h].T * s, -1) * at_word[h][:, None]) @ vl[:, h]
                            for h in range(heads)], dim=1).reshape(n, heads * d)
        want = stock[b + row] + term @ attn.to_out[0].weight.T  # to_out is linear: the terms add
        torch.testing.assert_close(ours[b + row], want)


def test_masks():
    assert box_mask((1.5, 2.0, 4.2, 3.0), 5, 6).sum() == 4 * 1  # columns 1..4, row 2
    assert box_mask((-10, -10, 100, 100), 5, 6).all()
    grid = mask_to_grid(box_mask((0, 0, 256, 512), 512, 512), 16)
    assert grid.shape == (16, 16) and grid[:, :8].all() and not grid[:, 8:].any()


def test_prepared_face_masks_the_local_words(method, prepared):
    face = prepared["obama"]
    assert isinstance(face, ELITEFace) and face.word.shape == (TEXT_WIDTH,) and face.local.shape == (256, TEXT_WIDTH)
    outside = face.mask.reshape(-1) == 0
    assert 0 < int(outside.sum()) < 256 and face.box is not None
    assert not face.local[outside].any() and face.local[~outside].abs().sum(-1).gt(0).all()
    assert not torch.equal(prepared["biden"].word, face.word)
    full = _elite({k: method.params[k] for k in ("global_mapper", "local_mapper", "image_encoder")}, mask="full")
    whole = full.prepare(_face("obama"))
    assert whole.mask.all() and whole.box is None and torch.equal(whole.word, face.word)  # same global input


def test_prompt_form_and_placeholder_position(method, prepared):
    request = _request(method, _face("obama"), prepared["obama"])
    ref = load_prompt_set("smoke").reference
    assert ref.render(method.params["subject"]) == "a photo of a S"
    text = method.prompt_text(request)
    assert text == request.prompt.template.replace("{}", "a S")
    ids = method.context.pipeline().tokenizer(text).input_ids
    assert ids[int(method.placeholder_index([request])[0])] == method.load().placeholder_id


def test_rendering_batches_faces_and_leaves_the_shared_pipeline_alone(files, prepared):
    cfg = config_from_dict(small_config_dict(methods=[{"name": "sd-class"}, {"name": "elite", "params": files}]))
    sd, elite = build_methods(cfg, load_prompt_set("smoke"))
    pipe = elite.context.pipeline()
    assert sd.context.pipeline() is pipe  # one shared base pipeline
    obama, biden = _face("obama"), _face("biden")
    sd_request = lambda: _request(sd, obama, None, 1, 0)  # noqa: E731
    before_sd = _pixels(sd.generate([sd_request()])[0])
    processors = dict(pipe.unet.attn_processors)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    a = [_request(elite, obama, prepared["obama"], 1, 0), _request(elite, biden, prepared["biden"], 1, 0),
         _request(elite, obama, prepared["obama"], 2, 1)]
    batch = [_pixels(im) for im in elite.generate(a)]
    alone = [_pixels(elite.generate([_request(elite, f, prepared[f.face_id], p, s)])[0])
             for f, p, s in ((obama, 1, 0), (biden, 1, 0), (obama, 2, 1))]
    for x, y in zip(batch, alone):
        assert np.abs(x - y).max() <= 1  # a batch of faces = each face alone (uint8 rounding)
    assert np.abs(batch[0] - batch[1]).max() > 10  # different faces, same prompt and seed
    again = _pixels(elite.generate([_request(elite, obama, prepared["obama"], 1, 0)])[0])
    assert np.array_equal(again, alone[0])  # same face, same image

    # The shared pipeline: same processor objects, same weights, and sd-class renders the same bytes.
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert np.array_equal(_pixels(sd.generate([sd_request()])[0]), before_sd)
    assert np.abs(before_sd - alone[0]).max() > 10  # ELITE's own image is not the plain one


def test_the_loaded_mapper_files_decide_the_images(files, prepared):
    """The global mapper's word and K/V come from the file: other weights (seeded random) give other images."""
    loaded = _elite(files)
    other = _elite({**files, "global_mapper": "random", "local_mapper": "random"})
    images = []
    for m in (loaded, other):
        face = m.prepare(_face("obama"))
        images.append(_pixels(m.generate([_request(m, _face("obama"), face, 1, 0)])[0]))
    assert np.abs(images[0] - images[1]).max() > 10


def test_llambda_weights_the_local_term(files, prepared):
    images = {}
    for lam in (0.0, 0.8):
        m = _elite(files, llambda=lam)
        images[lam] = _pixels(m.generate([_request(m, _face("obama"), prepared["obama"], 1, 0)])[0])
    assert np.abs(images[0.0] - images[0.8]).max() > 0


def test_trained_parameters_counted_from_the_architecture(method):
    from diffusers import UNet2DConditionModel

    from f2d_bench.pipelines.sd14 import SD14_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    shapes = cross_attention_shapes(unet)
    assert len(shapes) == 16
    mlps = 10 * (1024 * 1024 + 1024 + 2 * 1024 + 1024 * 1024 + 1024 + 2 * 1024 + 1024 * 768 + 768)
    kv = 2 * 768 * (5 * 320 + 5 * 640 + 6 * 1280)
    assert parameter_count(1024, 768, shapes) == mlps + kv == 48_074_240  # x 4 bytes: the 192 MB files
    info = method.info()
    loaded = sum(p.numel() for p in method.load().global_mapper.parameters())
    assert info["trained_params"] == 2 * loaded == 2 * parameter_count(VISION_WIDTH, TEXT_WIDTH,
                                                                       cross_attention_shapes(method.context.pipeline().unet))


def test_random_mappers_are_reported(files):
    m = _elite({**files, "global_mapper": "random"})
    assert m.info()["weights"] == "random weights: not meaningful"
    assert m.method_id != _elite(files).method_id
    assert any("not meaningful" in w for w in m.preflight(["obama"], ["ref"], [0]))


def test_a_photo_without_a_face_is_named_for_face_box_masks_only(method, tmp_path):
    """mask: face-box needs the face's box (the photo is named before a run starts); mask: full needs none."""
    from conftest import a_real_and_a_faceless_face
    from f2d_bench.errors import F2DBenchError

    real, blank = a_real_and_a_faceless_face(tmp_path)
    assert method.faceless([real, blank]) == [blank]
    with pytest.raises(F2DBenchError, match=r"elite: no face detected in .*wall\.png \(face wall\); mask: face-box"):
        method.prepare(blank)
    full = _elite({k: method.params[k] for k in ("global_mapper", "local_mapper", "image_encoder")}, mask="full")
    assert full.face_need is None and full.faceless([real, blank]) == []
    assert full.prepare(blank).mask.all()
