"""Face2Diffusion as the ``f2d`` method: official file layout, strict loading, token injection, end to end.

Real F2D weights are not reachable offline; the checkpoints here are random weights saved in the
official layout, which exercises the same loading code. Faces are the real test photos.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from f2d_bench.config import PRESET_DIR, config_from_dict
from f2d_bench.engine import build_methods, generate_run
from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.faces.faceset import Face
from f2d_bench.faces.source import builtin_test_faces_dir
from f2d_bench.grid import ItemKey
from f2d_bench.methods import METHODS
from f2d_bench.methods.base import GenerationRequest
from f2d_bench.methods.f2d.checkpoints import CheckpointError, load_strict
from f2d_bench.methods.f2d.injection import injected_tokens, placeholder_positions
from f2d_bench.methods.f2d.mapping import MappingNetwork
from f2d_bench.methods.f2d.method import F2DFace, F2DMethod, mapping_parameter_count
from f2d_bench.methods.f2d.msid import MSIDEncoder
from f2d_bench.prompts import load_prompt_set
from f2d_bench.files import read_jsonl

from conftest import faceless_photo, small_config_dict

# --- the official file layout, written from the official structure (PROTOCOL.md section 4) -----------
_VIT_BLOCK = {
    "norm1.weight": (384,), "norm1.bias": (384,),
    "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
    "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
    "norm2.weight": (384,), "norm2.bias": (384,),
    "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
    "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,),
}
_FEATURE_NORMS = {  # norms.layer_{i}: 0 = BatchNorm1d(384), 1 = LayerNorm(384)
    "0.weight": (384,), "0.bias": (384,), "0.running_mean": (384,), "0.running_var": (384,),
    "0.num_batches_tracked": (), "1.weight": (384,), "1.bias": (384,),
}
MSID_PT = {
    "cls_token": (1, 1, 384),
    "pos_embed": (1, 197, 384),  # 14x14 patches of 8 pixels + CLS
    "patch_embed.proj.weight": (384, 3, 8, 8),
    "patch_embed.proj.bias": (384,),
    **{f"blocks.{n}.{key}": shape for n in range(12) for key, shape in _VIT_BLOCK.items()},
    "norm.weight": (384,),
    "norm.bias": (384,),
    **{f"norms.layer_{i}.{key}": shape for i in (2, 5, 8, 11) for key, shape in _FEATURE_NORMS.items()},
}
MAPPING_PT = {  # IMG2TEXTwithEXP(1536, 1536, 768)
    "null_exp": (64,),
    "i2t_first.layers.0.0.weight": (1536, 1600), "i2t_first.layers.0.0.bias": (1536,),
    "i2t_first.layers.1.0.weight": (1536, 1536), "i2t_first.layers.1.0.bias": (1536,),
    "i2t_first.fc_out.weight": (768, 1536), "i2t_first.fc_out.bias": (768,),
    "i2t_last.layers.0.0.weight": (1536, 1600), "i2t_last.layers.0.0.bias": (1536,),
    "i2t_last.layers.1.0.weight": (1536, 1536), "i2t_last.layers.1.0.bias": (1536,),
    "i2t_last.fc_out.weight": (768, 1536), "i2t_last.fc_out.bias": (768,),
}

RANDOM = {"name": "f2d", "params": {"weights": "random"}}
FACES = ("biden", "obama", "obama2")


def _build(method_cfg: dict, **overrides) -> F2DMethod:
    cfg = config_from_dict(small_config_dict(methods=[method_cfg], **overrides))
    [method] = build_methods(cfg, load_prompt_set("smoke"))
    return method


def _random_state(module_factory, seed: int) -> dict:
    torch.manual_seed(seed)
    module = module_factory()
    for name, buf in module.named_buffers():  # non-default BatchNorm statistics, so they must load too
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    return module.state_dict()


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Three prepared test faces (FFHQ-aligned crops) in a face-set directory of their own."""
    src = builtin_test_faces_dir()
    out = tmp_path_factory.mktemp("faces")
    for face_id in FACES:
        shutil.copy(src / f"{face_id}.png", out / f"{face_id}.png")
    return out


@pytest.fixture(scope="module")
def method(faces) -> F2DMethod:
    m = _build(RANDOM, faces=str(faces))
    m.preflight([], [], [])
    return m


