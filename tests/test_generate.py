"""The generation engine on the tiny pipeline, loaded through the same from_pretrained path as SD 1.4."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from f2d_bench.cli import main
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.errors import F2DBenchError
from f2d_bench.grid import Shard
from f2d_bench.run_dir import RunDir
from f2d_bench.files import read_jsonl

from conftest import REPO, face_dir, prepared_crops, run_hashes, run_pixels, small_config_dict

N_FACES, N_PROMPTS, N_SEEDS = 8, 5, 2  # 8 test photos; smoke set: 4 prompts + the reference

_hashes, _pixels = run_hashes, run_pixels  # face/prompt/seed -> sha256 / pixels of a run's images


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = generate_run(config_from_dict(small_config_dict()), out, progress=False)
    return out, summary


def test_full_grid_is_written_with_metadata(reference_run):
    out, summary = reference_run
    expected = N_FACES * N_PROMPTS * N_SEEDS
    assert summary.complete and summary.written == expected
    run = RunDir(out)
    [status] = run.status()
    assert (status.expected, status.done) == (expected, expected)
    for name in ("run.json", "grid.json", "config.yaml", "prompts.yaml", "environment.jsonl"):
        assert (out / name).is_file(), name
    grid = run.read_grid()
    assert [p["id"] for p in grid["prompts"]][-1] == "ref"  # the reference prompt is part of the grid
    mid = grid["methods"][0]["method_id"]
    assert mid.startswith("sd-class-")
    # sd-class encodes no face: no prepare time is recorded for it (Table 2 shows none)
    assert not (out / "methods" / mid / "prepare_times.jsonl").exists()
    assert run.method_info(mid)["encodes_faces"] is False
    img = Image.open(run.store.image_path(run.keys()[0]))
    assert img.size == (64, 64) and img.mode == "RGB"
    env = read_jsonl(out / "environment.jsonl")[0]
    assert env["packages"]["torch"] and "cpu_count" in env["hardware"]


def test_refusal_names_the_setting_that_differs(tmp_path):
    out = tmp_path / "run"
    generate_run(config_from_dict(small_config_dict(seeds=[0])), out, progress=False)
    other = config_from_dict(small_config_dict(seeds=[0], sampling={"guidance_scale": 5.0}))
    with pytest.raises(F2DBenchError, match=r"\(sampling\.guidance_scale: 7\.0 in the run, 5\.0 now[;)]"):
        generate_run(other, out, progress=False)


def test_shards_may_spell_the_device_differently(reference_run, tmp_path):
    """`--device cpu` on one shard and `auto` on the other (the CPU both) make one run, as one process would."""
    out = tmp_path / "run"
    for index, device in ((1, "cpu"), (2, "auto")):
        config = config_from_dict(small_config_dict(model={"device": device}))
        assert generate_run(config, out, shard=Shard(index, 2), progress=False).written > 0
    pixels, reference = _pixels(out), _pixels(reference_run[0])
    assert pixels.keys() == reference.keys()
    assert max(np.abs(pixels[k] - reference[k]).max() for k in reference) <= 3  # other batches: rounding only
    assert [r["rendering"] for r in RunDir(out).environment()] == [{"device": "cpu", "dtype": "float32"}] * 2


def test_a_run_made_when_the_device_was_hashed_as_written_keeps_its_hash(tmp_path):
    from f2d_bench.store import read_png_key

    config = config_from_dict(small_config_dict(seeds=[0]))
    out = tmp_path / "run"
    generate_run(config, out, shard=Shard(1, 2), progress=False)
    earlier = config.earlier_grid_hashes()[0]
    assert earlier != config.grid_hash()  # the tests' model.device is cpu, not auto
    for name in ("grid.json", "run.json"):  # as an earlier version wrote them
        data = json.loads((out / name).read_text())
        (out / name).write_text(json.dumps({**data, "config_hash": earlier}))
    assert generate_run(config, out, shard=Shard(2, 2), progress=False).complete
    run = RunDir(out)
    assert run.read_grid()["config_hash"] == earlier
    shard2 = [r for r in run.store.manifest_records().values() if r.writer == "shard-2-of-2"]
    assert shard2 and {r.config_hash for r in shard2} == {earlier}
    assert {read_png_key(run.store.image_path(r.key))[1] for r in shard2} == {earlier}


def test_a_shard_in_another_dtype_is_refused_and_writes_nothing(tmp_path):
    config = config_from_dict(small_config_dict(seeds=[0], model={"dtype": "auto"}))
    out = tmp_path / "run"
    generate_run(config, out, shard=Shard(1, 2), progress=False)
    run = RunDir(out)
    record = run.environment()[-1]
    assert record["rendering"] == {"device": "cpu", "dtype": "float32"}  # auto is float32 on the CPU
    # what a shard on a GPU node records: auto resolved to float16 there
    run.record_environment({**record, "writer": "shard-2-of-2", "rendering": {"device": "cuda:0", "dtype": "float16"}})
    before = _hashes(out)
    with pytest.raises(F2DBenchError, match=r"rendered in float16 \(by shard-2-of-2 on cuda:0, .*render in "
                                            r"float32 on cpu"):
        generate_run(config, out, shard=Shard(2, 2), progress=False)
    assert _hashes(out) == before and len(run.environment()) == 2


def test_two_shards_starting_at_once_in_other_dtypes_cannot_both_pass(tmp_path, monkeypatch):
    """The dtype check and its record are one step: a writer that checks while another is between its
    check and its record waits for that record, and is refused."""
    import threading

    from f2d_bench import engine
    from f2d_bench.pipelines.loading import load_sd_pipeline

    config = config_from_dict(small_config_dict(seeds=[0], model={"dtype": "auto"}))
    out = tmp_path / "run"
    real = engine.check_rendering
    first_checked, second_checking, go_on = threading.Event(), threading.Event(), threading.Event()

    def check(run, rendering):
        if rendering["dtype"] == "float32":  # the first writer pauses between its check and its record
            real(run, rendering)
            first_checked.set()
            go_on.wait(60)
        else:
            second_checking.set()
            real(run, rendering)

    monkeypatch.setattr(engine, "check_rendering", check)
    bf16 = load_sd_pipeline(config.model.pretrained, dtype="bfloat16", device="cpu")
    outcome = {}

    def second():
        try:
            engine.open_run(config, out, shard=Shard(2, 2), pipeline=lambda: bf16)
            outcome["second"] = "opened"
        except F2DBenchError as exc:
            outcome["second"] = str(exc)

    first = threading.Thread(target=engine.open_run, args=(config, out), kwargs={"shard": Shard(1, 2)})
    first.start()
    assert first_checked.wait(60)
    other = threading.Thread(target=second)
    other.start()
    second_checking.wait(2)  # without the lock the second writer checks now, before the first's record
    go_on.set()
    first.join(60)
    other.join(60)
    assert "rendered in float32 (by shard-1-of-2" in outcome["second"]
    assert [r["writer"] for r in RunDir(out).environment()] == ["shard-1-of-2"]


@pytest.mark.slow
def test_same_config_gives_identical_images(reference_run, tmp_path):
    out, _ = reference_run
    generate_run(config_from_dict(small_config_dict()), tmp_path / "again", progress=False)
    assert _hashes(tmp_path / "again") == _hashes(out)


def test_different_seeds_and_prompts_give_different_images(reference_run):
    pixels = _pixels(reference_run[0])
    face = sorted({k.split("/")[0] for k in pixels})[0]
    assert np.abs(pixels[f"{face}/job-chef/0"] - pixels[f"{face}/job-chef/1"]).mean() > 1
    assert np.abs(pixels[f"{face}/job-chef/0"] - pixels[f"{face}/ref/0"]).mean() > 0.1


@pytest.mark.slow
def test_batch_equals_one_at_a_time(reference_run, tmp_path):
    generate_run(config_from_dict(small_config_dict(batch_size=1)), tmp_path / "b1", progress=False)
    a, b = _pixels(reference_run[0]), _pixels(tmp_path / "b1")
    assert a.keys() == b.keys()
    diffs = np.array([np.abs(a[k] - b[k]).max() for k in a])
    # Same noise, float rounding only: at most a couple of uint8 levels anywhere.
    assert diffs.max() <= 3, diffs.max()
    assert np.mean([np.abs(a[k] - b[k]).mean() for k in a]) < 0.05


def test_rerun_skips_finished_images(reference_run, tmp_path):
    out = tmp_path / "run"
    cfg = config_from_dict(small_config_dict(seeds=[0]))
    first = generate_run(cfg, out, progress=False)
    second = generate_run(cfg, out, progress=False)
    assert first.written == N_FACES * N_PROMPTS and second.written == 0 and second.complete


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    generate_run(config_from_dict(small_config_dict(seeds=[0])), out, progress=False)
    with pytest.raises(F2DBenchError, match="different settings"):
        generate_run(config_from_dict(small_config_dict(seeds=[0, 1])), out, progress=False)
    # another batch size is fine: it changes rounding, not the experiment; so is another display label
    assert generate_run(config_from_dict(small_config_dict(seeds=[0], batch_size=3)), out, progress=False).complete
    relabelled = small_config_dict(seeds=[0], methods=[{"name": "sd-class", "label": "SD (class word)"}])
    assert generate_run(config_from_dict(relabelled), out, progress=False).complete


@pytest.mark.slow
def test_shards_union_to_the_unsharded_set(reference_run, tmp_path):
    out = tmp_path / "sharded"
    cfg = config_from_dict(small_config_dict())
    owned = []
    for i in (1, 2, 3):
        s = generate_run(cfg, out, shard=Shard(i, 3), progress=False)
        records = RunDir(out).store.manifest_records().values()
        owned.append({r.key for r in records if r.writer == Shard(i, 3).tag})
        assert s.complete  # each shard completes its own part
    assert all(owned) and sum(map(len, owned)) == len(set().union(*owned))  # disjoint
    a, b = _pixels(reference_run[0]), _pixels(out)
    assert a.keys() == b.keys()
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 3  # other batches: rounding only
    assert sorted(p.name for p in (out / "manifests").glob("*.jsonl")) == [
        "shard-1-of-3.jsonl", "shard-2-of-3.jsonl", "shard-3-of-3.jsonl"]


def _write_config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(small_config_dict(**overrides)))
    return path


@pytest.mark.slow
def test_kill_9_and_restart_completes_exactly_once(tmp_path):
    """A real generate process killed with SIGKILL mid-run, then started again."""
    faces = face_dir(tmp_path / "faces", sorted(prepared_crops())[:3])
    cfg = _write_config(tmp_path / "run.yaml", faces=str(faces), seeds=[0, 1, 2], batch_size=4,
                        sampling={"num_inference_steps": 30})
    out, clean = tmp_path / "run", tmp_path / "clean"
    cmd = [sys.executable, "-m", "f2d_bench", "generate", "--config", str(cfg), "--no-progress", "--out"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "wb") as log:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen([*cmd, str(out)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    manifest = out / "manifests" / "all.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_bytes().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "generate ended before the kill: " + (tmp_path / "first.log").read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    expected = 3 * N_PROMPTS * 3
    partial = len(list((out / "images").rglob("*.png")))
    assert 0 < partial < expected

    done = subprocess.run([*cmd, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outputs:" in done.stdout
    run = RunDir(out)
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == expected == len(run.keys())
    assert not list((out / "images").rglob("*.tmp")) and not run.store.temporary_files()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]  # no partial line
    keys = [tuple(sorted(line["key"].items())) for line in lines]
    assert len(keys) == len(set(keys)) == expected
    # Fixed batches: the resumed run's images are bit-identical to an uninterrupted run's.
    subprocess.run([*cmd, str(clean)], cwd=REPO, env=env, check=True, capture_output=True, timeout=400)
    assert _hashes(out) == _hashes(clean)
    # ... and to the plain diffusers loop's with CPU generators (the path before noise was drawn ahead).
    from f2d_bench.config import load_config
    from f2d_bench.engine import build_methods
    from f2d_bench.faces.source import resolve_face_set
    from f2d_bench.prompts import load_prompt_set
    from test_fast_path import _plain_loop

    config = load_config(cfg)
    [method] = build_methods(config, load_prompt_set(config.prompts))
    keys = run.keys()  # canonical order: the engine's batches
    plain = _plain_loop(method, keys, {f.face_id: f for f in resolve_face_set(str(faces))}, config.batch_size)
    resumed = _pixels(out)
    assert all(np.array_equal(resumed[k.as_string().split("/", 1)[1]], plain[k]) for k in keys)


def test_status_json(reference_run, capsys):
    out, _ = reference_run
    assert main(["status", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    total = N_FACES * N_PROMPTS * N_SEEDS
    assert data["expected"] == data["done"] == total
    [(mid, row)] = data["methods"].items()
    assert mid.startswith("sd-class-") and row["done"] == total
    assert main(["status", str(out)]) == 0
    assert f"{total}/{total}" in capsys.readouterr().out.replace(" ", "")


def test_status_of_a_non_run_is_a_clear_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not an f2d-bench run directory" in capsys.readouterr().err
