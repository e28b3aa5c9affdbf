import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from f2d_bench.errors import ConfigError
from f2d_bench.grid import ItemKey, Shard, fixed_batches, grid_keys
from f2d_bench.files import append_jsonl, read_jsonl
from f2d_bench.run_dir import RunDir
from f2d_bench.store import read_png_key


def _keys():
    return grid_keys(["m-1234abcd"], [f"face{i}" for i in range(7)], ["job-chef", "ref"], [0, 1, 2, 3])


def test_key_path_and_validation():
    key = ItemKey("sd-class-0a1b2c3d", "obama", "job-chef", 3)
    assert key.relpath.as_posix() == "images/sd-class-0a1b2c3d/obama/job-chef/3.png"
    for bad in ("..", "a/b", "", ".hidden", "a\\b"):
        with pytest.raises(ValueError):
            ItemKey("m", bad, "p", 0)
    with pytest.raises(ValueError):
        ItemKey("m", "f", "p", -1)
    assert ItemKey.from_dict(key.to_dict()) == key


def test_stable_hash_is_fixed_across_processes():
    # A literal: if this changes, shards of existing runs would be reassigned.
    assert ItemKey("m", "f", "p", 0).stable_hash() == int.from_bytes(
        __import__("hashlib").sha256(b"m/f/p/0").digest()[:8], "big")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_the_grid(n):
    keys = _keys()
    parts = [[k for k in keys if Shard(i, n).owns(k)] for i in range(1, n + 1)]
    assert sorted(k for p in parts for k in p) == sorted(keys)
    assert sum(map(len, parts)) == len(keys)
    if n > 1:
        assert all(parts), "every shard gets some keys on a 56-key grid"


def test_shard_parse_errors():
    assert Shard.parse("2/4") == Shard(2, 4)
    for bad in ("0/4", "5/4", "a/b", "3"):
        with pytest.raises(ConfigError):
            Shard.parse(bad)


def test_fixed_batches_do_not_depend_on_what_is_done():
    keys = _keys()
    batches = list(fixed_batches(keys, 5))
    assert [len(b) for b in batches] == [5] * 11 + [1]
    assert [k for b in batches for k in b] == keys


def _img(v=0):
    return Image.fromarray(np.full((8, 8, 3), v, np.uint8))


def test_write_image_is_atomic_and_recorded(tmp_path):
    store = RunDir(tmp_path).store
    key = _keys()[0]
    rec = store.write_image(key, _img(7), config_hash="abc", batch_size=4, writer="all", written_at="t")
    path = store.image_path(key)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    assert read_png_key(path) == (key, "abc")
    lines = read_jsonl(RunDir(tmp_path).manifest_path("all"))
    assert len(lines) == 1 and lines[0]["sha256"] == rec.sha256
    assert np.asarray(Image.open(path)).max() == 7


def test_reconcile_repairs_what_a_kill_leaves(tmp_path):
    store = RunDir(tmp_path).store
    keys = _keys()[:4]
    for k in keys[:2]:
        store.write_image(k, _img(), config_hash="h", batch_size=4, writer="all", written_at="t")
    # killed between rename and manifest append: an image with no line
    store.write_image(keys[2], _img(), config_hash="h", batch_size=4, writer="x", written_at="t")
    RunDir(tmp_path).manifest_path("x").unlink()
    # killed mid-write: a temporary file, and a partial manifest line
    tmp = store.image_path(keys[3]).with_name(".3.png.deadbeef.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"\x89PNG partial")
    with open(RunDir(tmp_path).manifest_path("all"), "a") as fh:
        fh.write('{"key": {"method_id": "m-1')
    # a temporary file of a key this writer does not own stays
    foreign = store.image_path(_keys()[10]).with_name(".9.png.cafe.tmp")
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(b"x")

    counts = store.reconcile(keys, writer="all", config_hash="h")
    assert counts["removed_tmp"] == 1 and counts["manifest_added"] == 1
    assert not tmp.exists() and foreign.exists()
    text = RunDir(tmp_path).manifest_path("all").read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line is whole JSON now
    assert sorted(ItemKey.from_dict(r["key"]) for r in records) == sorted(keys[:3])
    assert set(store.manifest_records()) == set(keys[:3])
    # idempotent
    assert store.reconcile(keys, writer="all", config_hash="h") == {
        "removed_tmp": 0, "manifest_added": 0, "manifest_dropped": 0, "damaged_removed": 0}


def test_reconcile_removes_a_truncated_image_without_a_line_but_keeps_one_it_cannot_read(tmp_path, monkeypatch):
    import errno

    import f2d_bench.store as store_module

    store = RunDir(tmp_path).store
    keys = _keys()[:2]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for k in keys:  # written by a writer whose manifest line was lost (killed between rename and append)
        store.write_image(k, Image.fromarray(noise), config_hash="h", batch_size=1, writer="x", written_at="t")
    RunDir(tmp_path).manifest_path("x").unlink()
    cut = store.image_path(keys[0])
    cut.write_bytes(cut.read_bytes()[:-2000])  # its pixels end early: Pillow says "image file is truncated"
    counts = store.reconcile(keys, writer="all", config_hash="h")
    assert not cut.exists() and counts["manifest_added"] == 1  # generated again; the whole one adopted
    assert set(store.manifest_records()) == {keys[1]}

    # a read that fails in the file system (EIO) is no proof of damage: the image stays, the run stops
    RunDir(tmp_path).manifest_path("all").unlink()

    def failing(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(store_module, "read_png_key", failing)
    with pytest.raises(OSError) as err:
        store.reconcile(keys, writer="all", config_hash="h")
    assert err.value.errno == errno.EIO and err.value.filename.endswith("1.png")
    assert store.image_path(keys[1]).is_file()


def test_append_after_a_partial_line_keeps_the_new_record(tmp_path):

    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as fh:
        fh.write('{"b": ')  # a writer killed mid-line
    append_jsonl(path, {"c": 3})
    assert read_jsonl(path) == [{"a": 1}, {"c": 3}]


def test_append_that_a_full_disk_cuts_short_is_an_error_not_a_lost_line(tmp_path, monkeypatch):
    import errno

    import f2d_bench.files as files

    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"a": 1})
    real = os.write
    # a full disk: write(2) takes part of the buffer and returns its length
    monkeypatch.setattr(files.os, "write", lambda fd, data: real(fd, data[:5]))
    with pytest.raises(OSError) as err:
        append_jsonl(path, {"b": 2})
    assert err.value.errno == errno.ENOSPC and "wrote 5 of" in str(err.value)
    monkeypatch.setattr(files.os, "write", real)
    append_jsonl(path, {"c": 3})  # once there is room: the partial line is skipped, nothing else lost
    assert read_jsonl(path) == [{"a": 1}, {"c": 3}]


