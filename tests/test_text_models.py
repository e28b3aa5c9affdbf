"""Text-fidelity models: pure metric functions, open_clip loading, and a cross-check against transformers.

Real CLIP/SigLIP weights never load here; tiny models built from configs go through the same loading code.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from f2d_bench.errors import ConfigError, ModelUnavailableError
from f2d_bench.scorers.text import tiny
from f2d_bench.scorers.text.clip_models import (
    CLIP_MODEL_NAME,
    CLIP_PRETRAINED,
    SIGLIP_MODEL_NAME,
    SIGLIP_PRETRAINED,
    image_embeds,
    load_clip,
    text_embeds,
)
from f2d_bench.scorers.text.similarity import DEGENERATE_NORM, clip_score, directional_clip, siglip_scores

PHOTOS = Path(__file__).resolve().parent.parent / "f2d_bench" / "assets" / "faces"
PROMPTS = [
    "a photo of a person as a doctor",
    "a person riding a bicycle in the city",
    "an astronaut in space",
]
REF_TEXT = "A photo of a person"


@pytest.fixture(scope="module")
def photos():
    names = ("obama.jpg", "grace_hopper.jpg", "astronaut.png")
    return [Image.open(PHOTOS / name).convert("RGB") for name in names]


@pytest.fixture(scope="module")
def tiny_clip():
    name, path = tiny.tiny_clip_checkpoint()
    return load_clip(name, str(path))


@pytest.fixture(scope="module")
def tiny_siglip():
    name, path = tiny.tiny_siglip_checkpoint()
    return load_clip(name, str(path))


# --- pure functions on hand-made vectors ---------------------------------------------------------------


def test_clip_score_is_raw_cosine_of_unnormalised_inputs():
    img = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    txt = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    assert torch.allclose(clip_score(img, txt), torch.tensor([24 / 25, 0.0]), atol=1e-7)
    # One text against several images broadcasts.
    assert torch.allclose(clip_score(img, txt[:1]), torch.tensor([24 / 25, 4 / 5]), atol=1e-7)
    with pytest.raises(ValueError):
        clip_score(torch.ones(2, 2), torch.ones(3, 2))


def test_directional_clip_closed_form_2d():
    gen, ref = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    txt, ref_txt = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
    # dI = (-1, 1), dT = (-0.4, 0.8): cos = 1.2 / (sqrt(2) * sqrt(0.8)) = 3 / sqrt(10)
    expected = 3 / math.sqrt(10)
    assert directional_clip(gen, ref, txt, ref_txt).item() == pytest.approx(expected, abs=1e-6)
    # Embeddings are normalised BEFORE the difference: scaling one input changes nothing.
    # (Unnormalised, dI would be (-1, 5) and the cosine 0.965.)
    assert directional_clip(gen * 5, ref, txt * 3, ref_txt).item() == pytest.approx(expected, abs=1e-6)
    # Opposite directions give -1.
    assert directional_clip(ref, gen, txt, ref_txt).item() == pytest.approx(-expected, abs=1e-6)


def test_directional_clip_degenerate_is_zero_not_nan():
    a, b = torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt, ref_txt = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
    out = directional_clip(a, b, txt, ref_txt)  # row 1: generated == reference image
    assert out[1].item() == 0.0 and not torch.isnan(out).any()
    assert out[0].item() == pytest.approx(3 / math.sqrt(10), abs=1e-6)
    # Prompt equal to the reference text (up to scale): no text direction.
    assert directional_clip(a[:1], b[:1], ref_txt * 2, ref_txt).item() == 0.0
    # A difference below DEGENERATE_NORM is float noise, not a direction: also 0.0 (the bare formula
    # would give about 0.89 here).
    almost_b = torch.tensor([[1.0, 1e-7]])
    assert DEGENERATE_NORM > 1e-7
    assert directional_clip(almost_b, b[:1], txt, ref_txt).item() == 0.0


def test_siglip_probability_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    logit_scale, logit_bias = math.log(10.0), -5.0  # stored as a log, like open_clip and big_vision
    cos, prob = siglip_scores(img, txt, logit_scale, logit_bias)
    assert torch.allclose(cos, torch.tensor([1.0, 0.6, 0.0]))
    by_hand = [1 / (1 + math.exp(-(c * 10.0 - 5.0))) for c in (1.0, 0.6, 0.0)]
    assert prob.tolist() == pytest.approx(by_hand, abs=1e-6)
    assert prob[1].item() == pytest.approx(0.7310586, abs=1e-6)  # sigmoid(1)


# --- CLIP: project code against transformers on the same weights ----------------------------------------


def _openclip_to_hf(sd: dict[str, torch.Tensor], text_layers: int, vision_layers: int) -> dict:
    """Map an open_clip `CLIP` (non-custom text) state dict to transformers' CLIPModel names."""
    out = {
        "logit_scale": sd["logit_scale"],
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,
    }
    for src_prefix, dst_prefix, layers in (
        ("transformer.resblocks", "text_model.encoder.layers", text_layers),
        ("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers),
    ):
        for i in range(layers):
            s, d = f"{src_prefix}.{i}", f"{dst_prefix}.{i}"
            for part in ("weight", "bias"):
                q, k, v = sd[f"{s}.attn.in_proj_{part}"].chunk(3, dim=0)  # packed in q, k, v order
                out[f"{d}.self_attn.q_proj.{part}"] = q
                out[f"{d}.self_attn.k_proj.{part}"] = k
                out[f"{d}.self_attn.v_proj.{part}"] = v
                out[f"{d}.self_attn.out_proj.{part}"] = sd[f"{s}.attn.out_proj.{part}"]
                out[f"{d}.layer_norm1.{part}"] = sd[f"{s}.ln_1.{part}"]
                out[f"{d}.layer_norm2.{part}"] = sd[f"{s}.ln_2.{part}"]
                out[f"{d}.mlp.fc1.{part}"] = sd[f"{s}.mlp.c_fc.{part}"]
                out[f"{d}.mlp.fc2.{part}"] = sd[f"{s}.mlp.c_proj.{part}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def _hf_config():
    from transformers import CLIPConfig

    oc = tiny.TINY_CLIP_CONFIG
    v, t = oc["vision_cfg"], oc["text_cfg"]
    return CLIPConfig(
        projection_dim=oc["embed_dim"],
        text_config=dict(
            vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
            num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
            max_position_embeddings=t["context_length"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=v["width"], intermediate_size=4 * v["width"], num_hidden_layers=v["layers"],
            num_attention_heads=v["width"] // v["head_width"], image_size=v["image_size"],
            patch_size=v["patch_size"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
    )


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def hf_clip(tiny_clip, tmp_path_factory):
    """The tiny CLIP's weights as a transformers CLIPModel, saved with save_pretrained and loaded back."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    sd = load_file(tiny_clip.checkpoint)
    cfg = tiny.TINY_CLIP_CONFIG
    model = CLIPModel(_hf_config())
    missing, unexpected = model.load_state_dict(
        _openclip_to_hf(sd, cfg["text_cfg"]["layers"], cfg["vision_cfg"]["layers"]), strict=False
    )
    assert not unexpected and not [k for k in missing if not k.endswith("position_ids")]
    out_dir = tmp_path_factory.mktemp("hf-tiny-clip")
    model.save_pretrained(out_dir)
    return CLIPModel.from_pretrained(out_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from f2d_bench.pipelines.tokenizer import write_clip_tokenizer

    directory = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def test_clip_and_dclip_match_transformers(tiny_clip, hf_clip, hf_tokenizer, photos):
    texts = PROMPTS[:2] + [REF_TEXT]
    # Project code.
    img = image_embeds(tiny_clip, photos)
    txt = text_embeds(tiny_clip, texts)
    ours_clip = clip_score(img[:2], txt[:2])
    ours_dclip = directional_clip(img[:2], img[2:], txt[:2], txt[2:])

    # Independent computation: transformers' CLIPModel, same preprocessed pixels, its own tokenizer.
    hf_ids = hf_tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    oc_ids = tiny_clip.tokenizer(texts)
    for a, b in zip(hf_ids, oc_ids):
        eos = int((b == 49407).nonzero()[0])
        assert a[: eos + 1].tolist() == b[: eos + 1].tolist()  # same ids up to EOS (only padding differs)
    pixels = torch.stack([tiny_clip.preprocess(p) for p in photos])
    with torch.no_grad():
        hi = _features(hf_clip.get_image_features(pixel_values=pixels))
        ht = _features(hf_clip.get_text_features(input_ids=hf_ids))
    hi = hi / hi.norm(dim=-1, keepdim=True)
    ht = ht / ht.norm(dim=-1, keepdim=True)
    ref_clip = (hi[:2] * ht[:2]).sum(-1)
    d_img, d_txt = hi[:2] - hi[2:], ht[:2] - ht[2:]
    ref_dclip = (d_img * d_txt).sum(-1) / (d_img.norm(dim=-1) * d_txt.norm(dim=-1))

    assert torch.allclose(img, hi, atol=1e-5) and torch.allclose(txt, ht, atol=1e-5)
    assert torch.allclose(ours_clip, ref_clip, atol=1e-5)
    assert torch.allclose(ours_dclip, ref_dclip, atol=1e-5)
    assert img.shape == (3, tiny.TINY_CLIP_CONFIG["embed_dim"])
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_clip_score_depends_on_image_and_caption(tiny_clip, photos):
    img = image_embeds(tiny_clip, photos)
    txt = text_embeds(tiny_clip, PROMPTS)
    matching = clip_score(img, txt)  # image i with caption i
    swapped = clip_score(img, txt.roll(1, dims=0))  # image i with another image's caption
    assert (matching - swapped).abs().min() > 1e-4
    full = img @ txt.T  # every image against every caption: not a constant, rows differ
    assert full.std() > 1e-3
    assert (full[0] - full[1]).abs().max() > 1e-3


# --- SigLIP -------------------------------------------------------------------------------------------


def test_siglip_pads_text_to_context_length(tiny_siglip):
    short, long = "a person", "a person laughing on the beach at sunset, reading a book in a library"
    tokens = tiny_siglip.tokenizer([short, long])
    assert tuple(tokens.shape) == (2, 64) == (2, tiny_siglip.context_length)
    n_short = len(tiny_siglip.tokenizer.tokenizer(short).input_ids)  # pieces + eos, unpadded
    pad_id = tiny_siglip.tokenizer.tokenizer.pad_token_id
    assert n_short < 10 and (tokens[0, n_short:] == pad_id).all()
    # Last-token pooling: the embedding of a text must not depend on what else is in the batch.
    alone = text_embeds(tiny_siglip, [short])
    batched = text_embeds(tiny_siglip, [short, long])
    assert torch.allclose(alone[0], batched[0], atol=1e-6)


def test_siglip_cosine_and_probability(tiny_siglip, photos):
    b = tiny_siglip
    assert b.is_siglip and b.preprocess_cfg["resize_mode"] == "squash"
    assert tuple(b.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    img, txt = image_embeds(b, photos), text_embeds(b, PROMPTS)
    cos, prob = siglip_scores(img, txt, b.logit_scale, b.logit_bias)
    assert cos.shape == prob.shape == (3,)
    assert ((cos >= -1) & (cos <= 1)).all() and ((prob > 0) & (prob < 1)).all()
    by_hand = [1 / (1 + math.exp(-(c * math.exp(b.logit_scale) + b.logit_bias))) for c in cos.tolist()]
    assert prob.tolist() == pytest.approx(by_hand, rel=1e-5)

    # open_clip stores the log of the scale: its forward returns exp(stored) as the multiplier.
    assert b.logit_scale == pytest.approx(math.log(10.0), abs=1e-6)
    pixels = torch.stack([b.preprocess(p) for p in photos])
    with torch.no_grad():
        out = b.model(pixels, b.tokenizer(PROMPTS))
    img_f, txt_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    scale = out["logit_scale"] if isinstance(out, dict) else out[2]
    bias = out["logit_bias"] if isinstance(out, dict) else out[3]
    assert float(scale) == pytest.approx(10.0, rel=1e-6)
    model_prob = torch.sigmoid((img_f * txt_f).sum(-1) * scale + bias)
    assert torch.allclose(prob, model_prob.reshape(-1), atol=1e-6)


# --- loading: strictness, errors, the tag path through a Hugging Face cache ----------------------------


def test_local_checkpoint_with_missing_key_fails_clearly(tiny_clip, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(tiny_clip.checkpoint)
    del sd["visual.ln_post.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(ConfigError) as err:
        load_clip(tiny.TINY_CLIP_NAME, str(broken))
    assert "visual.ln_post.weight" in str(err.value) and str(broken) in str(err.value)


def test_a_local_checkpoint_loads_without_the_random_initialisation_warning(caplog):
    import logging

    name, path = tiny.tiny_clip_checkpoint()
    with caplog.at_level(logging.INFO):
        bundle = load_clip(name, str(path))
    assert bundle.checkpoint == str(path)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()], caplog.text


def test_a_local_checkpoint_is_not_fitted_by_open_clips_silent_repairs(tiny_clip, tiny_siglip, tmp_path):
    """open_clip interpolates positional embeddings of another length and fills in a missing logit_bias:
    a checkpoint of another resolution or context length, or a SigLIP file without its bias, loads without
    a word. Each is refused here, naming the tensor."""
    from safetensors.torch import load_file, save_file

    clip = load_file(tiny_clip.checkpoint)
    grid = math.isqrt(clip["visual.positional_embedding"].shape[0] - 1)
    # a context 4 tokens longer; a vision grid one patch wider (another image size), plus the class token
    for key, length in (("positional_embedding", clip["positional_embedding"].shape[0] + 4),
                        ("visual.positional_embedding", (grid + 1) ** 2 + 1)):
        own, width = clip[key].shape
        for saver, suffix in ((save_file, "safetensors"), (torch.save, "pt")):
            other = tmp_path / f"{key}.{suffix}"
            saver({**clip, key: torch.zeros(length, width)}, str(other))
            with pytest.raises(ConfigError, match=rf"{re.escape(key)} is \({length}, {width}\) in the file, "
                                                  rf"\({own}, {width}\) in the model"):
                load_clip(tiny.TINY_CLIP_NAME, str(other))
    siglip = load_file(tiny_siglip.checkpoint)
    unbiased = tmp_path / "no-bias.safetensors"
    save_file({k: v for k, v in siglip.items() if k != "logit_bias"}, str(unbiased))
    with pytest.raises(ConfigError, match="has no logit_bias"):
        load_clip(tiny_siglip.model_name, str(unbiased))
    # the files as written still load, also nested and prefixed as training scripts save them
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.items()}}, nested)
    assert load_clip(tiny.TINY_CLIP_NAME, str(nested)).checkpoint == str(nested)


def test_checkpoint_of_another_model_fails_clearly(tiny_siglip):
    with pytest.raises(ConfigError, match="does not fit"):
        load_clip(tiny.TINY_CLIP_NAME, tiny_siglip.checkpoint)


@pytest.mark.parametrize(
    ("model_name", "tag", "repos"),
    [
        (CLIP_MODEL_NAME, CLIP_PRETRAINED, ["timm/vit_large_patch14_clip_224.openai"]),
        # SigLIP's tokenizer is a Hub download too, from the ViT-B-16 repo.
        (SIGLIP_MODEL_NAME, SIGLIP_PRETRAINED, ["timm/ViT-SO400M-14-SigLIP-384", "timm/ViT-B-16-SigLIP"]),
    ],
)
def test_missing_weights_offline_name_the_model(monkeypatch, tmp_path, model_name, tag, repos):
    import huggingface_hub.constants
    import huggingface_hub.file_download

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: act as if it was imported before it was set,
    # and record any attempt to reach the Hub (it would retry for about 20 s per file before failing).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub_requests = []

    def no_network(*args, **kwargs):
        hub_requests.append(args)
        raise ConnectionError("test: no network")

    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", no_network)
    with pytest.raises(ModelUnavailableError) as err:
        load_clip(model_name, tag, cache_dir=tmp_path)  # an empty Hugging Face cache
    msg = str(err.value)
    assert model_name in msg and repr(tag) in msg and all(repo in msg for repo in repos)
    assert "HF_HUB_OFFLINE" in msg and "local path" in msg
    assert "not in the cache" in msg and not hub_requests  # offline read from the environment at call time


def test_missing_local_file_and_bad_names(tmp_path):
    missing = tmp_path / "ViT-L-14.safetensors"
    with pytest.raises(ModelUnavailableError) as err:
        load_clip(CLIP_MODEL_NAME, str(missing))
    assert CLIP_MODEL_NAME in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(ConfigError, match="neither a tag"):
        load_clip(CLIP_MODEL_NAME, "webli")
    with pytest.raises(ConfigError, match="ViT-L-14-quickgelu"):
        load_clip("ViT-L-14", "openai")  # OpenAI weights need QuickGELU
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        load_clip("ViT-L-15", "openai")


def test_local_file_preprocessing_follows_the_models_tags():
    from f2d_bench.scorers.text.clip_models import _local_preprocess

    siglip = _local_preprocess(SIGLIP_MODEL_NAME, None)  # a local SigLIP file: SigLIP's preprocessing
    assert siglip["resize_mode"] == "squash" and tuple(siglip["mean"]) == (0.5, 0.5, 0.5)
    clip = _local_preprocess(CLIP_MODEL_NAME, None)
    assert clip["resize_mode"] == "shortest" and clip["mean"][0] == pytest.approx(0.48145466)
    with pytest.raises(ConfigError, match="preprocess_tag"):
        _local_preprocess("ViT-L-14", None)  # its tags disagree (laion2b uses mean 0.5)
    assert _local_preprocess("ViT-L-14", "laion2b_s32b_b82k")["mean"] == (0.5, 0.5, 0.5)


def test_tag_resolves_through_offline_hf_cache(monkeypatch, tmp_path, tiny_siglip):
    """A pretrained tag loads from a populated Hugging Face cache with HF_HUB_OFFLINE=1."""
    import open_clip.pretrained

    repo, revision = "f2d-bench/tiny-siglip", "0" * 40
    repo_dir = tmp_path / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    (snapshot / "open_clip_model.safetensors").write_bytes(Path(tiny_siglip.checkpoint).read_bytes())
    tag_cfg = {"url": "", "hf_hub": repo + "/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "resize_mode": "squash"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny.TINY_SIGLIP_NAME, {"cachetest": tag_cfg})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    bundle = load_clip(tiny.TINY_SIGLIP_NAME, "cachetest", cache_dir=tmp_path)
    assert Path(bundle.checkpoint).parent == snapshot
    assert bundle.preprocess_cfg["interpolation"] == "bilinear"  # taken from the tag
    texts = PROMPTS[:1]
    assert torch.equal(text_embeds(bundle, texts), text_embeds(tiny_siglip, texts))


# --- the tiny models themselves -------------------------------------------------------------------------


def test_tiny_checkpoint_is_cached_and_deterministic(tmp_path):
    name, path = tiny.tiny_clip_checkpoint(tmp_path)
    assert name == tiny.TINY_CLIP_NAME and path == tmp_path / "models" / name / tiny.CHECKPOINT_FILE
    mtime = path.stat().st_mtime_ns
    assert tiny.tiny_clip_checkpoint(tmp_path) == (name, path) and path.stat().st_mtime_ns == mtime

    from safetensors.torch import load_file

    again = tiny.build_tiny_model("clip", tmp_path / "again")
    other = tiny.build_tiny_model("clip", tmp_path / "other", seed=1)
    a, b, c = load_file(path), load_file(again), load_file(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        tiny.tiny_clip_checkpoint(tmp_path, kind="blip")


def test_siglip_scorer_refuses_a_clip_model_when_it_loads(tiny_clip):
    """A CLIP architecture has no logit_bias: the scorer says so by name instead of failing mid-score."""
    from f2d_bench.scorers.base import ScoringContext
    from f2d_bench.scorers.text.scorer import SiglipScorer

    scorer = SiglipScorer({"model": tiny.TINY_CLIP_NAME, "weights": "random"},
                          ScoringContext(prompt_set=None, device="cpu", input_detections={}))
    with pytest.raises(ConfigError, match=r"scorer siglip: model 'f2d-tiny-clip-v1' is not a SigLIP model"):
        scorer.load()


def test_the_tiny_model_is_described_as_the_random_checkpoint_it_loads():
    """Its pretrained tag and weights setting are not used: the run's record must not say 'webli, official'."""
    from f2d_bench.scorers.base import ScoringContext
    from f2d_bench.scorers.text.scorer import SiglipScorer

    scorer = SiglipScorer({"model": "tiny"}, ScoringContext(prompt_set=None, device="cpu", input_detections={}))
    scorer.load()
    described = scorer.describe()
    assert described["settings"] == {"model": "tiny", "pretrained": None, "weights": "random"}
    assert described["checkpoint"] and described["note"]  # the file loaded, and "random weights"
    assert scorer.settings["weights"] == "official"  # the settings themselves (and the cache id) are untouched
