"""The images of a run: atomic PNG writes with the key in their metadata, per-writer manifests, and the
resume bookkeeping that repairs what a killed writer left.

An image is complete exactly when its final path exists: it is written to a temporary file in the same
directory and renamed. A process killed at any moment leaves at most a temporary file, which the next
writer owning that key removes. Every path comes from :class:`f2d_bench.run_dir.RunDir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from PIL import Image, PngImagePlugin

from f2d_bench.errors import F2DBenchError
from f2d_bench.files import (
    TMP_SUFFIX, append_jsonl, atomic_write_bytes, atomic_write_text, exclusive_lock, file_sha256, final_name,
    lock_is_held, read_jsonl, system_failure,
)
from f2d_bench.grid import ItemKey, Shard

if TYPE_CHECKING:
    from f2d_bench.run_dir import RunDir

PNG_KEY_FIELD = "f2d_bench.key"
PNG_CONFIG_FIELD = "f2d_bench.config_hash"


#: zlib level of the grid's PNGs: level 1 encodes a 512x512 image several times faster than Pillow's
#: default 6 for files about a quarter larger; the pixels are the same at every level.
PNG_COMPRESS_LEVEL = 1


def png_bytes(image: Image.Image, text: dict[str, str], compress_level: int = 6) -> bytes:
    """Encode ``image`` as PNG with ``text`` as tEXt chunks (``compress_level``: zlib level 0-9)."""
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def read_png_key(path: Path) -> tuple[ItemKey, str | None]:
    """The ItemKey and config hash stored in an image's PNG metadata, once its pixels decode whole.

    A truncated or damaged file raises Pillow's error (an OSError without errno, SyntaxError, ...).
    """
    with Image.open(path) as im:
        im.load()
        text = dict(getattr(im, "text", {}) or {})
    if PNG_KEY_FIELD not in text:
        raise F2DBenchError(f"{path}: no {PNG_KEY_FIELD} metadata; not written by f2d-bench generate")
    return ItemKey.from_dict(json.loads(text[PNG_KEY_FIELD])), text.get(PNG_CONFIG_FIELD)


@dataclass
class ImageRecord:
    """One manifest line."""

    key: ItemKey
    path: str
    sha256: str
    config_hash: str
    batch_size: int
    written_at: str
    writer: str

    def to_dict(self) -> dict:
        return {
            "key": self.key.to_dict(),
            "path": self.path,
            "sha256": self.sha256,
            "config_hash": self.config_hash,
            "batch_size": self.batch_size,
            "written_at": self.written_at,
            "writer": self.writer,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRecord":
        return cls(
            key=ItemKey.from_dict(d["key"]),
            path=str(d["path"]),
            sha256=str(d["sha256"]),
            config_hash=str(d.get("config_hash", "")),
            batch_size=int(d.get("batch_size", 0)),
            written_at=str(d.get("written_at", "")),
            writer=str(d.get("writer", "")),
        )


def _line_record(d: dict) -> ImageRecord | None:
    """The record of a manifest line's object; None for one that is not a whole record."""
    try:
        return ImageRecord.from_dict(d)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _line_key(line: str) -> ItemKey | None:
    """The key of a manifest line; None for a line that is not a whole record (kept as it is)."""
    try:
        record = _line_record(json.loads(line))
    except json.JSONDecodeError:
        return None
    return record.key if record is not None else None


def _layout(writer: str) -> int | None:
    """The shard count of a generate's writer tag; None for a name that is not a shard's."""
    shard = Shard.from_tag(writer)
    return shard.count if shard is not None else None


