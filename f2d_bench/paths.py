"""Where f2d-bench keeps files it builds or downloads."""

from __future__ import annotations

import os
from pathlib import Path

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
