"""The per-face tuning stage and TextualInversion, on the tiny pipeline and the real test photos."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from f2d_bench.config import config_from_dict
from f2d_bench.engine import build_methods, generate_run, tune_run
from f2d_bench.faces.faceset import Face
from f2d_bench.grid import ItemKey, Shard
from f2d_bench.methods import METHODS
from f2d_bench.methods.base import GenerationRequest
from f2d_bench.methods.token_slots import single_token_ids, token_embedding_module
from f2d_bench.methods.word_vectors import word_vector_parameters
from f2d_bench.prompts import load_prompt_set
from f2d_bench.run_dir import RunDir
from f2d_bench.tuning.artifacts import TUNE_RECORD, TunedFaces
from f2d_bench.tuning.diffusion import DenoisingLoss, encode_posterior, encode_text, training_pixels, training_resolution

from conftest import REPO, face_dir, prepared_crops, run_hashes, sha256_file, small_config_dict

TI = {"name": "textual-inversion", "params": {"steps": 3, "accumulation": 1}}


def _method(method_cfg: dict, **overrides):
    cfg = config_from_dict(small_config_dict(methods=[method_cfg], **overrides))
    [method] = build_methods(cfg, load_prompt_set("smoke"))
    return method


def _face(face_id: str = "obama") -> Face:
    return Face(face_id, prepared_crops()[face_id])


def _request(method, face: Face, prepared, prompt_index: int = 0, seed: int = 0) -> GenerationRequest:
    prompt = load_prompt_set("smoke").prompts[prompt_index]
    return GenerationRequest(ItemKey(method.method_id, face.face_id, prompt.id, seed), prompt, face, prepared,
                             torch.Generator("cpu").manual_seed(seed))


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@torch.no_grad()
def _fixed_draw_loss(method, face: Face, vectors: torch.Tensor, *, caption: str | None = None, draws: int = 16,
                     batch: int = 8) -> float:
    """The denoising loss of ``vectors`` (n_vectors, width) at a fixed set of (flip, latent, timestep, noise)
    draws; ``caption`` defaults to "a photo of <subject>"."""
    pipe = method.context.pipeline()
    posterior = encode_posterior(pipe.vae, training_pixels(face.path, training_resolution(pipe)))
    generator = torch.Generator("cpu").manual_seed(1234)
    loss = DenoisingLoss(pipe, generator)
    caption = caption if caption is not None else "a photo of " + method.subject_text()
    total = 0.0
    for _ in range(draws):
        latents = posterior.sample(batch, generator, 0.5)
        with method.written(vectors[None].expand(batch, -1, -1)):
            text = encode_text(pipe, [caption] * batch)
        total += float(loss(pipe.unet, latents, text))
    return total / draws


# --- TextualInversion ------------------------------------------------------------------------------


def test_textual_inversion_is_listed_through_its_entry_point():
    entry = METHODS.entries()["textual-inversion"]
    assert entry.origin != "built-in" and entry.target.startswith("baselines.textual_inversion.")


def test_textual_inversion_trains_one_word_vector_at_sd14_size():
    from transformers import CLIPTextConfig, CLIPTextModel

    from f2d_bench.pipelines.sd14 import SD14_TEXT_ENCODER_CONFIG

    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT_ENCODER_CONFIG))
    assert word_vector_parameters(text_encoder, 1) == 768


def test_tuning_lowers_the_loss_on_a_real_photo(tmp_path):
    method = _method({"name": "textual-inversion",
                      "params": {"steps": 20, "accumulation": 1, "batch_size": 4, "learning_rate": 5e-2}})
    face = _face()
    pipe = method.context.pipeline()
    (init_id,) = single_token_ids(pipe.tokenizer, ["person"])
    start = token_embedding_module(pipe.text_encoder).weight[init_id][None].detach().clone()
    facts = method.tune(face, tmp_path)
    learned = method.load_tuned(face, tmp_path).vectors
    assert facts["trained_params"] == 32 and len(facts["losses"]) == 20
    before, after = _fixed_draw_loss(method, face, start), _fixed_draw_loss(method, face, learned)
    assert after < before - 1e-3, (before, after)


def test_artifact_reloads_through_diffusers_and_renders_the_same_images(tmp_path):
    from diffusers import StableDiffusionPipeline

    method = _method(TI)
    face = _face()
    method.tune(face, tmp_path)
    prepared = method.load_tuned(face, tmp_path)
    request = _request(method, face, prepared)
    ours = _pixels(method.generate([request])[0])

    pipe = method.context.pipeline()
    # A pipeline of its own: load_textual_inversion grows the vocabulary of the model it is given.
    other = StableDiffusionPipeline(**{**pipe.components, "tokenizer": copy.deepcopy(pipe.tokenizer),
                                       "text_encoder": copy.deepcopy(pipe.text_encoder)})
    other.load_textual_inversion(str(tmp_path), weight_name="learned_embeds.safetensors")
    s = method.context.config.sampling
    theirs = other(request.prompt.render("<obama>"), negative_prompt="", num_inference_steps=s.num_inference_steps,
                   guidance_scale=s.guidance_scale, height=s.height, width=s.width,
                   generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(_pixels(theirs) - ours).max() <= 1

    sd_class = _method({"name": "sd-class"})
    plain = _pixels(sd_class.generate([_request(sd_class, face, None)])[0])
    assert np.abs(plain - ours).max() > 10  # the tuned subject changes the image


def assert_faces_share_a_batch(method, tmp_path):
    """Two tuned faces in one batch render as each alone (float rounding only) and differ from each other."""
    faces = [_face("obama"), _face("biden")]
    prepared = {}
    for f in faces:
        (tmp_path / f.face_id).mkdir()
        method.tune(f, tmp_path / f.face_id)
        prepared[f.face_id] = method.load_tuned(f, tmp_path / f.face_id)
    together = method.generate([_request(method, f, prepared[f.face_id]) for f in faces])
    alone = [method.generate([_request(method, f, prepared[f.face_id])])[0] for f in faces]
    assert max(np.abs(_pixels(a) - _pixels(b)).max() for a, b in zip(together, alone)) <= 3
    assert np.abs(_pixels(together[0]) - _pixels(together[1])).max() > 0


def test_faces_share_a_batch_and_render_as_alone(tmp_path):
    assert_faces_share_a_batch(_method(TI), tmp_path)


def test_same_seed_same_artifact_bytes(tmp_path):
    method = _method(TI)
    face = _face()
    for name in "abc":
        (tmp_path / name).mkdir()
    method.tune(face, tmp_path / "a")
    method.tune(face, tmp_path / "b")
    assert sha256_file(tmp_path / "a" / "learned_embeds.safetensors") == \
        sha256_file(tmp_path / "b" / "learned_embeds.safetensors")
    other_seed = _method({"name": "textual-inversion", "params": {**TI["params"], "seed": 1}})
    other_seed.tune(face, tmp_path / "c")
    assert sha256_file(tmp_path / "a" / "learned_embeds.safetensors") != \
        sha256_file(tmp_path / "c" / "learned_embeds.safetensors")


def test_a_wrong_artifact_is_refused_with_its_path(tmp_path):
    from safetensors.torch import save_file

    from f2d_bench.errors import F2DBenchError

    method = _method(TI)
    save_file({"<someone-else>": torch.zeros(1, 32)}, str(tmp_path / "learned_embeds.safetensors"))
    with pytest.raises(F2DBenchError, match="learned_embeds.safetensors: expected one tensor '<obama>'"):
        method.load_tuned(_face(), tmp_path)


# --- the tuning stage ------------------------------------------------------------------------------


def _tuning_config(tmp_path: Path, face_ids, steps: int = 3, **overrides):
    faces = face_dir(tmp_path / "faces", face_ids)
    return config_from_dict(small_config_dict(
        faces=str(faces), methods=[{"name": "textual-inversion", "params": {"steps": steps, "accumulation": 1}}],
        **overrides))


def test_generate_tunes_each_face_once_and_reuses_it(tmp_path):
    cfg = _tuning_config(tmp_path, ["obama", "biden"], seeds=[0])
    out = tmp_path / "run"
    first = generate_run(cfg, out, progress=False)
    assert first.complete
    run = RunDir(out)
    [mid] = [m["method_id"] for m in run.read_grid()["methods"]]
    records = run.tune_records(mid)
    assert sorted(r["face_id"] for r in records) == ["biden", "obama"]
    assert all(r["trained_params"] == 32 and r["steps"] == 3 and r["writer"] == "all" for r in records)
    # Table 2's time per face is the tuning time.
    assert run.prepare_seconds(mid) == {r["face_id"]: r["seconds"] for r in records}
    stamps = {r["face_id"]: r["finished_at"] for r in records}
    hashes = run_hashes(out)

    tuned = TunedFaces(run, mid)
    (tuned.path("obama") / "learned_embeds.safetensors").write_bytes(b"damaged")  # no longer its hash
    assert "differs from the hash" in tuned.damage("obama")
    for p in (out / "images" / mid / "obama").rglob("*.png"):
        p.unlink()
    again = generate_run(cfg, out, progress=False)
    assert again.complete and again.written == len(load_prompt_set("smoke").all_prompts())
    assert tuned.damage("obama") is None and tuned.record("biden")["finished_at"] == stamps["biden"]
    assert run_hashes(out) == hashes  # the re-tuned face is the same bytes, so are its images


def test_a_non_square_face_photo_is_named_before_tuning_squashes_it(tmp_path):
    from PIL import Image

    cfg = _tuning_config(tmp_path, ["obama", "biden"], seeds=[0])
    photo = tmp_path / "faces" / "obama.png"
    with Image.open(photo) as image:
        image.crop((0, 0, 512, 384)).save(photo)  # a hand-made face folder: a wider-than-high photo
    out = tmp_path / "run"
    summary = tune_run(cfg, out, progress=False)
    [note] = [n for n in summary.notes if "not square" in n]
    assert "obama (512x384)" in note and "biden" not in note and "1 face photo(s)" in note
    generated = generate_run(cfg, out, progress=False)
    [prog] = generated.methods
    assert any("obama (512x384)" in problem for problem in prog.problems)


def _one_tuned_face(tmp_path):
    """A run whose one face (obama) is tuned: (config, out, run, method id, TunedFaces, its weights' sha)."""
    cfg = _tuning_config(tmp_path, ["obama"], seeds=[0])
    out = tmp_path / "run"
    tune_run(cfg, out, progress=False)
    run = RunDir(out)
    [mid] = [m["method_id"] for m in run.read_grid()["methods"]]
    tuned = TunedFaces(run, mid)
    return cfg, out, run, mid, tuned, sha256_file(tuned.path("obama") / "learned_embeds.safetensors")


def test_an_unfinished_tuning_is_never_loaded(tmp_path):
    cfg, out, run, mid, tuned, good = _one_tuned_face(tmp_path)
    # What a kill mid-tuning leaves: the work folder, and (by hand) no finished folder.
    import shutil

    shutil.move(tuned.path("obama"), tuned.path("obama").parent / ".obama.tuning")
    (tuned.path("obama").parent / ".obama.tuning" / "learned_embeds.safetensors").write_bytes(b"half")
    assert tuned.record("obama") is None and not tuned.ready("obama")
    summary = tune_run(cfg, out, progress=False)
    assert summary.methods[0][3] == 1  # tuned again, from scratch
    assert sha256_file(tuned.path("obama") / "learned_embeds.safetensors") == good
    assert not (tuned.path("obama").parent / ".obama.tuning").exists()


def test_a_damaged_tune_record_is_tuned_again(tmp_path):
    cfg, out, run, mid, tuned, good = _one_tuned_face(tmp_path)
    record = tuned.path("obama") / TUNE_RECORD
    record.write_bytes(record.read_bytes()[:100])  # a disk or a copy cut it short
    assert tuned.record("obama") is None and run.tune_records(mid) == []
    summary = tune_run(cfg, out, progress=False)
    assert summary.methods[0][3] == 1  # tuned again, not an error
    assert sha256_file(tuned.path("obama") / "learned_embeds.safetensors") == good
    assert tuned.record("obama")["face_id"] == "obama"


def test_class_images_resumed_after_a_kill_are_the_bytes_of_an_unbroken_render(tmp_path):
    from f2d_bench.config import SamplingConfig
    from f2d_bench.pipelines.loading import load_sd_pipeline
    from f2d_bench.tuning.class_images import class_image_paths

    real = load_sd_pipeline("f2d-bench/tiny-sd14", dtype="float32", device="cpu")
    calls = []

    def pipe(**kwargs):  # the batches, by seed: a batched render differs from another in float rounding
        calls.append([g.initial_seed() for g in kwargs["generator"]])
        return real(**kwargs)

    sampling = SamplingConfig(num_inference_steps=2, height=64, width=64)
    render = dict(pipe=pipe, prompt="a photo of a person", count=10, sampling=sampling, seed=0, batch_size=4)
    whole = {p.name: sha256_file(p) for p in class_image_paths(tmp_path / "a", **render)}
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    paths = class_image_paths(tmp_path / "b", **render)
    for p in paths[1:]:  # what a kill right after the first image's rename leaves
        p.unlink()
    calls.clear()
    assert {p.name: sha256_file(p) for p in class_image_paths(tmp_path / "b", **render)} == whole
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the same batches again, image 0 rendered and kept


def test_tune_shards_split_the_faces(tmp_path):
    ids = sorted(prepared_crops())[:4]
    cfg = _tuning_config(tmp_path, ids, steps=1)
    out = tmp_path / "run"
    owned = []
    for i in (1, 2):
        tune_run(cfg, out, shard=Shard(i, 2), progress=False)
        run = RunDir(out)
        [mid] = [m["method_id"] for m in run.read_grid()["methods"]]
        owned.append({r["face_id"] for r in run.tune_records(mid)} - set().union(*owned))
    assert owned[0] and owned[1] and owned[0] | owned[1] == set(ids) and not owned[0] & owned[1]
    assert all(Shard(1, 2).owns_face(f) for f in owned[0])


def test_the_upper_bound_child_reuses_the_parents_tuning(tmp_path):
    cfg = _tuning_config(tmp_path, ["obama"], seeds=[0])
    parent = RunDir(tmp_path / "run")
    tune_run(cfg, parent.root, progress=False)
    [mid] = [m["method_id"] for m in parent.read_grid()["methods"]]
    child = parent.upper_bound_child(2)
    assert TunedFaces(child, mid).link_from(TunedFaces(parent, mid)) == 1
    src = TunedFaces(parent, mid).path("obama") / "learned_embeds.safetensors"
    dst = TunedFaces(child, mid).path("obama") / "learned_embeds.safetensors"
    assert os.path.samefile(src, dst) or sha256_file(src) == sha256_file(dst)
    assert TunedFaces(child, mid).ready("obama")
    assert TunedFaces(child, mid).link_from(TunedFaces(parent, mid)) == 0  # once


@pytest.mark.slow
def test_tune_killed_with_sigkill_resumes_with_every_face_tuned_once(tmp_path):
    """A real `f2d-bench tune` process killed mid-face, then started again, ends as an uninterrupted run."""
    ids = ["biden", "obama", "grace_hopper"]
    faces = face_dir(tmp_path / "faces", ids)
    data = small_config_dict(faces=str(faces), methods=[
        {"name": "textual-inversion", "params": {"steps": 60, "accumulation": 1}}])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "f2d_bench", "tune", "--config", str(cfg), "--no-progress", "--out"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen([*cmd, str(out)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    finished = lambda: list(out.glob("methods/*/faces/*/" + TUNE_RECORD))  # noqa: E731
    working = lambda: list(out.glob("methods/*/faces/.*.tuning"))  # noqa: E731
    while time.time() < deadline and proc.poll() is None and not (finished() and working()):
        time.sleep(0.02)
    assert proc.poll() is None, "tune ended before the kill: " + (tmp_path / "first.log").read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= len(finished()) < len(ids)

    done = subprocess.run([*cmd, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not working()
    records = [json.loads(p.read_text()) for p in finished()]
    assert sorted(r["face_id"] for r in records) == sorted(ids)

    clean = tmp_path / "clean"
    subprocess.run([*cmd, str(clean)], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    def artifacts(root):
        return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.glob("methods/*/faces/*/*.safetensors")}

    assert artifacts(out) == artifacts(clean) and len(artifacts(out)) == len(ids)


@pytest.mark.slow
def test_upper_bound_tops_up_a_tuned_run_without_tuning_again(tmp_path):
    from f2d_bench.scoring import score_run
    from f2d_bench.upper_bound import upper_bound

    from conftest import offline_scoring

    cfg = _tuning_config(tmp_path, ["obama"], seeds=[0], batch_size=4,
                         scoring=offline_scoring(scorers=["facenet", "clip"]))
    parent = RunDir(tmp_path / "run")
    assert generate_run(cfg, parent.root, progress=False).complete
    score_run(parent.root, progress=False)
    [mid] = [m["method_id"] for m in parent.read_grid()["methods"]]
    # two of the six metrics: no hMean, so the curve is of CLIP (the tuning's reuse is what is tested)
    upper_bound(parent.root, 2, progress=False, column="clip")
    child = parent.upper_bound_child(2)
    assert child.tune_records(mid) == parent.tune_records(mid)  # linked, not tuned again
    assert len(child.keys()) == 2 * len(load_prompt_set("smoke").all_prompts())
    assert all(child.store.has_image(k) for k in child.keys())


def test_loss_scaling_changes_nothing_in_float32_and_keeps_float16_gradients_alive():
    """Scaling by a power of two is exact in float32; through float16 layers it is what keeps gradients of
    an MSE over many elements (about 1e-5 each) from rounding to 0."""
    from f2d_bench.tuning.diffusion import optimise

    def run(dtype, scaling):
        torch.manual_seed(0)
        vector = torch.nn.Parameter(torch.randn(8))
        layer = torch.nn.Linear(8, 4096).to(dtype)  # frozen, as the UNet is
        layer.requires_grad_(False)
        target = torch.randn(4096)
        losses = optimise([vector], steps=5, learning_rate=1e-2, accumulation=4, loss_scaling=scaling,
                          weight_decay=0.0,  # so that only a gradient moves the vector
                          loss=lambda: torch.nn.functional.mse_loss(layer(vector.to(dtype)).float() * 1e-3,
                                                                    target * 1e-3))
        return vector.detach(), losses

    plain, plain_losses = run(torch.float32, False)
    scaled, scaled_losses = run(torch.float32, True)
    assert torch.equal(plain, scaled) and plain_losses == scaled_losses
    torch.manual_seed(0)  # the start: the first draw of run()
    first = torch.randn(8)
    stuck, _ = run(torch.float16, False)
    alive, _ = run(torch.float16, True)
    assert torch.equal(stuck, first)  # every float16 gradient underflowed: the vector never moved
    assert not torch.equal(alive, first) and torch.isfinite(alive).all()


@pytest.mark.parametrize("name", ["textual-inversion", "custom-diffusion", "celeb-basis"])
def test_float16_tuning_runs_with_loss_scaling_and_says_so(tmp_path, name):
    """float16 is what `auto` gives on CUDA; the tiny pipeline runs it on the CPU through the same code."""
    params = {"steps": 3, **{"custom-diffusion": {"num_class_images": 0},
                             "celeb-basis": {"backbone": "random", "names": "random"}}.get(name, {})}
    method = _method({"name": name, "params": params}, model={"dtype": "float16"})
    assert method.context.pipeline().unet.dtype == torch.float16
    facts = method.tune(_face(), tmp_path)
    assert facts["loss_scaling"] is True and len(facts["losses"]) == 3
    assert all(math.isfinite(v) for v in facts["losses"])
