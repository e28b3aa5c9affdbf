"""`score --shard`: concurrent writers of one chunk cache, and sharded score processes that together make
the unsharded records (FID included), under simulated SLURM and torchrun launchers."""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from f2d_bench.cli import main
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.grid import Shard
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring import score_run
from f2d_bench.scoring.cache import ChunkCache
from f2d_bench.scoring.inputs import run_images

from conftest import TWO_PROCESS_LAUNCHERS, face_dir, offline_scoring, prepared_crops, small_config_dict
from test_launch import _launch_all

FACES = ["biden", "grace_hopper", "obama"]


# --- the chunk cache ----------------------------------------------------------------------------------


def _write_chunks(folder: str, writer: str, barrier, n: int) -> None:
    """One writer process: ``n`` one-row chunks, keys ``<writer>-<i>``, plus the shared key ``same``."""
    cache = ChunkCache(Path(folder), writer)
    barrier.wait()  # every writer starts at once, to make name collisions as likely as they can be
    for i in range(n):
        cache.write(pd.DataFrame({"cache_key": [f"{writer}-{i}", "same"], "value": [float(i), 1.5]}))


def test_concurrent_writers_never_lose_or_clobber_a_chunk(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    writers, n = 4, 40
    barrier = ctx.Barrier(writers)
    # Two processes with the same writer tag too: the per-object token keeps their names apart.
    tags = ["all", "all", "shard-1-of-2", "shard-2-of-2"]
    procs = [ctx.Process(target=_write_chunks, args=(str(tmp_path), tag, barrier, n)) for tag in tags]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = ChunkCache(tmp_path)
    assert len(cache.chunks()) == writers * n  # not one chunk overwritten by another writer's
    frame = cache.read()
    # Every key once: the two "all" writers wrote the same keys with the same values, as two shards
    # that scored the same image would; "same" is in every chunk.
    assert frame["cache_key"].is_unique
    assert len(frame) == 3 * n + 1
    assert frame.set_index("cache_key").loc["same", "value"] == 1.5
    assert frame.set_index("cache_key").loc[f"shard-2-of-2-{n - 1}", "value"] == n - 1
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_old_chunk_names_are_read_with_new_ones_and_one_writer_keeps_its_order(tmp_path):
    # A cache written before chunk names had a writer tag.
    pd.DataFrame({"cache_key": ["a", "b"], "v": [1.0, 2.0]}).to_parquet(tmp_path / "chunk-000000.parquet")
    pd.DataFrame({"cache_key": ["c"], "v": [3.0]}).to_parquet(tmp_path / "chunk-000001.parquet")
    cache = ChunkCache(tmp_path, "shard-1-of-2")
    cache.write(pd.DataFrame({"cache_key": ["d"], "v": [4.0]}))
    cache.write(pd.DataFrame({"cache_key": ["d"], "v": [5.0]}))  # the same writer's later chunk wins
    names = [p.name for p in cache.chunks()]
    assert names[:2] == ["chunk-000000.parquet", "chunk-000001.parquet"]
    assert all(n.startswith("chunk-shard-1-of-2-") for n in names[2:]) and len(names) == 4
    values = cache.read().set_index("cache_key")["v"].to_dict()
    assert values == {"a": 1.0, "b": 2.0, "c": 3.0, "d": 5.0}
    # copied chunks (the upper bound's child run) get names of their own, and copying again adds none
    child = ChunkCache(tmp_path / "child")
    assert child.copy_from(cache) == 4 and child.copy_from(cache) == 0
    assert child.read().set_index("cache_key")["v"].to_dict() == values


def test_a_damaged_chunk_is_left_out_by_name_and_a_failing_read_stops(tmp_path, monkeypatch, capsys):
    import errno

    cache = ChunkCache(tmp_path, "all")
    cache.write(pd.DataFrame({"cache_key": ["a"], "v": [1.0]}))
    cache.write(pd.DataFrame({"cache_key": ["b"], "v": [2.0]}))
    damaged = cache.chunks()[1]
    damaged.write_bytes(damaged.read_bytes()[:40])  # a disk that lost the end of the file
    assert cache.read()["cache_key"].tolist() == ["a"]  # its rows are computed again
    cache.read()
    err = capsys.readouterr().err
    assert err.count(f"score cache file {damaged} is damaged") == 1  # said once, naming the file

    def failing(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(pd, "read_parquet", failing)
    with pytest.raises(OSError) as err:  # as itself, for the command line to name (not taken for damage)
        cache.read()
    assert err.value.errno == errno.EIO


def test_a_writer_removes_only_its_own_temporary_files(tmp_path):
    for name in (".chunk-shard-1-of-2-abc-000001.parquet.1234abcd.tmp",
                 ".chunk-shard-1-of-20-abc-000001.parquet.1234abcd.tmp",
                 ".chunk-all-abc-000001.parquet.1234abcd.tmp", ".chunk-000003.parquet.1234abcd.tmp"):
        (tmp_path / name).write_bytes(b"half")
    assert ChunkCache(tmp_path, "shard-1-of-2").remove_temporary() == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert ".chunk-shard-1-of-20-abc-000001.parquet.1234abcd.tmp" in left and len(left) == 3
    assert ChunkCache(tmp_path, "all").remove_temporary() == 2  # and the untagged names of old caches
    assert [p.name for p in tmp_path.iterdir()] == [".chunk-shard-1-of-20-abc-000001.parquet.1234abcd.tmp"]
    with pytest.raises(ValueError):
        ChunkCache(tmp_path, "../x")


# --- sharded score runs --------------------------------------------------------------------------------


def _fid_reference(tmp_path: Path) -> Path:
    ref_dir = tmp_path / "fid-photos"
    ref_dir.mkdir()
    for p in prepared_crops().values():
        img = Image.open(p).convert("RGB").resize((64, 64))
        img.save(ref_dir / f"{p.stem}.png")
        img.transpose(Image.FLIP_LEFT_RIGHT).save(ref_dir / f"{p.stem}-flip.png")
    ref = tmp_path / "ref.npz"
    assert main(["fid-ref", "build", str(ref_dir), "--out", str(ref), "--backend", "clean-fid-torchscript",
                 "--quiet"]) == 0
    return ref


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny generated run (3 faces x 5 prompts x 2 seeds) with offline scorers; scoring batch 1, so
    every image is scored alone in any shard and values are bit-identical to an unsharded score's."""
    tmp = tmp_path_factory.mktemp("score-shards")
    faces = face_dir(tmp / "faces", FACES)
    data = small_config_dict(faces=str(faces), seeds=[0, 1], batch_size=4,
                             scoring=offline_scoring(scorers=["clip", "facenet"], batch_size=1, chunk_size=3,
                                                     fid_backend="clean-fid-torchscript",
                                                     fid_reference=str(_fid_reference(tmp))))
    out = tmp / "run"
    assert generate_run(config_from_dict(data), out, progress=False).complete
    return out, data


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("scores", "records.parquet", "table1.csv"))
    return dst


@pytest.fixture(scope="module")
def unsharded(generated, tmp_path_factory):
    out = _copy_run(generated[0], tmp_path_factory.mktemp("unsharded") / "run")
    score_run(out, progress=False)
    return out


def test_shard_entries_are_its_images_and_their_references(generated):
    out, _ = generated
    run = RunDir(out)
    every = {e.key for e in run_images(run)}
    owned = set()
    for i in (1, 2, 3):
        entries = run_images(run, Shard(i, 3))
        mine = {e.key for e in entries if Shard(i, 3).owns(e.key)}
        owned |= mine
        assert {e.key for e in entries} - mine == {e.reference_key for e in entries if e.key in mine and e.reference_key} - mine
    assert owned == every


@pytest.mark.slow
def test_sharded_in_process_scores_then_a_plain_score_computes_nothing(generated, unsharded, tmp_path):
    out = _copy_run(generated[0], tmp_path / "run")
    first = score_run(out, progress=False, shard=Shard(2, 3))
    assert not first.assembled and first.waiting == ["1/3", "3/3"] and not RunDir(out).records_parquet.exists()
    assert "records.parquet not assembled from this round yet" in first.text()
    assert not (out / "scores" / "fid.json").exists()  # FID waits for the whole set
    # A plain score now assembles the records: it computes the other shards' images only.
    done = score_run(out, progress=False)
    assert done.assembled and 0 < done.computed["clip"] < done.n_images
    assert RunDir(out).records().equals(RunDir(unsharded).records())
    again = score_run(out, progress=False)
    assert again.computed == {"clip": 0, "facenet": 0}
    # The assembly cleared shard 2/3's mark: in a later round, shard 3/3 waits for both others again
    # rather than completing a set with a mark of the earlier round.
    assert not list(RunDir(out).score_shards_dir.glob("*.json"))
    later = score_run(out, progress=False, shard=Shard(3, 3))
    assert not later.assembled and later.waiting == ["1/3", "2/3"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, envs", TWO_PROCESS_LAUNCHERS)
def test_concurrent_shard_processes_make_the_unsharded_records(launcher, envs, generated, unsharded, tmp_path,
                                                               capsys):
    out = _copy_run(generated[0], tmp_path / "run")
    cmd = [sys.executable, "-m", "f2d_bench", "score", str(out), "--shard", "auto", "--no-progress"]
    outputs = _launch_all(cmd, envs, tmp_path)
    for i, text in enumerate(outputs):
        assert f"--shard auto: {launcher}" in text and f"shard {i + 1}/2" in text, text[-2000:]
    # Exactly one of them finished the set and assembled; the other left it to that one.
    assert sum("finished last and assembled" in t for t in outputs) == 1, outputs
    assert sum("records.parquet not assembled from this round yet" in t for t in outputs) == 1, outputs
    run, clean = RunDir(out), RunDir(unsharded)
    records = run.records()
    assert records.equals(clean.records())  # same rows, same values, bit for bit
    assert len(records) == len(run.keys()) and records["path"].is_unique
    assert json.loads(run.fid_json.read_text()) == json.loads(clean.fid_json.read_text())
    assert (out / "table1.csv").read_bytes() == (unsharded / "table1.csv").read_bytes()
    # Chunks of both shards, every key once per cache, no marks or temporary files left.
    for folder in run.cache_dirs():
        if folder.name == "shards":
            assert not list(folder.glob("*.json"))
            continue
        cache = ChunkCache(folder)
        writers = {p.name.split("-of-2-")[0] for p in cache.chunks()}
        assert writers == {"chunk-shard-1", "chunk-shard-2"}, folder
        assert cache.read()["cache_key"].is_unique
    assert not list(out.rglob("*.tmp"))
    # status, score and report see one run: a plain score computes nothing and changes nothing.
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == len(run.keys())
    again = score_run(out, progress=False)
    assert set(again.computed.values()) == {0}
    assert run.records().equals(clean.records())
    assert main(["report", str(out), "-o", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()


def test_cli_score_shard_refuses_ray_and_needs_a_launcher_for_auto(monkeypatch, capsys, tmp_path):
    from f2d_bench.launch.environment import LAUNCH_VARIABLES

    assert main(["score", str(tmp_path), "--ray", "--shard", "1/2"]) == 2
    assert "leave out --shard" in capsys.readouterr().err
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert main(["score", str(tmp_path), "--shard", "auto"]) == 2
    assert "found no launcher" in capsys.readouterr().err
    assert main(["score", str(tmp_path), "--shard", "3/2"]) == 2
    assert "need 1 <= i <= N" in capsys.readouterr().err