class RunStore:
    """The images and manifests of one run directory. Paths follow from keys; writes are atomic."""

    def __init__(self, run: "RunDir"):
        self.run = run

    def image_path(self, key: ItemKey) -> Path:
        return self.run.image_path(key)

    # -- images -----------------------------------------------------------------------------------
    def has_image(self, key: ItemKey) -> bool:
        return self.image_path(key).is_file()

    def write_image(
        self, key: ItemKey, image: Image.Image, *, config_hash: str, batch_size: int, writer: str,
        written_at: str,
    ) -> ImageRecord:
        """Write one image atomically with its key in the PNG metadata, then its manifest line."""
        sha256 = self.write_png(key, image, config_hash)
        return self.record(key, sha256, config_hash=config_hash, batch_size=batch_size, writer=writer,
                           written_at=written_at)

    def write_png(self, key: ItemKey, image: Image.Image, config_hash: str) -> str:
        """Encode and atomically write the image of ``key``; returns the sha256 of its bytes.

        Touches only the image's own file, so calls for different keys may run on several threads."""
        data = png_bytes(
            image,
            {PNG_KEY_FIELD: json.dumps(key.to_dict(), sort_keys=True), PNG_CONFIG_FIELD: config_hash},
            compress_level=PNG_COMPRESS_LEVEL,
        )
        atomic_write_bytes(self.image_path(key), data)
        return hashlib.sha256(data).hexdigest()

    def record(self, key: ItemKey, sha256: str, *, config_hash: str, batch_size: int, writer: str,
               written_at: str) -> ImageRecord:
        """Append the manifest line of an image ``write_png`` wrote (an image without one, after a kill,
        is adopted by the next ``reconcile``)."""
        record = ImageRecord(
            key=key, path=key.relpath.as_posix(), sha256=sha256,
            config_hash=config_hash, batch_size=batch_size, writer=writer, written_at=written_at,
        )
        append_jsonl(self.run.manifest_path(writer), record.to_dict())
        return record

    def manifest_records(self) -> dict[ItemKey, ImageRecord]:
        """Union of every writer's manifest; a later line for the same key wins."""
        records: dict[ItemKey, ImageRecord] = {}
        for path in self.run.manifest_paths():
            for rec in map(_line_record, read_jsonl(path)):
                if rec is not None:
                    records[rec.key] = rec
        return records

    def reconcile(self, keys: Iterable[ItemKey], *, writer: str, config_hash: str) -> dict[str, int]:
        """Bring the files of ``keys`` (those this writer owns) into a consistent state before writing.

        Removes temporary files a killed process left for these keys, removes images whose bytes no
        longer match the hash their manifest line recorded (truncated, emptied, overwritten: they are
        generated again; a line of another writer, as in a run resumed with another ``--shard`` layout,
        goes with its image), rewrites this writer's manifest without partial or duplicate lines or lines
        whose image is gone, and adds lines for images that were renamed into place just before a kill.
        Returns counts of what was repaired. Hold :meth:`writer_lock` while calling it.
        """
        keys = set(keys)
        removed_tmp = 0
        by_dir: dict[Path, set[str]] = {}
        for key in keys:
            by_dir.setdefault(self.image_path(key).parent, set()).add(f"{key.seed}.png")
        for directory, names in by_dir.items():
            if not directory.is_dir():
                continue
            for tmp in directory.glob(f".*{TMP_SUFFIX}"):
                if final_name(tmp.name) in names:
                    tmp.unlink(missing_ok=True)
                    removed_tmp += 1

        path = self.run.manifest_path(writer)
        raw_lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
        mine: dict[ItemKey, ImageRecord] = {}
        for rec in map(_line_record, read_jsonl(path)):
            if rec is not None and self.image_path(rec.key).is_file():
                mine[rec.key] = rec
        damaged = self.damaged(mine, mine)
        for key in damaged:
            self.image_path(key).unlink(missing_ok=True)
            del mine[key]
        damaged_theirs, others = self._repair_other_layouts(keys, mine, writer)
        added = 0
        for key in sorted(keys):
            if key in mine or key in others or not self.has_image(key):
                continue
            img_path = self.image_path(key)
            try:
                stored_key, stored_hash = read_png_key(img_path)
            except (OSError, SyntaxError, ValueError, EOFError, json.JSONDecodeError) as exc:
                # Undecodable ("image file is truncated"): a corrupt file cannot come from our rename;
                # regenerate it. A system failure (EIO, EMFILE) stops the run: no good image is deleted.
                if system_failure(exc):
                    raise
                img_path.unlink(missing_ok=True)
                continue
            if stored_key != key:
                raise F2DBenchError(f"{img_path}: PNG metadata names {stored_key}, not {key}")
            mine[key] = ImageRecord(
                key=key, path=key.relpath.as_posix(),
                sha256=file_sha256(img_path),
                config_hash=stored_hash or config_hash, batch_size=0, writer=writer, written_at="",
            )
            added += 1
        if added or damaged or len(mine) != len(raw_lines):
            text = "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in mine.values())
            atomic_write_text(path, text)
        return {"removed_tmp": removed_tmp, "manifest_added": added,
                "damaged_removed": len(damaged) + len(damaged_theirs),
                "manifest_dropped": max(0, len(raw_lines) - (len(mine) - added))}

    def _repair_other_layouts(self, keys: set[ItemKey], mine: dict[ItemKey, ImageRecord], writer: str
                              ) -> tuple[set[ItemKey], set[ItemKey]]:
        """A run resumed with another ``--shard`` layout: other writers' lines for ``keys``.

        An image such a line records that no longer has the recorded bytes is removed with its line, to be
        generated again; a line whose key this writer recorded with other bytes (left by a kill between
        the two steps of that repair) is dropped. Only the manifests holding such lines are locked, all of
        them before anything changes: a writer of them still running refuses the repair and nothing is
        touched. Returns the damaged keys removed, and the keys other writers still record (this writer
        adopts none of them).
        """
        lines: dict[Path, dict[ItemKey, ImageRecord]] = {}
        for path in self.run.manifest_paths():
            if path.stem != writer:
                lines[path] = {r.key: r for r in map(_line_record, read_jsonl(path)) if r is not None and r.key in keys}
        theirs = {k: r for recs in lines.values() for k, r in recs.items() if k not in mine}
        damaged = set(self.damaged(theirs, theirs))
        stale = {k for recs in lines.values() for k, r in recs.items() if k in mine and r.sha256 != mine[k].sha256}
        drop = damaged | stale
        others = {k for recs in lines.values() for k in recs if k not in drop and k not in mine}
        touched = [p for p, recs in lines.items() if drop & recs.keys()]
        if not touched:
            return set(), others
        with contextlib.ExitStack() as held:
            for path in touched:
                held.enter_context(exclusive_lock(self.run.writer_lock_path(path.stem), busy=(
                    f"{path.stem} is writing images of {self.run.root} that this shard owns too (the run is "
                    f"being resumed with another --shard layout, and {len(drop)} of its images need repair); "
                    f"wait for {path.stem} to finish, then run this shard again")))
            for key in damaged:
                self.image_path(key).unlink(missing_ok=True)
            for path in touched:
                text = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
                atomic_write_text(path, "".join(line for line in text if _line_key(line) not in drop))
        return damaged, others

    def damaged(self, keys: Iterable[ItemKey], records: dict[ItemKey, ImageRecord] | None = None
                ) -> dict[ItemKey, str]:
        """The keys whose image file is not what its manifest line recorded: key -> what is wrong.

        Every image with a manifest line is read and hashed (about a second per thousand 512x512
        PNGs on a local disk); a missing image, or one without a line, is not listed here.
        """
        records = self.manifest_records() if records is None else records
        out = {}
        for key in keys:
            rec, path = records.get(key), self.image_path(key)
            if rec is None or not path.is_file():
                continue
            if path.stat().st_size == 0:
                out[key] = "empty file"
            elif file_sha256(path) != rec.sha256:
                out[key] = "its bytes differ from the hash its manifest line records (truncated or overwritten)"
        return out

    def writer_lock(self, writer: str):
        """Hold the lock of ``writer``'s manifest: one process at a time writes a shard's images.

        The lock is released when the process ends, however it ends, so a killed writer never leaves it
        held. A second writer of the same shard gets an error instead of racing on the manifest.
        """
        path = self.run.writer_lock_path(writer)
        busy = (f"another process is writing the images of {self.run.root} as {writer!r} (it holds {path}); "
                "wait for it to finish, or give this one another --shard")
        return exclusive_lock(path, busy=busy)

    def layouts(self) -> set[int]:
        """The shard counts of the writers whose manifests the run holds (1: unsharded)."""
        return {n for p in self.run.manifest_paths() if (n := _layout(p.stem)) is not None}

    def check_layouts(self, writer: str) -> None:
        """Refuse to write while a writer of another ``--shard`` layout is running (call it holding
        :meth:`writer_lock`): the two would own some keys both, and each one's :meth:`reconcile` would take
        the other's files in flight for a kill's leftovers (removing its temporary files, adopting images it
        has not recorded yet). Shards of one layout own disjoint keys and run side by side. Each writer checks
        after taking its own lock, so of two starting together at least one sees the other.
        """
        mine = _layout(writer)
        if mine is None or not self.run.manifests_dir.is_dir():
            return
        for lock in sorted(self.run.manifests_dir.glob("*.lock")):
            other = lock.stem
            if other == writer or _layout(other) in (None, mine):
                continue
            # Held for 2 s: a running writer holds its lock for its whole run, while a shard of this layout
            # repairing that writer's manifest (reconcile) holds it a moment only.
            if lock_is_held(lock, seconds=2.0):
                raise F2DBenchError(
                    f"{other} is writing images of {self.run.root} with another --shard layout ({other} vs "
                    f"{writer}); the two would write the same images. Wait for {other} to finish, then resume "
                    "with one layout")

    def temporary_files(self) -> list[Path]:
        """Temporary files left anywhere under images/ (by a killed writer of any shard)."""
        images = self.run.images_dir
        return sorted(images.rglob(f".*{TMP_SUFFIX}")) if images.is_dir() else []


