"""The fast generation path equals the plain diffusers loop bit for bit on the CPU.

The engine writes PNGs on background threads, converts to uint8 on the device and encodes the empty
negative prompt once per batch size; none of it may change a pixel or lose a manifest line.
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


def test_engine_images_equal_the_plain_loop(tmp_path):
    faces_dir = face_dir(tmp_path / "faces", ["obama", "biden"])
    cfg = config_from_dict(small_config_dict(faces=str(faces_dir), batch_size=3))
    out = tmp_path / "run"
    assert generate_run(cfg, out, progress=False).complete
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
    writer = BackgroundWriter(run.store, threads=3, max_pending=2)
    fields = dict(config_hash="h", batch_size=5, writer="all", written_at="now")
    for key, p in zip(keys, pixels):
        writer.submit(key, Image.fromarray(p), **fields)
    writer.close()
    records = run.store.manifest_records()
    assert list(records) == keys  # manifest lines in submission order
    for key, p in zip(keys, pixels):
        assert np.array_equal(np.asarray(Image.open(run.store.image_path(key))), p)
    # A write that fails (its folder is a file) is raised by close; the images before it keep their lines.
    bad = ItemKey(mid, "obama", "blocked", 0)
    run.store.image_path(bad).parent.parent.mkdir(parents=True, exist_ok=True)
    run.store.image_path(bad).parent.write_text("not a folder")
    writer = BackgroundWriter(run.store, threads=2)
    writer.submit(ItemKey(mid, "obama", "ref", 9), Image.fromarray(pixels[1]), **fields)
    writer.submit(bad, Image.fromarray(pixels[2]), **fields)
    with pytest.raises(OSError):
        writer.close()
    assert ItemKey(mid, "obama", "ref", 9) in run.store.manifest_records()
    assert bad not in run.store.manifest_records()
