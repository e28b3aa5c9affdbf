"""`f2d-bench score`: every metric of every image of a run, cached, resumable, into records.parquet.

Stages, each cached under ``RUN/scores/`` by the hash of what went in:

1. faces (:mod:`.faces`): MTCNN on each generated image, one face chosen by the recorded policy;
2. one chunk cache per scorer and settings (:mod:`.cached_scorer`);
3. ``records.parquet`` (:mod:`.records`), ``table1.csv``, and FID per method when a reference is given.

Each image is decoded once per call, in blocks, and shared by every stage (:meth:`ScoreSession._compute`).
A score run killed at any moment leaves whole chunk files only; the next run computes what is missing
and ends with the same table as an uninterrupted run.

Sharded (``--shard i/N``, ``--shard auto``, ``--ray``): a shard computes stages 1 and 2 (and the FID
features) for its own images, split by the key hash of ``generate --shard``, into the same caches (chunk
names carry the writer, see :mod:`.cache`), and writes no records. Stage 3 is the *assembly*: it computes
whatever the whole run still lacks (nothing, once every shard is done) and writes records.parquet,
table1.csv, FID over all of each method's images and scoring.json. It runs in the shard that finishes the
set of N (each finished shard leaves ``scores/shards/shard-i-of-N.json``; the one that finds all N
assembles), in a plain ``score`` run afterwards, or in the ``--ray`` driver. Every assembly clears all
marks: a later sharded round (new images, a changed cache) starts from none, so no shard completes a set
with marks left by an earlier round. Assemblies and unsharded scores of one run take turns on one lock;
each shard has its own.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from f2d_bench.aggregate.metrics import MetricCatalog
from f2d_bench.config import ScoringConfig, canonical_hash
from f2d_bench.devices import resolve_device
from f2d_bench.errors import F2DBenchError
from f2d_bench.faces.choice import INPUT_FACE_RULE
from f2d_bench.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    exclusive_lock,
    final_name,
)
from f2d_bench.grid import UNSHARDED, Shard
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring.cache import ChunkCache
from f2d_bench.scoring.cached_scorer import CachedScorer
from f2d_bench.scoring.faces import face_stage_id, input_face_detections
from f2d_bench.scoring.fid import compute_fid, make_fid_backend, mark_stale_fid
from f2d_bench.scoring.inputs import ImageEntry, run_faces, run_images
from f2d_bench.scoring.records import assemble_records
from f2d_bench.scoring.walk import StageWalk


@dataclass
class ScoreSummary:
    run_dir: Path
    records_path: Path
    n_images: int
    computed: dict[str, int] = field(default_factory=dict)  # scorer -> rows computed this time
    errors: int = 0
    unreadable: list[str] = field(default_factory=list)  # the errors (naming the file) of the first few
    no_face: int = 0
    seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)
    table: Any = None  # per-method means (pandas DataFrame)
    fid: dict = field(default_factory=dict)  # method_id -> FID result
    missing: list[str] = field(default_factory=list)  # keys the grid expects whose image does not exist
    no_face_rule: str = "identity metrics 0.0"  # what scoring.no_face did to those images
    shard: str | None = None  # "i/N" of a sharded score
    assembled: bool = True  # records.parquet written by this call (False: a shard that was not the last)
    waiting: list[str] = field(default_factory=list)  # shards ("i/N") not finished yet, when not assembled

    def text(self) -> str:
        if not self.assembled:
            lines = [f"scored shard {self.shard}: {self.n_images} images of {self.run_dir} in {self.seconds:.1f} s"]
            lines += [f"  {name}: {n} computed, {self.n_images - n} from cache" for name, n in self.computed.items()]
            lines.append(f"records.parquet not assembled from this round yet: shard(s) "
                         f"{', '.join(self.waiting[:8])}"
                         f"{' ...' if len(self.waiting) > 8 else ''} still to finish; the last shard to finish "
                         f"writes it (or run f2d-bench score {self.run_dir} once they are done)")
            return "\n".join(lines)
        lines = [f"scored {self.n_images} images of {self.run_dir} in {self.seconds:.1f} s"]
        if self.shard:
            lines[0] += (f" (shard {self.shard} finished last and assembled every shard's cached values; "
                         "computed counts are this shard's)")
        if self.missing:
            lines.append(
                f"  warning: {len(self.missing)} image(s) the grid expects do not exist (e.g. {self.missing[0]}) and are "
                "not scored; a prompt image whose reference is missing has no dCLIP, hence no hMean/gMean. "
                "Run the run's generate command again to make them.")
        for name, n in self.computed.items():
            note = f"  [{self.notes[name]}]" if self.notes.get(name) else ""
            lines.append(f"  {name}: {n} computed, {self.n_images - n} from cache{note}")
        lines.append(f"  no face detected: {self.no_face} images ({self.no_face_rule}, face_detected false)")
        if self.errors:
            lines.append(f"  unreadable images: {self.errors} (metrics empty, see the `error` column), e.g. "
                         f"{'; '.join(self.unreadable)}. generate remakes an image whose bytes changed since it "
                         "was written: run the run's generate command again, then score")
        if self.table is not None and len(self.table):
            import pandas as pd

            with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
                lines.append("means per method (prompt images; reference images left out):")
                lines.append(self.table.drop(columns=["label"]).to_string())
        for mid, r in self.fid.items():
            lines.append(f"  FID {mid}: {r['value']:.2f} ({r['backend']}, {r['n_generated']} generated vs "
                         f"{r['n_reference']} reference images)")
        lines.append(f"records: {self.records_path}")
        return "\n".join(lines)


def identity_conventions(values: dict, identity: Sequence[str], detected, scoring: ScoringConfig) -> dict:
    """``values`` (metric -> one value per image) with the scoring's identity conventions applied to the
    ``identity`` metrics: clamped at 0 when ``identity_clamp``; NaN (left out of means) where no face was
    detected when ``no_face`` is ``drop``. The cached values stay raw, so a change recomputes nothing."""
    detected = np.asarray(detected, dtype=bool)
    out = dict(values)
    for name in identity:
        if name not in out:
            continue
        column = np.array(out[name], dtype=np.float64)  # a copy: cached arrays are not changed
        if scoring.identity_clamp:
            column = np.maximum(column, 0.0)  # NaN stays NaN
        if scoring.no_face == "drop":
            column[~detected] = np.nan
        out[name] = column
    return out


def load_scorers(names: Sequence[str], scoring: ScoringConfig, context) -> list:
    """The scorer objects of ``names`` with their settings; settings for an unknown scorer are an error."""
    from f2d_bench.scorers import SCORERS, check_scoring

    check_scoring(names, scoring.settings)
    return [SCORERS.load(name)(dict(scoring.settings.get(name, {})), context) for name in names]


def metric_declarations(scorers) -> list[dict]:
    """Each scorer's MetricSpecs as recorded in ``scoring.json`` (the MetricCatalog's source)."""
    return [asdict(m) | {"scorer": s.name, "note": s.note(), "identity": s.uses_faces}
            for s in scorers for m in s.metrics]


#: The lock's message when another process scores the same shard (RunStore's message for generate).
SCORE_BUSY = "another process is scoring"
#: Outputs of the assembly, written only under the assembly lock: their temporary files are removable there.
_ASSEMBLED = ("records.parquet", "table1.csv", "scoring.json", "fid.json")


class ScoreSession:
    """A run's scoring with what it needs loaded once: input faces, face detector, scorer objects.

    :meth:`work` computes and caches the missing values of one shard's images; :meth:`assemble` those of
    the whole run and writes the records. A Ray worker keeps one session across its shards, so each
    scorer's model loads once per worker. ``scorers``: names (default: the run config's, else all
    built-ins); ``scoring``: the settings (default: the run config's); ``require_images``: refuse a run
    without images (``generate --score`` opens its session before the first image).
    """

    def __init__(self, run_dir: str | Path, *, scorers: Sequence[str] | None = None,
                 scoring: ScoringConfig | None = None, progress: bool = True, require_images: bool = True):
        from f2d_bench.faces.detect import FaceDetector
        from f2d_bench.prompts import load_prompt_set
        from f2d_bench.scorers import DEFAULT_SCORERS, SCORERS
        from f2d_bench.scorers.base import ScoringContext

        self.run = run = RunDir(run_dir)
        self.run_dir = Path(run_dir)
        self.grid = run.read_grid()
        config = run.config()
        self.scoring = scoring = scoring or config.scoring
        self.names = list(dict.fromkeys(scorers or scoring.scorers or DEFAULT_SCORERS))  # each once, in order
        self.prompt_set = load_prompt_set(run.prompts_yaml)
        self.faces = run_faces(run, config)
        if require_images and not any(run.store.has_image(k) for k in run.keys()):
            raise F2DBenchError(f"{run.root} has no images yet; run f2d-bench generate first")
        self.progress = progress
        self.device = str(resolve_device(scoring.device))
        self.detector = FaceDetector(device=self.device)
        self.context = context = ScoringContext(
            prompt_set=self.prompt_set, device=self.device, precision=scoring.precision,
            input_detections=input_face_detections(self.faces, self.detector))
        # Scorers of earlier score calls keep their columns (from their caches) when --scorers names a subset.
        previous = [str(s["name"]) for s in run.scoring_info().get("scorers", [])]
        self.kept = [n for n in previous if n not in self.names and n in SCORERS.names()]
        self.scorer_objs = load_scorers(self.names + self.kept, scoring, context)
        self.face_sha = {f["face_id"]: f["sha256"] for f in self.grid["faces"]}
        self.face_stage = face_stage_id(scoring)
        self._fid_backend = None
        self._can_read: dict[str, bool] = {}

    @property
    def settings_id(self) -> str:
        """What a shard's mark must match to count towards the assembly: the caches it filled."""
        fid = [self.scoring.fid_backend, self.scoring.fid_weights] if self.scoring.fid_reference else None
        return canonical_hash({"faces": self.face_stage, "fid": fid,
                               "scorers": [s.cache_id for s in self.scorer_objs if s.name in self.names]}, 10)

    def _bar(self, seq, desc):
        from tqdm.auto import tqdm

        return tqdm(seq, desc=desc, unit="img", disable=not self.progress or not seq, dynamic_ncols=True)

    def _lock(self, tag: str, *, wait: bool):
        """The writer lock of ``tag`` (``all``: assemblies and unsharded scores, which wait for each other)."""
        path = self.run.score_lock_path(tag)
        if wait:
            return exclusive_lock(path, waiting=lambda: print(
                f"waiting for another score of {self.run.root} to finish", file=sys.stderr, flush=True))
        return exclusive_lock(path, busy=f"{SCORE_BUSY} {tag} of {self.run.root}; wait for it to finish")

    def _remove_temporary(self, tag: str) -> None:
        """What a killed process holding ``tag``'s lock left half-written (call with that lock held)."""
        for folder in self.run.cache_dirs():
            ChunkCache(folder, tag).remove_temporary()
        if tag != "all":
            return
        marks = self.run.score_shards_dir
        for folder in (self.run.root, self.run.scores_dir, marks):
            for path in folder.glob(".*.tmp") if folder.is_dir() else []:
                name = final_name(path.name)
                if name in _ASSEMBLED or (folder == marks and name and name.endswith(".json")):
                    path.unlink(missing_ok=True)

    def _fid(self):
        if self._fid_backend is None:
            self._fid_backend = make_fid_backend(self.scoring, self.device)
        return self._fid_backend

    def _compute(self, entries: Sequence[ImageEntry], owned: Sequence[ImageEntry], writer: str):
        """Cache every missing value of ``owned`` (``entries``: those and their reference images).
        Returns (detections, reference function, scorer -> rows computed).

        The images are walked in blocks of ``scoring.block_size`` (:class:`~.walk.StageWalk`): each
        image of a block that any stage still needs is decoded once (in ``scoring.workers`` threads,
        while the previous block is scored) and given to the face stage, every scorer and the FID
        features. The face stage and FID run with CUDA's TF32 as ``scoring.precision`` says (each scorer
        under its own precision), the same in every process and in ``generate --score``.
        """
        from f2d_bench.scorers.base import tf32_scope

        size = self.scoring.block_size
        blocks = [owned[i:i + size] for i in range(0, len(owned), size)]
        with tf32_scope(self.scoring.precision == "tf32"):
            walk = StageWalk(self, writer, progress=True, total=len(owned))
            walk.know(entries, owned)
            finished = False
            try:
                if blocks:
                    walk.prefetch(blocks[0])
                for k, block in enumerate(blocks):
                    walk.step(block, blocks[k + 1] if k + 1 < len(blocks) else [])
                finished = True
            finally:
                detections = walk.close(finished=finished)
        return detections, walk.reference, walk.computed

    def load_models(self) -> None:
        """Load every model this session runs now (the face detector, the scorers', FID's Inception)
        rather than on first use."""
        self.detector.load()
        for scorer in self.scorer_objs:
            if scorer.name in self.names:
                scorer.load()
        if self.scoring.fid_reference:
            self._fid().model()

    def _cached(self, scorer, reference, writer: str) -> CachedScorer:
        return CachedScorer(scorer, self.run, reference=reference, face_sha=self.face_sha,
                            face_stage=self.face_stage, writer=writer)

    def work(self, shard: Shard) -> dict:
        """Compute and cache what ``shard``'s images lack, holding its lock; writes no records.
        Returns ``{"shard", "images", "computed", "seconds"}`` (computed: scorer -> rows)."""
        start = time.perf_counter()
        entries = run_images(self.run, shard)
        owned = [e for e in entries if shard.owns(e.key)]
        with self._lock(shard.tag, wait=False):
            self._remove_temporary(shard.tag)
            _, _, computed = self._compute(entries, owned, shard.tag)
        return {"shard": shard.tag, "images": len(owned), "computed": computed,
                "seconds": time.perf_counter() - start}

    def finish_shard(self, shard: Shard, work: dict) -> ScoreSummary:
        """Mark ``shard`` done; the shard that completes the set of N assembles the records (which clears
        the marks). Returns the assembled summary, or the shard's own."""
        marks = self.run.score_shards_dir
        with self._lock("all", wait=True):
            atomic_write_json(marks / f"{shard.tag}.json", {"settings": self.settings_id, "images": work["images"]})
            waiting = []
            for i in range(1, shard.count + 1):
                mark = marks / f"{Shard(i, shard.count).tag}.json"
                try:
                    done = json.loads(mark.read_text(encoding="utf-8")).get("settings") == self.settings_id
                except (OSError, ValueError):
                    done = False
                if not done:
                    waiting.append(f"{i}/{shard.count}")
            if not waiting:
                summary = self._assemble(computed=work["computed"])
                summary.shard = f"{shard.index}/{shard.count}"
                return summary
        return ScoreSummary(self.run_dir, self.run.records_parquet, work["images"], computed=work["computed"],
                            seconds=work["seconds"], shard=f"{shard.index}/{shard.count}", assembled=False,
                            waiting=waiting)

    def assemble(self, computed: dict[str, int] | None = None) -> ScoreSummary:
        """Score the whole run (what is missing) and write the records, holding the assembly lock.
        ``computed``: rows computed elsewhere for this run (Ray workers), added to the summary's counts."""
        with self._lock("all", wait=True):
            return self._assemble(computed)

    def _assemble(self, computed: dict[str, int] | None = None) -> ScoreSummary:
        start = time.perf_counter()
        run, scoring = self.run, self.scoring
        self._remove_temporary("all")
        entries = run_images(run)
        if not entries:
            raise F2DBenchError(f"{run.root} has no images yet; run f2d-bench generate first")
        by_key = {e.key: e for e in entries}
        missing = [k.as_string() for k in run.keys() if k not in by_key]
        detections, reference, now = self._compute(entries, entries, "all")
        summary = ScoreSummary(self.run_dir, run.records_parquet, len(entries), missing=missing)
        summary.computed = {name: now[name] + (computed or {}).get(name, 0) for name in now}
        values: dict[str, Any] = {}
        for scorer in self.scorer_objs:
            summary.notes[scorer.name] = scorer.note() or ""
            values.update(self._cached(scorer, reference, "all").values(entries))

        declared = metric_declarations(self.scorer_objs)
        catalog = MetricCatalog(tuple(declared))
        identity = [m["name"] for m in declared if m["identity"]]
        detected = np.array([bool(detections.loc[e.sha256, "face_detected"]) for e in entries], dtype=bool)
        values = identity_conventions(values, identity, detected, scoring)
        records = assemble_records(run, entries, detections, self.prompt_set, values, catalog)
        atomic_write_parquet(run.records_parquet, records)
        from f2d_bench.aggregate.tables import method_means

        summary.table = method_means(records, catalog)
        atomic_write_bytes(run.table1_csv, summary.table.to_csv().encode("utf-8"))
        if scoring.fid_reference:
            summary.fid = compute_fid(run, entries, scoring, self.device, self._bar, backend=self._fid())
            atomic_write_json(run.fid_json, summary.fid)
        elif run.fid_json.is_file():  # an earlier FID stays, marked where the images changed since
            earlier = run.fid_results()
            marked = mark_stale_fid(earlier, entries, run.read_grid()["prompt_set"]["reference_id"])
            if marked != earlier:
                atomic_write_json(run.fid_json, marked)
        atomic_write_json(run.scoring_json, {
            "scoring": scoring.to_dict(complete=True) | {"scorers": self.names + self.kept},
            "scorers": [s.describe() for s in self.scorer_objs],
            "face_detector": "facenet-pytorch MTCNN", "face_policy": scoring.face_policy,
            "input_face_rule": INPUT_FACE_RULE, "min_face_prob": scoring.min_face_prob,
            "identity_clamp": scoring.identity_clamp, "no_face": scoring.no_face, "metrics": declared,
        })
        if run.score_shards_dir.is_dir():  # the marks of every earlier round, of any N: assembled now
            for mark in run.score_shards_dir.glob("shard-*-of-*.json"):
                mark.unlink(missing_ok=True)
        summary.no_face_rule = ("identity metrics 0.0" if scoring.no_face == "zero"
                                else "identity metrics empty, left out of the means")
        summary.errors = int(records["error"].notna().sum())
        summary.unreadable = records.loc[records["error"].notna(), "error"].head(3).tolist()
        summary.no_face = int((~records["face_detected"] & records["error"].isna()).sum())
        summary.seconds = time.perf_counter() - start
        return summary


def score_run(
    run_dir: str | Path, *, scorers: Sequence[str] | None = None, scoring: ScoringConfig | None = None,
    progress: bool = True, shard: Shard = UNSHARDED, computed: dict[str, int] | None = None,
) -> ScoreSummary:
    """Score the images of ``run_dir`` with ``scorers`` (default: the run config's, else all built-ins).

    Unsharded: everything, then records.parquet. ``shard`` (count > 1): only that shard's images, into
    the caches; records.parquet only when this shard completes the set of N (see the module docstring).
    ``computed``: rows computed elsewhere for this run (the Ray driver's workers), for the summary.
    """
    start = time.perf_counter()
    session = ScoreSession(run_dir, scorers=scorers, scoring=scoring, progress=progress)
    if shard.count == 1:
        summary = session.assemble(computed)
    else:
        summary = session.finish_shard(shard, session.work(shard))
    summary.seconds = time.perf_counter() - start
    return summary