class BackgroundWriter:
    """Writes a generate's images on a few threads while the next batch renders.

    PNG encoding, hashing, fsync and rename run on at most ``threads`` threads with at most
    ``max_pending`` images in flight (bounded memory); manifest lines are appended on the calling thread,
    in submission order. A failed write is raised by the first ``submit`` that finds it done, at the latest
    by ``close``, which waits for every write; the lines of the images submitted before it are in by then.
    """

    def __init__(self, store: RunStore, *, threads: int = 4, max_pending: int = 64):
        from concurrent.futures import ThreadPoolExecutor

        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png-writer")
        self._pending: list[tuple] = []
        self._max_pending = max_pending

    def submit(self, key: ItemKey, image: Image.Image, *, on_done=None, **record_fields) -> None:
        """Queue ``image`` for ``key``; ``record_fields``: those of :meth:`RunStore.record`."""
        future = self._pool.submit(self._store.write_png, key, image, record_fields["config_hash"])
        self._pending.append((key, future, record_fields, on_done))
        # Lines of the writes already done go in now, so the manifest (status, progress) trails the files
        # by the writes in flight only; then wait while too many are in flight.
        while self._pending and (self._pending[0][1].done() or len(self._pending) > self._max_pending):
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        key, future, fields, on_done = self._pending.pop(0)
        self._store.record(key, future.result(), **fields)
        if on_done is not None:
            on_done()

    def flush(self) -> None:
        """Wait for every queued image and append its manifest line."""
        while self._pending:
            self._finish_oldest()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            # Writes still queued after an error finish (each is atomic); their lines come from reconcile.
            self._pool.shutdown(wait=True)
