"""`f2d-bench score`: every metric of every image of a run, cached, resumable, into records.parquet.

Stages, each cached under ``RUN/scores/`` by the hash of what went in:

1. faces: MTCNN on each generated image (boxes, 5 landmarks, probability), one face chosen by the
   recorded policy; unreadable images get their error here and no metric later.
2. one folder per scorer and settings (``<name>-<hash>/``): chunk files of per-image values, each
   written atomically. A row is reused only when the image, its reference image and the input face
   are byte-identical to those it was computed from, so a regenerated image is rescored.
3. ``records.parquet``: one row per image with every metric as a column, hMean and gMean.

A score run killed at any moment leaves whole chunk files only; the next run computes what is missing
and ends with the same table as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from f2d_bench.config import RunConfig, ScoringConfig, config_from_dict
from f2d_bench.errors import F2DBenchError
from f2d_bench.faces.faceset import Face
from f2d_bench.grid import ItemKey
from f2d_bench.run_dir import RunDir
from f2d_bench.store import atomic_write_bytes, atomic_write_json, file_sha256

FACE_STAGE_VERSION = "1"


@dataclass
class ImageEntry:
    key: ItemKey
    path: Path
    sha256: str
    reference_key: ItemKey | None


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

    def text(self) -> str:
        lines = [f"scored {self.n_images} images of {self.run_dir} in {self.seconds:.1f} s"]
        for name, n in self.computed.items():
            note = f"  [{self.notes[name]}]" if self.notes.get(name) else ""
            lines.append(f"  {name}: {n} computed, {self.n_images - n} from cache{note}")
        lines.append(f"  no face detected: {self.no_face} images (identity metrics 0.0, face_detected false)")
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


# -- small helpers ----------------------------------------------------------------------------------


def _write_parquet(path: Path, frame) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def _read_chunks(folder: Path):
    """All chunk files of a cache folder as one frame (later chunks win for the same row)."""
    import pandas as pd

    files = sorted(folder.glob("chunk-*.parquet")) if folder.is_dir() else []
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except Exception:  # a file that is not whole cannot come from an atomic write: ignore it
            continue
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    return frame.drop_duplicates(subset=["cache_key"], keep="last")


def _next_chunk_path(folder: Path) -> Path:
    existing = sorted(folder.glob("chunk-*.parquet"))
    n = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    return folder / f"chunk-{n:06d}.parquet"


class _ChunkWriter:
    """Collects cache rows and writes them as whole chunk files of ``size`` rows (the rest on ``close``)."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size, self.rows = folder, size, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.size:
            self.close()

    def close(self) -> None:
        if self.rows:
            import pandas as pd

            _write_parquet(_next_chunk_path(self.folder), pd.DataFrame(self.rows))
            self.rows = []


