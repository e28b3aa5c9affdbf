"""The numbers of a report as DataFrames, and their CSV / JSON files beside the page.

Every number shown in the HTML comes from one of these frames, so the files beside the page hold exactly
what the page shows (at full precision).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from f2d_bench.aggregate.bootstrap import face_bootstrap_ci, paired_differences
from f2d_bench.aggregate.breakdown import PROMPT_CATEGORIES, category_means, top_k_marks
from f2d_bench.aggregate.tables import method_means, prompt_rows
from f2d_bench.report.data import ReportData, time_summary


@dataclass
class Aggregates:
    table1: pd.DataFrame  # index method: label, c, c_lo, c_hi per Table 1 column, face_detection_rate, ...
    table1_marks: dict
    table2: pd.DataFrame  # index method: label, fid, fid_backend, fid_n_generated, fid_n_reference, ...
    table2_marks: dict
    categories: pd.DataFrame  # index (method, category): Table 1 columns
    category_marks: dict  # category -> marks over methods
    pairs: pd.DataFrame  # method_a, method_b, column, diff, lo, hi, p_a_better, n_faces
    best_of_n: pd.DataFrame  # run, column, method, method_label, n, variant, value, n_pairs
    confidence: float
    n_resamples: int
    notes: dict = field(default_factory=dict)
    #: index method: ``<metric>_zero`` (images without a face count 0.0) and ``<metric>_detected`` (over
    #: images with a detected face only) per identity metric, and ``n_images`` / ``n_detected``
    identity_both_ways: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: index face: identity means over every method's prompt images, detection rate, input quality, flags
    per_face: pd.DataFrame = field(default_factory=pd.DataFrame)


def compute_aggregates(data: ReportData, *, n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> Aggregates:
    records = data.records
    catalog = data.catalog
    columns = [c for c in catalog.table1_columns if c in records.columns]
    means = method_means(records, catalog)
    ci = face_bootstrap_ci(records, columns, n_resamples=n_resamples, confidence=confidence, seed=seed)
    table1 = pd.DataFrame(index=means.index)
    table1["label"] = means["label"]
    for c in columns:
        table1[c] = means[c]  # the same estimate as method_means (the bootstrap's point is equal)
        table1[f"{c}_lo"] = ci[f"{c}_lo"].reindex(means.index)
        table1[f"{c}_hi"] = ci[f"{c}_hi"].reindex(means.index)
    for c in ("face_detection_rate", "n_images", "n_hmean", "n_errors"):
        if c in means.columns:
            table1[c] = means[c]
    table1["n_faces"] = ci["n_faces"].reindex(means.index)
    hib = catalog.higher_is_better()
    marks1 = top_k_marks(table1, columns + ["face_detection_rate"], k=3, higher_is_better=hib)

    table2 = _table2(data, means)
    ranked = table2.copy()
    if len(ranked):  # an FID over images that changed since is shown, marked, and not ranked
        ranked.loc[ranked["fid_stale"].notna(), "fid"] = np.nan
    marks2 = top_k_marks(ranked, ["fid", "encode_median_s"], k=3,
                         higher_is_better={"fid": False, "encode_median_s": False})

    cats = category_means(records, columns)
    cat_marks = {}
    for cat in PROMPT_CATEGORIES:
        if len(cats) and cat in cats.index.get_level_values("category"):
            part = cats.xs(cat, level="category")
            cat_marks[cat] = top_k_marks(part, columns, k=3, higher_is_better=hib)

    pair_cols = [c for c in ("hmean", "gmean") if c in records.columns]
    pairs = (paired_differences(records, pair_cols, n_resamples=n_resamples, confidence=confidence, seed=seed)
             if pair_cols and records["method"].nunique() > 1 else
             pd.DataFrame(columns=["method_a", "method_b", "column", "diff", "lo", "hi", "p_a_better", "n_faces"]))

    frames = []
    for run in data.runs:
        for curve in run.best_of_n:
            frame = pd.read_csv(curve.csv)
            frame.insert(0, "run", run.index)
            frame.insert(1, "column", curve.column)
            frames.append(frame)
    best = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    identity = [m for m in identity_columns(catalog) if m in records.columns]
    return Aggregates(table1, marks1, table2, marks2, cats, cat_marks, pairs, best, confidence, n_resamples,
                      identity_both_ways=identity_both_ways(records, identity),
                      per_face=per_face_results(records, identity, data.face_quality(), data.face_sources()))


def identity_columns(catalog) -> list[str]:
    """Every identity metric, in or out of hMean/gMean (dlib is out, and still an identity check)."""
    return [s["name"] for s in catalog.specs if s.get("identity")]


QUALITY_COLUMNS = ("source_crop_px", "upscale", "padding_share", "prob", "faces_in_crop")


def _with_zero(rows: pd.DataFrame, metric: str) -> pd.Series:
    """The metric with 0.0 for images without a face (whatever ``scoring.no_face`` stored there)."""
    return rows[metric].where(rows["face_detected"].astype(bool), 0.0)


def identity_both_ways(records: pd.DataFrame, identity: list[str]) -> pd.DataFrame:
    """Per method, each identity metric's mean both ways: no-face images as 0.0 (the paper, FastComposer)
    and over detected faces only (CelebBasis drops images without a face). Prompt images, no errors."""
    rows = prompt_rows(records)
    if not len(rows) or not identity:
        return pd.DataFrame()
    detected = rows["face_detected"].astype(bool)
    out = pd.DataFrame(index=sorted(rows["method"].unique()))
    out.index.name = "method"
    out["label"] = rows.groupby("method")["method_label"].first()
    for m in identity:
        out[f"{m}_zero"] = _with_zero(rows, m).groupby(rows["method"]).mean()
        out[f"{m}_detected"] = rows[m].where(detected).groupby(rows["method"]).mean()
    out["n_images"] = rows.groupby("method").size()
    out["n_detected"] = detected.groupby(rows["method"]).sum()
    return out


def per_face_results(records: pd.DataFrame, identity: list[str], quality: dict[str, dict],
                     sources: dict[str, str] | None = None) -> pd.DataFrame:
    """Per input face: each identity metric's mean over every method's prompt images (no-face images as
    0.0), the face detection rate, the image count, the face's input-quality record and flags, and the
    source it was prepared from (``source``: file name, and frame of a video; "" when not recorded)."""
    rows = prompt_rows(records)
    faces = sorted(set(rows["face"].unique()) | set(quality)) if len(rows) else sorted(quality)
    out = pd.DataFrame(index=pd.Index(faces, name="face"))
    if len(rows):
        by_face = rows.groupby("face")
        for m in identity:
            out[m] = _with_zero(rows, m).groupby(rows["face"]).mean()
        out["face_detection_rate"] = by_face["face_detected"].mean()
        out["n_images"] = by_face.size()
    for col in QUALITY_COLUMNS:
        out[col] = [quality.get(f, {}).get(col, np.nan) for f in faces]
    out["quality_recorded"] = [f in quality for f in faces]
    out["flags"] = [", ".join(quality.get(f, {}).get("flags", [])) for f in faces]  # "" when none
    out["source"] = [(sources or {}).get(f, "") for f in faces]
    return out


def _table2(data: ReportData, means: pd.DataFrame) -> pd.DataFrame:
    info = data.method_info()
    fid = data.fid()
    times = data.prepare_seconds()
    methods = list(means.index) + sorted(set(info) - set(means.index))
    rows = []
    for mid in methods:
        m = info.get(mid, {})
        label = means["label"].get(mid) if mid in means.index else (m.get("label") or m.get("name") or mid)
        f = fid.get(mid, {})
        t = time_summary(times.get(mid, []))
        rows.append({
            "method": mid, "label": label,
            "fid": f.get("value", np.nan), "fid_backend": f.get("backend"),
            "fid_n_generated": f.get("n_generated"), "fid_n_reference": f.get("n_reference"),
            "fid_stale": f.get("stale"),
            "trained_params": _number(m.get("trained_params")),
            "weights": m.get("weights"),
            "encode_median_s": t["median"] if t["median"] is not None else np.nan,
            "encode_mean_s": t["mean"] if t["mean"] is not None else np.nan,
            "encode_n_faces": t["n"],
        })
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating,)):
        return _json_safe(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """A frame (index included) as JSON-ready rows; NaN becomes null."""
    flat = frame.reset_index() if frame.index.name or any(frame.index.names) else frame
    return [{str(k): _json_safe(v) for k, v in row.items()} for row in flat.to_dict(orient="records")]


def write_aggregate_files(agg: Aggregates, out_dir: Path, extra: dict | None = None) -> dict[str, str]:
    """table1/table2/categories/paired(/best_of_n) as CSV and JSON in ``out_dir``, plus aggregates.json.

    Returns name -> CSV file name (relative to ``out_dir``) for the page's links.
    """
    from f2d_bench.files import atomic_write_bytes, atomic_write_text

    files = {}
    frames = {"table1": agg.table1, "table2": agg.table2, "categories": agg.categories, "paired": agg.pairs,
              "identity_both_ways": agg.identity_both_ways, "per_face": agg.per_face}
    if len(agg.best_of_n):
        frames["best_of_n"] = agg.best_of_n
    everything: dict = {"confidence": agg.confidence, "n_resamples": agg.n_resamples, **(extra or {})}
    for name, frame in frames.items():
        index = bool(frame.index.name or any(frame.index.names))
        atomic_write_bytes(out_dir / f"{name}.csv", frame.to_csv(index=index).encode("utf-8"))
        rows = frame_records(frame)
        atomic_write_text(out_dir / f"{name}.json", json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
        everything[name] = rows
        files[name] = f"{name}.csv"
    atomic_write_text(out_dir / "aggregates.json", json.dumps(everything, indent=1, ensure_ascii=False) + "\n")
    return files
