"""A chunk cache: one folder of whole Parquet files of per-image rows, keyed by ``cache_key``.

Each chunk is written atomically and never rewritten, so a process killed at any moment loses at most
the rows it had not yet written, and a folder can be copied chunk by chunk into another run's cache.

Many processes may write one cache at once (``score --shard``, ``--ray``): a chunk is named
``chunk-<writer>-<token>-<n>.parquet``, where ``writer`` is the writer's shard tag (``all``,
``shard-i-of-N``), ``token`` is random per :class:`ChunkCache` object and ``n`` counts that object's
chunks, so no name is ever chosen by looking at the folder and two writers never pick the same one.
Caches written before this scheme (``chunk-000000.parquet``, ...) are read the same way.

A key in several chunks (two writers that computed the same image, a copy from a parent run) is read
once: the row of the chunk whose name sorts last wins. Its inputs were byte-identical, so the rows are
the same (on the CPU bit for bit; a GPU may differ in the last bits, and the choice then depends only on
which chunks the folder holds, not on when they were read).
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from f2d_bench.files import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, atomic_write_parquet, system_failure

if TYPE_CHECKING:
    import pandas as pd

#: Lists the chunks of another cache already copied into this one (see ``ChunkCache.copy_from``).
COPIED_LIST = "copied_from_parent.json"
#: What a writer tag may be: it is part of file names.
_WRITER = re.compile(r"[a-z0-9][a-z0-9-]*")


class ChunkCache:
    """The rows of ``folder``, written by ``writer`` (a shard tag; see the module docstring)."""

    def __init__(self, folder: Path, writer: str = "all"):
        if not _WRITER.fullmatch(writer):
            raise ValueError(f"writer tag {writer!r}: lower-case letters, digits and '-' only")
        self.folder = Path(folder)
        self.writer_tag = writer
        self._token: str | None = None  # drawn on the first write
        self._written = 0

    def chunks(self) -> list[Path]:
        """Every whole chunk, sorted by name (the order in which a later duplicate key wins)."""
        return sorted(self.folder.glob("chunk-*.parquet")) if self.folder.is_dir() else []

    def describe(self, name: str, data: dict) -> None:
        """Write what the rows were computed with (``stage.json``, ``scorer.json``) beside them.

        Left alone when it already says the same: every shard of a run describes the same settings, and
        a rewrite is one more temporary file that a kill could leave behind.
        """
        path = self.folder / name
        try:
            if json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(data, default=str)):
                return
        except (OSError, ValueError):
            pass
        atomic_write_json(path, data)

    def read(self) -> "pd.DataFrame | None":
        """All rows as one frame, one row per ``cache_key`` (None when there are none)."""
        import pandas as pd

        frames = []
        for chunk in self.chunks():
            try:
                frames.append(pd.read_parquet(chunk))
            except Exception as exc:  # not whole Parquet: not from an atomic write, but a damaged disk
                if system_failure(exc):  # the file system failed, not the chunk: its rows are not lost
                    raise
                _skip_damaged(chunk, exc)
        if not frames:
            return None
        return pd.concat(frames, ignore_index=True).drop_duplicates(subset=["cache_key"], keep="last")

    def keys(self) -> set[str]:
        frame = self.read()
        return set(frame["cache_key"]) if frame is not None else set()

    def _new_chunk(self) -> Path:
        """A chunk name no other writer can choose: this object's token and its own count."""
        if self._token is None:
            self._token = uuid.uuid4().hex[:12]
        self._written += 1
        return self.folder / f"chunk-{self.writer_tag}-{self._token}-{self._written:06d}.parquet"

    def write(self, frame: "pd.DataFrame") -> None:
        """Add ``frame`` (with a ``cache_key`` column) as one new chunk."""
        atomic_write_parquet(self._new_chunk(), frame)

    def writer(self, size: int) -> "ChunkWriter":
        return ChunkWriter(self, size)

    def remove_temporary(self) -> int:
        """Remove the temporary files a killed process of this writer tag left here; returns how many.

        Only for a caller that holds the writer tag's lock: then no live process of the tag is writing.
        Tag ``all`` also takes those of caches written before chunk names had a tag.
        """
        if not self.folder.is_dir():
            return 0
        patterns = [f".chunk-{self.writer_tag}-*{TMP_SUFFIX}"]
        if self.writer_tag == "all":
            patterns.append(f".chunk-[0-9]*{TMP_SUFFIX}")
        found = {p for pattern in patterns for p in self.folder.glob(pattern)}
        for path in found:
            path.unlink(missing_ok=True)
        return len(found)

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
            atomic_write_bytes(self._new_chunk(), chunk.read_bytes())
            done.add(chunk.name)
            atomic_write_json(listing, sorted(done))
            copied += 1
        return copied


class ChunkWriter:
    """Collects rows and writes them as chunks of at least ``size`` rows (the rest on ``close``).

    Rows come in groups (a scorer's batch) and a chunk never splits one: a killed score then leaves whole
    batches cached, so its resumption cuts the remaining images into the same batches as an uninterrupted
    score and computes the same values bit for bit (a batch's size changes a model's float rounding).
    """

    def __init__(self, cache: ChunkCache, size: int):
        self.cache, self.size, self.rows = cache, size, []

    def add(self, row: dict) -> None:
        self.add_rows([row])

    def add_rows(self, rows: list[dict]) -> None:
        """Add one group of rows, written in the same chunk."""
        self.rows.extend(rows)
        if len(self.rows) >= self.size:
            self.close()

    def close(self) -> None:
        if self.rows:
            import pandas as pd

            self.cache.write(pd.DataFrame(self.rows))
            self.rows = []


_SKIPPED: set[Path] = set()


def _skip_damaged(chunk: Path, exc: Exception) -> None:
    """Say once per process that a damaged chunk is left out: its rows are computed again."""
    if chunk not in _SKIPPED:
        _SKIPPED.add(chunk)
        print(f"warning: score cache file {chunk} is damaged ({type(exc).__name__}: {exc}); it is left out "
              "and its rows are computed again (delete it to silence this)", file=sys.stderr, flush=True)