def _batched(seq: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


# -- the run's images -------------------------------------------------------------------------------


def run_images(run: RunDir) -> list[ImageEntry]:
    """Every existing image of the run with its hash and its reference image's key.

    Hashes are taken from the files, not the manifest, so an image changed by any means is rescored.
    """
    grid = run.read_grid()
    ref_id = grid["prompt_set"]["reference_id"]
    entries = []
    for key in run.keys():
        path = run.store.image_path(key)
        if not path.is_file():
            continue
        sha = file_sha256(path)
        ref = None if key.prompt_id == ref_id else ItemKey(key.method_id, key.face_id, ref_id, key.seed)
        entries.append(ImageEntry(key, path, sha, ref))
    return entries


def run_config(run: RunDir) -> RunConfig:
    """The config a run was generated with (``run.json``)."""
    run.read_grid()  # a clear error when ``run`` is not a run directory
    path = run.root / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise F2DBenchError(f"{path} is missing or damaged ({exc}); the run's config cannot be read") from None
    return config_from_dict(data, str(path))


def run_faces(run: RunDir, config: RunConfig) -> dict[str, Face]:
    """The run's input faces, checked against the hashes recorded when the run was made."""
    from f2d_bench.faceset_source import resolve_face_set

    grid = run.read_grid()
    # The face directory resolved at generation time: a relative `faces:` path then still works when
    # scoring from another working directory.
    recorded = json.loads((run.root / "run.json").read_text(encoding="utf-8")).get("faces_dir") or []
    source = recorded[0] if len(recorded) == 1 and Path(recorded[0]).is_dir() else config.faces
    faces = {f.face_id: f for f in resolve_face_set(source)}
    out = {}
    for entry in grid["faces"]:
        face = faces.get(entry["face_id"])
        if face is None:
            raise F2DBenchError(f"input face {entry['face_id']!r} of {run.root} is no longer in {config.faces}")
        if file_sha256(face.path) != entry["sha256"]:
            raise F2DBenchError(f"input face {face.path} changed since {run.root} was generated; "
                                "identity scores would compare against another photo")
        out[face.face_id] = face
    return out


# -- stage 1: faces in generated images -------------------------------------------------------------


def choose_face(detections, policy: str, min_prob: float):
    """The detection that counts under ``policy`` among those at or above ``min_prob`` (None if none)."""
    found = [d for d in detections if d.prob >= min_prob]
    if not found:
        return None, 0
    pick = max(found, key=(lambda d: d.area) if policy == "largest" else (lambda d: d.prob))
    return pick, len(found)


def _face_stage_identity(scoring: ScoringConfig) -> dict:
    return {"stage": "faces", "version": FACE_STAGE_VERSION, "policy": scoring.face_policy,
            "min_prob": scoring.min_face_prob, "detector": "facenet-pytorch MTCNN"}


def face_stage_id(scoring: ScoringConfig) -> str:
    """``faces-<hash>``: the folder of the face stage, and part of face-dependent scorers' cache keys."""
    from f2d_bench.config import canonical_hash

    return f"faces-{canonical_hash(_face_stage_identity(scoring), 10)}"


def detect_faces(run: RunDir, entries: list[ImageEntry], scoring: ScoringConfig, detector, progress) -> "Any":
    """Stage 1, cached: per image sha, the chosen face (or none) and any read error."""

    from f2d_bench.faces.imageio import read_image

    ident = _face_stage_identity(scoring)
    folder = run.root / "scores" / face_stage_id(scoring)
    atomic_write_json(folder / "stage.json", ident)
    cached = _read_chunks(folder)
    have = set(cached["cache_key"]) if cached is not None else set()
    todo = [e for e in entries if e.sha256 not in have]
    writer = _ChunkWriter(folder, scoring.chunk_size)
    for e in progress(todo, "faces"):
        row: dict[str, Any] = {"cache_key": e.sha256, "error": None, "face_detected": False,
                               "face_prob": np.nan, "n_faces": 0, "face_box": None, "face_landmarks": None}
        try:
            image = read_image(e.path)
        except F2DBenchError as exc:
            row["error"] = str(exc)
        else:
            pick, n = choose_face(detector.detect(image), scoring.face_policy, scoring.min_face_prob)
            row["n_faces"] = n
            if pick is not None:
                row.update(face_detected=True, face_prob=pick.prob, face_box=list(pick.box),
                           face_landmarks=pick.landmarks.reshape(-1).tolist())
        writer.add(row)
    writer.close()
    return _read_chunks(folder).set_index("cache_key")


def _detection_from_row(row):
    from f2d_bench.faces.detect import Detection

    if not row["face_detected"]:
        return None
    return Detection(box=tuple(row["face_box"]), landmarks=np.asarray(row["face_landmarks"]).reshape(5, 2),
                     prob=float(row["face_prob"]))


# -- stage 2: scorers -------------------------------------------------------------------------------


def _load_scorers(names: Sequence[str], scoring: ScoringConfig, context) -> list:
    from f2d_bench.scorers import SCORERS

    scorers = []
    for name in names:
        cls = SCORERS.load(name)
        scorers.append(cls(dict(scoring.settings.get(name, {})), context))
    unknown = sorted(set(scoring.settings) - set(names) - set(SCORERS.names()))
    if unknown:
        raise F2DBenchError(f"scoring.settings.{unknown[0]}: no such scorer; installed: {', '.join(SCORERS.names())}")
    return scorers


def score_run(
    run_dir: str | Path, *, scorers: Sequence[str] | None = None, scoring: ScoringConfig | None = None,
    progress: bool = True,
) -> ScoreSummary:
    """Score every image of ``run_dir`` with ``scorers`` (default: the run config's, else all built-ins)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from f2d_bench.faces.detect import FaceDetector
    from f2d_bench.faces.imageio import read_image
    from f2d_bench.prompts import load_prompt_set
    from f2d_bench.scorers import DEFAULT_SCORERS
    from f2d_bench.scorers.base import ScoreItem, ScoringContext

    start = time.perf_counter()
    run = RunDir(run_dir)
    grid = run.read_grid()
    config = run_config(run)
    scoring = scoring or config.scoring
    names = list(dict.fromkeys(scorers or scoring.scorers or DEFAULT_SCORERS))  # each once, in order
    prompt_set = load_prompt_set(run.root / "prompts.yaml")
    faces = run_faces(run, config)
    entries = run_images(run)
    if not entries:
        raise F2DBenchError(f"{run.root} has no images yet; run f2d-bench generate first")
    by_key = {e.key: e for e in entries}
    face_sha = {f["face_id"]: f["sha256"] for f in grid["faces"]}

    def bar(seq, desc):
        return tqdm(seq, desc=desc, unit="img", disable=not progress or not seq, dynamic_ncols=True)

    def readable(e: ImageEntry) -> bool:
        return pd.isna(detections.loc[e.sha256, "error"])

    def reference(e: ImageEntry) -> ImageEntry | None:
        """The same method's reference image for this face and seed, if it exists and is readable."""
        ref = by_key.get(e.reference_key) if e.reference_key else None
        return ref if ref is not None and readable(ref) else None

    device = _scoring_device(scoring.device)
    detector = FaceDetector(device=device)
    detections = detect_faces(run, entries, scoring, detector, bar)
    input_det = {}
    for fid, face in faces.items():
        pick, _ = choose_face(detector.detect(read_image(face.path)), "largest", 0.0)
        input_det[fid] = pick
    context = ScoringContext(prompt_set=prompt_set, device=device, input_detections=input_det)
    # Scorers of earlier score calls keep their columns (from their caches) when --scorers names a subset.
    from f2d_bench.scorers import SCORERS

    kept = [n for n in _previous_scorers(run) if n not in names and n in SCORERS.names()]
    scorer_objs = _load_scorers(names + kept, scoring, context)

    summary = ScoreSummary(Path(run_dir), run.root / "records.parquet", len(entries))
    metric_frames = []
    for scorer in scorer_objs:
        folder = run.root / "scores" / scorer.cache_id
        atomic_write_json(folder / "scorer.json", scorer.describe())
        cached = _read_chunks(folder)
        have = set(cached["cache_key"]) if cached is not None else set()

        # Identity scores depend on which face the face stage chose, so its settings are in their key.
        faces_part = face_stage_id(scoring) if scorer.uses_faces else "-"

        def cache_key(e: ImageEntry, faces_part=faces_part) -> str:
            ref = reference(e)
            parts = [e.key.as_string(), e.sha256, ref.sha256 if ref else "-", face_sha[e.key.face_id], faces_part]
            return hashlib.sha256("|".join(parts).encode()).hexdigest()

        todo = [e for e in entries if readable(e) and cache_key(e) not in have] if scorer.name in names else []
        if scorer.name in names:
            summary.computed[scorer.name] = len(todo)
        summary.notes[scorer.name] = scorer.note() or ""
        pbar = bar(todo, scorer.name)
        writer = _ChunkWriter(folder, scoring.chunk_size)
        for batch in _batched(todo, scoring.batch_size):
            items = []
            for e in batch:
                ref = reference(e)
                items.append(ScoreItem(
                    key=e.key, image=read_image(e.path), prompt=prompt_set.by_id(e.key.prompt_id),
                    face=faces[e.key.face_id], reference_path=ref.path if ref else None,
                    detection=_detection_from_row(detections.loc[e.sha256]),
                ))
            values = scorer.score(items)
            if len(values) != len(items):
                raise RuntimeError(f"scorer {scorer.name} returned {len(values)} rows for {len(items)} images")
            for e, v in zip(batch, values):
                writer.add({"cache_key": cache_key(e), **{m.name: _as_float(v.get(m.name)) for m in scorer.metrics}})
            pbar.update(len(batch))
        writer.close()
        pbar.close()
        frame = _read_chunks(folder)
        cols = [m.name for m in scorer.metrics]
        table = frame.set_index("cache_key")[cols] if frame is not None else pd.DataFrame(columns=cols)
        metric_frames.append((scorer, table, cache_key))

    records = _assemble(run, grid, entries, detections, metric_frames, prompt_set)
    _write_parquet(summary.records_path, records)
    from f2d_bench.aggregate.tables import method_means

    table = method_means(records)
    atomic_write_bytes(run.root / "table1.csv", table.to_csv().encode("utf-8"))
    summary.table = table
    if scoring.fid_reference:
        summary.fid = compute_fid(run, entries, grid, scoring, device, bar)
        atomic_write_json(run.root / "scores" / "fid.json", summary.fid)
    atomic_write_json(run.root / "scores" / "scoring.json", {
        "scoring": config.to_dict()["scoring"] | {"scorers": names + kept},
        "scorers": [s.describe() for s in scorer_objs],
        "face_detector": "facenet-pytorch MTCNN", "face_policy": scoring.face_policy,
        "min_face_prob": scoring.min_face_prob, "metrics": _metric_specs(scorer_objs),
    })
    summary.errors = int(records["error"].notna().sum())
    summary.no_face = int((~records["face_detected"] & records["error"].isna()).sum())
    summary.seconds = time.perf_counter() - start
    return summary


def compute_fid(run: RunDir, entries: list[ImageEntry], grid: dict, scoring: ScoringConfig, device: str,
                progress) -> dict:
    """FID of each method's prompt images against ``scoring.fid_reference``.

    Inception features are cached per image (``scores/fid-<hash>/``), so any grouping can be computed
    later and a regenerated image is re-embedded. Returns method_id -> {value, backend, n_generated,
    n_reference, reference}.
    """
    import pandas as pd

    from f2d_bench.config import canonical_hash
    from f2d_bench.faces.imageio import read_image
    from f2d_bench.scorers.fid import fid_from_features, load_stats, make_backend

    reference = load_stats(scoring.fid_reference)
    backend = make_backend(scoring.fid_backend, weights=scoring.fid_weights, device=device)
    ident = {"stage": "fid-features", "backend": backend.describe()}
    folder = run.root / "scores" / f"fid-{canonical_hash(ident, 10)}"
    atomic_write_json(folder / "stage.json", ident)
    ref_id = grid["prompt_set"]["reference_id"]
    wanted = [e for e in entries if e.key.prompt_id != ref_id]
    cached = _read_chunks(folder)
    have = set(cached["cache_key"]) if cached is not None else set()
    todo = list({e.sha256: e for e in wanted if e.sha256 not in have}.values())
    pbar = progress(todo, "fid")
    for chunk in _batched(todo, scoring.chunk_size):
        images, keep = [], []
        for e in chunk:
            try:
                images.append(read_image(e.path))
                keep.append(e)
            except F2DBenchError:
                continue  # recorded as an error by the faces stage; not part of any FID
        feats = backend.features(images) if images else np.zeros((0, 2048))
        frame = pd.DataFrame({"cache_key": [e.sha256 for e in keep],
                              "features": [f.astype(np.float32).tolist() for f in feats]})
        _write_parquet(_next_chunk_path(folder), frame)
        pbar.update(len(chunk))
    pbar.close()
    table = _read_chunks(folder)
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


def _previous_scorers(run: RunDir) -> list[str]:
    """Names of the scorers the last score call recorded (none before the first)."""
    try:
        data = json.loads((run.root / "scores" / "scoring.json").read_text(encoding="utf-8"))
        return [str(s["name"]) for s in data.get("scorers", [])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []


def _metric_specs(scorers) -> list[dict]:
    from dataclasses import asdict

    return [asdict(m) | {"scorer": s.name, "note": s.note()} for s in scorers for m in s.metrics]


def _assemble(run, grid, entries, detections, metric_frames, prompt_set):
    import pandas as pd

    from f2d_bench.aggregate.combine import MEAN_METRICS, geometric_mean_rows, harmonic_mean_rows

    labels = {m["method_id"]: m.get("label") or m["name"] for m in grid["methods"]}
    rows = []
    for e in entries:
        det = detections.loc[e.sha256]
        prompt = prompt_set.by_id(e.key.prompt_id)
        rows.append({
            "method": e.key.method_id, "method_label": labels.get(e.key.method_id, e.key.method_id),
            "face": e.key.face_id, "prompt": e.key.prompt_id, "category": prompt.category,
            "seed": e.key.seed, "path": e.path.relative_to(run.root).as_posix(), "sha256": e.sha256,
            "face_detected": bool(det["face_detected"]), "face_prob": float(det["face_prob"]),
            "n_faces": int(det["n_faces"]), "error": None if pd.isna(det["error"]) else str(det["error"]),
        })
    records = pd.DataFrame(rows)
    for scorer, table, cache_key in metric_frames:
        keys = [cache_key(e) for e in entries]
        for m in scorer.metrics:
            records[m.name] = table[m.name].reindex(keys).to_numpy(dtype=np.float64)
    present = [m for m in MEAN_METRICS if m in records.columns]
    if len(present) == len(MEAN_METRICS):
        values = records[list(MEAN_METRICS)].to_numpy(dtype=np.float64)
        records["hmean"] = harmonic_mean_rows(values)
        records["gmean"] = geometric_mean_rows(values)
    # The reference prompt's images exist for dCLIP; they are not part of Table 1's averages.
    records["is_reference"] = records["prompt"] == grid["prompt_set"]["reference_id"]
    return records


def _as_float(value) -> float:
    return np.nan if value is None else float(value)


def _scoring_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` must be available."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise F2DBenchError(f"scoring device {name!r}: CUDA is not available on this machine; use cpu or auto")
        return name
    raise F2DBenchError(f"scoring device {name!r} is not one of auto, cpu, cuda, cuda:N")
