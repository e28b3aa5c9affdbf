"""The index of a reports folder: ``reports/index.html`` and ``reports/index.json``.

One entry per folder under the reports folder, read from that report's own ``aggregates.json`` (the file
``f2d-bench report`` writes beside its page, with Table 1 and the facts below under ``report_format``), and a
leaderboard: per method id, the report with its best hMean and its latest report. A method id carries a hash
of every setting that decides its images, so one method run with other settings is another row.

A folder that is not a report, cannot be read, or was written by another version of the report layout is
listed with the reason; it never stops the index. Hidden names are skipped: they are the report command's
own temporary folders and locks (``.NAME.new-*``, ``.NAME.old-*``, ``.NAME.lock``) and the temporary files of
atomic writes. The page follows the reports' rules: it opens from disk, its CSP lets through only its own
inline script and style (by hash), and every link is checked to point at a file inside the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from f2d_bench import __version__
from f2d_bench.errors import F2DBenchError
from f2d_bench.files import atomic_write_json, atomic_write_text, exclusive_lock
from f2d_bench.report.page import (TEMPLATES, check_links_inside, environment, finite, fmt, inline_hash,
                                   model_text, sampling_text)
from f2d_bench.report.thumbnails import inside
from f2d_bench.runinfo import utc_now

#: The layout of a report's ``aggregates.json`` that this index reads. `report` writes it as
#: ``report_format``; bump it when a key the index reads changes meaning or place.
REPORT_FORMAT = 1
#: The layout of ``index.json`` itself.
INDEX_FORMAT = 1
INDEX_HTML = "index.html"
INDEX_JSON = "index.json"
AGGREGATES = "aggregates.json"
HEADLINE = ("hmean", "gmean")

OK, OUTDATED, NEWER, UNREADABLE, NOT_A_REPORT = "ok", "outdated", "newer", "unreadable", "not a report"


class _Unreadable(Exception):
    """A report folder whose files do not hold what the index needs; the message is the reason shown."""


# -- reading one report ------------------------------------------------------------------------------


def _number(value, where: str) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unreadable(f"{AGGREGATES}: {where} is {value!r}, not a number")
    return value


def _text(value, where: str, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Unreadable(f"{AGGREGATES}: {where} is {value!r}, not text")
    return value


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Unreadable(f"{AGGREGATES}: {where} is not a JSON object")
    return value


def _rows(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise _Unreadable(f"{AGGREGATES}: {where} is not a list of JSON objects")
    return value


def _names(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Unreadable(f"{AGGREGATES}: {where} is not a list of names")
    return value


def _load_aggregates(folder: Path) -> dict:
    path = folder / AGGREGATES
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _Unreadable(f"cannot read {AGGREGATES}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _Unreadable(f"{AGGREGATES} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Unreadable(f"{AGGREGATES} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise _Unreadable(f"{AGGREGATES} is not a JSON object")
    return data


def _parse_report(data: dict) -> dict:
    """The index's view of one report's ``aggregates.json`` (format ``REPORT_FORMAT``)."""
    columns = []
    for i, c in enumerate(_rows(data.get("table1_columns"), "table1_columns")):
        columns.append({"col": _text(c.get("col"), f"table1_columns[{i}].col", optional=False),
                        "name": _text(c.get("name"), f"table1_columns[{i}].name") or c["col"],
                        "note": _text(c.get("note"), f"table1_columns[{i}].note")})
    meta = _mapping(data.get("methods"), "methods")
    methods = []
    for i, row in enumerate(_rows(data.get("table1"), "table1")):
        mid = _text(row.get("method"), f"table1[{i}].method", optional=False)
        info = _mapping(meta.get(mid), f"methods[{mid!r}]")
        entry = {"method": mid, "label": _text(row.get("label"), f"table1[{i}].label") or mid,
                 "name": _text(info.get("name"), f"methods[{mid!r}].name"),
                 "model": _mapping(info.get("model"), f"methods[{mid!r}].model") or None,
                 "sampling": _mapping(info.get("sampling"), f"methods[{mid!r}].sampling") or None,
                 "sampling_mode": _text(info.get("sampling_mode"), f"methods[{mid!r}].sampling_mode"),
                 "replaces": _names(info.get("replaces", []), f"methods[{mid!r}].replaces"),
                 "source": _text(info.get("source"), f"methods[{mid!r}].source")}
        for c in columns:
            for key in (c["col"], f"{c['col']}_lo", f"{c['col']}_hi"):
                if key == c["col"] or key in row:  # the detection rate has no interval
                    entry[key] = _number(row.get(key), f"table1[{i}].{key}")
        for key in ("n_faces", "n_images", "n_errors"):
            entry[key] = _number(row.get(key), f"table1[{i}].{key}")
        methods.append(entry)
    runs = []
    for i, r in enumerate(_rows(data.get("run_info", []), "run_info")):
        runs.append({"name": _text(r.get("name"), f"run_info[{i}].name") or "?",
                     "created": _text(r.get("created"), f"run_info[{i}].created"),
                     "config_hash": _text(r.get("config_hash"), f"run_info[{i}].config_hash")})
    notes = {str(k): str(v) for k, v in _mapping(data.get("metric_notes"), "metric_notes").items()}
    return {
        "generated": _text(data.get("generated"), "generated"),
        "version": _text(data.get("f2d_bench_version"), "f2d_bench_version"),
        "columns": columns, "methods": methods, "runs": runs, "metric_notes": notes,
        "n_faces": _number(data.get("n_faces"), "n_faces"), "n_images": _number(data.get("n_images"), "n_images"),
        "confidence": _number(data.get("confidence"), "confidence"),
        "n_resamples": _number(data.get("n_resamples"), "n_resamples"),
    }


def read_report(folder: Path, root: Path) -> dict:
    """One entry of the index for the folder ``folder`` of the reports folder ``root``; never raises for
    what is in the folder (an unusable one gets a ``status`` other than "ok" and a ``reason``)."""
    entry = {"name": folder.name, "status": OK, "reason": None, "href": None, "json_href": None,
             "generated": None, "version": None, "columns": [], "methods": [], "runs": [], "metric_notes": {},
             "n_faces": None, "n_images": None, "confidence": None, "n_resamples": None}
    if not inside(folder, root):
        return {**entry, "status": UNREADABLE,
                "reason": f"a link to {folder.resolve()}, outside {root}; not followed"}
    try:
        has_page = (folder / INDEX_HTML).is_file()
        has_numbers = (folder / AGGREGATES).is_file()
    except OSError as exc:
        return {**entry, "status": UNREADABLE, "reason": f"cannot read the folder: {exc.strerror or exc}"}
    base = quote(folder.name)
    if has_page:
        entry["href"] = f"{base}/{INDEX_HTML}"
    if not has_numbers:
        if has_page:
            return {**entry, "status": UNREADABLE,
                    "reason": f"has {INDEX_HTML} but no {AGGREGATES}; write the report again with f2d-bench report"}
        return {**entry, "status": NOT_A_REPORT,
                "reason": f"no {INDEX_HTML} or {AGGREGATES}: not written by f2d-bench report"}
    entry["json_href"] = f"{base}/{AGGREGATES}"
    try:
        data = _load_aggregates(folder)
        entry["version"] = data.get("f2d_bench_version") if isinstance(data.get("f2d_bench_version"), str) else None
        layout = data.get("report_format")
        if layout is None:
            by = f"f2d-bench {entry['version']}" if entry["version"] else "an older f2d-bench"
            return {**entry, "status": OUTDATED,
                    "reason": f"written by {by}, before reports recorded their format (no report_format in "
                              f"{AGGREGATES}); run f2d-bench report into it again to list its numbers"}
        if isinstance(layout, bool) or not isinstance(layout, int):
            raise _Unreadable(f"{AGGREGATES}: report_format is {layout!r}, not a whole number")
        if layout > REPORT_FORMAT:
            return {**entry, "status": NEWER,
                    "reason": f"written by a newer f2d-bench (report format {layout}; this one reads up to "
                              f"{REPORT_FORMAT}); upgrade f2d-bench to list it"}
        if layout < REPORT_FORMAT:
            return {**entry, "status": OUTDATED,
                    "reason": f"report format {layout} is older than {REPORT_FORMAT}; run f2d-bench report "
                              "into it again to list its numbers"}
        entry.update(_parse_report(data))
    except _Unreadable as exc:
        return {**entry, "status": UNREADABLE, "reason": str(exc)}
    return entry


def scan(root: Path) -> list[dict]:
    """Every non-hidden folder of ``root`` as an index entry, newest report first (then by name)."""
    entries = []
    for path in sorted(root.iterdir(), key=lambda p: p.name):
        if path.name.startswith("."):  # the report command's temporary folders and locks, atomic temp files
            continue
        try:
            is_dir = path.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            entries.append(read_report(path, root))
    dated = sorted((e for e in entries if e["generated"]), key=lambda e: (e["generated"], e["name"]), reverse=True)
    return dated + [e for e in entries if not e["generated"]]


# -- the leaderboard ---------------------------------------------------------------------------------


def _headline(entry: dict, row: dict) -> dict:
    """One method's Table 1 numbers in one report, with where they come from."""
    cols = [c["col"] for c in entry["columns"]]
    values = {k: row[k] for c in cols for k in (c, f"{c}_lo", f"{c}_hi") if k in row}
    return {"report": entry["name"], "href": entry["href"], "generated": entry["generated"],
            "n_faces": row.get("n_faces"), "n_images": row.get("n_images"),
            "notes": {c["col"]: c["note"] for c in entry["columns"] if c["note"]}, **values}


