"""The fast generation path equals the plain diffusers loop bit for bit on the CPU.

The engine writes PNGs on background threads, converts to uint8 on the device, encodes the empty
negative prompt once per batch size and draws each image's noise ahead; none of it may change a pixel or
lose a manifest line. ``--compile`` pads every call to the batch size (no pixel changes) and agrees with
eager images within float noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from f2d_bench.config import config_from_dict
from f2d_bench.engine import PipelineProvider, build_methods, generate_run
from f2d_bench.grid import ItemKey, fixed_batches
from f2d_bench.methods.base import GenerationRequest
from f2d_bench.methods.stable_diffusion import pipeline_images
from f2d_bench.pipelines import noise
from f2d_bench.pipelines.loading import with_scheduler
from f2d_bench.prompts import load_prompt_set
from f2d_bench.run_dir import RunDir
from f2d_bench.store import BackgroundWriter

from conftest import face_dir, small_config_dict


def _plain_loop(method, keys, faces, batch_size):
    """The loop as diffusers' examples write it: every batch encodes its negatives, PIL output on the host."""
    pipe, s = method.context.pipeline(), method.context.sampling
    prompts = method.context.prompt_set
    out = {}
    for batch in fixed_batches(keys, batch_size):
        requests = [GenerationRequest(key=k, prompt=prompts.by_id(k.prompt_id), face=faces[k.face_id], prepared=None,
                                      generator=torch.Generator("cpu").manual_seed(k.seed)) for k in batch]
        negative, _ = pipe.encode_prompt([""] * len(batch), pipe.device, 1, do_classifier_free_guidance=False)
        images = pipe(prompt_embeds=method.prompt_embeds(requests), negative_prompt_embeds=negative,
                      num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                      height=s.height, width=s.width, generator=[r.generator for r in requests],
                      output_type="pil").images
        out.update({k: np.asarray(im) for k, im in zip(batch, images)})
    return out


def test_uint8_on_the_device_equals_diffusers_pil_output():
    pipe = PipelineProvider(config_from_dict(small_config_dict()))()
    call = dict(prompt=["a photo of a person", "a person laughing"], num_inference_steps=3, height=64, width=64)
    reference = pipe(**call, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pil").images
    fast = pipeline_images(pipe, **call, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    for a, b in zip(reference, fast):
        assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))


def _feeds(monkeypatch) -> list:
    """Collect what every ``pipeline_images`` call gets from ``noise.draw_ahead`` (a NoiseFeed or None)."""
    feeds = []

    def spy(pipe, call):
        feeds.append(original(pipe, call))
        return feeds[-1]

    original = noise.draw_ahead
    monkeypatch.setattr(noise, "draw_ahead", spy)
    return feeds


