"""Everything a report shows, read from scored run directories (files only: no torch, no model code).

Several runs are merged into one table of records: each row keeps the run it came from (``run``, the
run's position in the argument list, and ``run_root``), so that its image can be found. Method ids carry a
hash of their settings, so the same id in two runs is the same method; an image key present in two runs is
taken from the first run given and counted in ``ReportData.duplicates``. Face and prompt ids must mean
the same photo and prompt in every run (``_check_same_inputs``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from f2d_bench.aggregate.metrics import MetricCatalog, scoring_signature, signature_differences
from f2d_bench.errors import F2DBenchError
from f2d_bench.files import file_sha256
from f2d_bench.run_dir import RunDir, read_json

KEY_COLUMNS = ("method", "face", "prompt", "seed")
FACE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class BestOfNCurve:
    """One curve ``upper-bound`` wrote into a run (``RUN/upper_bound/best_of_n-<column>-n<N>.*``)."""

    #: the per-image value it maximised (``--column``); None when its ``.json`` is missing or damaged
    column: str | None
    n: int | None  # ``--n``: images per (face, prompt); None when not recorded
    csv: Path
    svg: Path | None
    #: why its numbers may not be the run's current ones: the scoring it used differs from the run's
    #: last ``score`` (one line per difference), or it did not record its scoring
    stale: list[str] = field(default_factory=list)


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
    #: method_id -> face_id -> seconds of a method that prepares per process (``RunDir.prepare_seconds``)
    prepare_seconds: dict[str, dict[str, float]]
    scored_at: str | None
    #: the upper bound's curves (``upper-bound``): of each column, the one with the largest N
    best_of_n: list[BestOfNCurve]
    input_faces: dict[str, Path]  # face_id -> the input photo, when it is still where the run found it
    #: face_id -> the input-quality record ``faces prepare`` wrote for it (manifest ``quality``), if any
    face_quality: dict[str, dict] = field(default_factory=dict)
    #: face_id -> where ``faces prepare`` took it from: the source file's name, and the frame of a video
    face_sources: dict[str, str] = field(default_factory=dict)
    #: per face-set folder of the run (those with a manifest): its name, ``selection`` (which sources were
    #: used: rule, limit, seed, counts) and ``settings`` (detection, alignment, frame) from manifest.json
    face_sets: list[dict] = field(default_factory=list)
    #: method_id -> face_id -> tuning seconds of a method that tunes each face once (``tune.json``)
    tuned_seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def catalog(self) -> MetricCatalog:
        """The metrics this run's scorers declared (``scores/scoring.json``)."""
        return MetricCatalog(tuple(self.scoring.get("metrics", [])))


@dataclass
class ReportData:
    """The merged view of several runs."""

    runs: list[RunData]
    records: pd.DataFrame
    duplicates: int = 0
    prompts: dict[str, dict] = field(default_factory=dict)  # prompt id -> {category, template}

    @property
    def catalog(self) -> MetricCatalog:
        """The metrics of every run together, as their scorers declared them (the first run's wins)."""
        return MetricCatalog.merged(run.catalog.specs for run in self.runs)

    def metric_notes(self) -> dict[str, str]:
        """Notes of every run together; a metric is marked if any run computed it with a note."""
        notes: dict[str, str] = {}
        for run in self.runs:
            for name, note in run.catalog.notes().items():
                notes.setdefault(name, note)
        return notes

    def _first(self, of: Callable[[RunData], dict]) -> dict:
        """The runs' dicts ``of(run)`` merged; for a key in several, the first run's value wins."""
        out: dict = {}
        for run in self.runs:
            for key, value in of(run).items():
                out.setdefault(key, value)
        return out

    def method_info(self) -> dict[str, dict]:
        """method id -> its method.json (the first run that has the method wins)."""
        return self._first(lambda run: run.methods)

    def prepare_seconds(self) -> dict[str, list[float]]:
        """method id -> per-face seconds (Table 2's time), one value per face, sorted by face id: its
        prepare time or its tuning time, from the first run that has it (an upper-bound child links its
        parent's tuned faces, records and all; two runs given may hold the same faces)."""
        out: dict[str, list[float]] = {}
        per_face = self._first(lambda run: {(mid, face): seconds for source in (run.prepare_seconds, run.tuned_seconds)
                                            for mid, faces in source.items() for face, seconds in faces.items()})
        for (mid, _face), seconds in sorted(per_face.items()):
            out.setdefault(mid, []).append(seconds)
        return out

    def face_quality(self) -> dict[str, dict]:
        """face id -> its input-quality record (the first run that has one wins)."""
        return self._first(lambda run: run.face_quality)

    def face_sources(self) -> dict[str, str]:
        """face id -> the source it was prepared from (the first run that knows wins)."""
        return self._first(lambda run: run.face_sources)

    def fid(self) -> dict[str, dict]:
        """method -> FID result; a method with FID in several runs keeps the first run's (noted per run)."""
        return self._first(lambda run: {mid: {**result, "run": run.index} for mid, result in run.fid.items()})


