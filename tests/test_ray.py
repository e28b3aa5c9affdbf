"""The Ray executor (``--ray``) on a local Ray instance with 2 CPU workers and the tiny pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from f2d_bench.cli import main
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.errors import F2DBenchError
from f2d_bench.grid import Shard
from f2d_bench.launch.ray_executor import ManifestLines, import_ray, previous_shard_count, run_with_ray
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring import score_run

from conftest import REPO, SAME, external_source, face_dir, offline_scoring, run_hashes, small_config_dict

FACES = ["biden", "grace_hopper", "obama"]


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when it is not installed
    with pytest.raises(F2DBenchError, match=r"pip install 'f2d-bench\[ray\]'"):
        import_ray()


def test_manifest_lines_counts_appends_and_rewrites(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    counter = ManifestLines(folder)
    assert counter.count() == 0
    (folder / "shard-1-of-2.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    assert counter.count() == 2
    with open(folder / "shard-1-of-2.jsonl", "a") as fh:
        fh.write('{"a": 3}\n')
    (folder / "shard-2-of-2.jsonl").write_text('{"b": 1}\n')
    assert counter.count() == 4
    tmp = folder / "new.tmp"
    tmp.write_text('{"a": 1}\n')  # a resuming writer replaces its manifest with a shorter one
    os.replace(tmp, folder / "shard-1-of-2.jsonl")
    assert counter.count() == 2


def test_previous_shard_count_reads_the_manifest_names(tmp_path):
    assert previous_shard_count(tmp_path) is None
    (tmp_path / "manifests").mkdir()
    for name in ("shard-1-of-8.jsonl", "shard-5-of-8.jsonl", "all.jsonl"):
        (tmp_path / "manifests" / name).write_text("")
    assert previous_shard_count(tmp_path) == 8
    (tmp_path / "manifests" / "shard-1-of-3.jsonl").write_text("")
    assert previous_shard_count(tmp_path) is None  # two counts: nothing to keep


def test_a_ray_address_without_a_cluster_is_a_clear_error(tmp_path):
    # In a fresh process: this module's local instance would be joined instead.
    proc = subprocess.run([sys.executable, "-m", "f2d_bench", "generate", "--preset", "smoke", "--out",
                           str(tmp_path / "run"), "--ray", "not-an-address"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--ray not-an-address: cannot join a Ray cluster there" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_assembly_on_a_driver_without_the_workers_device_uses_the_cpu():
    from f2d_bench.config import ScoringConfig
    from f2d_bench.launch.ray_executor import assembly_scoring

    scoring, note = assembly_scoring(ScoringConfig(device="cpu"))
    assert scoring.device == "cpu" and note is None
    if not __import__("torch").cuda.is_available():
        scoring, note = assembly_scoring(ScoringConfig(device="cuda", precision="tf32"))
        assert scoring.device == "cpu" and scoring.precision == "tf32" and "not available on this driver" in note


# --- a local Ray instance ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = import_ray()
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, object_store_memory=128 * 1024 * 1024)
    yield ray
    ray.shutdown()


def _config(tmp_path: Path, **overrides) -> dict:
    faces = face_dir(tmp_path / "faces", FACES)
    # Batch 1: an image's batch is itself in every shard, so any sharding gives the same pixels.
    return small_config_dict(faces=str(faces), batch_size=1, **overrides)


def _exactly_once(out: Path, expected: int) -> None:
    """Every image of the grid present, one manifest line each, no temporary file anywhere."""
    run = RunDir(out)
    assert len(run.keys()) == expected
    assert sum(r.done for r in run.status()) == expected
    lines = [json.loads(line) for p in run.manifest_paths() for line in p.read_text().splitlines()]
    keys = [json.dumps(line["key"], sort_keys=True) for line in lines]
    assert len(keys) == len(set(keys)) == expected
    assert not run.store.temporary_files() and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_ray_run_equals_a_single_process_run(local_ray, tmp_path, capsys):
    data = _config(tmp_path, seeds=[0, 1], scoring=offline_scoring(scorers=["clip"]))
    cfg = config_from_dict(data)
    out, clean = tmp_path / "ray", tmp_path / "clean"
    workers = []
    summary = run_with_ray("generate", cfg, out, workers=2, shards=6, progress=False, on_worker=workers.append)
    assert summary.complete and summary.written == summary.expected == len(FACES) * 5 * 2
    assert summary.workers == 2 and summary.worker_kind == "CPU" and summary.shards == 6
    assert len({w["pid"] for w in workers}) == 2 and summary.worker_deaths == 0
    assert sorted(p.stem for p in RunDir(out).manifest_paths()) == sorted(f"shard-{i}-of-6" for i in range(1, 7))
    _exactly_once(out, summary.expected)
    generate_run(cfg, clean, progress=False)
    assert run_hashes(out) == run_hashes(clean)  # bit-identical, key by key
    # status and score see one run, as if one process had made it
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == summary.expected
    scored = score_run(out, progress=False)
    assert scored.n_images == summary.expected and not scored.missing
    score_run(clean, progress=False)
    assert RunDir(out).records().equals(RunDir(clean).records())
    # Running it again finds everything done and keeps the shard count of the first run.
    again = run_with_ray("generate", cfg, out, workers=1, progress=False)
    assert again.complete and again.written == 0 and again.shards == 6


def _kill_a_worker_midway(kind: str, cfg, out, started):
    """Run ``kind`` over Ray with 2 workers and 8 shards in a thread, SIGKILL one worker once both are up
    and ``started()`` holds, and wait for the run; returns its summary and every worker that came up."""
    workers: list[dict] = []
    result: dict = {}

    def drive():
        try:
            result["summary"] = run_with_ray(kind, cfg, out, workers=2, shards=8, progress=False,
                                             on_worker=workers.append)
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=drive)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        if len(workers) >= 2 and started():
            break
        time.sleep(0.02)
    assert thread.is_alive() and len(workers) >= 2, result
    os.kill(workers[0]["pid"], signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and "error" not in result, result
    return result["summary"], workers


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_completes_once(local_ray, tmp_path):
    data = _config(tmp_path, seeds=[0, 1, 2], sampling={"num_inference_steps": 30})
    cfg = config_from_dict(data)
    out, clean = tmp_path / "ray", tmp_path / "clean"
    expected = len(FACES) * 5 * 3
    at_kill: list[int] = []

    def started() -> bool:
        at_kill[:] = [len(list((out / "images").rglob("*.png")))]
        return at_kill[0] >= 4

    summary, workers = _kill_a_worker_midway("generate", cfg, out, started)
    assert at_kill[0] < expected, "the run ended before the kill"
    assert summary.worker_deaths >= 1 and summary.retried and summary.complete
    assert len({w["pid"] for w in workers}) >= 3  # a new worker took the dead one's place
    _exactly_once(out, expected)
    generate_run(cfg, clean, progress=False)
    assert run_hashes(out) == run_hashes(clean)


def test_worker_counts_the_cluster_cannot_hold_are_refused(local_ray, tmp_path):
    cfg = config_from_dict(_config(tmp_path, seeds=[0]))
    with pytest.raises(F2DBenchError, match=r"--workers 3: the Ray cluster has 2 CPUs"):
        run_with_ray("generate", cfg, tmp_path / "a", workers=3, progress=False)
    with pytest.raises(F2DBenchError, match=r"--workers 0: need at least one worker"):
        run_with_ray("generate", cfg, tmp_path / "b", workers=0, progress=False)
    with pytest.raises(F2DBenchError, match=r"--ray-shards 0: need at least one shard"):
        run_with_ray("generate", cfg, tmp_path / "c", workers=1, shards=0, progress=False)


@pytest.mark.slow
def test_workers_take_shards_as_they_get_ready_and_one_that_never_starts_holds_nothing_up(local_ray, tmp_path):
    @local_ray.remote(num_cpus=1)
    class Blocker:  # another job holding one of the cluster's two CPUs
        def ping(self):
            return 1

    blocker = Blocker.remote()
    local_ray.get(blocker.ping.remote())
    try:
        cfg = config_from_dict(_config(tmp_path, seeds=[0]))
        workers = []
        summary = run_with_ray("generate", cfg, tmp_path / "run", workers=2, shards=3, progress=False,
                               on_worker=workers.append)
        assert summary.complete and summary.written == len(FACES) * 5 and len(workers) == 1
    finally:
        local_ray.kill(blocker)


def test_an_error_setting_a_worker_up_is_reported_with_its_cause(local_ray, tmp_path, monkeypatch):
    from f2d_bench.config import RunConfig

    cfg = config_from_dict(_config(tmp_path, seeds=[0]))
    to_dict = RunConfig.to_dict
    # what a worker of another f2d-bench version reads: a key it does not know
    monkeypatch.setattr(RunConfig, "to_dict", lambda self, **k: {**to_dict(self, **k), "new_setting": 1})
    with pytest.raises(F2DBenchError, match=r"starting a worker on a Ray worker: .*new_setting") as err:
        run_with_ray("generate", cfg, tmp_path / "run", workers=1, progress=False)
    assert "died" not in str(err.value)


@pytest.mark.slow
def test_tune_over_ray_tunes_every_face_once(local_ray, tmp_path):
    data = _config(tmp_path, seeds=[0], methods=[
        {"name": "textual-inversion", "params": {"steps": 1, "accumulation": 1}}])
    out = tmp_path / "run"
    summary = run_with_ray("tune", config_from_dict(data), out, workers=2, shards=4, progress=False)
    run = RunDir(out)
    [mid] = [m["method_id"] for m in run.read_grid()["methods"]]
    assert sorted(r["face_id"] for r in run.tune_records(mid)) == FACES
    assert summary.tuned[mid][1:] == [len(FACES), len(FACES)]
    again = run_with_ray("tune", config_from_dict(data), out, workers=1, shards=4, progress=False)
    assert again.tuned[mid][1:] == [len(FACES), 0]  # finished faces are kept


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_the_same_command(tmp_path):
    data = _config(tmp_path, seeds=[0, 1, 2], sampling={"num_inference_steps": 30})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out, clean = tmp_path / "ray", tmp_path / "clean"
    expected = len(FACES) * 5 * 3
    cmd = [sys.executable, "-m", "f2d_bench", "generate", "--config", str(cfg), "--ray", "--workers", "2",
           "--ray-shards", "8", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "wb") as log:
        # Its own process group: the local Ray instance it starts can be cleaned up with it.
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        counter = ManifestLines(out / "manifests")
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and counter.count() < 4:
            time.sleep(0.05)
        assert first.poll() is None, "ended before the kill: " + (tmp_path / "first.log").read_text()[-2000:]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        try:  # what is left of its Ray instance (Ray's agents outlive a killed driver)
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    partial = len(list((out / "images").rglob("*.png")))
    assert 0 < partial < expected
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"{expected}/{expected} images" in done.stdout and "8 shards" in done.stdout
    _exactly_once(out, expected)
    generate_run(config_from_dict(data), clean, progress=False)
    assert run_hashes(out) == run_hashes(clean)


# --- score over Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_pair(tmp_path_factory):
    """A generated run (scoring batch 1: every image scored alone, so values do not depend on the shard)
    and a copy of it scored by one process."""
    import shutil

    tmp = tmp_path_factory.mktemp("ray-score")
    data = _config(tmp, seeds=[0, 1], scoring=offline_scoring(scorers=["clip", "facenet"], batch_size=1,
                                                                chunk_size=1))
    out = tmp / "run"
    generate_run(config_from_dict(data), out, progress=False)
    clean = tmp / "clean"
    shutil.copytree(out, clean)
    score_run(clean, progress=False)
    return out, clean, data


def _unscored_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _scored_once(out: Path, clean: Path) -> None:
    """Records equal to the single process's, every key once in every cache, no temporary file."""
    from f2d_bench.scoring.cache import ChunkCache

    run = RunDir(out)
    assert run.records().equals(RunDir(clean).records())
    for folder in run.cache_dirs():
        chunks = ChunkCache(folder).read()
        assert chunks is None or chunks["cache_key"].is_unique
    assert not list(out.rglob("*.tmp")) and not list((out / "scores" / "shards").glob("*.json"))


