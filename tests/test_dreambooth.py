"""DreamBooth (full UNet and LoRA) on the tiny pipeline and the real test photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.dreambooth.method import DreamBoothMethod, lora_parameter_count
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.methods import METHODS
from f2d_bench.run_dir import RunDir
from f2d_bench.tuning.artifacts import TunedFaces
from f2d_bench.tuning.diffusion import DenoisingLoss, encode_posterior, encode_text, training_pixels, training_resolution

from conftest import face_dir, run_hashes, small_config_dict
from test_tuning import _face, _method, _pixels, _request


def _dreambooth(tmp_path, **params) -> DreamBoothMethod:
    m = _method({"name": "dreambooth", "params": {"steps": 3, "num_class_images": 2, **params}})
    m.shared_dir = tmp_path / "shared"
    return m


def test_listed_through_its_entry_point():
    assert METHODS.entries()["dreambooth"].target.startswith("baselines.dreambooth.")


def test_trained_parameters_at_sd14_size():
    from diffusers import UNet2DConditionModel

    from f2d_bench.pipelines.sd14 import SD14_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # full DreamBooth: the whole UNet
    # LoRA rank 4 on q, k, v, out of the 32 attention layers (16 self, 16 cross):
    # self: 4 x (w + w) x 4 projections; cross: q and out 4 x 2w, k and v 4 x (768 + w).
    widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    by_hand = sum(4 * (2 * w) * 4 + 2 * 4 * 2 * w + 2 * 4 * (768 + w) for w in widths)
    assert lora_parameter_count(unet, 4) == by_hand == 797_184


def test_lora_count_equals_what_peft_trains(tmp_path):
    method = _dreambooth(tmp_path, variant="lora", lora_rank=2)
    unet = method._trainable_unet(seed=0)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == lora_parameter_count(method.context.pipeline().unet, 2) == method.trained_params()


def _fixed_draw_loss(method, face, unet) -> float:
    pipe = method.context.pipeline()
    posterior = encode_posterior(pipe.vae, training_pixels(face.path, training_resolution(pipe)))
    generator = torch.Generator("cpu").manual_seed(7)
    loss = DenoisingLoss(pipe, generator)
    with torch.no_grad():
        text = encode_text(pipe, [method.params["instance_prompt"]] * 8)
        return sum(float(loss(unet, posterior.sample(8, generator, 0.0), text)) for _ in range(12)) / 12


@pytest.mark.parametrize("variant, lr", [("full", 2e-4), ("lora", 2e-2)])
def test_tuning_lowers_the_loss_and_reloads_as_trained(tmp_path, monkeypatch, variant, lr):
    method = _dreambooth(tmp_path, variant=variant, steps=15, learning_rate=lr, num_class_images=0,
                         batch_size=2)
    face = _face()
    pipe = method.context.pipeline()
    base_unet = pipe.unet
    trained = {}
    real_save = method._save

    def keep_and_save(unet, work_dir):  # the real writer; the test only keeps the in-memory model
        trained["unet"] = unet
        real_save(unet, work_dir)

    monkeypatch.setattr(method, "_save", keep_and_save)
    (tmp_path / "a").mkdir()
    facts = method.tune(face, tmp_path / "a")
    assert facts["trained_params"] == method.trained_params() and len(facts["losses"]) == 15
    before = _fixed_draw_loss(method, face, base_unet)
    assert _fixed_draw_loss(method, face, trained["unet"]) < before - 1e-3

    prepared = method.load_tuned(face, tmp_path / "a")
    loaded = _pixels(method.generate([_request(method, face, prepared)])[0])
    assert pipe.unet is base_unet  # rendering restored the shared UNet
    pipe.unet = trained["unet"].to(base_unet.dtype)
    try:  # the in-memory tuned model, through the plain pipeline path
        in_memory = _pixels(super(DreamBoothMethod, method).generate([_request(method, face, None)])[0])
    finally:
        pipe.unet = base_unet
    assert np.abs(loaded - in_memory).max() <= 1
    # The same prompt through the base UNet: the tuned weights, not the prompt, change the image.
    base = _pixels(super(DreamBoothMethod, method).generate([_request(method, face, None)])[0])
    assert np.abs(base - loaded).max() > 10
    sd_class = _method({"name": "sd-class"})
    assert np.abs(_pixels(sd_class.generate([_request(sd_class, face, None)])[0]) - loaded).max() > 10


def test_full_without_kept_weights_renders_then_deletes_and_retunes_only_whats_missing(tmp_path):
    faces = face_dir(tmp_path / "faces", ["obama", "biden"])
    cfg = config_from_dict(small_config_dict(faces=str(faces), seeds=[0], methods=[
        {"name": "dreambooth", "params": {"steps": 2, "num_class_images": 2, "keep_weights": False}}]))
    out = tmp_path / "run"
    assert generate_run(cfg, out, progress=False).complete
    run = RunDir(out)
    [mid] = [m["method_id"] for m in run.read_grid()["methods"]]
    tuned = TunedFaces(run, mid)
    records = {r["face_id"]: r for r in tuned.records()}
    assert set(records) == {"obama", "biden"} and all(r["weights_deleted"] for r in records.values())
    assert not list(out.glob(f"methods/{mid}/faces/*/unet"))  # weights gone, facts kept
    assert len(run.prepare_seconds(mid)) == 2
    hashes = run_hashes(out)

    for p in (out / "images" / mid / "biden").rglob("*.png"):
        p.unlink()
    assert generate_run(cfg, out, progress=False).complete
    after = {r["face_id"]: r for r in tuned.records()}
    assert after["obama"]["finished_at"] == records["obama"]["finished_at"]  # complete: not tuned again
    assert after["biden"]["finished_at"] >= records["biden"]["finished_at"] and after["biden"]["weights_deleted"]
    assert run_hashes(out) == hashes  # the same tuning again, so the same images


def test_shards_without_kept_weights_tune_each_face_once_and_the_last_shard_drops_them(tmp_path):
    from f2d_bench.grid import Shard

    faces = face_dir(tmp_path / "faces", ["obama", "biden"])
    cfg = config_from_dict(small_config_dict(faces=str(faces), seeds=[0], methods=[
        {"name": "dreambooth", "params": {"steps": 2, "num_class_images": 2, "keep_weights": False}}]))
    out = tmp_path / "run"
    generate_run(cfg, out, shard=Shard(1, 2), progress=False)
    run = RunDir(out)
    [mid] = [m["method_id"] for m in run.read_grid()["methods"]]
    tuned = TunedFaces(run, mid)
    first = {r["face_id"]: r for r in tuned.records()}
    assert set(first) == {"obama", "biden"}  # shard 1 owns images of both faces
    assert not any(r["weights_deleted"] for r in first.values())  # shard 2 still needs them
    assert generate_run(cfg, out, shard=Shard(2, 2), progress=False).complete
    after = {r["face_id"]: r for r in tuned.records()}
    for face in ("obama", "biden"):
        assert after[face]["finished_at"] == first[face]["finished_at"]  # tuned once, by shard 1
        assert after[face]["weights_deleted"]  # every image is on disk: the weights go



def test_a_run_whose_kept_weights_would_fill_the_disk_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from f2d_bench.engine import open_run
    from f2d_bench.errors import F2DBenchError
    from f2d_bench.grid import UNSHARDED

    faces = face_dir(tmp_path / "faces", ["obama", "biden", "grace_hopper"])

    def config(**params):
        return config_from_dict(small_config_dict(faces=str(faces), seeds=[0], methods=[
            {"name": "dreambooth", "params": {"steps": 2, "num_class_images": 2, **params}}]))

    per_face = _dreambooth(tmp_path).artifact_bytes()
    assert per_face == sum(p.numel() * p.element_size() for p in _dreambooth(tmp_path).context.pipeline().unet.parameters())
    assert _dreambooth(tmp_path, variant="lora").artifact_bytes() is None
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * per_face, 8 * per_face, 2 * per_face))
    out = tmp_path / "run"
    with pytest.raises(F2DBenchError, match=r"need .* MB and .* has .* MB free .*x 3 face\(s\).*keep_weights: false"):
        open_run(config(), out, shard=UNSHARDED, preflight=False)
    assert not out.exists()  # nothing written
    # rendering each face right after tuning it needs one face's weights at a time: it fits
    open_run(config(keep_weights=False), out, shard=UNSHARDED, preflight=False)