def test_weights_are_hashed_once_while_the_file_stays_the_same(tmp_path, monkeypatch):
    import hashlib

    import f2d_bench.files as files

    reads = []
    original = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda p: reads.append(Path(p).name) or original(p))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 1000)
    first = files.weights_sha256(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert files.weights_sha256(path) == first and reads == ["model.safetensors"]  # once
    # Rewritten in place with the same size and its modification time set back: hashed again.
    stat = path.stat()
    time.sleep(0.05)  # file times tick coarsely (a few ms): a rewrite in the same tick would keep them
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files.weights_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(reads) == 2
    # A model folder's files go through the same memo.
    (tmp_path / "config.json").write_text("{}")
    assert files.folder_sha256s(tmp_path) == {"config.json": hashlib.sha256(b"{}").hexdigest(),
                                              "model.safetensors": hashlib.sha256(b"b" * 1000).hexdigest()}
    assert reads == ["model.safetensors", "model.safetensors", "config.json"]


def test_link_or_copy_copies_across_file_systems(tmp_path, monkeypatch):
    import errno

    import f2d_bench.files as files

    src = tmp_path / "a.png"
    src.write_bytes(b"pixels")

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "link", cross_device)
    dst = files.atomic_link_or_copy(src, tmp_path / "child" / "a.png")
    assert dst.read_bytes() == b"pixels" and dst.stat().st_ino != src.stat().st_ino
    assert [p.name for p in dst.parent.iterdir()] == ["a.png"]  # no temporary file left


def test_lock_probe_sees_a_holder_but_not_another_probe(tmp_path):
    """check_layouts probes other writers' locks: a running writer (exclusive) is seen, two probes of one
    lock at once are not (a probe taking the lock exclusively made same-layout shards refuse each other)."""
    import fcntl

    from f2d_bench.files import exclusive_lock, lock_is_held

    path = tmp_path / "shard-1-of-2.lock"
    assert not lock_is_held(path)  # no file: nobody
    with exclusive_lock(path):
        assert lock_is_held(path)
    assert not lock_is_held(path)  # released (a stale file left by a finished writer)
    with open(path, "rb") as other_probe:
        fcntl.flock(other_probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe in progress elsewhere
        assert not lock_is_held(path)


def test_a_lock_held_a_moment_is_not_a_running_writer(tmp_path):
    """A shard repairing another layout's manifest holds that writer's lock for a moment: a sibling shard
    starting then must not take it for a running writer of that layout."""
    import threading

    from f2d_bench.files import exclusive_lock, lock_is_held

    path = tmp_path / "all.lock"
    taken, release = threading.Event(), threading.Event()

    def repair():
        with exclusive_lock(path):
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=repair)
    holder.start()
    assert taken.wait(10)
    threading.Timer(0.3, release.set).start()  # the repair ends within the probe's window
    assert not lock_is_held(path, seconds=5.0)
    holder.join(10)
    with exclusive_lock(path):  # held for the whole window: a running writer
        assert lock_is_held(path, seconds=0.3)