@pytest.mark.slow
def test_score_over_ray_equals_a_single_process_score(local_ray, scored_pair, tmp_path):
    src, clean, data = scored_pair
    out = _unscored_copy(src, tmp_path / "run")
    workers: list[dict] = []
    summary = run_with_ray("score", RunDir(out).config(), out, workers=2, shards=6, progress=False,
                           on_worker=workers.append)
    assert summary.complete and summary.scored == summary.expected == len(FACES) * 5 * 2
    assert len({w["pid"] for w in workers}) == 2 and summary.shards == 6
    assert summary.computed["clip"] == summary.expected  # by the workers ...
    assert summary.score.computed["clip"] == summary.expected  # ... the driver's assembly added nothing
    _scored_once(out, clean)
    writers = {p.name.split("-of-6-")[0] for p in (out / "scores").glob("clip-*/chunk-*.parquet")}
    assert writers == {f"chunk-shard-{i}" for i in range(1, 7)}
    again = score_run(out, progress=False)
    assert set(again.computed.values()) == {0}


@pytest.mark.slow
def test_a_killed_score_worker_is_replaced_and_every_key_is_scored_once(local_ray, scored_pair, tmp_path):
    src, clean, _ = scored_pair
    out = _unscored_copy(src, tmp_path / "run")
    summary, _ = _kill_a_worker_midway(
        "score", RunDir(out).config(), out, lambda: len(list((out / "scores").glob("clip-*/chunk-*.parquet"))) >= 3)
    assert summary.worker_deaths >= 1 and summary.retried and summary.complete
    # The dead worker's shard was handed out again; its replacement may still be loading when the other
    # worker has scored the rest (workers take shards as they get ready): the generate test above, whose
    # run is long enough, checks that a replacement comes up.
    assert summary.scored == summary.expected
    _scored_once(out, clean)