def leaderboard(entries: list[dict]) -> list[dict]:
    """Per method id seen in any readable report: its best report (highest hMean; the later one on a tie)
    and its latest report (by generation time, then name), sorted by best hMean, highest first."""
    seen: dict[str, list[tuple[dict, dict]]] = {}
    for entry in entries:
        if entry["status"] == OK:
            for row in entry["methods"]:
                seen.setdefault(row["method"], []).append((entry, row))
    board = []
    for mid, found in seen.items():
        by_time = sorted(found, key=lambda er: (er[0]["generated"] or "", er[0]["name"]))
        latest_entry, latest_row = by_time[-1]
        scored = [er for er in by_time if finite(er[1].get("hmean"))]
        best = max(scored, key=lambda er: er[1]["hmean"]) if scored else None
        if scored:  # max keeps the first of equals; prefer the later report on a tie
            top = best[1]["hmean"]
            best = [er for er in scored if er[1]["hmean"] == top][-1]
        board.append({
            "method": mid, "label": latest_row["label"], "name": latest_row["name"], "model": latest_row["model"],
            "sampling": latest_row["sampling"], "sampling_mode": latest_row["sampling_mode"],
            "replaces": latest_row["replaces"], "source": latest_row["source"], "n_reports": len(found),
            "best": _headline(*best) if best else None, "latest": _headline(latest_entry, latest_row),
        })
    board.sort(key=lambda m: (-(m["best"]["hmean"]) if m["best"] else float("inf"), m["method"]))
    return board


