"""CelebBasis: the celebrity basis, the IResNet-100 backbone's official layout, and per-face tuning on the
tiny pipeline with the real test photos."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from baselines.celeb_basis.backbone import IResNet, load_backbone
from baselines.celeb_basis.basis import OFFICIAL_ROWS, effective_basis_size, pca_basis, word_vectors
from baselines.celeb_basis.method import (
    ARTIFACT, COEFFICIENTS, CelebBasisMethod, FaceMLP, coefficient_count, mlp_parameter_count,
)
from f2d_bench.config import config_from_dict
from f2d_bench.engine import PipelineProvider, build_methods
from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.methods.base import MethodContext
from f2d_bench.methods.token_slots import token_embedding_module
from f2d_bench.prompts import load_prompt_set
from f2d_bench.weights import WeightsLayoutError

from conftest import sha256_file, small_config_dict
from test_tuning import _face, _fixed_draw_loss, _pixels, _request, assert_faces_share_a_batch

OFFLINE = {"backbone": "random", "names": "random"}
FAST = {**OFFLINE, "steps": 3}
#: Single CLIP tokens, so that "first last" has exactly two tokens and "first" one.
FIRST = ("john", "mary", "james", "anna", "peter", "laura", "david", "emma")
LAST = ("smith", "brown", "taylor", "wilson", "moore")


@pytest.fixture(scope="module")
def provider():
    """One tiny pipeline for the whole module (methods only read it; diffusers' loader gets copies)."""
    return PipelineProvider(config_from_dict(small_config_dict()))


def _method(provider, **params) -> CelebBasisMethod:
    # Built directly on the module's shared pipeline (build_methods would load one per method).
    cfg = config_from_dict(small_config_dict(methods=[{"name": "celeb-basis", "params": params}]))
    method = CelebBasisMethod(params, MethodContext(cfg, load_prompt_set("smoke"), provider))
    method.label = "celeb-basis"
    return method


# --- sizes and the basis ---------------------------------------------------------------------------

def test_trained_parameters_equal_closed_forms_at_sd14_size():
    width = 768  # SD 1.4's text width
    size = effective_basis_size(512, OFFICIAL_ROWS, width)
    assert size == 512 and coefficient_count(size) == 1024  # Table 2: CelebBasis 1024
    with torch.device("meta"):
        mlp = FaceMLP(size)
    assert sum(p.numel() for p in mlp.parameters()) == mlp_parameter_count(size) == 525_312
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, width, generator=generator, dtype=torch.float64) for n in OFFICIAL_ROWS]
    basis = pca_basis(rows, size)
    assert basis.shape == (2, 513, 768)
    for j in range(2):
        torch.testing.assert_close(basis[j, 0].double(), rows[j].mean(0), atol=1e-6, rtol=0)
        gram = basis[j, 1:].double() @ basis[j, 1:].double().T
        torch.testing.assert_close(gram, torch.eye(size, dtype=torch.float64), atol=1e-5, rtol=0)
    # A small text width caps the directions (no more orthonormal ones exist), as does the row count.
    assert effective_basis_size(512, OFFICIAL_ROWS, 32) == 32 and effective_basis_size(512, (40, 9), 768) == 8


