"""Turns a run config's ``faces`` value into a face set.

``builtin:test-faces`` names the real photos shipped in ``f2d_bench/assets/faces``; they are prepared
(detected and FFHQ-aligned by the same code as ``f2d-bench faces prepare``) once into the cache.
"""

from __future__ import annotations

from pathlib import Path

from f2d_bench.config import BUILTIN_TEST_FACES
from f2d_bench.errors import ConfigError
from f2d_bench.faces.faceset import Face, load_face_set
from f2d_bench.paths import cache_root, cached_build

TEST_FACE_PHOTOS = Path(__file__).resolve().parent.parent / "assets" / "faces"
_BUILTIN_VERSION = "v3"  # bump when preparation changes so caches are rebuilt (v2: quality in manifest, v3: class words)


def builtin_test_faces_dir() -> Path:
    """Prepared crops of the shipped test photos, built on first use (atomically)."""
    from f2d_bench.faces.prepare import prepare_faces

    return cached_build(
        cache_root() / "faces" / f"test-faces-{_BUILTIN_VERSION}",
        lambda tmp: prepare_faces(TEST_FACE_PHOTOS, tmp, progress=False),
        lambda d: (d / "manifest.json").is_file(),
    )


def resolve_face_set(value: str | None) -> list[Face]:
    """The faces of a run, sorted by id."""
    if value is None:
        raise ConfigError(
            "faces: no face set given; prepare one with `f2d-bench faces prepare SRC DST` and pass "
            "--faces DST (or set `faces:` in the config)"
        )
    if value == BUILTIN_TEST_FACES:
        return load_face_set(builtin_test_faces_dir())
    if value.startswith("builtin:"):
        raise ConfigError(f"faces: unknown built-in face set {value!r}; available: {BUILTIN_TEST_FACES}")
    return load_face_set(Path(value).expanduser())
