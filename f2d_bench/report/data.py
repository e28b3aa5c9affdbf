"""Everything a report shows, read from scored run directories (files only: no torch, no model code).

Several runs are merged into one table of records: each row keeps the run it came from (``run``, the
run's position in the argument list, and ``run_root``), so that its image can be found. Method ids carry a
hash of their settings, so the same id in two runs is the same method; an image key present in two runs is
taken from the first run given and counted in ``ReportData.duplicates``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from f2d_bench.errors import F2DBenchError

#: Table 1 columns whose values come from identity models (the detection rate stands beside them).
IDENTITY_METRICS = ("adaface", "sphereface", "facenet")
TEXT_METRICS = ("clip", "dclip", "siglip")
KEY_COLUMNS = ("method", "face", "prompt", "seed")
FACE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class RunData:
    """One scored run directory as read from its files."""

    index: int
    root: Path
    run_json: dict
    grid: dict
    records: pd.DataFrame
    scoring: dict
    fid: dict
    environment: list[dict]
    methods: dict[str, dict]  # method_id -> method.json
    prepare_seconds: dict[str, list[float]]  # method_id -> per-face seconds
    scored_at: str | None
    best_of_n_csv: Path | None
    best_of_n_svg: Path | None
    input_faces: dict[str, Path]  # face_id -> the input photo, when it is still where the run found it

    @property
    def name(self) -> str:
        return self.root.name

    def metric_notes(self) -> dict[str, str]:
        """metric -> note (e.g. "random weights: not meaningful"); metrics without a note are absent."""
        return {m["name"]: m["note"] for m in self.scoring.get("metrics", []) if m.get("note")}

    def higher_is_better(self) -> dict[str, bool]:
        return {m["name"]: bool(m.get("higher_is_better", True)) for m in self.scoring.get("metrics", [])}


@dataclass
class ReportData:
    """The merged view of several runs."""

    runs: list[RunData]
    records: pd.DataFrame
    duplicates: int = 0
    prompts: dict[str, dict] = field(default_factory=dict)  # prompt id -> {category, template}

    def metric_notes(self) -> dict[str, str]:
        """Notes of every run together; a metric is marked if any run computed it with a note."""
        notes: dict[str, str] = {}
        for run in self.runs:
            for name, note in run.metric_notes().items():
                notes.setdefault(name, note)
        return notes

    def higher_is_better(self) -> dict[str, bool]:
        out: dict[str, bool] = {"hmean": True, "gmean": True}
        for run in self.runs:
            out.update(run.higher_is_better())
        return out

    def method_info(self) -> dict[str, dict]:
        info: dict[str, dict] = {}
        for run in self.runs:
            for mid, data in run.methods.items():
                info.setdefault(mid, data)
        return info

    def prepare_seconds(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for run in self.runs:
            for mid, values in run.prepare_seconds.items():
                out.setdefault(mid, []).extend(values)
        return out

    def fid(self) -> dict[str, dict]:
        """method -> FID result; a method with FID in several runs keeps the first run's (noted per run)."""
        out: dict[str, dict] = {}
        for run in self.runs:
            for mid, result in run.fid.items():
                out.setdefault(mid, {**result, "run": run.index})
        return out


def _read_json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise F2DBenchError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed writer: the others still hold
    return out


def _find_input_faces(run_json: dict, grid: dict) -> dict[str, Path]:
    """face id -> the input photo, found by id in the run's face folder(s) and checked by hash."""
    import hashlib

    wanted = {f["face_id"]: f.get("sha256") for f in grid.get("faces", [])}
    found: dict[str, Path] = {}
    for folder in run_json.get("faces_dir", []):
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for fid, sha in wanted.items():
            if fid in found:
                continue
            for ext in FACE_EXTENSIONS:
                for candidate in (folder / f"{fid}{ext}", folder / f"{fid}{ext.upper()}"):
                    if candidate.is_file() and (sha is None or hashlib.sha256(candidate.read_bytes()).hexdigest() == sha):
                        found[fid] = candidate
                        break
                if fid in found:
                    break
    return found


def load_run(root: str | Path, index: int = 0) -> RunData:
    """Read one scored run; a run without ``records.parquet`` is an error that says to score it."""
    root = Path(root)
    grid = _read_json(root / "grid.json")
    if grid is None:
        raise F2DBenchError(f"{root} is not an f2d-bench run directory (no grid.json)")
    records_path = root / "records.parquet"
    if not records_path.is_file():
        raise F2DBenchError(f"{root} has no records.parquet; score it first: f2d-bench score {root}")
    records = pd.read_parquet(records_path)
    run_json = _read_json(root / "run.json", {})
    methods: dict[str, dict] = {}
    prepare: dict[str, list[float]] = {}
    for m in grid.get("methods", []):
        mid = m["method_id"]
        mdir = root / "methods" / mid
        methods[mid] = _read_json(mdir / "method.json", {}) or {"method_id": mid, "label": m.get("label")}
        times = [float(r["seconds"]) for r in _read_jsonl(mdir / "prepare_times.jsonl") if "seconds" in r]
        if times:
            prepare[mid] = times
    upper = root / "upper_bound"
    scored_at = None
    try:
        import datetime as _dt

        scored_at = _dt.datetime.fromtimestamp(records_path.stat().st_mtime, _dt.timezone.utc).isoformat(
            timespec="seconds")
    except OSError:
        pass
    return RunData(
        index=index, root=root, run_json=run_json, grid=grid, records=records,
        scoring=_read_json(root / "scores" / "scoring.json", {}) or {},
        fid=_read_json(root / "scores" / "fid.json", {}) or {},
        environment=_read_jsonl(root / "environment.jsonl"),
        methods=methods, prepare_seconds=prepare, scored_at=scored_at,
        best_of_n_csv=(upper / "best_of_n.csv") if (upper / "best_of_n.csv").is_file() else None,
        best_of_n_svg=(upper / "best_of_n.svg") if (upper / "best_of_n.svg").is_file() else None,
        input_faces=_find_input_faces(run_json, grid),
    )


def load_runs(run_dirs: list[str | Path]) -> ReportData:
    """Read and merge several runs (the first run given wins for a key present in more than one)."""
    if not run_dirs:
        raise F2DBenchError("no run directory given")
    runs = [load_run(root, i) for i, root in enumerate(run_dirs)]
    frames = []
    for run in runs:
        frame = run.records.copy()
        frame["run"] = run.index
        frame["run_root"] = str(run.root)
        frames.append(frame)
    records = pd.concat(frames, ignore_index=True)
    before = len(records)
    records = records.drop_duplicates(subset=list(KEY_COLUMNS), keep="first").reset_index(drop=True)
    prompts: dict[str, dict] = {}
    for run in runs:
        for p in run.grid.get("prompts", []):
            prompts.setdefault(p["id"], {"category": p.get("category"), "template": p.get("template")})
    return ReportData(runs=runs, records=records, duplicates=before - len(records), prompts=prompts)


def time_summary(values: list[float]) -> dict[str, float | int | None]:
    """Median, mean and count of per-face encoding times (seconds)."""
    if not values:
        return {"median": None, "mean": None, "n": 0}
    return {"median": float(statistics.median(values)), "mean": float(statistics.fmean(values)), "n": len(values)}