# -- the page ----------------------------------------------------------------------------------------


def _cells(source: dict, cols: list[str], notes: dict[str, str]) -> list[dict]:
    """Each column's value, interval and note (a metric computed with a placeholder model) as shown."""
    out = []
    for c in cols:
        lo, hi = source.get(f"{c}_lo"), source.get(f"{c}_hi")
        ci = f"[{fmt(lo)}, {fmt(hi)}]" if finite(lo) or finite(hi) else None
        out.append({"col": c, "value": fmt(source.get(c)), "ci": ci, "note": notes.get(c) or "",
                    "sort": repr(float(source[c])) if finite(source.get(c)) else ""})
    return out


def _count(value) -> str:
    return str(int(value)) if finite(value) else "\u2013"


def _method_view(method: dict) -> dict:
    mode = f"{method['sampling_mode']}: " if method.get("sampling_mode") else ""
    replaces = f" with its own {', '.join(method['replaces'])}" if method.get("replaces") else ""
    return {"method": method["method"], "label": method["label"], "model": model_text(method) + replaces,
            "sampling": mode + sampling_text(method),
            "model_json": json.dumps(method.get("model"), sort_keys=True, ensure_ascii=False, default=str),
            "sampling_json": json.dumps(method.get("sampling"), sort_keys=True, ensure_ascii=False, default=str),
            "filter_text": f"{method['method']} {method['label']}".lower()}


