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
        writer = self.cache.writer(chunk_size)
        bar = progress(entries, self.scorer.name)
        try:
            for start in range(0, len(entries), batch_size):
                batch = entries[start:start + batch_size]
                values = self.scorer.score([make_item(e) for e in batch])
                if len(values) != len(batch):
                    raise RuntimeError(f"scorer {self.scorer.name} returned {len(values)} rows for {len(batch)} images")
                for e, v in zip(batch, values):
                    writer.add({"cache_key": self.cache_key(e),
                                **{name: _as_float(v.get(name)) for name in self.metric_names}})
                bar.update(len(batch))
        finally:
            writer.close()
            bar.close()

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
