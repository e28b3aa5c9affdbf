"""`f2d-bench score`: every metric of every image of a run, cached, resumable, into records.parquet.

Stages, each cached under ``RUN/scores/`` by the hash of what went in:

1. faces (:mod:`.faces`): MTCNN on each generated image, one face chosen by the recorded policy;
2. one chunk cache per scorer and settings (:mod:`.cached_scorer`);
3. ``records.parquet`` (:mod:`.records`), ``table1.csv``, and FID per method when a reference is given.

A score run killed at any moment leaves whole chunk files only; the next run computes what is missing
and ends with the same table as an uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from f2d_bench.aggregate.metrics import MetricCatalog
from f2d_bench.config import ScoringConfig
from f2d_bench.devices import resolve_device
from f2d_bench.errors import F2DBenchError
from f2d_bench.faces.choice import INPUT_FACE_RULE
from f2d_bench.files import atomic_write_bytes, atomic_write_json, atomic_write_parquet
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring.cached_scorer import CachedScorer
from f2d_bench.scoring.faces import detect_faces, detection_from_row, face_stage_id, input_face_detections
from f2d_bench.scoring.fid import compute_fid
from f2d_bench.scoring.inputs import ImageEntry, run_faces, run_images
from f2d_bench.scoring.records import assemble_records


@dataclass
class ScoreSummary:
    run_dir: Path
    records_path: Path
    n_images: int
    computed: dict[str, int] = field(default_factory=dict)  # scorer -> rows computed this time
    errors: int = 0
    no_face: int = 0
    seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)
    table: Any = None  # per-method means (pandas DataFrame)
    fid: dict = field(default_factory=dict)  # method_id -> FID result
    missing: list[str] = field(default_factory=list)  # keys the grid expects whose image does not exist
    no_face_rule: str = "identity metrics 0.0"  # what scoring.no_face did to those images

    def text(self) -> str:
        lines = [f"scored {self.n_images} images of {self.run_dir} in {self.seconds:.1f} s"]
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
            lines.append(f"  unreadable images: {self.errors} (metrics empty, see the `error` column)")
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


def score_run(
    run_dir: str | Path, *, scorers: Sequence[str] | None = None, scoring: ScoringConfig | None = None,
    progress: bool = True,
) -> ScoreSummary:
    """Score every image of ``run_dir`` with ``scorers`` (default: the run config's, else all built-ins)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from f2d_bench.aggregate.tables import method_means
    from f2d_bench.faces.detect import FaceDetector
    from f2d_bench.faces.imageio import read_image
    from f2d_bench.prompts import load_prompt_set
    from f2d_bench.scorers import DEFAULT_SCORERS, SCORERS
    from f2d_bench.scorers.base import ScoreItem, ScoringContext

    start = time.perf_counter()
    run = RunDir(run_dir)
    grid = run.read_grid()
    config = run.config()
    scoring = scoring or config.scoring
    names = list(dict.fromkeys(scorers or scoring.scorers or DEFAULT_SCORERS))  # each once, in order
    prompt_set = load_prompt_set(run.prompts_yaml)
    faces = run_faces(run, config)
    entries = run_images(run)
    if not entries:
        raise F2DBenchError(f"{run.root} has no images yet; run f2d-bench generate first")
    by_key = {e.key: e for e in entries}
    missing = [k.as_string() for k in run.keys() if k not in by_key]

    def bar(seq, desc):
        return tqdm(seq, desc=desc, unit="img", disable=not progress or not seq, dynamic_ncols=True)

    def readable(e: ImageEntry) -> bool:
        return pd.isna(detections.loc[e.sha256, "error"])

    def reference(e: ImageEntry) -> ImageEntry | None:
        """The same method's reference image for this face and seed, if it exists and is readable."""
        ref = by_key.get(e.reference_key) if e.reference_key else None
        return ref if ref is not None and readable(ref) else None

    def item(e: ImageEntry) -> ScoreItem:
        ref = reference(e)
        return ScoreItem(key=e.key, image=read_image(e.path), prompt=prompt_set.by_id(e.key.prompt_id),
                         face=faces[e.key.face_id], reference_path=ref.path if ref else None,
                         detection=detection_from_row(detections.loc[e.sha256]))

    device = str(resolve_device(scoring.device))
    detector = FaceDetector(device=device)
    detections = detect_faces(run, entries, scoring, detector, bar)
    input_det = input_face_detections(faces, detector)
    context = ScoringContext(prompt_set=prompt_set, device=device, input_detections=input_det)
    # Scorers of earlier score calls keep their columns (from their caches) when --scorers names a subset.
    previous = [str(s["name"]) for s in run.scoring_info().get("scorers", [])]
    kept = [n for n in previous if n not in names and n in SCORERS.names()]
    scorer_objs = load_scorers(names + kept, scoring, context)

    summary = ScoreSummary(Path(run_dir), run.records_parquet, len(entries), missing=missing)
    face_sha = {f["face_id"]: f["sha256"] for f in grid["faces"]}
    values: dict[str, Any] = {}
    for scorer in scorer_objs:
        cached = CachedScorer(scorer, run, reference=reference, face_sha=face_sha,
                              face_stage=face_stage_id(scoring))
        if scorer.name in names:
            todo = cached.missing([e for e in entries if readable(e)])
            summary.computed[scorer.name] = len(todo)
            cached.compute(todo, item, batch_size=scoring.batch_size, chunk_size=scoring.chunk_size, progress=bar)
        summary.notes[scorer.name] = scorer.note() or ""
        values.update(cached.values(entries))

    declared = metric_declarations(scorer_objs)
    catalog = MetricCatalog(tuple(declared))
    identity = [m["name"] for m in declared if m["identity"]]
    detected = np.array([bool(detections.loc[e.sha256, "face_detected"]) for e in entries], dtype=bool)
    values = identity_conventions(values, identity, detected, scoring)
    records = assemble_records(run, entries, detections, prompt_set, values, catalog)
    atomic_write_parquet(run.records_parquet, records)
    summary.table = method_means(records, catalog)
    atomic_write_bytes(run.table1_csv, summary.table.to_csv().encode("utf-8"))
    if scoring.fid_reference:
        summary.fid = compute_fid(run, entries, scoring, device, bar)
        atomic_write_json(run.fid_json, summary.fid)
    atomic_write_json(run.scoring_json, {
        "scoring": scoring.to_dict() | {"scorers": names + kept},
        "scorers": [s.describe() for s in scorer_objs],
        "face_detector": "facenet-pytorch MTCNN", "face_policy": scoring.face_policy,
        "input_face_rule": INPUT_FACE_RULE, "min_face_prob": scoring.min_face_prob,
        "identity_clamp": scoring.identity_clamp, "no_face": scoring.no_face, "metrics": declared,
    })
    summary.no_face_rule = ("identity metrics 0.0" if scoring.no_face == "zero"
                            else "identity metrics empty, left out of the means")
    summary.errors = int(records["error"].notna().sum())
    summary.no_face = int((~records["face_detected"] & records["error"].isna()).sum())
    summary.seconds = time.perf_counter() - start
    return summary