def _generate_ray_score(data: dict, out: Path, workers: int, shards: int) -> int:
    """`f2d-bench generate --ray --score` on the run config ``data`` (written beside ``out``)."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(data))
    return main(["generate", "--config", str(config), "--out", str(out), "--ray", "--workers", str(workers),
                 "--ray-shards", str(shards), "--score", "--no-progress"])


@pytest.mark.slow
def test_generate_ray_score_leaves_the_records_of_a_single_process(local_ray, scored_pair, tmp_path, capsys):
    src, clean, data = scored_pair
    out = tmp_path / "run"
    assert _generate_ray_score(data, out, workers=2, shards=4) == 0
    text = capsys.readouterr().out
    assert "generate over Ray" in text and "score over Ray" in text, text
    assert run_hashes(out) == run_hashes(clean)
    _scored_once(out, clean)


@pytest.mark.slow
def test_generate_ray_score_scores_the_images_made_when_one_could_not_be(local_ray, tmp_path, capsys):
    from f2d_bench.prompts import load_prompt_set

    pids = [p.id for p in load_prompt_set("smoke").all_prompts()]
    src = external_source(tmp_path / "src", FACES, lambda f: {pid: SAME[f] for pid in pids},
                          rng=np.random.default_rng(0), noise_size=64)
    (src / FACES[0] / pids[0] / "0.png").unlink()  # one image the method cannot make
    data = _config(tmp_path, seeds=[0], methods=[{"name": "external", "params": {"source": str(src)}}],
                   scoring=offline_scoring(scorers=["clip"]))
    out = tmp_path / "run"
    assert _generate_ray_score(data, out, workers=2, shards=2) == 1
    text = capsys.readouterr().out
    assert "score over Ray" in text, text
    records = RunDir(out).records()
    assert len(records) == len(FACES) * len(pids) - 1 and records["clip"].notna().all()
    # no image at all: nothing to score, said as such (not "run generate first" from the score workers)
    empty = tmp_path / "empty"
    empty.mkdir()
    data["methods"] = [{"name": "external", "params": {"source": str(empty)}}]
    assert _generate_ray_score(data, tmp_path / "none", workers=1, shards=1) == 1
    assert "nothing to score: no image could be made" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_waits_for_a_busy_shard_before_starting_it_once(tmp_path):
    """A shard still held by a worker of a killed driver: the new worker waits for the lock, then starts
    the shard once (one environment line, one preflight), rather than once per retry."""
    from f2d_bench.files import exclusive_lock
    from f2d_bench.launch.ray_executor import ShardWorker

    out = tmp_path / "run"
    worker = ShardWorker("generate", _config(tmp_path, seeds=[0]), str(out), str(tmp_path))
    worker.run(2, 2)  # the run exists, shard 1/2 still to do
    held, release = threading.Event(), threading.Event()

    def old_worker():
        with exclusive_lock(RunDir(out).writer_lock_path("shard-1-of-2")):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=old_worker)
    thread.start()
    held.wait(10)
    threading.Timer(3.5, release.set).start()
    result = worker.run(1, 2)
    thread.join()
    assert result["written"] == sum(Shard(1, 2).owns(k) for k in RunDir(out).keys())
    assert [r["writer"] for r in RunDir(out).environment()].count("shard-1-of-2") == 1


@pytest.mark.slow
def test_a_shard_worker_generates_compiled_when_asked(tmp_path, monkeypatch):
    """--compile reaches Ray's workers: the actor's pipeline is compiled and its calls padded (the
    compilation itself left out here; tests/test_fast_path.py compiles for real)."""
    import f2d_bench.pipelines.compile as compile_module
    from f2d_bench.launch.ray_executor import ShardWorker

    from f2d_bench.methods.stable_diffusion import StableDiffusionMethod

    compiled, sizes = [], []
    monkeypatch.setattr(compile_module, "compile_pipeline", compiled.append)
    original = StableDiffusionMethod.generate
    monkeypatch.setattr(StableDiffusionMethod, "generate", lambda self, r: sizes.append(len(r)) or original(self, r))
    data = {**_config(tmp_path, seeds=[0]), "batch_size": 4}
    out = tmp_path / "run"
    worker = ShardWorker("generate", data, str(out), str(tmp_path), compile=True)
    result = worker.run(1, 2)
    owned = sum(Shard(1, 2).owns(k) for k in RunDir(out).keys())
    assert len(compiled) == 1 and result["written"] == owned
    assert set(sizes) == {4} and len(sizes) == -(-owned // 4)  # every call padded to the batch size
    env = RunDir(out).environment()[-1]
    assert env["writer"] == "shard-1-of-2" and env["compile"] == ["unet", "vae.decoder"]