def _find_input_faces(run_json: dict, grid: dict) -> dict[str, Path]:
    """face id -> the input photo, found by id in the run's face folder(s) and checked by hash."""
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
                    if candidate.is_file() and (sha is None or file_sha256(candidate) == sha):
                        found[fid] = candidate
                        break
                if fid in found:
                    break
    return found


@dataclass
class FaceSetInfo:
    """What the face-set manifests beside a run's input photos record (see ``RunData``'s fields)."""

    quality: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    sets: list[dict] = field(default_factory=list)


def _face_set_info(input_faces: dict[str, Path]) -> FaceSetInfo:
    """Read the ``faces prepare`` manifest beside each found input photo."""
    manifests: dict[Path, dict] = {}
    info = FaceSetInfo()
    for fid, photo in input_faces.items():
        folder = photo.parent
        if folder not in manifests:
            try:
                manifest = read_json(folder / "manifest.json", {})
            except F2DBenchError:  # a broken face-set manifest only costs these facts, not the report
                manifest = {}
            manifest = manifest if isinstance(manifest, dict) else {}
            entries = manifest.get("faces", [])
            manifests[folder] = {(e.get("face_id"), e.get("file")): e
                                 for e in entries if isinstance(e, dict)} if isinstance(entries, list) else {}
            if manifests[folder]:
                info.sets.append({"folder": folder.name, "selection": manifest.get("selection") or {},
                                  "settings": manifest.get("settings") or {}})
        entry = manifests[folder].get((fid, photo.name))
        if not entry:
            continue
        if isinstance(entry.get("quality"), dict):
            info.quality[fid] = entry["quality"]
        if entry.get("source"):
            frame = entry.get("frame_index")
            info.sources[fid] = str(entry["source"]) + (f", frame {frame}" if frame is not None else "")
    return info


def load_run(root: str | Path, index: int = 0) -> RunData:
    """Read one scored run; a run without ``records.parquet`` is an error that says to score it."""
    run = RunDir(root)
    grid = run.read_grid()
    records = run.records()
    run_json = read_json(run.run_json, {})
    methods: dict[str, dict] = {}
    prepare: dict[str, dict[str, float]] = {}
    tuned: dict[str, dict[str, float]] = {}
    for m in grid.get("methods", []):
        mid = m["method_id"]
        methods[mid] = run.method_info(mid) or {"method_id": mid, "label": m.get("label")}
        if seconds := run.tune_seconds(mid):
            tuned[mid] = seconds
        elif methods[mid].get("encodes_faces", True) and (times := run.prepare_seconds(mid)):
            prepare[mid] = times  # a method that prepares nothing has no time (earlier runs recorded ~0 s)
    scored_at = None
    try:
        import datetime as _dt

        scored_at = _dt.datetime.fromtimestamp(run.records_parquet.stat().st_mtime, _dt.timezone.utc).isoformat(
            timespec="seconds")
    except OSError:
        pass
    input_faces = _find_input_faces(run_json, grid)
    faces = _face_set_info(input_faces)
    scoring = run.scoring_info()
    return RunData(
        index=index, root=run.root, run_json=run_json, grid=grid, records=records,
        scoring=scoring, fid=run.fid_results(), environment=run.environment(),
        methods=methods, prepare_seconds=prepare, scored_at=scored_at,
        best_of_n=best_of_n_curves(run, scoring),
        input_faces=input_faces, face_quality=faces.quality, face_sources=faces.sources, face_sets=faces.sets,
        tuned_seconds=tuned,
    )


