"""`f2d-bench report`: one static HTML page (plus CSS, SVG plots, CSV/JSON and images beside it).

The page opens from disk with no network: the CSS is a file beside it, the only script is inline and
allowed by its hash in the page's Content-Security-Policy, plots are SVG files, and every image shown is
copied into the report folder. Every user-supplied string (prompts, ids, labels, paths) goes through
jinja2's autoescaping, and before the page is written every href/src in it is checked to point at a
file inside the report folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from f2d_bench import __version__
from f2d_bench.aggregate.breakdown import PROMPT_CATEGORIES
from f2d_bench.errors import F2DBenchError
from f2d_bench.report.numbers import (
    Aggregates,
    compute_aggregates,
    identity_columns,
    write_aggregate_files,
)
from f2d_bench.aggregate.metrics import COMBINED, PROTOCOL_MEAN, MetricCatalog
from f2d_bench.aggregate.tables import prompt_rows
from f2d_bench.report.data import ReportData, load_runs, scoring_differences
from f2d_bench.report.plots import (
    COLUMN_NAMES,
    plot_categories,
    plot_means,
    plot_tradeoff,
)
from f2d_bench.report.index import AGGREGATES, INDEX_HTML, INDEX_JSON, REPORT_FORMAT, write_index
from f2d_bench.report.page import (TEMPLATES, check_links_inside, environment, fmt, inline_hash, page_links,
                                   setup_text)
from f2d_bench.report.page import finite as _finite
from f2d_bench.report.thumbnails import export_image, inside
from f2d_bench.runinfo import utc_now
from f2d_bench.files import atomic_link_or_copy, atomic_write_text, exclusive_lock, recover_dir, replace_dir

# page_links and check_links_inside live in page.py; they are re-exported here for callers of this module.
__all__ = ["build_report", "check_links_inside", "fmt", "page_links"]
MARK_TAGS = {1: "strong", 2: "u", 3: "em"}


# -- formatting --------------------------------------------------------------------------------------


def fmt_count(value) -> str:
    """A parameter count: whole below 100,000 (CelebBasis's 1,024), else three significant digits."""
    if not _finite(value):
        return "\u2013"
    v = float(value)
    if abs(v) < 1e5 and v == int(v):
        return f"{int(v):,}"
    return f"{v:.2e}".replace("e+0", "e").replace("e+", "e")


def fmt_seconds(value) -> str:
    if not _finite(value):
        return "\u2013"
    v = float(value)
    return f"{v:.3g} s" if v < 100 else f"{v:,.0f} s"


# -- view models -------------------------------------------------------------------------------------


def _cell(table: pd.DataFrame, method, col: str, marks: dict, with_ci: bool = True) -> dict:
    value = table.loc[method, col] if col in table.columns else np.nan
    cell = {"col": col, "value": fmt(value), "mark": MARK_TAGS.get(marks.get((method, col))), "ci": None}
    if with_ci and f"{col}_lo" in table.columns:
        cell["ci"] = f"[{fmt(table.loc[method, f'{col}_lo'])}, {fmt(table.loc[method, f'{col}_hi'])}]"
    return cell


def display_columns(catalog: MetricCatalog) -> tuple[str, ...]:
    """Table 1 as the page shows it: identity metrics, the detection rate, text metrics, hMean, gMean."""
    return (*catalog.identity_metrics, "face_detection_rate", *catalog.text_metrics, *COMBINED)


def _table1_view(agg: Aggregates, notes: dict[str, str], catalog: MetricCatalog) -> dict:
    t = agg.table1
    cols = [c for c in display_columns(catalog) if c in t.columns]
    mean_note = next((notes[m] for m in catalog.mean_metrics if m in notes), None)
    headers = []
    for c in cols:
        note = notes.get(c) or (mean_note if c in ("hmean", "gmean") else None)
        headers.append({"col": c, "name": COLUMN_NAMES.get(c, c), "note": note or None,
                        "identity": c in catalog.identity_metrics or c == "face_detection_rate"})
    rows = []
    for m in t.index:
        cells = []
        for h in headers:
            cell = _cell(t, m, h["col"], agg.table1_marks, with_ci=h["col"] != "face_detection_rate")
            cell["note"] = h["note"]
            cells.append(cell)
        rows.append({"method": m, "label": t.loc[m, "label"], "cells": cells,
                     "n_images": int(t.loc[m, "n_images"]), "n_faces": int(t.loc[m, "n_faces"])
                     if _finite(t.loc[m, "n_faces"]) else 0, "n_errors": int(t.loc[m, "n_errors"] or 0),
                     # hMean/gMean cover fewer images where a metric is empty (dCLIP without its reference)
                     "n_hmean": int(t.loc[m, "n_hmean"]) if "n_hmean" in t.columns else None})
    noted = sorted({notes[c] for c in cols if c in notes})
    combined = [h["name"] for h in headers if h["col"] in ("hmean", "gmean") and h["note"] and h["col"] not in notes]
    return {"headers": headers, "rows": rows, "notes": noted, "combined": combined,
            "groups": _column_groups(headers, catalog)}


def _column_groups(headers: list[dict], catalog: MetricCatalog) -> list[dict]:
    """Table 1's header groups over the columns shown (a run scored without some metrics has fewer)."""
    groups: list[dict] = []
    for h in headers:
        name = ("Identity" if h["identity"] else "Text" if h["col"] in catalog.text_metrics
                else "Identity \u00d7 Text")
        if groups and groups[-1]["name"] == name:
            groups[-1]["span"] += 1
        else:
            groups.append({"name": name, "span": 1})
    return groups


#: Fewer images than the Inception features' 2048 dimensions leave FID's covariance rank-deficient: the
#: value is biased upward and far from one of the paper's 16,000 images (pytorch-fid's README asks for
#: at least 2048 for this reason).
FID_MIN_IMAGES = 2048


def _few_for_fid(*counts) -> bool:
    return any(not _finite(n) or float(n) < FID_MIN_IMAGES for n in counts)


def _table2_view(agg: Aggregates) -> dict:
    t = agg.table2
    rows = []
    for m in t.index:
        r = t.loc[m]
        fid = {"value": fmt(r["fid"], 2), "mark": MARK_TAGS.get(agg.table2_marks.get((m, "fid"))),
               "backend": r["fid_backend"], "n_generated": r["fid_n_generated"], "n_reference": r["fid_n_reference"],
               "few": _few_for_fid(r["fid_n_generated"], r["fid_n_reference"]),
               "stale": r["fid_stale"] if isinstance(r["fid_stale"], str) else None}
        rows.append({"method": m, "label": r["label"], "fid": fid if _finite(r["fid"]) else None,
                     "trained_params": fmt_count(r["trained_params"]),
                     "weights": r["weights"] if isinstance(r["weights"], str) else None,
                     "encode_median": fmt_seconds(r["encode_median_s"]),
                     "encode_median_mark": MARK_TAGS.get(agg.table2_marks.get((m, "encode_median_s"))),
                     "encode_mean": fmt_seconds(r["encode_mean_s"]), "encode_n": int(r["encode_n_faces"])})
    stale = [f"{r['label']}: {r['fid']['stale']}" for r in rows if r["fid"] and r["fid"]["stale"]]
    return {"rows": rows, "has_fid": bool(t["fid"].notna().any()) if len(t) else False, "stale_fid": stale,
            "few_for_fid": any(r["fid"] and r["fid"]["few"] for r in rows), "fid_min": f"{FID_MIN_IMAGES:,}"}


def _categories_view(agg: Aggregates, labels: dict, catalog: MetricCatalog) -> dict:
    cats = agg.categories
    cols = [c for c in catalog.table1_columns if c in cats.columns]
    groups = []
    for cat in PROMPT_CATEGORIES:
        if not len(cats) or cat not in cats.index.get_level_values("category"):
            continue
        part = cats.xs(cat, level="category")
        marks = agg.category_marks.get(cat, {})
        groups.append({"category": cat, "rows": [
            {"method": m, "label": labels.get(m, m), "cells": [_cell(part, m, c, marks, with_ci=False) for c in cols]}
            for m in part.index]})
    return {"headers": [COLUMN_NAMES.get(c, c) for c in cols], "groups": groups}


def _identity_both_view(agg: Aggregates, catalog: MetricCatalog) -> dict:
    """Identity means with no-face images as 0.0 and over detected faces only, per method."""
    t = agg.identity_both_ways
    metrics = [m for m in identity_columns(catalog) if f"{m}_zero" in t.columns]
    rows = [{"method": m, "label": t.loc[m, "label"], "n_images": int(t.loc[m, "n_images"]),
             "n_detected": int(t.loc[m, "n_detected"]),
             "cells": [(fmt(t.loc[m, f"{c}_zero"]), fmt(t.loc[m, f"{c}_detected"])) for c in metrics]}
            for m in t.index] if metrics else []
    return {"headers": [COLUMN_NAMES.get(c, c) for c in metrics], "rows": rows}


def _per_face_view(agg: Aggregates, catalog: MetricCatalog) -> dict:
    """Per input face: identity means, detection rate and the face's input-quality flags."""
    t = agg.per_face
    metrics = [m for m in identity_columns(catalog) if m in t.columns]
    rows = []
    for f in t.index:
        r = t.loc[f]
        measured = bool(r.get("quality_recorded")) and _finite(r.get("source_crop_px"))
        rows.append({
            "face": f, "cells": [fmt(r[m]) for m in metrics],
            "detection": fmt(r["face_detection_rate"]) if "face_detection_rate" in t.columns else "",
            "quality": (f"{r['source_crop_px']:.0f} px (x{r['upscale']:.2f}), padding {100 * r['padding_share']:.1f}%, "
                        f"p {r['prob']:.4f}, faces in crop {fmt(r['faces_in_crop'], 0)}") if measured else None,
            "flags": r["flags"] or "", "flagged": bool(r["flags"]), "source": r.get("source") or ""})
    return {"headers": [COLUMN_NAMES.get(c, c) for c in metrics], "rows": rows,
            "flagged": [row["face"] for row in rows if row["flagged"]],
            "measured": any(row["quality"] for row in rows)}


def _pairs_view(agg: Aggregates, labels: dict) -> list[dict]:
    rows = []
    for r in agg.pairs.itertuples(index=False):
        excludes_zero = _finite(r.lo) and _finite(r.hi) and (r.lo > 0 or r.hi < 0)
        rows.append({"a": r.method_a, "a_label": labels.get(r.method_a, r.method_a), "b": r.method_b,
                     "b_label": labels.get(r.method_b, r.method_b), "column": COLUMN_NAMES.get(r.column, r.column),
                     "diff": fmt(r.diff), "ci": f"[{fmt(r.lo)}, {fmt(r.hi)}]", "p": fmt(r.p_a_better, 3),
                     "n_faces": int(r.n_faces), "excludes_zero": excludes_zero})
    return rows


def _no_pairs_reason(data: ReportData, catalog: MetricCatalog) -> str:
    """Why the paired-comparison table is empty."""
    if not catalog.combines:
        missing = [m for m in PROTOCOL_MEAN if m not in catalog.mean_metrics]
        return (f"No hMean or gMean to compare: they need all six protocol metrics, and {', '.join(missing)} "
                "were not scored.")
    readable = prompt_rows(data.records)["method"].nunique()
    return ("No method has" if readable == 0 else "Only one method has") + " readable prompt images: nothing to compare."


def _paper_view() -> dict:
    from f2d_bench.aggregate.breakdown import top_k_marks
    from f2d_bench.aggregate.paper import PAPER_COLUMNS, PAPER_SOURCE, PAPER_TABLE1, PAPER_TABLE2

    cols = list(PAPER_COLUMNS)
    marks = top_k_marks(PAPER_TABLE1, cols, k=3)
    t1 = [{"method": m, "cells": [_cell(PAPER_TABLE1, m, c, marks, with_ci=False) for c in cols]}
          for m in PAPER_TABLE1.index]
    t2 = [{"method": m, "fid": fmt(r["fid"], 2), "trained_params": fmt_count(r["trained_params"]),
           "encode": fmt_seconds(r["encode_seconds"])} for m, r in PAPER_TABLE2.iterrows()]
    return {"source": PAPER_SOURCE, "headers": [COLUMN_NAMES[c] for c in cols], "table1": t1, "table2": t2}


def _best_of_n_view(agg: Aggregates, data: ReportData, out_dir: Path) -> list[dict]:
    """One view per run and curve (of each column, the largest N), with its staleness if any."""
    views = []
    for run in data.runs:
        for curve in run.best_of_n:
            column = curve.column
            again = " ".join(["f2d-bench upper-bound", str(run.root), *(["--n", str(curve.n)] if curve.n else []),
                              *(["--column", column] if column and column != "hmean" else [])])
            view = {"run": run.name, "svg": None, "ns": [], "rows": [], "n": curve.n, "stale": curve.stale,
                    "again": again,
                    "column": COLUMN_NAMES.get(column, column) if column else "hMean or gMean (not recorded)"}
            if curve.svg is not None:
                rel = f"upper_bound/run{run.index}-{curve.svg.name}"
                (out_dir / "upper_bound").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(curve.svg, out_dir / rel)
                view["svg"] = rel
            part = agg.best_of_n
            if len(part):
                part = part[(part["run"] == run.index) & (part["column"].fillna("") == (column or ""))]
            if len(part):
                ns = sorted(int(n) for n in part["n"].unique())
                view["ns"] = ns
                for (method, variant), g in part.groupby(["method", "variant"], sort=True):
                    by_n = dict(zip(g["n"].astype(int), g["value"]))
                    view["rows"].append({"method": method, "label": g["method_label"].iloc[0], "variant": variant,
                                         "cells": [fmt(by_n.get(n)) for n in ns],
                                         "n_pairs": int(g["n_pairs"].max())})
            views.append(view)
    return views


def _score_dict(row, catalog: MetricCatalog) -> dict:
    """What the viewer shows for one image: Table 1's columns, then the other metrics."""
    out = {}
    others = [s["name"] for s in catalog.specs if s["name"] not in catalog.table1_columns]
    for c in (*catalog.table1_columns, *others):
        if c in row:
            out[COLUMN_NAMES.get(c, c)] = round(float(row[c]), 4) if _finite(row[c]) else None
    out["face detected"] = "yes" if bool(row.get("face_detected")) else "no"
    if _finite(row.get("face_prob")):
        out["face prob"] = round(float(row["face_prob"]), 4)
    if isinstance(row.get("error"), str):
        out["error"] = row["error"]
    return out


def _grid_view(data: ReportData, out_dir: Path, labels: dict, grid_faces: int, grid_seeds: int) -> dict:
    """Per method: faces x prompts, each cell the thumbnails of up to ``grid_seeds`` seeds."""
    rec = data.records
    faces_all = sorted(rec["face"].unique())
    faces = faces_all if grid_faces <= 0 else faces_all[:grid_faces]
    prompt_ids = list(data.prompts)  # grid order; the reference prompt last (it is listed last or first)
    refs = [p for p in prompt_ids if data.prompts[p]["category"] == "reference"]
    prompt_ids = [p for p in prompt_ids if p not in refs] + refs
    prompt_ids = [p for p in prompt_ids if p in set(rec["prompt"])]
    seeds_all = sorted(int(s) for s in rec["seed"].unique())
    seeds = seeds_all if grid_seeds <= 0 else seeds_all[:grid_seeds]
    roots = {run.index: run.root for run in data.runs}
    phrase = next((r.grid.get("prompt_set", {}).get("class_phrase") for r in data.runs), None) or "S*"
    shown = rec[rec["face"].isin(faces) & rec["seed"].isin(seeds)]
    by_key = {(r["method"], r["face"], r["prompt"]): [] for _, r in shown.iterrows()}
    for _, r in shown.sort_values("seed").iterrows():
        root = roots[int(r["run"])]
        source = root / str(r["path"])
        exported = export_image(source, out_dir, r.get("sha256")) if inside(source, root) else None
        template = data.prompts.get(r["prompt"], {}).get("template") or ""
        by_key[(r["method"], r["face"], r["prompt"])].append({
            "thumb": exported[0] if exported else None, "full": exported[1] if exported else None,
            "key": f"{r['method']} / {r['face']} / {r['prompt']} / seed {int(r['seed'])}",
            "prompt": template.replace("{}", phrase),
            "scores": json.dumps(_score_dict(r, data.catalog), ensure_ascii=False),
            "seed": int(r["seed"]), "no_face": not bool(r["face_detected"]), "error": isinstance(r["error"], str),
        })
    methods = []
    for m in sorted(rec["method"].unique()):
        methods.append({"method": m, "label": labels.get(m, m), "rows": [
            {"face": f, "cells": [by_key.get((m, f, p), []) for p in prompt_ids]} for f in faces]})
    input_faces = []
    for fid in faces:
        photo = next((r.input_faces[fid] for r in data.runs if fid in r.input_faces), None)
        exported = export_image(photo, out_dir) if photo is not None else None
        input_faces.append({"face": fid, "thumb": exported[0] if exported else None,
                            "full": exported[1] if exported else None})
    prompts = [{"id": p, "category": data.prompts[p]["category"], "template": data.prompts[p]["template"]}
               for p in prompt_ids]
    return {"methods": methods, "prompts": prompts, "faces": faces, "n_faces": len(faces_all),
            "seeds": seeds, "n_seeds": len(seeds_all), "input_faces": input_faces}


def _metadata_view(data: ReportData) -> list[dict]:
    runs = []
    for run in data.runs:
        env = run.environment
        latest = env[-1] if env else {}
        scoring = run.scoring
        scorers = []
        for s in scoring.get("scorers", []):
            rest = {k: v for k, v in s.items() if k not in ("name", "note", "version", "settings", "precision")}
            # Scores made before precision was recorded were fp32.
            scorers.append({"name": s.get("name"), "version": s.get("version"), "note": s.get("note"),
                            "precision": s.get("precision", "fp32"),
                            "settings": json.dumps(s.get("settings", {}), sort_keys=True),
                            "extra": json.dumps(rest, sort_keys=True) if rest else ""})
        fid_backends = sorted({f"{r.get('backend')} (reference: {r.get('reference')}, {r.get('n_reference')} "
                               f"images{', ' + r['reference_filter'] if r.get('reference_filter') else ''})"
                               for r in run.fid.values()})
        runs.append({
            "index": run.index, "name": run.name, "path": str(run.root.resolve()),
            "created": run.run_json.get("created"), "scored": run.scored_at,
            "version": run.run_json.get("f2d_bench_version"), "config_hash": run.run_json.get("config_hash"),
            "config": json.dumps(run.run_json.get("config", {}), indent=2, ensure_ascii=False),
            "prompt_set": run.grid.get("prompt_set", {}),
            "n_faces": len(run.grid.get("faces", [])), "n_prompts": len(run.grid.get("prompts", [])),
            "seeds": run.grid.get("seeds", []),
            "packages": sorted((latest.get("packages") or {}).items()),
            "hardware": json.dumps(latest.get("hardware", {}), indent=2),
            "writers": [{"writer": e.get("writer"), "time": e.get("time"),
                         "gpus": ", ".join(g.get("name", "?") for g in (e.get("hardware") or {}).get("gpus", []))
                         or "none", "platform": (e.get("hardware") or {}).get("platform")} for e in env],
            "face_detector": scoring.get("face_detector"), "face_policy": scoring.get("face_policy"),
            "min_face_prob": scoring.get("min_face_prob"), "scorers": scorers,
            "input_face_rule": scoring.get("input_face_rule"), "identity_clamp": scoring.get("identity_clamp"),
            "no_face": scoring.get("no_face"),
            "scoring_settings": json.dumps(scoring.get("scoring", {}), indent=2, sort_keys=True),
            "fid_backends": fid_backends,
            "face_sets": [_face_set_text(f) for f in run.face_sets],
        })
    return runs


def _face_set_text(face_set: dict) -> str:
    """One line on how ``faces prepare`` made a face set: which sources, which frame, how aligned."""
    sel, st = face_set["selection"], face_set["settings"]
    if sel:
        chosen = f"{sel.get('n_chosen')} of {sel.get('n_candidates')} sources"
        rule = {"all": "all of them", "sorted": f"the first {sel.get('limit')} by name",
                "seeded": f"{sel.get('limit')} drawn with seed {sel.get('seed')}"}.get(sel.get("rule"), sel.get("rule"))
        parts = [f"{chosen} ({rule})"]
    else:
        parts = ["sources not recorded"]
    if st:
        parts.append(f"frame {st.get('frame_index')} of each video; {st.get('detector')}, min probability "
                     f"{st.get('min_prob')}, several faces: {st.get('several')}; aligned to {st.get('output_size')} px "
                     f"({st.get('alignment')})")
    return f"{face_set['folder']}: " + "; ".join(parts)


def _setup_facts(info: dict) -> dict:
    """A method's base model and sampling from its method.json (runs made before ``sampling_mode`` was
    recorded rendered with the run's own sampling: protocol)."""
    ident = info.get("identity") or {}
    return {"model": ident.get("model"), "sampling": ident.get("sampling"), "source": ident.get("source"),
            "sampling_mode": info.get("sampling_mode") or ("protocol" if ident.get("sampling") else None),
            "replaces": info.get("replaces") or []}


def _setups(data: ReportData) -> dict[str, str]:
    """The line under each method's name in every table: base model and sampling (``setup_text``)."""
    return {mid: setup_text(_setup_facts(info)) for run in data.runs for mid, info in run.methods.items()}


def _index_facts(data: ReportData, table1: dict, generated: str) -> dict:
    """What the reports index reads from ``aggregates.json`` beside Table 1 (layout ``REPORT_FORMAT``): when
    the report was made, its runs, each method's base model and sampling, and the faces and images behind it.
    """
    methods: dict[str, dict] = {}
    for run in data.runs:
        for mid, info in run.methods.items():
            ident = info.get("identity") or {}
            entry = methods.setdefault(mid, {
                "name": info.get("name") or ident.get("method"), **_setup_facts(info),
                "weights": info.get("weights"), "runs": []})
            entry["runs"].append(run.name)
    runs = []
    for run in data.runs:
        config = run.run_json.get("config", {})
        runs.append({"name": run.name, "path": str(run.root.resolve()), "created": run.run_json.get("created"),
                     "config_hash": run.run_json.get("config_hash"), "model": config.get("model"),
                     "sampling": config.get("sampling"), "n_faces": len(run.grid.get("faces", [])),
                     "n_prompts": len(run.grid.get("prompts", [])), "seeds": run.grid.get("seeds", [])})
    return {
        "report_format": REPORT_FORMAT, "generated": generated, "run_info": runs, "methods": methods,
        "table1_columns": [{"col": h["col"], "name": h["name"], "note": h["note"]} for h in table1["headers"]],
        "n_faces": int(data.records["face"].nunique()), "n_images": int(len(prompt_rows(data.records))),
    }


# -- the command -------------------------------------------------------------------------------------


#: The report's link to the index of the folder that holds it (``reports/index.html``).
UP_TO_INDEX = f"../{INDEX_HTML}"


def build_report(run_dirs, out_dir, *, grid_faces: int = 8, grid_seeds: int = 4, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> Path:
    """Write the report of ``run_dirs`` (scored runs, merged) into ``out_dir``; returns ``out_dir/index.html``.

    ``grid_faces`` / ``grid_seeds`` bound the image grids (0: all), since a full run has 16,000 images per
    method; the tables and files always use every image. The report is written into a temporary folder
    beside ``out_dir`` and swapped into place whole: a killed report leaves the old report or the new one.
    Then the index of the folder holding ``out_dir`` (``index.html``, ``index.json``) is rewritten.
    """
    # The folder itself, not a link to it: the checks, the swap and the index all see one place.
    out_dir = Path(out_dir).resolve()
    run_dirs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not 0.0 < confidence < 1.0 or n_resamples < 1 or grid_faces < 0 or grid_seeds < 0:
        raise F2DBenchError(f"report settings out of range: confidence {confidence} (strictly between 0 and 1), "
                            f"resamples {n_resamples} (>= 1), grid faces {grid_faces} and seeds {grid_seeds} (>= 0)")
    check_report_target(out_dir, run_dirs)
    data = load_runs(run_dirs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _report_lock(out_dir):
        recover_dir(out_dir)
        for stale in out_dir.parent.glob(f".{out_dir.name}.new-*"):  # left by a killed report
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
        work.chmod(0o755)  # mkdtemp's folder is private; a report folder is for reading
        try:
            for kept in ("full", "thumbs"):  # images already exported (named by content): linked, not redone
                for src in (out_dir / kept).glob("*") if (out_dir / kept).is_dir() else []:
                    atomic_link_or_copy(src, work / kept / src.name)
            _write_report(data, work, grid_faces=grid_faces, grid_seeds=grid_seeds, n_resamples=n_resamples,
                          confidence=confidence, seed=seed)
            replace_dir(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    write_index(out_dir.parent)  # the folder's index of reports lists this one
    return out_dir / "index.html"


def check_report_target(out_dir: Path, run_dirs: list[Path]) -> None:
    """Refuse an ``-o`` whose replacement would delete what is not a report.

    A report is swapped in whole, so whatever ``out_dir`` holds is removed: it must be missing, empty or an
    earlier report (it has ``aggregates.json``), and hold no run. The index rewritten in its parent must
    likewise be f2d-bench's own (``index.json`` beside it) or not yet exist.
    """
    target = out_dir.resolve()
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:  # the working folder was deleted: nothing the swap could pull away
        cwd = None
    if cwd is not None and (target == cwd or target in cwd.parents):
        raise F2DBenchError(f"the report folder {out_dir} is the working folder or holds it, and the report "
                            "replaces its folder whole; give a folder by its own name (e.g. -o reports/NAME)")
    for r in run_dirs:
        run = r.resolve()
        if run == target or target in run.parents:
            raise F2DBenchError(f"the report folder {out_dir} holds the run {r}, and writing the report would "
                                f"delete it; give another -o (for example reports/{r.name})")
    if target.is_file():
        raise F2DBenchError(f"the report folder {out_dir} is a file; give a folder for -o")
    if target.is_dir() and any(target.iterdir()) and not (target / AGGREGATES).is_file():
        raise F2DBenchError(f"{out_dir} is not empty and holds no f2d-bench report ({AGGREGATES} missing); "
                            "the report replaces the whole folder, so give a new or empty folder for -o")
    index = target.parent / INDEX_HTML
    if index.exists() and not (target.parent / INDEX_JSON).is_file():
        raise F2DBenchError(f"{index} exists and is not an f2d-bench reports index ({INDEX_JSON} missing); "
                            "the report rewrites the index of the folder holding it, so put the report in a "
                            "folder of reports, such as reports/NAME")


def _report_lock(out_dir: Path):
    """One report at a time into ``out_dir`` (``.<name>.lock`` beside it, released when the process ends)."""
    return exclusive_lock(out_dir.parent / f".{out_dir.name}.lock",
                          busy=f"another f2d-bench report is writing {out_dir}; wait for it to finish")


def _write_report(data: ReportData, out_dir: Path, *, grid_faces: int, grid_seeds: int, n_resamples: int,
                  confidence: float, seed: int) -> None:
    agg = compute_aggregates(data, n_resamples=n_resamples, confidence=confidence, seed=seed)
    notes = data.metric_notes()
    labels = {m: agg.table1.loc[m, "label"] for m in agg.table1.index}
    labels.update({m: agg.table2.loc[m, "label"] for m in agg.table2.index if m not in labels})
    catalog = data.catalog
    table1 = _table1_view(agg, notes, catalog)
    generated = utc_now()
    files = write_aggregate_files(agg, out_dir, {
        "runs": [str(r.root.resolve()) for r in data.runs], "metric_notes": notes,
        "f2d_bench_version": __version__, **_index_facts(data, table1, generated),
    })

    from f2d_bench.aggregate.paper import PAPER_TABLE1

    plots_dir = out_dir / "plots"
    plots = []
    for path, title in (
        (plot_means(agg.table1, plots_dir / "means.svg", confidence), "hMean and gMean per method"),
        (plot_tradeoff(agg.table1, PAPER_TABLE1, plots_dir / "tradeoff.svg", catalog), "Identity vs text trade-off"),
        (plot_categories(agg.categories, labels, plots_dir / "categories.svg"), "hMean by prompt category"),
    ):
        if path is not None:
            plots.append({"src": path.relative_to(out_dir).as_posix(), "title": title})

    script = (TEMPLATES / "viewer.js").read_text(encoding="utf-8")
    shutil.copyfile(TEMPLATES / "style.css", out_dir / "style.css")
    context = {
        "title": "f2d-bench report: " + ", ".join(r.name for r in data.runs),
        "generated": generated, "version": __version__,
        "runs": _metadata_view(data), "duplicates": data.duplicates,
        "scoring_differences": scoring_differences(data.runs),
        "table1": table1, "table2": _table2_view(agg),
        "categories": _categories_view(agg, labels, catalog), "pairs": _pairs_view(agg, labels),
        "no_pairs": _no_pairs_reason(data, catalog),
        "identity_both": _identity_both_view(agg, catalog), "per_face": _per_face_view(agg, catalog),
        "paper": _paper_view(), "best_of_n": _best_of_n_view(agg, data, out_dir),
        "plots": plots, "files": files, "setups": _setups(data),
        "grid": _grid_view(data, out_dir, labels, grid_faces, grid_seeds),
        "confidence": f"{confidence:.0%}", "n_resamples": n_resamples,
        "script": script, "script_hash": inline_hash(script),
    }
    html = environment().get_template("report.html.j2").render(**context, reports_index=UP_TO_INDEX)
    # The link up to the reports index: build_report writes that index beside the report right after it.
    check_links_inside(html, out_dir, also=frozenset({UP_TO_INDEX}))
    atomic_write_text(out_dir / "index.html", html)