@pytest.fixture(scope="module")
def prepared(method, faces) -> dict[str, F2DFace]:
    return {f: method.prepare(Face(f, faces / f"{f}.png")) for f in FACES}


def _requests(method, prepared, faces, face_ids, prompt_index=0, seed=0):
    prompt = load_prompt_set("smoke").prompts[prompt_index]
    return [
        GenerationRequest(
            key=ItemKey(method.method_id, f, prompt.id, seed), prompt=prompt, face=Face(f, faces / f"{f}.png"),
            prepared=prepared[f], generator=torch.Generator("cpu").manual_seed(seed),
        )
        for f in face_ids
    ]


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(i, dtype=np.int16) for i in images]


def expected_layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every entry ``module.state_dict()`` has (parameters and buffers)."""
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


# --- structure ----------------------------------------------------------------------------------------
def test_official_key_and_shape_contract():
    assert expected_layout(MSIDEncoder()) == MSID_PT
    assert expected_layout(MappingNetwork(768)) == MAPPING_PT
    assert expected_layout(MappingNetwork(32))["i2t_last.fc_out.weight"] == (32, 1536)  # tiny pipeline


def test_msid_structure_details():
    torch.manual_seed(0)
    m = MSIDEncoder().eval()
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in m.blocks) and m.norm.eps == 1e-6
    for i in (2, 5, 8, 11):
        bn, ln = m.norms[f"layer_{i}"]
        assert isinstance(bn, nn.BatchNorm1d) and isinstance(ln, nn.LayerNorm) and ln.eps == 1e-5
    with torch.no_grad():  # non-trivial norm parameters, so that misplaced norms would show
        for p in m.norms.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        features = m(x)
        # Reference: timm's own per-block outputs (CLS prefix token), then each block's norms.
        _, prefix = zip(*m.forward_intermediates(x, indices=[2, 5, 8, 11], return_prefix_tokens=True,
                                                 norm=False, intermediates_only=True))
        want = torch.cat([m.norms[f"layer_{i}"](p[:, 0]) for i, p in zip((2, 5, 8, 11), prefix)], dim=1)
        assert features.shape == (2, 1536)
        torch.testing.assert_close(features, want, atol=1e-5, rtol=1e-5)
        m.norm.weight.mul_(3.0)  # the ViT's final norm is in the file but not applied
        assert torch.equal(m(x), features)
        m.norms["layer_11"][1].bias.add_(1.0)  # the last slice belongs to block 11
        changed = (m(x) != features).any(dim=0)
        assert changed[1152:].all() and not changed[:1152].any()


def test_mapping_structure_details():
    m = MappingNetwork(32).eval()
    mlp = m.i2t_first.layers
    assert [type(x) for x in mlp[0]] == [nn.Linear, nn.Dropout, nn.LeakyReLU]
    assert mlp[0][1].p == 0.1 and mlp[0][2].negative_slope == 0.2
    identity = torch.randn(3, 1536)
    tokens = m(identity)
    assert tokens.shape == (3, 2, 32)
    x = torch.cat([identity, m.null_exp.expand(3, 64)], dim=1)
    torch.testing.assert_close(tokens[:, 0], m.i2t_first.fc_out(m.i2t_first.layers(x)))
    torch.testing.assert_close(tokens[:, 1], m.i2t_last.fc_out(m.i2t_last.layers(x)))
    assert not torch.allclose(tokens, m(identity, torch.ones(64)))


def test_trained_params_match_table_2():
    # 2 x (1600*1536+1536 + 1536*1536+1536 + 1536*768+768) + 64: Table 2 reports 1.20e7.
    assert mapping_parameter_count(768) == sum(p.numel() for p in MappingNetwork(768).parameters()) == 12_000_832
    assert f"{mapping_parameter_count(768):.2e}" == "1.20e+07"


# --- checkpoints --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Random weights saved the way the official files are: torch.save(module.state_dict())."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.save(_random_state(MSIDEncoder, 1), d / "msid.pt")
    torch.save(_random_state(lambda: MappingNetwork(32), 2), d / "mapping.pt")
    return d


def test_official_files_load_strictly(official_files, faces, prepared, method, tmp_path):
    params = {"weights": "official", "msid": str(official_files / "msid.pt"),
              "mapping": str(official_files / "mapping.pt")}
    m = _build({"name": "f2d", "params": params}, faces=str(faces))
    enc = m.load()
    for module, file in ((enc.msid, "msid.pt"), (enc.mapping, "mapping.pt")):
        saved = torch.load(official_files / file, weights_only=True)
        got = module.state_dict()
        assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    face = Face("obama", faces / "obama.png")
    tokens = m.prepare(face).tokens
    assert not torch.allclose(tokens, prepared["obama"].tokens)  # other weights than `method`'s
    assert m.info()["weights"] == "official"
    ident = m.identity()["params"]
    assert ident["msid"]["sha256"] and "ckpt" not in json.dumps(ident)  # contents, not paths
    moved = tmp_path / "elsewhere"
    shutil.copytree(official_files, moved)
    again = _build({"name": "f2d", "params": {**params, "msid": str(moved / "msid.pt"),
                                              "mapping": str(moved / "mapping.pt")}}, faces=str(faces))
    assert again.method_id == m.method_id != method.method_id


def test_key_differences_are_clear_errors():
    good = MappingNetwork(32).state_dict()
    missing = {k: v for k, v in good.items() if k != "i2t_last.fc_out.bias"}
    with pytest.raises(CheckpointError, match=r"mapping\.pt .*missing keys 1: 'i2t_last\.fc_out\.bias'"):
        load_strict(MappingNetwork(32), missing, "mapping network", "mapping.pt")
    with pytest.raises(CheckpointError, match=r"mapping\.pt .*unexpected keys 1: 'head\.weight'"):
        load_strict(MappingNetwork(32), {**good, "head.weight": torch.zeros(1)}, "mapping network", "mapping.pt")
    shifted = {**good, "null_exp": torch.zeros(65)}
    wrong = r"mapping\.pt .*wrong shapes 1: 'null_exp \[65\] \(expected \[64\]\)'"
    with pytest.raises(CheckpointError, match=wrong):
        load_strict(MappingNetwork(32), shifted, "mapping network", "mapping.pt")
    load_strict(MappingNetwork(32), good, "mapping network", "mapping.pt")  # the control: no error


def test_bad_files_fail_at_load_naming_the_file(official_files, faces, tmp_path):
    sd = torch.load(official_files / "msid.pt", weights_only=True)
    del sd["norms.layer_5.1.weight"]
    torch.save(sd, tmp_path / "msid.pt")
    torch.save(_random_state(lambda: MappingNetwork(768), 3), tmp_path / "mapping768.pt")
    torch.save({"model": MappingNetwork(32).state_dict()}, tmp_path / "wrapped.pt")
    good = {"msid": str(official_files / "msid.pt"), "mapping": str(official_files / "mapping.pt")}
    cases = [
        ({"msid": str(tmp_path / "msid.pt")}, r"msid\.pt .*missing keys 1: 'norms\.layer_5\.1\.weight'"),
        ({"mapping": str(tmp_path / "mapping768.pt")}, r"768-d tokens.* 32-d"),
        ({"mapping": str(tmp_path / "wrapped.pt")}, r"wrapped\.pt holds a dict, not a state dict of tensors"),
    ]
    for change, pattern in cases:
        m = _build({"name": "f2d", "params": {"weights": "official", **good, **change}}, faces=str(faces))
        with pytest.raises(CheckpointError, match=pattern):
            m.load()


def test_missing_checkpoints_say_where_they_are_published(tmp_path):
    with pytest.raises(ConfigError) as err:
        _build({"name": "f2d"})
    text = str(err.value)
    assert text.startswith("methods[0] (f2d):")
    for part in ("msid.pt", "mapping.pt", "not set", "Google Drive", "github.com/mapooon/Face2Diffusion",
                 "drive.google.com", "methods[i].params.msid", "methods[i].params.mapping", "weights: random"):
        assert part in text, part
    with pytest.raises(ConfigError, match=r"params\.mapping \(mapping\.pt\): no file at .*nowhere\.pt"):
        torch.save({}, tmp_path / "msid.pt")
        _build({"name": "f2d", "params": {"msid": str(tmp_path / "msid.pt"), "mapping": str(tmp_path / "nowhere.pt")}})
    with pytest.raises(ConfigError, match="not used with weights: random"):
        _build({"name": "f2d", "params": {"weights": "random", "msid": str(tmp_path / "msid.pt")}})
    with pytest.raises(ConfigError, match="weights must be one of official, random"):
        _build({"name": "f2d", "params": {"weights": "pretrained"}})


# --- injection ----------------------------------------------------------------------------------------
def test_injected_embeddings_equal_a_hand_computation(method):
    pipe = method.context.pipeline()
    te, tok = pipe.text_encoder, pipe.tokenizer
    prompts = ["f l as a chef in a restaurant kitchen", "a photo of f l"]
    torch.manual_seed(0)
    vectors = torch.randn(2, 2, 32) * 0.5
    with torch.no_grad():
        with injected_tokens(te, method.load().placeholder_ids, vectors):
            got, _ = pipe.encode_prompt(prompts, pipe.device, 1, do_classifier_free_guidance=False)

        # By hand: token + position embeddings, overwrite the "f" row and the next, then the encoder.
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        f_id = tok("f").input_ids[1]  # as the official code finds the placeholder
        h = te.embeddings.token_embedding(ids) + te.embeddings.position_embedding(torch.arange(77))[None]
        pos = [row.index(f_id) for row in ids.tolist()]
        assert pos == [1, 4]
        for b, p in enumerate(pos):
            h[b, p], h[b, p + 1] = vectors[b, 0], vectors[b, 1]
        causal = torch.full((77, 77), float("-inf")).triu(1)[None, None].expand(2, 1, 77, 77)
        for layer in te.encoder.layers:
            h = layer(h, causal)
            h = h[0] if isinstance(h, tuple) else h
        want = te.final_layer_norm(h)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

        plain, _ = pipe.encode_prompt(prompts, pipe.device, 1, do_classifier_free_guidance=False)
    # The hook is gone after the block; causal attention leaves the rows before "f" as they were.
    for b, p in enumerate(pos):
        torch.testing.assert_close(got[b, :p], plain[b, :p])
        assert not torch.allclose(got[b, p:], plain[b, p:])


def test_every_builtin_prompt_carries_the_placeholder(method):
    tok = method.context.pipeline().tokenizer
    ids = method.load().placeholder_ids
    for name in ("smoke", "human40"):
        texts = [p.render("f l") for p in load_prompt_set(name).all_prompts()]
        batch = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        pos = placeholder_positions(batch, *ids)
        assert ((pos >= 1) & (pos < 75)).all()
    with pytest.raises(ValueError, match="prompt 1 of the batch has no F2D placeholder"):
        placeholder_positions(tok(["f l", "a person"], padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids, *ids)


def test_batch_of_different_faces_equals_each_face_alone(method, prepared, faces):
    batch = _requests(method, prepared, faces, FACES)
    together = method.prompt_embeds(batch)
    alone = torch.cat([method.prompt_embeds(_requests(method, prepared, faces, [f])) for f in FACES])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    images = _pixels(method.generate(_requests(method, prepared, faces, FACES)))
    singles = [_pixels(method.generate(_requests(method, prepared, faces, [f])))[0] for f in FACES]
    assert max(np.abs(a - b).max() for a, b in zip(images, singles)) <= 3
    # The unconditional branch is the plain empty prompt.
    pipe = method.context.pipeline()
    empty, _ = pipe.encode_prompt([""] * 2, pipe.device, 1, do_classifier_free_guidance=False)
    assert torch.equal(method.negative_embeds(2), empty)


def test_different_faces_differ_and_the_same_face_repeats(method, prepared, faces):
    again = method.prepare(Face("obama", faces / "obama.png"))
    assert torch.equal(again.tokens, prepared["obama"].tokens)
    assert not torch.allclose(prepared["obama"].tokens, prepared["biden"].tokens, atol=1e-3)
    obama, biden = _pixels(method.generate(_requests(method, prepared, faces, ["obama", "biden"])))
    assert np.abs(obama - biden).mean() > 0.5
    [obama_again] = _pixels(method.generate(_requests(method, {"obama": again}, faces, ["obama"])))
    [obama_single] = _pixels(method.generate(_requests(method, prepared, faces, ["obama"])))
    assert np.array_equal(obama_again, obama_single)


def test_face_input_is_the_arcface_crop(method, prepared, faces):
    from f2d_bench.faces.align import arcface_align
    from f2d_bench.faces.imageio import read_image

    image = read_image(faces / "biden.png")
    crop = arcface_align(image, prepared["biden"].landmarks, size=112)  # RGB uint8, 112x112x3
    x = torch.from_numpy((crop.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]  # as F2D feeds MSID
    enc = method.load()
    with torch.no_grad():
        torch.testing.assert_close(enc.mapping(enc.msid(x))[0], prepared["biden"].tokens)
    torch.testing.assert_close(method.encode_crops(crop[None])[0], prepared["biden"].tokens)
    # A mirrored crop is another input: the tokens depend on the pixels, not only on the file.
    assert not torch.allclose(method.encode_crops(crop[None, :, ::-1])[0], prepared["biden"].tokens, atol=1e-4)


def test_no_face_is_an_error_naming_the_file(method, tmp_path):
    path = tmp_path / "blank-wall.png"
    faceless_photo(path)
    with pytest.raises(F2DBenchError, match=r"no face detected in .*blank-wall\.png"):
        method.prepare(Face("blank-wall", path))


def test_a_photo_without_a_face_stops_generate_before_the_run_exists(faces, tmp_path):
    """Named at the start, with every such photo, not at its face hours in: once the photo is removed the
    same --out starts (a run folder made first would list the face and refuse the corrected set)."""
    face_set = tmp_path / "faces"
    shutil.copytree(faces, face_set)
    faceless_photo(face_set / "blank-wall.png")
    Image.new("RGB", (512, 512), (30, 30, 30)).save(face_set / "dark.png")
    cfg = lambda: config_from_dict(small_config_dict(methods=[RANDOM], faces=str(face_set), seeds=[0]))  # noqa: E731
    out = tmp_path / "run"
    with pytest.raises(F2DBenchError, match=r"no face detected in 2 photo\(s\) of the face set:\n.*blank-wall\.png "
                                            r"\(face blank-wall\): no face for .*F2D needs a visible face.*\n.*dark\.png"):
        generate_run(cfg(), out, progress=False)
    assert not out.exists()
    (face_set / "blank-wall.png").unlink()
    (face_set / "dark.png").unlink()
    assert generate_run(cfg(), out, progress=False).complete


def test_faceless_searches_each_photo_once_per_detector_until_it_changes(faces, tmp_path, monkeypatch):
    from f2d_bench.faces.detect import FaceDetector
    from f2d_bench.faces.faceset import load_face_set

    face_set = tmp_path / "faces"
    shutil.copytree(faces, face_set)
    faceless_photo(face_set / "blank.png")
    calls = []
    detect = FaceDetector.detect
    monkeypatch.setattr(FaceDetector, "detect", lambda self, image: calls.append(1) or detect(self, image))
    listed = load_face_set(face_set)
    first, second = _build(RANDOM, faces=str(face_set)), _build(RANDOM, faces=str(face_set))
    assert [f.face_id for f in first.faceless(listed)] == ["blank"] and len(calls) == len(listed)
    assert [f.face_id for f in second.faceless(listed)] == ["blank"] and len(calls) == len(listed)  # shared
    shutil.copy(faces / "obama.png", face_set / "blank.png")  # the photo replaced: searched again
    assert first.faceless(listed) == [] and len(calls) == len(listed) + 1
    # Replaced by a copy that keeps size and mtime (uncompressed PNGs of one size, cp -p): searched again.
    wall = tmp_path / "wall.png"
    faceless_photo(wall, compress_level=0)
    Image.fromarray(np.asarray(Image.open(faces / "obama.png").convert("RGB"))).save(face_set / "blank.png", compress_level=0)
    assert first.faceless(listed) == [] and len(calls) == len(listed) + 2
    stat = (face_set / "blank.png").stat()
    assert wall.stat().st_size == stat.st_size
    os.utime(wall, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy2(wall, face_set / "blank.png")
    assert (face_set / "blank.png").stat().st_mtime_ns == stat.st_mtime_ns
    assert [f.face_id for f in first.faceless(listed)] == ["blank"] and len(calls) == len(listed) + 3


def test_expression_reference_replaces_null_exp(method, prepared, faces, tmp_path):
    vec = np.random.default_rng(0).normal(size=64).astype(np.float32)
    np.save(tmp_path / "smile.npy", vec)
    torch.save(torch.from_numpy(vec), tmp_path / "smile.pt")
    with_exp = _build({"name": "f2d", "params": {"weights": "random", "expression": str(tmp_path / "smile.npy")}},
                      faces=str(faces))
    tokens = with_exp.prepare(Face("obama", faces / "obama.png")).tokens
    assert not torch.allclose(tokens, prepared["obama"].tokens, atol=1e-4)
    assert with_exp.method_id != method.method_id
    from_pt = _build({"name": "f2d", "params": {"weights": "random", "expression": str(tmp_path / "smile.pt")}},
                     faces=str(faces))
    torch.testing.assert_close(from_pt.expression, with_exp.expression)
    np.save(tmp_path / "short.npy", vec[:63])
    with pytest.raises(ConfigError, match="expected 64 values"):
        _build({"name": "f2d", "params": {"weights": "random", "expression": str(tmp_path / "short.npy")}})


# --- registry, preset, engine -------------------------------------------------------------------------
def test_registered_and_in_the_smoke_preset():
    assert METHODS.load("f2d") is F2DMethod
    smoke = yaml.safe_load((PRESET_DIR / "smoke.yaml").read_text())
    assert {"name": "f2d", "params": {"weights": "random"}} in smoke["methods"]


def test_f2d_grid_end_to_end(faces, tmp_path):
    cfg = config_from_dict(small_config_dict(methods=[RANDOM], faces=str(faces), seeds=[0]))
    out = tmp_path / "run"
    summary = generate_run(cfg, out, progress=False)
    [m] = summary.methods
    assert summary.complete and m.written == len(FACES) * 5  # smoke: 4 prompts + reference
    assert any("random weights" in p for p in m.problems)
    method_dir = out / "methods" / m.method_id
    info = json.loads((method_dir / "method.json").read_text())
    assert info["trained_params"] == mapping_parameter_count(32) and info["weights"] == "random weights: not meaningful"
    times = read_jsonl(method_dir / "prepare_times.jsonl")
    assert sorted(t["face_id"] for t in times) == sorted(FACES) and all(t["seconds"] > 0 for t in times)
    assert generate_run(cfg, out, progress=False).written == 0  # resumable like every method


def test_moved_checkpoints_resume_the_same_run(official_files, faces, tmp_path):
    """Method ids hash the checkpoints' contents, and the grid follows method ids: a run made with the
    official files resumes after the files move, and other file contents are refused."""
    def config(folder):
        params = {"weights": "official", "msid": str(folder / "msid.pt"), "mapping": str(folder / "mapping.pt")}
        return config_from_dict(small_config_dict(methods=[{"name": "f2d", "params": params}],
                                                  faces=str(faces), seeds=[0]))

    out = tmp_path / "run"
    first = generate_run(config(official_files), out, progress=False)
    assert first.complete and first.written == len(FACES) * 5
    moved = tmp_path / "elsewhere"
    shutil.copytree(official_files, moved)
    again = generate_run(config(moved), out, progress=False)
    assert again.complete and again.written == 0
    assert again.methods[0].method_id == first.methods[0].method_id
    torch.save(_random_state(lambda: MappingNetwork(32), 99), moved / "mapping.pt")  # other weights
    with pytest.raises(F2DBenchError, match="different settings"):
        generate_run(config(moved), out, progress=False)


def test_a_bad_checkpoint_stops_generate_before_the_run_exists(official_files, faces, tmp_path):
    """The weights load before the run directory is written: the corrected config then starts the same
    --out (a run folder made by the failed start would hold another method id and refuse it)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    sd = torch.load(official_files / "mapping.pt", weights_only=True)
    del sd["i2t_last.fc_out.bias"]
    torch.save(sd, broken / "mapping.pt")

    def config(mapping):
        params = {"weights": "official", "msid": str(official_files / "msid.pt"), "mapping": str(mapping)}
        return config_from_dict(small_config_dict(methods=[{"name": "f2d", "params": params}],
                                                  faces=str(faces), seeds=[0]))

    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"mapping\.pt .*missing keys 1"):
        generate_run(config(broken / "mapping.pt"), out, progress=False)
    assert not out.exists()
    fixed = generate_run(config(official_files / "mapping.pt"), out, progress=False)
    assert fixed.complete and fixed.written == len(FACES) * 5