@pytest.mark.parametrize("scheduler, extra, step_draws", [
    ("EulerAncestralDiscreteScheduler", {}, 4),  # the protocol's: fresh noise at every step
    ("EulerDiscreteScheduler", {}, 0),  # noise only with s_churn > 0, which the pipeline never passes
    ("DDPMScheduler", {}, 3),  # no noise at the last step: the drawn-ahead tail stays unused
    ("DDIMScheduler", {}, 0),  # eta 0: nothing after the initial latents
    ("DDIMScheduler", {"eta": 0.7}, 4),
    ("KDPM2AncestralDiscreteScheduler", {}, None),  # second order: counted, not pinned here
    ("LMSDiscreteScheduler", {}, 0),  # its step takes no generator
    ("DPMSolverMultistepScheduler", {"eta": None}, "generator path"),  # not supported: today's path
])
def test_noise_drawn_ahead_equals_the_generator_path(monkeypatch, scheduler, extra, step_draws):
    pipe = with_scheduler(PipelineProvider(config_from_dict(small_config_dict()))(), scheduler)
    call = dict(prompt=["a photo of a person", "a person laughing", "a person"], num_inference_steps=4,
                height=64, width=64, **{k: v for k, v in extra.items() if v is not None})
    seeds = (3, 0, 3)  # a repeated seed: each image draws from its own generator
    reference = pipe(**call, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pil").images
    feeds = _feeds(monkeypatch)
    fast = pipeline_images(pipe, **call, generator=[torch.Generator().manual_seed(s) for s in seeds])
    for a, b in zip(reference, fast, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    [feed] = feeds
    if step_draws == "generator path":
        assert feed is None
    else:
        assert feed is not None and feed.initial.shape == (3, 4, 8, 8)
        assert step_draws is None or feed.used == step_draws  # the scheduler's noise came from the feed


def test_noise_feed_refuses_to_hand_out_other_noise():
    feed = noise.NoiseFeed(torch.zeros(2, 4, 8, 8), torch.zeros(1, 2, 4, 8, 8))
    with pytest.raises(RuntimeError, match="asked for noise"):
        feed.draw((2, 4, 8, 8), torch.float16, "cpu")
    feed.draw((2, 4, 8, 8), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="drew noise 2 times"):
        feed.draw((2, 4, 8, 8), torch.float32, "cpu")


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DDIMScheduler"])
def test_engine_images_equal_the_plain_loop(tmp_path, monkeypatch, scheduler):
    faces_dir = face_dir(tmp_path / "faces", ["obama", "biden"])
    cfg = config_from_dict(small_config_dict(faces=str(faces_dir), batch_size=3, sampling={"scheduler": scheduler}))
    out = tmp_path / "run"
    feeds = _feeds(monkeypatch)
    assert generate_run(cfg, out, progress=False).complete
    assert feeds and all(f is not None for f in feeds)  # the engine took the drawn-ahead path
    monkeypatch.undo()
    run = RunDir(out)
    [method] = build_methods(cfg, load_prompt_set("smoke"))
    keys = sorted((k for k in run.store.manifest_records()), key=lambda k: (k.face_id, k.prompt_id, k.seed))
    from f2d_bench.faces.source import resolve_face_set

    faces = {f.face_id: f for f in resolve_face_set(str(faces_dir))}
    expected = _plain_loop(method, keys, faces, cfg.batch_size)
    assert len(expected) == len(keys) == 2 * 5 * 2
    for key in keys:
        assert np.array_equal(np.asarray(Image.open(run.store.image_path(key))), expected[key]), key


def test_background_writer_records_every_image_in_order_and_raises_a_failed_write(tmp_path):
    cfg = config_from_dict(small_config_dict(faces=str(face_dir(tmp_path / "faces", ["obama"]))))
    from f2d_bench.engine import open_run
    from f2d_bench.grid import UNSHARDED

    run = open_run(cfg, tmp_path / "run", shard=UNSHARDED).run
    mid = run.read_grid()["methods"][0]["method_id"]
    keys = [ItemKey(mid, "obama", "ref", s) for s in range(5)]
    pixels = [np.full((8, 8, 3), 40 * s, dtype=np.uint8) for s in range(5)]
    writer = BackgroundWriter(run.store, threads=3, max_pending=64)
    fields = dict(config_hash="h", batch_size=5, writer="all", written_at="now")
    writer.submit(keys[0], Image.fromarray(pixels[0]), **fields)
    writer._pending[0][1].result()  # the first write is done ...
    writer.submit(keys[1], Image.fromarray(pixels[1]), **fields)
    assert keys[0] in run.store.manifest_records()  # ... so its line is in before the pool fills or closes
    writer.close()
    bounded = BackgroundWriter(run.store, threads=3, max_pending=2)
    for key, p in zip(keys[2:], pixels[2:]):
        bounded.submit(key, Image.fromarray(p), **fields)
        assert len(bounded._pending) <= 2  # bounded memory: at most max_pending images in flight
    bounded.close()
    records = run.store.manifest_records()
    assert list(records) == keys  # manifest lines in submission order
    for key, p in zip(keys, pixels):
        assert np.array_equal(np.asarray(Image.open(run.store.image_path(key))), p)
    # A write that fails (its folder is a file) is raised by the next submit that finds it done, or at the
    # latest by close; the images submitted before it keep their lines either way.
    bad = ItemKey(mid, "obama", "blocked", 0)
    run.store.image_path(bad).parent.parent.mkdir(parents=True, exist_ok=True)
    run.store.image_path(bad).parent.write_text("not a folder")
    writer = BackgroundWriter(run.store, threads=2)
    writer.submit(ItemKey(mid, "obama", "ref", 9), Image.fromarray(pixels[1]), **fields)
    with pytest.raises(OSError):
        try:
            writer.submit(bad, Image.fromarray(pixels[2]), **fields)
            writer.submit(ItemKey(mid, "obama", "after", 0), Image.fromarray(pixels[3]), **fields)
        finally:
            writer.close()
    assert ItemKey(mid, "obama", "ref", 9) in run.store.manifest_records()
    assert bad not in run.store.manifest_records()


def _grid_pixels(out):
    run = RunDir(out)
    return {k: np.asarray(Image.open(run.store.image_path(k))) for k in run.store.manifest_records()}


def test_padding_to_the_batch_size_changes_no_image(tmp_path, monkeypatch):
    """--compile's padding, with compilation itself left out: the same pixels as unpadded eager calls."""
    import f2d_bench.pipelines.compile as compile_module
    from f2d_bench.methods.stable_diffusion import StableDiffusionMethod

    faces_dir = face_dir(tmp_path / "faces", ["obama", "biden"])
    cfg = config_from_dict(small_config_dict(faces=str(faces_dir), batch_size=3))  # 20 images: last batch 2
    assert generate_run(cfg, tmp_path / "eager", progress=False).complete
    sizes = []
    original = StableDiffusionMethod.generate
    monkeypatch.setattr(StableDiffusionMethod, "generate", lambda self, r: sizes.append(len(r)) or original(self, r))
    monkeypatch.setattr(compile_module, "compile_pipeline", lambda pipe: None)
    summary = generate_run(cfg, tmp_path / "padded", progress=False, compile=True)
    assert summary.compile and summary.written == 20 and "torch.compile" in summary.text()
    assert sizes == [3] * 7  # 6 full batches and the last one padded from 2
    eager, padded = _grid_pixels(tmp_path / "eager"), _grid_pixels(tmp_path / "padded")
    assert len(padded) == 20 and eager.keys() == padded.keys()
    for key in eager:
        assert np.array_equal(eager[key], padded[key]), key
    [env] = RunDir(tmp_path / "padded").environment()
    assert env["compile"] == ["unet", "vae.decoder"]
    assert RunDir(tmp_path / "eager").environment()[0]["compile"] is None


@pytest.mark.slow
def test_compiled_images_agree_with_eager_within_float_noise(tmp_path):
    """torch.compile on the CPU (inductor's C++ backend): minutes on two cores, cached for later runs."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: inductor cannot build CPU kernels")
    faces_dir = face_dir(tmp_path / "faces", ["obama", "biden"])
    cfg = config_from_dict(small_config_dict(faces=str(faces_dir), batch_size=3))
    assert generate_run(cfg, tmp_path / "eager", progress=False).complete
    assert generate_run(cfg, tmp_path / "compiled", progress=False, compile=True).complete
    eager, compiled = _grid_pixels(tmp_path / "eager"), _grid_pixels(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 20
    # Tolerance: 2 of 255 per pixel (measured: 1), far below the difference between two seeds.
    worst = max(int(np.abs(eager[k].astype(int) - compiled[k].astype(int)).max()) for k in eager)
    assert worst <= 2, worst
    assert any(not np.array_equal(eager[k], eager[j]) for k in eager for j in eager if k != j)
