"""A set of input faces: one aligned image per identity, named by a face id.

A face set directory is what ``f2d-bench faces prepare`` writes (PNG crops plus ``manifest.json``), or
any directory of face images, whose file stems become the ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from f2d_bench.errors import F2DBenchError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_NAME = "manifest.json"
#: Written by `faces prepare` before its first crop and removed once its manifest is in place: a folder
#: that holds it is a prepare that was killed (its crops a mixture, its manifest missing or stale).
PREPARING_NAME = ".faces-prepare-incomplete"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DOTS = re.compile(r"\.{2,}")
# Ids become file names (ID.png); 200 characters stays well under the usual 255-byte name limit.
_MAX_ID_LENGTH = 200
_FALLBACK_ID = "face"


#: Class words: letters (any script), then letters, spaces, hyphens or apostrophes; at most 40 characters.
_CLASS_WORD = re.compile(r"[^\W\d_](?:[^\W\d_]|[ '-])*")
_MAX_CLASS_WORD = 40


@dataclass(frozen=True)
class Face:
    """One input identity: its id, the path of its (aligned) image, and optionally its class word.

    class_word: the noun a method writes for the subject's class ("man", "woman"), which FastComposer and
    PhotoMaker need per face; None when the face set does not give one (``manifest.json``'s
    ``class_word``, set by ``f2d-bench faces prepare --class-word``).
    """

    face_id: str
    path: Path
    class_word: str | None = None


def check_class_word(value, where: str) -> str:
    """``value`` stripped when it is a valid class word, else F2DBenchError naming ``where`` and the value."""
    word = value.strip() if isinstance(value, str) else value
    if not isinstance(word, str) or not _CLASS_WORD.fullmatch(word) or len(word) > _MAX_CLASS_WORD:
        raise F2DBenchError(
            f"{where}: class word {value!r} is not valid; give a word such as 'man' or 'woman' (letters, then "
            f"letters, spaces, hyphens or apostrophes, at most {_MAX_CLASS_WORD} characters)"
        )
    return word


def sanitize_face_id(name: str) -> str:
    """A file-name-safe id for ``name``: the same input always gives the same id.

    Keeps ASCII letters, digits, '.', '_' and '-'; every other character (path separators included)
    becomes '_', and so does a run of dots ("a..b" -> "a_b": ids become path components). Leading
    '.', '_' and '-' are removed (ids start with a letter or digit; no hidden files), the result is cut to
    200 characters, and an empty result becomes "face". The result is always a valid ``ItemKey`` id.
    Idempotent: sanitizing an id returns it unchanged.
    """
    cleaned = _DOTS.sub("_", _UNSAFE.sub("_", str(name))).lstrip("._-")[:_MAX_ID_LENGTH]
    return cleaned or _FALLBACK_ID


def _from_manifest(directory: Path, manifest_path: Path) -> list[Face]:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = manifest["faces"]
        # class_word is optional: manifests written before it existed have none.
        pairs = [(entry["face_id"], entry["file"], entry.get("class_word")) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise F2DBenchError(
            f"face set manifest {manifest_path} is unreadable or malformed ({exc}); "
            "re-run `f2d-bench faces prepare` or delete it to use the images in the directory"
        ) from exc
    faces, files = [], {}
    for face_id, file_name, class_word in pairs:
        # Text as written: a hand edit's null or 7 would otherwise become the face "None" or "7"
        if not isinstance(face_id, str) or not face_id or not isinstance(file_name, str) or not file_name:
            raise F2DBenchError(f"face set manifest {manifest_path} has an entry with face_id {face_id!r} and file "
                                f"{file_name!r}; both must be non-empty text")
        if file_name in files or file_name == MANIFEST_NAME:
            raise F2DBenchError(
                f"face set manifest {manifest_path} lists {file_name} for face {face_id!r}"
                + (f" and for face {files[file_name]!r}: one photo would be two identities" if file_name in files
                   else ", the manifest itself"))
        files[file_name] = face_id
        path = directory / file_name
        # A manifest must not point outside its directory.
        if sanitize_face_id(face_id) != face_id or Path(file_name).name != file_name:
            raise F2DBenchError(
                f"face set manifest {manifest_path} has an unsafe entry: {face_id!r} -> {file_name!r}"
            )
        if not path.is_file():
            raise F2DBenchError(f"face set manifest {manifest_path} lists {file_name}, which does not exist")
        if class_word is not None:
            class_word = check_class_word(class_word, f"face set manifest {manifest_path}, face {face_id!r}")
        faces.append(Face(face_id, path, class_word))
    return faces


def _from_files(directory: Path) -> list[Face]:
    faces = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            faces.append(Face(sanitize_face_id(path.stem), path))
    return faces


def load_face_set(directory: str | Path) -> list[Face]:
    """The faces of a face set directory, sorted by id.

    Uses ``manifest.json`` when present, else every png/jpg/jpeg/webp file (not recursive). Raises
    F2DBenchError naming the path when the directory is missing or empty, when two files give the same id,
    or when a `faces prepare` into it did not finish.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise F2DBenchError(f"face set directory not found: {directory}")
    if (directory / PREPARING_NAME).exists():
        raise F2DBenchError(
            f"{directory}: `f2d-bench faces prepare` into it did not finish (killed?), so its crops and "
            "manifest may be partial or stale; run the same `faces prepare` command again"
        )
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.is_file():
        faces, origin = _from_manifest(directory, manifest_path), str(manifest_path)
    else:
        faces, origin = _from_files(directory), str(directory)
    if not faces:
        raise F2DBenchError(
            f"no faces in {origin}: expected {', '.join(IMAGE_EXTENSIONS)} images "
            "(prepare photos with `f2d-bench faces prepare SRC DST`)"
        )
    by_id: dict[str, Face] = {}
    for face in faces:
        if face.face_id in by_id:
            raise F2DBenchError(
                f"duplicate face id {face.face_id!r} in {origin}: {by_id[face.face_id].path.name} and "
                f"{face.path.name}; rename one of them"
            )
        by_id[face.face_id] = face
    return [by_id[face_id] for face_id in sorted(by_id)]
