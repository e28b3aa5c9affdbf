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


class FidStage:
    """The Inception-feature cache of one writer, filled image by image (:meth:`add`); features are
    computed ``scoring.chunk_size`` images at a time and each such set is one chunk."""

    def __init__(self, run: RunDir, scoring: ScoringConfig, backend, *, writer: str = "all"):
        ident = {"stage": "fid-features", "backend": backend.describe()}
        self.cache = ChunkCache(run.cache_dir(f"fid-{canonical_hash(ident, 10)}"), writer)
        self.cache.describe("stage.json", ident)
        self.backend, self.size = backend, scoring.chunk_size
        self.ref_id = run.read_grid()["prompt_set"]["reference_id"]
        self._have = self.cache.keys()
        self._pending: list = []  # (entry, image or None)

    def todo(self, entries: Sequence[ImageEntry]) -> list[ImageEntry]:
        """``entries``' prompt images without features yet, each image sha once, in order."""
        return list({e.sha256: e for e in entries if self.wants(e)}.values())

    def wants(self, e: ImageEntry) -> bool:
        """Whether ``e`` is a prompt image without features yet."""
        return e.key.prompt_id != self.ref_id and e.sha256 not in self._have

    def add(self, e: ImageEntry, read) -> None:
        """Queue ``e`` (``read(path)``: its decoded image, or F2DBenchError: then it is in no FID; the
        faces stage records the error)."""
        try:
            image = read(e.path)
        except F2DBenchError:
            image = None
        self._have.add(e.sha256)
        self._pending.append((e, image))
        if len(self._pending) >= self.size:
            self.flush()

    def flush(self) -> None:
        import pandas as pd

        if not self._pending:
            return
        keep = [(e, im) for e, im in self._pending if im is not None]
        feats = self.backend.features([im for _, im in keep]) if keep else np.zeros((0, 2048))
        self.cache.write(pd.DataFrame({"cache_key": [e.sha256 for e, _ in keep],
                                       "features": [f.astype(np.float32).tolist() for f in feats]}))
        self._pending = []


def fid_features(run: RunDir, entries: Sequence[ImageEntry], scoring: ScoringConfig, backend, progress, *,
                 writer: str = "all") -> ChunkCache:
    """Cache the Inception features of ``entries``' prompt images that are not cached yet; returns the
    cache. ``backend``: from :func:`make_fid_backend`; ``writer``: the shard tag its chunks carry."""
    from f2d_bench.faces.imageio import read_image

    stage = FidStage(run, scoring, backend, writer=writer)
    todo = stage.todo(entries)
    bar = progress(todo, "fid")
    for e in todo:
        stage.add(e, read_image)
        bar.update(1)
    stage.flush()
    bar.close()
    return stage.cache


def make_fid_backend(scoring: ScoringConfig, device: str):
    """The scoring's Inception backend (its model loads on the first features call)."""
    from f2d_bench.scorers.fid import make_backend

    return make_backend(scoring.fid_backend, weights=scoring.fid_weights, device=device)


def method_prompt_images(entries: Sequence[ImageEntry], method_id: str, reference_id: str) -> list[ImageEntry]:
    """The method's prompt images among ``entries`` (the reference prompt's left out): FID's input set."""
    return [e for e in entries if e.key.method_id == method_id and e.key.prompt_id != reference_id]


def fid_images_digest(images: Sequence[ImageEntry]) -> str:
    """A digest of ``images``' file hashes, sorted (one method's :func:`method_prompt_images`). A later
    ``score`` without ``--fid-ref`` compares it with the run's images to tell when FID is out of date."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(e.sha256 for e in images)).encode("ascii")).hexdigest()


def mark_stale_fid(previous: dict, entries: Sequence[ImageEntry], reference_id: str) -> dict:
    """``previous`` (an earlier ``fid.json``) with ``stale`` set, saying why, on each method whose images
    changed since (generated, regenerated or removed); a record without a digest (older runs) is
    compared by its image count."""
    out = {}
    for mid, result in previous.items():
        result = {k: v for k, v in result.items() if k != "stale"}
        now = method_prompt_images(entries, mid, reference_id)
        if "images" in result:
            changed = result["images"] != fid_images_digest(now)
        else:
            changed = result.get("n_generated") != len(now)
        if changed:
            result["stale"] = (f"computed over {result.get('n_generated')} images; the method's images changed since "
                               f"({len(now)} now): score again with --fid-ref")
        out[mid] = result
    return out


def compute_fid(run: RunDir, entries: Sequence[ImageEntry], scoring: ScoringConfig, device: str,
                progress, *, backend=None, writer: str = "all") -> dict:
    """method_id -> {value, backend, n_generated, n_reference, reference, reference_filter} against
    ``scoring.fid_reference``, over every prompt image of ``entries`` (the whole run: FID is one statistic
    per method, never per shard); methods with fewer than two readable prompt images are left out."""
    from f2d_bench.scorers.fid import fid_from_features, load_stats
    from f2d_bench.scorers.fid.reference import filter_text
    from f2d_bench.scorers.fid.stats import check_reference_weights

    grid = run.read_grid()
    reference = load_stats(scoring.fid_reference)
    backend = backend or make_fid_backend(scoring, device)
    check_reference_weights(reference, backend.describe())  # before the feature pass, where the file is known
    cache = fid_features(run, entries, scoring, backend, progress, writer=writer)
    check_reference_weights(reference, backend.describe())  # and the file actually loaded
    ref_id = grid["prompt_set"]["reference_id"]
    table = cache.read()
    by_sha = dict(zip(table["cache_key"], table["features"])) if table is not None else {}
    results = {}
    for m in grid["methods"]:
        images = method_prompt_images(entries, m["method_id"], ref_id)
        feats = [by_sha[e.sha256] for e in images if e.sha256 in by_sha]
        if len(feats) < 2:
            continue
        r = fid_from_features(np.asarray(np.stack(feats), dtype=np.float64), reference, backend.name)
        results[m["method_id"]] = {"value": r.value, "backend": r.backend, "n_generated": r.n_generated,
                                   "n_reference": r.n_reference, "reference": str(scoring.fid_reference),
                                   "reference_filter": filter_text(reference.metadata),
                                   "images": fid_images_digest(images)}
    return results