def _view(root: Path, entries: list[dict], board: list[dict], generated: str) -> dict:
    # Leaderboard columns: every Table 1 column any readable report has, in the order first met.
    names: dict[str, str] = {}
    for e in entries:
        for c in e["columns"]:
            names.setdefault(c["col"], c["name"])
    cols = list(names)
    reports = []
    for e in entries:
        methods = []
        column_notes = {c["col"]: c["note"] for c in e["columns"] if c["note"]}
        for m in e["methods"]:
            methods.append({**_method_view(m),
                            "headline": _cells(m, [c for c in HEADLINE if c in names], column_notes),
                            "n_faces": _count(m.get("n_faces")), "n_images": _count(m.get("n_images"))})
        reports.append({
            "name": e["name"], "status": e["status"], "reason": e["reason"], "href": e["href"],
            "json_href": e["json_href"], "generated": e["generated"] or "", "version": e["version"],
            "runs": e["runs"], "methods": methods, "notes": sorted(set(e["metric_notes"].values())),
            "n_faces": _count(e["n_faces"]), "n_images": _count(e["n_images"]),
            "sort_faces": e["n_faces"] if finite(e["n_faces"]) else "",
            "sort_images": e["n_images"] if finite(e["n_images"]) else "",
        })
    rows = []
    for m in board:
        picks = []
        if m["best"] is not None and m["best"]["report"] == m["latest"]["report"]:
            picks.append(("best and latest", m["best"]))
        else:
            if m["best"] is not None:
                picks.append(("best", m["best"]))
            picks.append(("latest", m["latest"]))
        rows.append({**_method_view(m), "n_reports": m["n_reports"],
                     "sort_best": repr(float(m["best"]["hmean"])) if m["best"] else "",
                     "sort_latest": repr(float(m["latest"]["hmean"])) if finite(m["latest"].get("hmean")) else "",
                     "picks": [{"which": which, "report": h["report"], "href": h["href"], "generated": h["generated"],
                                "cells": _cells(h, cols, h["notes"]), "n_faces": _count(h["n_faces"]),
                                "n_images": _count(h["n_images"])} for which, h in picks]})
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    return {"folder": str(root), "generated": generated, "version": __version__, "reports": reports,
            "leaderboard": rows, "columns": [{"col": c, "name": names[c]} for c in cols],
            "headline": [{"col": c, "name": names[c]} for c in HEADLINE if c in names],
            "n_ok": counts.get(OK, 0), "n_problems": len(entries) - counts.get(OK, 0)}


def render_index(root: Path, entries: list[dict], board: list[dict], generated: str) -> str:
    """The index page's HTML (its links are checked to stay inside ``root``)."""
    script = (TEMPLATES / "index.js").read_text(encoding="utf-8")
    style = (TEMPLATES / "style.css").read_text(encoding="utf-8") + (TEMPLATES / "index.css").read_text(encoding="utf-8")
    html = environment().get_template("index.html.j2").render(
        **_view(root, entries, board, generated), script=script, script_hash=inline_hash(script),
        style=style, style_hash=inline_hash(style))
    check_links_inside(html, root)
    return html


def _index_lock(root: Path):
    """One index writer at a time (``.index.lock``): reports finishing together each rebuild the index, and
    the last to take the lock sees every report swapped in before it."""
    return exclusive_lock(root / ".index.lock")


def write_index(root: str | Path) -> Path:
    """(Re)write ``root/index.json`` and ``root/index.html`` from the report folders in ``root``; returns the
    path of index.html. Both files are written atomically: a reader sees the old index or the new one."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise F2DBenchError(f"reports folder {root} {what}: write a report first with "
                            f"`f2d-bench report RUN -o {root}/NAME`, or name the folder that holds the reports")
    with _index_lock(root):
        entries = scan(root)
        board = leaderboard(entries)
        generated = utc_now()
        atomic_write_json(root / INDEX_JSON, {"index_format": INDEX_FORMAT, "report_format": REPORT_FORMAT,
                                              "f2d_bench_version": __version__, "generated": generated,
                                              "reports": entries, "leaderboard": board})
        atomic_write_text(root / INDEX_HTML, render_index(root, entries, board, generated))
    return root / INDEX_HTML
