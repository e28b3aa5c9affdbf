"""FID of each method's prompt images against reference statistics, from per-image features.

Inception features are cached per image hash (``scores/fid-<hash>/``), so any grouping can be computed
later and a regenerated image is re-embedded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from f2d_bench.config import ScoringConfig, canonical_hash
from f2d_bench.errors import F2DBenchError
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring.cache import ChunkCache
from f2d_bench.scoring.inputs import ImageEntry


def fid_features(run: RunDir, entries: Sequence[ImageEntry], scoring: ScoringConfig, backend, progress, *,
                 writer: str = "all") -> ChunkCache:
    """Cache the Inception features of ``entries``' prompt images that are not cached yet; returns the
    cache. ``backend``: from :func:`make_fid_backend`; ``writer``: the shard tag its chunks carry."""
    import pandas as pd

    from f2d_bench.faces.imageio import read_image

    ident = {"stage": "fid-features", "backend": backend.describe()}
    cache = ChunkCache(run.cache_dir(f"fid-{canonical_hash(ident, 10)}"), writer)
    cache.describe("stage.json", ident)
    ref_id = run.read_grid()["prompt_set"]["reference_id"]
    have = cache.keys()
    todo = list({e.sha256: e for e in entries if e.key.prompt_id != ref_id and e.sha256 not in have}.values())
    bar = progress(todo, "fid")
    for start in range(0, len(todo), scoring.chunk_size):
        chunk = todo[start:start + scoring.chunk_size]
        images, keep = [], []
        for e in chunk:
            try:
                images.append(read_image(e.path))
                keep.append(e)
            except F2DBenchError:
                continue  # recorded as an error by the faces stage; not part of any FID
        feats = backend.features(images) if images else np.zeros((0, 2048))
        cache.write(pd.DataFrame({"cache_key": [e.sha256 for e in keep],
                                  "features": [f.astype(np.float32).tolist() for f in feats]}))
        bar.update(len(chunk))
    bar.close()
    return cache


def make_fid_backend(scoring: ScoringConfig, device: str):
    """The scoring's Inception backend (its model loads on the first features call)."""
    from f2d_bench.scorers.fid import make_backend

    return make_backend(scoring.fid_backend, weights=scoring.fid_weights, device=device)


def compute_fid(run: RunDir, entries: Sequence[ImageEntry], scoring: ScoringConfig, device: str,
                progress, *, backend=None, writer: str = "all") -> dict:
    """method_id -> {value, backend, n_generated, n_reference, reference} against
    ``scoring.fid_reference``, over every prompt image of ``entries`` (the whole run: FID is one statistic
    per method, never per shard); methods with fewer than two readable prompt images are left out."""
    from f2d_bench.scorers.fid import fid_from_features, load_stats

    grid = run.read_grid()
    reference = load_stats(scoring.fid_reference)
    backend = backend or make_fid_backend(scoring, device)
    cache = fid_features(run, entries, scoring, backend, progress, writer=writer)
    ref_id = grid["prompt_set"]["reference_id"]
    wanted = [e for e in entries if e.key.prompt_id != ref_id]
    table = cache.read()
    by_sha = dict(zip(table["cache_key"], table["features"])) if table is not None else {}
    results = {}
    for m in grid["methods"]:
        feats = [by_sha[e.sha256] for e in wanted if e.key.method_id == m["method_id"] and e.sha256 in by_sha]
        if len(feats) < 2:
            continue
        r = fid_from_features(np.asarray(np.stack(feats), dtype=np.float64), reference, backend.name)
        results[m["method_id"]] = {"value": r.value, "backend": r.backend, "n_generated": r.n_generated,
                                   "n_reference": r.n_reference, "reference": str(scoring.fid_reference)}
    return results
