"""Where f2d-bench keeps files it builds or downloads."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import platformdirs

CACHE_ENV_VAR = "F2D_BENCH_CACHE"


def cache_root() -> Path:
    """Root of f2d-bench's cache (built tiny models, derived files).

    `$F2D_BENCH_CACHE` wins when set and non-empty (tests point it at a temporary directory);
    otherwise the platform's user cache directory for "f2d-bench". The directory is not created here.
    """
    override = os.environ.get(CACHE_ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("f2d-bench"))


#: Temporary build folders older than this are leftovers of killed builds, in seconds.
STALE_BUILD_SECONDS = 3600.0


def cached_build(target: Path, build: Callable[[Path], object], is_complete: Callable[[Path], bool]) -> Path:
    """``target``, built on first use by ``build(tmp_dir)`` in a temporary sibling and renamed into place.

    Only a rename ever creates ``target``, so concurrent builders and killed builds never leave a half-
    built folder there; an incomplete ``target`` was damaged from outside and is moved aside and rebuilt.
    When another builder wins the race, its copy is used.
    """
    target = Path(target)
    if is_complete(target):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    now = time.time()
    for entry in parent.glob(f"{prefix}*"):
        try:
            if now - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process removed it first
    if target.exists() and not is_complete(target):
        trash = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            os.replace(target, trash / "broken")
        except FileNotFoundError:
            pass  # a concurrent builder moved it already
        shutil.rmtree(trash, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):  # else another builder won the race: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
