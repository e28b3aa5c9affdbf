"""One scorer with its chunk cache: computes the rows that are missing, reads back all of them.

A row is reused only when the image, its reference image and the input face are byte-identical to those
it was computed from (and, for identity scorers, the face stage's settings are the same), so a
regenerated image is rescored and nothing else is.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np

from f2d_bench.run_dir import RunDir
from f2d_bench.scorers.base import Scorer, ScoreItem
from f2d_bench.scoring.cache import ChunkCache
from f2d_bench.scoring.inputs import ImageEntry


class CachedScorer:
    """``scorer``'s values for a run's images, cached in ``scores/<scorer.cache_id>/``.

    reference: the readable reference image of an entry, or None; face_sha: face id -> input photo hash;
    face_stage: the face stage's id (part of the key of scorers that use faces); writer: the shard tag of
    the chunks this object writes.
    """

    def __init__(self, scorer: Scorer, run: RunDir, *, reference: Callable[[ImageEntry], ImageEntry | None],
                 face_sha: dict[str, str], face_stage: str, writer: str = "all"):
        self.scorer = scorer
        self.reference = reference
        self.face_sha = face_sha
        self.faces_part = face_stage if scorer.uses_faces else "-"
        self.cache = ChunkCache(run.cache_dir(scorer.cache_id), writer)
        self.cache.describe("scorer.json", scorer.describe())

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.scorer.metrics]

    def cache_key(self, e: ImageEntry) -> str:
        ref = self.reference(e)
        parts = [e.key.as_string(), e.sha256, ref.sha256 if ref else "-", self.face_sha[e.key.face_id],
                 self.faces_part]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def missing(self, entries: Sequence[ImageEntry]) -> list[ImageEntry]:
        have = self.cache.keys()
        return [e for e in entries if self.cache_key(e) not in have]

    def compute(self, entries: Sequence[ImageEntry], make_item: Callable[[ImageEntry], ScoreItem], *,
                batch_size: int, chunk_size: int, progress) -> None:
        """Score ``entries`` in batches and add their rows to the cache (whole chunks as they fill)."""
        bar = progress(entries, self.scorer.name)
        batcher = self.batcher(batch_size, chunk_size, on_batch=bar.update)
        try:
            for e in entries:
                batcher.add(e, make_item(e))
            batcher.flush()
        finally:
            batcher.close()
            bar.close()

    def batcher(self, batch_size: int, chunk_size: int, on_batch: Callable[[int], object] = lambda n: None):
        """A :class:`ScoreBatcher` that scores items ``batch_size`` at a time into this cache."""
        return ScoreBatcher(self, batch_size, self.cache.writer(chunk_size), on_batch)

    def values(self, entries: Sequence[ImageEntry]) -> dict[str, np.ndarray]:
        """metric -> one value per entry (NaN where nothing is cached, e.g. an unreadable image)."""
        import pandas as pd

        frame = self.cache.read()
        table = (frame.set_index("cache_key")[self.metric_names] if frame is not None
                 else pd.DataFrame(columns=self.metric_names))
        keys = [self.cache_key(e) for e in entries]
        return {name: table[name].reindex(keys).to_numpy(dtype=np.float64) for name in self.metric_names}


def _as_float(value) -> float:
    return np.nan if value is None else float(value)


class ScoreBatcher:
    """Items queued one at a time and scored ``batch_size`` at a time, in the order queued, under the
    scorer's precision (so a batch holds the same images however the caller walks the run)."""

    def __init__(self, cached: CachedScorer, batch_size: int, writer, on_batch: Callable[[int], object]):
        self.cached, self.batch_size, self.writer, self.on_batch = cached, batch_size, writer, on_batch
        self._queue: list[tuple[ImageEntry, ScoreItem]] = []

    def add(self, e: ImageEntry, item: ScoreItem) -> None:
        self._queue.append((e, item))
        if len(self._queue) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Score what is queued (a batch shorter than ``batch_size`` at the end of the run)."""
        scorer, batch, self._queue = self.cached.scorer, self._queue, []
        if not batch:
            return
        with scorer.precision_scope():
            values = scorer.score([item for _, item in batch])
        if len(values) != len(batch):
            raise RuntimeError(f"scorer {scorer.name} returned {len(values)} rows for {len(batch)} images")
        self.writer.add_rows([{"cache_key": self.cached.cache_key(e),
                               **{name: _as_float(v.get(name)) for name in self.cached.metric_names}}
                              for (e, _), v in zip(batch, values)])
        self.on_batch(len(batch))

    def close(self) -> None:
        """Write the rows of whole batches not written yet (queued items are dropped: call flush first)."""
        self.writer.close()