def test_names_file_basis_follows_the_official_recipe(provider, tmp_path):
    names = [f"{a} {b}" for a in FIRST for b in LAST] + list(FIRST[:3])  # 40 two-token + 3 one-token names
    (tmp_path / "names.txt").write_text("\n".join(names + names[:5]) + "\n")  # repeats count once
    method = _method(provider, backbone="random", names=str(tmp_path / "names.txt"), basis_size=16)
    pipe = provider()
    ids = {w: pipe.tokenizer(w, add_special_tokens=False).input_ids for w in FIRST + LAST}
    assert all(len(v) == 1 for v in ids.values())
    basis = method.basis()
    assert basis.rows == (43, 40) and basis.size == 16 and basis.tensor.shape == (2, 17, 32)
    table = token_embedding_module(pipe.text_encoder).weight.detach().double()
    first_ids = [ids[n.split()[0]][0] for n in sorted(set(names))]
    second_ids = [ids[n.split()[1]][0] for n in sorted(set(names)) if " " in n]
    torch.testing.assert_close(basis.tensor[0, 0].double(), table[first_ids].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(basis.tensor[1, 0].double(), table[second_ids].mean(0), atol=1e-6, rtol=0)
    assert method.info()["trained_params"] == 32
    # The basis size is capped by rows - 1 and by the width; the file's content is in the identity.
    assert _method(provider, backbone="random", names=str(tmp_path / "names.txt")).basis().size == 32
    before = method.method_id
    (tmp_path / "names.txt").write_text("\n".join(names[:-1]) + "\n")
    assert _method(provider, backbone="random", names=str(tmp_path / "names.txt"), basis_size=16).method_id != before


def test_missing_files_say_where_they_are_published(provider, tmp_path):
    with pytest.raises(ConfigError, match=r"params\.backbone.*arcface_torch.*backbone\.pth"):
        _method(provider, names="random")
    with pytest.raises(ConfigError, match=r"params\.names.*wiki_names_v2\.txt.*CelebBasis"):
        _method(provider, backbone="random", names=str(tmp_path / "absent.txt"))


# --- the backbone ----------------------------------------------------------------------------------


def _constant_state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every entry of ``model.state_dict()`` as a distinct constant (a broadcast scalar: a tiny file)."""
    return {prefix + key: torch.tensor(i % 97 + 1, dtype=value.dtype).expand(value.shape)
            for i, (key, value) in enumerate(model.state_dict().items())}


def test_backbone_official_layout_loads_strictly_and_others_are_refused(tmp_path):
    with torch.device("meta"):
        layout = IResNet()
    keys = list(layout.state_dict())
    assert sum(p.numel() for p in layout.parameters()) == 65_156_160 and len(keys) == 925
    assert {"conv1.weight", "bn1.weight", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.downsample.0.weight",
            "layer3.29.bn3.running_var", "fc.weight", "features.weight"} <= set(keys)
    assert "layer1.1.downsample.0.weight" not in keys and not any(k.startswith("module.") for k in keys)

    official = tmp_path / "backbone.pth"
    torch.save(_constant_state(layout), official)
    model = load_backbone(official)
    expected = layout.state_dict()
    for i, (key, value) in enumerate(model.state_dict().items()):
        assert value.dtype == expected[key].dtype and bool((value == i % 97 + 1).all()), key

    wrapped = tmp_path / "wrapped.pth"
    torch.save(_constant_state(layout, "module."), wrapped)
    with pytest.raises(WeightsLayoutError, match=r"wrapped\.pth.*extra 'module\.' prefix"):
        load_backbone(wrapped)
    incomplete = tmp_path / "incomplete.pth"
    state = _constant_state(layout)
    del state["layer4.2.bn3.weight"]
    torch.save(state, incomplete)
    with pytest.raises(WeightsLayoutError, match=r"incomplete\.pth.*missing keys 1: 'layer4\.2\.bn3\.weight'"):
        load_backbone(incomplete)


# --- tuning ----------------------------------------------------------------------------------------


def test_tuning_lowers_the_loss_on_a_real_photo(provider, tmp_path):
    # A short EMA (momentum 0.5) so that 20 updates reach the kept coefficients; the recipe is otherwise official.
    method = _method(provider, **OFFLINE, steps=20, batch_size=4, momentum=0.5)
    face = _face()
    start = method.start(face)
    with torch.no_grad():  # what the first steps train with: the fresh MLP's output for the photo
        first = word_vectors(method.basis().tensor, start.mlp(method.face_features(face)[:1]))[0]
    facts = method.tune(face, tmp_path)
    learned = method.load_tuned(face, tmp_path).vectors
    assert facts["trained_params"] == 64 and facts["mlp_params"] == mlp_parameter_count(32)
    assert len(facts["losses"]) == 20 and facts["ema_updates"] == 80 and facts["learning_rate"] == 2e-2
    caption = method.caption_text(method.params["templates"][0])
    before = _fixed_draw_loss(method, face, first, caption=caption)
    after = _fixed_draw_loss(method, face, learned, caption=caption)
    assert after < before - 2e-3, (before, after)


def test_same_seed_same_artifact_bytes(provider, tmp_path):
    from safetensors.torch import load_file

    method = _method(provider, **FAST)
    face = _face()
    for name in "abc":
        (tmp_path / name).mkdir()  # the engine hands tune() an empty folder
    method.tune(face, tmp_path / "a")
    method.tune(face, tmp_path / "b")
    for name in (ARTIFACT, COEFFICIENTS):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)
    # The saved vectors are the kept coefficients on the basis.
    coefficients = load_file(str(tmp_path / "a" / COEFFICIENTS))["coefficients"]
    assert coefficients.shape == (2, 32)
    torch.testing.assert_close(method.load_tuned(face, tmp_path / "a").vectors,
                               word_vectors(method.basis().tensor, coefficients[None])[0])
    other_seed = _method(provider, **FAST, seed=1)
    other_seed.tune(face, tmp_path / "c")
    assert sha256_file(tmp_path / "a" / ARTIFACT) != sha256_file(tmp_path / "c" / ARTIFACT)


def test_artifact_reloads_through_diffusers_and_renders_the_same_images(provider, tmp_path):
    from diffusers import StableDiffusionPipeline

    method = _method(provider, **FAST)
    face = _face()
    method.tune(face, tmp_path)
    request = _request(method, face, method.load_tuned(face, tmp_path))
    ours = _pixels(method.generate([request])[0])

    pipe = provider()
    # A pipeline of its own: load_textual_inversion grows the vocabulary of the model it is given.
    other = StableDiffusionPipeline(**{**pipe.components, "tokenizer": copy.deepcopy(pipe.tokenizer),
                                       "text_encoder": copy.deepcopy(pipe.text_encoder)})
    other.load_textual_inversion(str(tmp_path), weight_name=ARTIFACT)  # tokens <obama>, <obama>_1
    s = method.context.config.sampling
    theirs = other(request.prompt.render("<obama> person"), negative_prompt="",
                   num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, height=s.height,
                   width=s.width, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(_pixels(theirs) - ours).max() <= 3

    cfg = config_from_dict(small_config_dict())
    [sd_class] = build_methods(cfg, load_prompt_set("smoke"), pipeline=provider)
    plain = _pixels(sd_class.generate([_request(sd_class, face, None)])[0])
    assert np.abs(plain - ours).max() > 10  # the tuned subject changes the image


def test_faces_share_a_batch_and_render_as_alone(provider, tmp_path):
    assert_faces_share_a_batch(_method(provider, **FAST), tmp_path)


def test_a_wrong_artifact_is_refused_with_its_path(provider, tmp_path):
    from safetensors.torch import save_file

    method = _method(provider, **FAST)
    save_file({"<obama>": torch.zeros(1, 32)}, str(tmp_path / ARTIFACT))  # one vector, not two
    with pytest.raises(F2DBenchError, match=r"learned_embeds\.safetensors: expected one tensor '<obama>' of "
                                            r"shape \(2, 32\)"):
        method.load_tuned(_face(), tmp_path)


def test_native_sampling_is_the_official_ddim_50_steps_at_scale_10():
    """02_start_test.sh renders with DDIM (eta 0), 50 steps, scale 10; `sampling: native` gives it, and the
    pipeline the method renders with carries that scheduler."""
    data = small_config_dict(methods=[{"name": "celeb-basis", "params": OFFLINE, "sampling": "native"}])
    [method] = build_methods(config_from_dict(data), load_prompt_set("smoke"))
    sampling = method.context.sampling
    assert (sampling.scheduler, sampling.num_inference_steps, sampling.guidance_scale) == ("DDIMScheduler", 50, 10.0)
    assert (sampling.height, sampling.width) == (64, 64)  # the run's size
    assert type(method.context.pipeline().scheduler).__name__ == "DDIMScheduler"


def test_entries_differing_only_in_sampling_tune_each_face_once(tmp_path):
    """CelebBasis reads no sampling setting while tuning: its protocol and native entries share a face's
    tuning (one tuning id), linked with its record; a run of the native entry alone tunes the same bytes."""
    from f2d_bench.engine import tune_run
    from f2d_bench.run_dir import RunDir
    from f2d_bench.tuning.artifacts import TunedFaces

    from conftest import face_dir

    faces = str(face_dir(tmp_path / "faces", ["obama"]))
    protocol = {"name": "celeb-basis", "params": FAST}
    native = {"name": "celeb-basis", "label": "celeb-basis-native", "sampling": "native", "params": FAST}
    both = config_from_dict(small_config_dict(faces=faces, seeds=[0], methods=[protocol, native]))
    summary = tune_run(both, tmp_path / "both", progress=False)
    assert [row[3] for row in summary.methods] == [1, 0]  # tuned once, linked once
    run = RunDir(tmp_path / "both")
    first, second = (TunedFaces(run, row[0]) for row in summary.methods)
    a, b = first.path("obama") / ARTIFACT, second.path("obama") / ARTIFACT
    assert a.stat().st_ino == b.stat().st_ino or sha256_file(a) == sha256_file(b)
    assert second.record("obama") == first.record("obama")  # the tuning's own time, for Table 2
    [m1, m2] = build_methods(both, load_prompt_set("smoke"), pipeline=lambda: None)
    assert m1.method_id != m2.method_id and m1.tuning_id == m2.tuning_id

    alone = config_from_dict(small_config_dict(faces=faces, seeds=[0], methods=[native]))
    tune_run(alone, tmp_path / "alone", progress=False)
    [(mid, *_)] = [(m["method_id"],) for m in RunDir(tmp_path / "alone").read_grid()["methods"]]
    assert mid == m2.method_id
    assert sha256_file(TunedFaces(RunDir(tmp_path / "alone"), mid).path("obama") / ARTIFACT) == sha256_file(b)


def test_a_photo_without_a_face_is_named_before_tuning(provider, tmp_path):
    from conftest import a_real_and_a_faceless_face

    method = _method(provider, **FAST)
    real, blank = a_real_and_a_faceless_face(tmp_path)
    assert method.faceless([real, blank]) == [blank]
    with pytest.raises(F2DBenchError, match=r"celeb-basis: no face detected in .*wall\.png \(face wall\); its face MLP"):
        method.face_features(blank)
