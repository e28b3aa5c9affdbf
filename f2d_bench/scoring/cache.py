"""A chunk cache: one folder of whole Parquet files of per-image rows, keyed by ``cache_key``.

Each chunk is written atomically and never rewritten, so a process killed at any moment loses at most
the rows it had not yet written, and a folder can be copied chunk by chunk into another run's cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from f2d_bench.files import atomic_write_bytes, atomic_write_json, atomic_write_parquet

if TYPE_CHECKING:
    import pandas as pd

#: Lists the chunks of another cache already copied into this one (see ``ChunkCache.copy_from``).
COPIED_LIST = "copied_from_parent.json"


class ChunkCache:
    """The rows of ``folder``; a later chunk wins for the same ``cache_key``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.parquet")) if self.folder.is_dir() else []

    def describe(self, name: str, data: dict) -> None:
        """Write what the rows were computed with (``stage.json``, ``scorer.json``) beside them."""
        atomic_write_json(self.folder / name, data)

    def read(self) -> "pd.DataFrame | None":
        """All rows as one frame (None when there are none)."""
        import pandas as pd

        frames = []
        for chunk in self.chunks():
            try:
                frames.append(pd.read_parquet(chunk))
            except Exception:  # a file that is not whole cannot come from an atomic write: ignore it
                continue
        if not frames:
            return None
        return pd.concat(frames, ignore_index=True).drop_duplicates(subset=["cache_key"], keep="last")

    def keys(self) -> set[str]:
        frame = self.read()
        return set(frame["cache_key"]) if frame is not None else set()

    def _next_chunk(self) -> Path:
        existing = self.chunks()
        n = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        return self.folder / f"chunk-{n:06d}.parquet"

    def write(self, frame: "pd.DataFrame") -> None:
        """Add ``frame`` (with a ``cache_key`` column) as one new chunk."""
        atomic_write_parquet(self._next_chunk(), frame)

    def writer(self, size: int) -> "ChunkWriter":
        return ChunkWriter(self, size)

    def copy_from(self, other: "ChunkCache") -> int:
        """Copy each chunk of ``other`` not copied before into this cache; returns how many were copied.

        ``copied_from_parent.json`` lists the chunks already taken (chunk files are never rewritten), so
        repeating the copy after a kill or an update adds only the new ones.
        """
        listing = self.folder / COPIED_LIST
        try:
            done = set(json.loads(listing.read_text(encoding="utf-8")))
        except (FileNotFoundError, ValueError):
            done = set()
        copied = 0
        for chunk in other.chunks():
            if chunk.name in done:
                continue
            atomic_write_bytes(self._next_chunk(), chunk.read_bytes())
            done.add(chunk.name)
            atomic_write_json(listing, sorted(done))
            copied += 1
        return copied


class ChunkWriter:
    """Collects rows and writes them as whole chunks of ``size`` rows (the rest on ``close``)."""

    def __init__(self, cache: ChunkCache, size: int):
        self.cache, self.size, self.rows = cache, size, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.size:
            self.close()

    def close(self) -> None:
        if self.rows:
            import pandas as pd

            self.cache.write(pd.DataFrame(self.rows))
            self.rows = []
