"""Tuning a face when a command first needs it (generate, tune), waiting for another process doing it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from f2d_bench.tuning.artifacts import TunedFaces

if TYPE_CHECKING:
    from f2d_bench.faces.faceset import Face
    from f2d_bench.methods.base import Method
    from f2d_bench.run_dir import RunDir


def ensure_tuned(method: "Method", face: "Face", run: "RunDir", writer: str) -> tuple[Any, bool]:
    """Tune ``face`` for ``method`` unless the run holds an intact artifact; returns (folder, tuned now).

    The tuning's wall time is in the face's ``tune.json`` (Table 2 reads it from there). ``writer``
    names the process in the record (``all``, ``shard-i-of-N``, ``tune-...``).
    """
    tuned = TunedFaces(run, method.method_id)
    tuning_id = method.tuning_id

    def waiting():
        print(f"{method.label}: waiting for another process tuning face {face.face_id}", file=sys.stderr)

    def tune(work):
        return {**method.tune(face, work), "writer": writer, "tuning_id": tuning_id}

    folder, record = tuned.ensure(face.face_id, tune, waiting=waiting,
                                  reuse=same_tuning(run, method.method_id, tuning_id, face.face_id))
    return folder, record is not None


def same_tuning(run: "RunDir", method_id: str, tuning_id: str, face_id: str) -> list[TunedFaces]:
    """The run's other methods whose artifact of ``face_id`` records ``tuning_id``: the same settings
    tuned it (two entries of one method differing only in a sampling the tuning does not read)."""
    out = []
    for other in run.read_grid().get("methods", []):
        mid = other.get("method_id")
        if mid and mid != method_id and (run.tune_record(mid, face_id) or {}).get("tuning_id") == tuning_id:
            out.append(TunedFaces(run, mid))
    return out


def tuned_prepared(method: "Method", face: "Face", run: "RunDir", writer: str) -> Any:
    """What ``generate`` gets as ``prepared`` for a tuning method: the face's artifact, tuned if needed."""
    folder, _ = ensure_tuned(method, face, run, writer)
    return method.load_tuned(face, folder)


def non_square_note(faces: Sequence, label: str) -> str | None:
    """A note naming the faces whose photo is not square (``diffusion.training_pixels`` squashes them to a square,
    as the official tuning scripts do), or None. ``faces prepare`` writes square crops; a hand-made face
    folder may not. Only the file header is read; an unreadable photo is left to the tuning's own error."""
    odd = []
    for face in faces:
        try:
            with Image.open(face.path) as opened:
                width, height = opened.size
        except (OSError, ValueError, SyntaxError):
            continue
        if width != height:
            odd.append(f"{face.face_id} ({width}x{height})")
    if not odd:
        return None
    shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
    return (f"{label} tunes on square images: {len(odd)} face photo(s) are not square and are resized without "
            f"keeping their aspect ratio, which distorts the face: {shown}. `f2d-bench faces prepare` writes "
            "square aligned crops")
