"""Per-face tuning artifacts in a run: built aside, marked complete, renamed into place, hash-checked.

Layout, under ``RUN/methods/<method_id>/faces/``::

    <face_id>/            the artifact files (safetensors, diffusers' names) and tune.json, the marker
    .<face_id>.tuning/    the folder an unfinished tuning writes; removed when tuning restarts
    .<face_id>.lock       held while one process tunes the face (several generate shards may need it)

A face is tuned when ``<face_id>/tune.json`` exists and every file it lists has the bytes it records.
The folder appears in one rename with the marker inside, so a process killed at any moment leaves the
old state or the finished artifact; a damaged artifact is removed and tuned again. A record whose
``weights_deleted`` is true (a method that renders a face right after tuning and drops the weights)
keeps its facts, and the face is tuned again only if images are still missing.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from f2d_bench.files import atomic_link_or_copy, atomic_write_json, exclusive_lock, file_sha256
from f2d_bench.run_dir import TUNE_RECORD, RunDir
from f2d_bench.runinfo import utc_now


class TunedFaces:
    """The per-face artifacts of one tuning method in one run."""

    def __init__(self, run: RunDir, method_id: str):
        self.run = run
        self.method_id = method_id

    def path(self, face_id: str) -> Path:
        return self.run.face_artifacts_dir(self.method_id, face_id)

    def record(self, face_id: str) -> dict | None:
        """The face's ``tune.json`` (None when the face was never tuned to the end, or when the file is
        damaged: the face is then tuned again)."""
        return self.run.tune_record(self.method_id, face_id)

    def damage(self, face_id: str) -> str | None:
        """Why the face's finished artifact cannot be used (None when it can, or when there is none)."""
        record = self.record(face_id)
        if record is None or record.get("weights_deleted"):
            return None
        folder = self.path(face_id)
        for name, digest in record.get("files", {}).items():
            if not (folder / name).is_file():
                return f"{folder / name} is missing"
            if file_sha256(folder / name) != digest:
                return f"{folder / name} differs from the hash tune.json records"
        return None

    def ready(self, face_id: str) -> bool:
        """Whether the face has a finished, intact artifact with its weights."""
        record = self.record(face_id)
        return record is not None and not record.get("weights_deleted") and self.damage(face_id) is None

    def ensure(
        self, face_id: str, tune: Callable[[Path], dict[str, Any]], *, waiting: Callable[[], Any] | None = None,
        reuse: Sequence["TunedFaces"] = (),
    ) -> tuple[Path, dict | None]:
        """The face's artifact folder, tuning it first when needed; returns (folder, new record or None).

        ``tune(work_dir)`` writes the artifact files into ``work_dir`` and returns facts (trained
        parameters, steps, losses) that go into ``tune.json`` with the wall time and file hashes. Another
        process tuning the same face is waited for (``waiting()`` is called once), not duplicated.
        ``reuse``: other methods' artifacts known to be the same (one tuning id); an intact one of this
        face is linked instead of tuning, its record (and tuning time) with it.
        """
        final = self.path(face_id)
        with exclusive_lock(final.parent / f".{face_id}.lock", waiting=waiting):
            if self.ready(face_id):
                return final, None
            for other in reuse:
                if other.ready(face_id) and self.link_face(other, face_id):
                    return final, None
            work = final.parent / f".{face_id}.tuning"
            shutil.rmtree(work, ignore_errors=True)  # an unfinished tuning restarts from scratch
            work.mkdir(parents=True)
            start = time.perf_counter()
            facts = tune(work)
            seconds = time.perf_counter() - start
            files = {p.relative_to(work).as_posix(): file_sha256(p) for p in sorted(work.rglob("*")) if p.is_file()}
            record = {
                "method_id": self.method_id, "face_id": face_id, "seconds": seconds, "finished_at": utc_now(),
                **facts, "files": files, "weights_deleted": False,
            }
            atomic_write_json(work / TUNE_RECORD, record)
            if final.exists():  # a damaged artifact, or one whose weights were dropped
                shutil.rmtree(final)
            os.rename(work, final)
            return final, record

    def drop_weights(self, face_id: str) -> None:
        """Delete the face's artifact files, keeping ``tune.json`` (marked ``weights_deleted``)."""
        final = self.path(face_id)
        with exclusive_lock(final.parent / f".{face_id}.lock"):
            record = self.record(face_id)
            if record is None:
                return
            atomic_write_json(final / TUNE_RECORD, {**record, "weights_deleted": True})
            for name in record.get("files", {}):
                (final / name).unlink(missing_ok=True)
            for folder in sorted((p for p in final.rglob("*") if p.is_dir()), reverse=True):
                if not any(folder.iterdir()):
                    folder.rmdir()

    def records(self) -> list[dict]:
        """Every finished face's record, sorted by face id."""
        return self.run.tune_records(self.method_id)

    def link_from(self, other: "TunedFaces") -> int:
        """Hard-link (else copy) every intact artifact of ``other`` this run lacks; returns how many faces.

        The upper-bound child run renders more seeds of the same faces: it reuses the parent's tuning
        instead of tuning again.
        """
        return sum(self.link_face(other, record["face_id"]) for record in other.records())

    def link_face(self, other: "TunedFaces", face_id: str) -> bool:
        """Hard-link (else copy) ``other``'s intact artifact of ``face_id`` here, unless this one has a
        folder for the face (finished, or with dropped weights); returns whether it linked. The folder
        appears in one rename, as a tuning's does; the record keeps the tuning's own facts and time."""
        record = other.record(face_id)
        final = self.path(face_id)
        if record is None or record.get("weights_deleted") or final.exists() or other.damage(face_id):
            return False
        work = final.parent / f".{face_id}.linking"
        shutil.rmtree(work, ignore_errors=True)
        source = other.path(face_id)
        for src in sorted(p for p in source.rglob("*") if p.is_file()):
            atomic_link_or_copy(src, work / src.relative_to(source))
        os.rename(work, final)
        return True
