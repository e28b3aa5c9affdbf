"""What `score` reads from a run: its existing images with their hashes, and its input faces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from f2d_bench.config import RunConfig
from f2d_bench.errors import F2DBenchError
from f2d_bench.faces.faceset import Face
from f2d_bench.faces.source import resolve_face_set
from f2d_bench.files import file_sha256
from f2d_bench.grid import UNSHARDED, ItemKey, Shard
from f2d_bench.run_dir import RunDir


@dataclass
class ImageEntry:
    key: ItemKey
    path: Path
    sha256: str
    reference_key: ItemKey | None


def run_images(run: RunDir, shard: Shard = UNSHARDED) -> list[ImageEntry]:
    """Every existing image of the run (of ``shard`` and their reference images: a prompt image's cache
    key names its reference's hash) with its hash and its reference image's key, in grid order.

    Hashes are taken from the files, not the manifest, so an image changed by any means is rescored. A
    shard hashes only its own images and their references, not the whole run.
    """
    ref_id = run.read_grid()["prompt_set"]["reference_id"]
    keys = run.keys()
    if shard.count > 1:
        wanted = {k for k in keys if shard.owns(k)}
        wanted |= {ItemKey(k.method_id, k.face_id, ref_id, k.seed) for k in wanted}
        keys = [k for k in keys if k in wanted]
    return [e for e in (image_entry(run, key, ref_id) for key in keys) if e is not None]


def image_entry(run: RunDir, key: ItemKey, ref_id: str) -> ImageEntry | None:
    """The entry of ``key``'s image (hashed from the file), or None when it does not exist.
    ``ref_id``: the prompt set's reference prompt id."""
    path = run.image_path(key)
    try:
        sha = file_sha256(path)
    except (FileNotFoundError, IsADirectoryError):  # also one another shard's writer removed just now
        return None
    ref = None if key.prompt_id == ref_id else ItemKey(key.method_id, key.face_id, ref_id, key.seed)
    return ImageEntry(key, path, sha, ref)


def run_faces(run: RunDir, config: RunConfig) -> dict[str, Face]:
    """The run's input faces, checked against the hashes recorded when the run was made."""
    # The face directory resolved at generation time: a relative `faces:` path then still works when
    # scoring from another working directory.
    recorded = run.faces_dirs()
    source = recorded[0] if len(recorded) == 1 and Path(recorded[0]).is_dir() else config.faces
    faces = {f.face_id: f for f in resolve_face_set(source)}
    out = {}
    for entry in run.read_grid()["faces"]:
        face = faces.get(entry["face_id"])
        if face is None:
            raise F2DBenchError(f"input face {entry['face_id']!r} of {run.root} is no longer in {config.faces}")
        if file_sha256(face.path) != entry["sha256"]:
            raise F2DBenchError(f"input face {face.path} changed since {run.root} was generated; "
                                "identity scores would compare against another photo")
        out[face.face_id] = face
    return out