def best_of_n_curves(run: RunDir, scoring: dict) -> list[BestOfNCurve]:
    """Of each column's curves in ``run``, the one with the largest N (the newest of equal N): a quick
    ``--n 2`` beside the ``--n 16`` curve is not shown. hMean's first. ``scoring``: the run's
    ``scoring.json``, against which each curve's recorded scoring is checked."""
    chosen: dict[str | None, tuple[tuple, BestOfNCurve]] = {}
    for paths in run.best_of_n_files():
        try:
            meta = read_json(paths["json"], {}) if "json" in paths else {}
        except F2DBenchError:  # a damaged .json costs the curve its caption, not the report
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        n = meta.get("N") if isinstance(meta.get("N"), int) else None
        if "scoring" in meta:
            stale = signature_differences(meta["scoring"], scoring_signature(scoring), "the curve", "the run's records")
        else:
            stale = ["the curve does not record the scoring it used"]
        curve = BestOfNCurve(column=meta.get("column"), n=n, csv=paths["csv"], svg=paths.get("svg"), stale=stale)
        rank = (n or 0, paths["csv"].stat().st_mtime_ns)
        if curve.column not in chosen or rank > chosen[curve.column][0]:
            chosen[curve.column] = (rank, curve)
    order = {"hmean": 0, "gmean": 1}
    return [c for _, c in sorted(chosen.values(), key=lambda rc: (order.get(rc[1].column, 2), str(rc[1].column)))]


def _check_same_inputs(runs: list[RunData]) -> None:
    """F2DBenchError when two runs use one face id for different photos, or one prompt id for different
    prompts: their images would share keys (the second run's dropped as duplicates) and their faces one
    bootstrap cluster, so the merged numbers would mix two experiments under one name."""
    kinds = (("face", "faces", "face_id", "sha256", "photo"), ("prompt", "prompts", "id", "template", "prompt"))
    for kind, list_key, id_key, value_key, noun in kinds:
        seen: dict[str, tuple[object, RunData]] = {}
        for run in runs:
            for item in run.grid.get(list_key, []):
                ident, value = item.get(id_key), item.get(value_key)
                if ident not in seen:
                    seen[ident] = (value, run)
                    continue
                first_value, first = seen[ident]
                if value is not None and first_value is not None and value != first_value:
                    raise F2DBenchError(
                        f"{kind} id {ident!r} is one {noun} in {first.root} ({value_key} {first_value!r}) and "
                        f"another in {run.root} ({value_key} {value!r}): a report merges runs made with the "
                        f"same {list_key}. Report these runs separately, or give the {list_key} distinct ids."
                    )


def scoring_differences(runs: list[RunData]) -> list[str]:
    """What the runs' last ``score`` did differently, one line each (empty when all agree): a scorer both
    ran with other settings, version or precision, or another face rule. Their methods' numbers are then
    not comparable with each other."""
    first = runs[0]
    return [line for run in runs[1:]
            for line in signature_differences(scoring_signature(first.scoring), scoring_signature(run.scoring),
                                              first.name, run.name)]


def load_runs(run_dirs: list[str | Path]) -> ReportData:
    """Read and merge several runs (the first run given wins for a key present in more than one)."""
    if not run_dirs:
        raise F2DBenchError("no run directory given")
    runs = [load_run(root, i) for i, root in enumerate(run_dirs)]
    _check_same_inputs(runs)
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
