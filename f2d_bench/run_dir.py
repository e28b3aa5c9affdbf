"""A run directory: every file name of a run is spelled here, and nowhere else.

Layout of ``RUN/``::

    run.json                   resolved config, grid hash, creation date, face folder (written once)
    grid.json                  face ids (with file hashes), prompts, seeds, method ids; written last
    config.yaml, prompts.yaml  the resolved config and a copy of the prompt set
    environment.jsonl          one line per generate of a shard (--ray: per shard run): versions, hardware
    methods/<method_id>/       method.json (settings, parameters), prepare_times.jsonl,
                               faces/<face_id>/ (a method's per-face artifacts; tune.json marks
                               a finished tuning, see f2d_bench.tuning.artifacts), shared/ (made
                               once for all faces: class images)
    images/<method>/<face>/<prompt>/<seed>.png
    manifests/<writer>.jsonl   one line per image written by that writer (``all`` or ``shard-i-of-N``)
    scores/<stage>-<hash>/     one chunk cache per scoring stage and settings (faces, each scorer, FID)
    scores/scoring.json        what the last `score` ran; scores/fid.json: FID per method
    records.parquet, table1.csv  one row per image with every metric; per-method means
    upper_bound/n<N>/          the child run topped up to N seeds; upper_bound/best_of_n-<column>-n<N>.{csv,json,svg}

Reading a run needs no torch: report code opens runs through this class too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from f2d_bench import __version__
from f2d_bench.config import UNHASHED_KEYS
from f2d_bench.errors import F2DBenchError
from f2d_bench.files import append_jsonl, atomic_write_json, atomic_write_text, file_sha256, read_jsonl
from f2d_bench.grid import ItemKey, grid_keys
from f2d_bench.store import RunStore

if TYPE_CHECKING:
    import pandas as pd

    from f2d_bench.config import RunConfig
    from f2d_bench.faces.faceset import Face
    from f2d_bench.methods.base import Method
    from f2d_bench.prompts import PromptSet

#: A finished tuning's record in its face's artifact folder (see f2d_bench.tuning.artifacts).
TUNE_RECORD = "tune.json"


@dataclass
class MethodStatus:
    method_id: str
    label: str
    expected: int
    done: int


class RunDir:
    """Paths and readers of one run directory, and its creation (``create_or_open``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise F2DBenchError(f"{self.root} is a file, not a run directory: give a run's folder (for generate "
                                "--out, a new or existing run folder)")

    @cached_property
    def store(self) -> RunStore:
        """The run's images and manifests."""
        return RunStore(self)

    # -- the run's description ----------------------------------------------------------------------
    run_json = property(lambda self: self.root / "run.json")
    grid_json = property(lambda self: self.root / "grid.json")
    config_yaml = property(lambda self: self.root / "config.yaml")
    prompts_yaml = property(lambda self: self.root / "prompts.yaml")
    environment_jsonl = property(lambda self: self.root / "environment.jsonl")
    environment_lock = property(lambda self: self.root / ".environment.lock")
    # -- images -------------------------------------------------------------------------------------
    images_dir = property(lambda self: self.root / "images")
    manifests_dir = property(lambda self: self.root / "manifests")
    # -- scores -------------------------------------------------------------------------------------
    scores_dir = property(lambda self: self.root / "scores")
    scoring_json = property(lambda self: self.root / "scores" / "scoring.json")
    fid_json = property(lambda self: self.root / "scores" / "fid.json")
    records_parquet = property(lambda self: self.root / "records.parquet")
    table1_csv = property(lambda self: self.root / "table1.csv")
    # -- upper bound --------------------------------------------------------------------------------
    upper_bound_dir = property(lambda self: self.root / "upper_bound")

    def image_path(self, key: ItemKey) -> Path:
        return self.root / key.relpath

    def manifest_path(self, writer: str) -> Path:
        return self.manifests_dir / f"{writer}.jsonl"

    def writer_lock_path(self, writer: str) -> Path:
        """The lock a writer holds while it writes images (one process per shard)."""
        return self.manifests_dir / f"{writer}.lock"

    def score_lock_path(self, tag: str) -> Path:
        """The lock of a score shard ``tag`` (``all``: assemblies and unsharded scores)."""
        return self.score_shards_dir / f"{tag}.lock"

    def manifest_paths(self) -> list[Path]:
        """Every writer's manifest, sorted by name."""
        return sorted(self.manifests_dir.glob("*.jsonl")) if self.manifests_dir.is_dir() else []

    def method_dir(self, method_id: str) -> Path:
        return self.root / "methods" / method_id

    def method_json(self, method_id: str) -> Path:
        return self.method_dir(method_id) / "method.json"

    def prepare_times_jsonl(self, method_id: str) -> Path:
        return self.method_dir(method_id) / "prepare_times.jsonl"

    def face_artifacts_dir(self, method_id: str, face_id: str) -> Path:
        """Where a method keeps what it made for one face (tuned weights, encodings)."""
        return self.method_dir(method_id) / "faces" / face_id

    def method_shared_dir(self, method_id: str) -> Path:
        """What a method makes once for all faces (class images of the prior-preservation loss)."""
        return self.method_dir(method_id) / "shared"

    def cache_dir(self, stage_id: str) -> Path:
        """The chunk cache of one scoring stage, ``scores/<stage_id>/``."""
        return self.scores_dir / stage_id

    #: Locks and finish marks of sharded `score` processes (no cache of values).
    score_shards_dir = property(lambda self: self.scores_dir / "shards")

    def cache_dirs(self) -> list[Path]:
        """Every stage's cache folder, sorted by name."""
        if not self.scores_dir.is_dir():
            return []
        return sorted(p for p in self.scores_dir.iterdir() if p.is_dir() and p != self.score_shards_dir)

    def upper_bound_child(self, n: int) -> "RunDir":
        """The child run that tops this run up to seeds ``0..n-1``."""
        return RunDir(self.upper_bound_dir / f"n{n}")

    def best_of_n_paths(self, column: str, n: int) -> dict[str, Path]:
        """``csv``, ``json`` and ``svg`` of the best-of-N curve of ``column`` up to ``n``: one set per
        (column, N), so a quick ``--n 2`` or a gMean curve leaves the ``--n 16`` hMean one in place."""
        stem = f"best_of_n-{column}-n{n}"
        return {ext: self.upper_bound_dir / f"{stem}.{ext}" for ext in ("csv", "json", "svg")}

    def best_of_n_files(self) -> list[dict[str, Path]]:
        """Every best-of-N curve on disk, sorted by name: per ``.csv``, a dict with ``csv`` and, where
        present, the ``json`` and ``svg`` of the same name (the older single ``best_of_n.csv`` included)."""
        if not self.upper_bound_dir.is_dir():
            return []
        found = []
        for csv in sorted(self.upper_bound_dir.glob("best_of_n*.csv")):
            siblings = {ext: csv.with_suffix(f".{ext}") for ext in ("json", "svg")}
            found.append({"csv": csv, **{ext: p for ext, p in siblings.items() if p.is_file()}})
        return found

    # -- readers ------------------------------------------------------------------------------------
    def read_grid(self) -> dict:
        """``grid.json``; a clear error when this is not a run directory."""
        try:
            return json.loads(self.grid_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise F2DBenchError(
                f"{self.root} is not an f2d-bench run directory (no grid.json); create one with f2d-bench generate"
            ) from None
        except json.JSONDecodeError as exc:
            raise F2DBenchError(f"{self.grid_json} is not valid JSON (line {exc.lineno}): {exc.msg}") from None

    def read_run_json(self) -> dict:
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise F2DBenchError(f"{self.run_json} is missing or damaged ({exc}); the run cannot be read") from None

    def config(self) -> "RunConfig":
        """The config the run was generated with."""
        from f2d_bench.config import config_from_dict

        self.read_grid()  # a clear error when this is not a run directory
        try:
            data = self.read_run_json()["config"]
        except (KeyError, TypeError) as exc:
            raise F2DBenchError(f"{self.run_json} has no config ({exc}); the run's config cannot be read") from None
        return config_from_dict(data, str(self.run_json))

    def faces_dirs(self) -> list[str]:
        """The face folder(s) resolved when the run was generated (absolute paths)."""
        return list(self.read_run_json().get("faces_dir") or [])

    def keys(self, method_id: str | None = None) -> list[ItemKey]:
        grid = self.read_grid()
        mids = [m["method_id"] for m in grid["methods"] if method_id in (None, m["method_id"])]
        return grid_keys(mids, [f["face_id"] for f in grid["faces"]], [p["id"] for p in grid["prompts"]],
                         grid["seeds"])

    def status(self) -> list[MethodStatus]:
        """Images done and expected per method (all shards together)."""
        grid = self.read_grid()
        out = []
        for m in grid["methods"]:
            keys = self.keys(m["method_id"])
            out.append(MethodStatus(m["method_id"], m.get("label") or m["name"], len(keys),
                                    sum(self.store.has_image(k) for k in keys)))
        return out

    def method_info(self, method_id: str) -> dict | None:
        """``methods/<id>/method.json`` (None when absent)."""
        return read_json(self.method_json(method_id))

    def prepare_seconds(self, method_id: str) -> dict[str, float]:
        """face id -> a method's cost for that face in seconds (Table 2's time): its tuning time when the
        method tunes per face (``tune.json``), else the median of its recorded ``prepare`` wall times (a
        face is prepared again by each shard and each resumed run: one value per face, not per measure)."""
        import statistics

        tuned = self.tune_seconds(method_id)
        if tuned:
            return tuned
        times: dict[str, list[float]] = {}
        for r in read_jsonl(self.prepare_times_jsonl(method_id)):
            if "seconds" in r:
                times.setdefault(str(r.get("face_id")), []).append(float(r["seconds"]))
        return {face: float(statistics.median(values)) for face, values in sorted(times.items())}

    def tune_seconds(self, method_id: str) -> dict[str, float]:
        """face id -> the face's tuning time in seconds, for every face a tuning method finished."""
        return {str(r["face_id"]): float(r["seconds"]) for r in self.tune_records(method_id)}

    def tune_records(self, method_id: str) -> list[dict]:
        """The ``tune.json`` of every face a tuning method finished, sorted by face id (a damaged one is
        left out: that face is tuned again)."""
        root = self.method_dir(method_id) / "faces"
        faces = sorted(p.parent.name for p in root.glob(f"*/{TUNE_RECORD}")) if root.is_dir() else []
        records = [self.tune_record(method_id, f) for f in faces if not f.startswith(".")]
        return [r for r in records if r is not None]

    def tune_record(self, method_id: str, face_id: str) -> dict | None:
        """The face's ``tune.json``; None when there is none or it is damaged (the face is tuned again)."""
        try:
            record = read_json(self.face_artifacts_dir(method_id, face_id) / TUNE_RECORD, None)
        except F2DBenchError:  # not valid JSON: a disk or a copy damaged it
            return None
        return record if isinstance(record, dict) else None

    def environment(self) -> list[dict]:
        return read_jsonl(self.environment_jsonl)

    def scoring_info(self) -> dict:
        """``scores/scoring.json`` of the last `score` ({} before the first)."""
        return read_json(self.scoring_json) or {}

    def fid_results(self) -> dict:
        return read_json(self.fid_json) or {}

    def records(self) -> "pd.DataFrame":
        """``records.parquet``; an error that says to score the run when it is missing."""
        import pandas as pd

        if not self.records_parquet.is_file():
            raise F2DBenchError(f"{self.root} has no records.parquet; score it first: f2d-bench score {self.root}")
        return pd.read_parquet(self.records_parquet)

    # -- writers ------------------------------------------------------------------------------------
    def record_environment(self, record: dict) -> None:
        append_jsonl(self.environment_jsonl, record)

    def record_prepare_time(self, method_id: str, record: dict) -> None:
        append_jsonl(self.prepare_times_jsonl(method_id), record)

    @classmethod
    def create_or_open(
        cls, root: str | Path, config: "RunConfig", faces: Sequence["Face"], prompt_set: "PromptSet",
        methods: Sequence["Method"],
    ) -> "RunDir":
        """Write the run's description, or check that an existing run was made with the same grid.

        Resuming with another batch size or shard is fine; another model, sampling setting, face,
        prompt, seed or method is an error, because the run's images would then mix two experiments.
        """
        import yaml

        from f2d_bench.runinfo import utc_now

        run = cls(root)
        grid = {
            # A face's class word (FastComposer's prompts) only where set: older grids stay equal.
            "faces": [{"face_id": f.face_id, "sha256": file_sha256(f.path),
                       **({"class_word": f.class_word} if f.class_word is not None else {})} for f in faces],
            "prompts": [{"id": p.id, "category": p.category, "template": p.template}
                        for p in prompt_set.all_prompts()],
            "prompt_set": {"name": prompt_set.name, "version": prompt_set.version,
                           "hash": prompt_set.content_hash(), "class_phrase": prompt_set.class_phrase,
                           "reference_id": prompt_set.reference.id},
            "seeds": list(config.seeds),
            "methods": [{"method_id": m.method_id, "name": m.name, "label": m.label,
                         "identity": m.identity()} for m in methods],
            "config_hash": config.grid_hash(),
        }
        if run.grid_json.exists():
            old = run.read_grid()
            if old.get("config_hash") in config.earlier_grid_hashes():
                grid["config_hash"] = old["config_hash"]  # made before the hash took its present form
            if _without_labels(old) != _without_labels(json.loads(json.dumps(grid, default=str))):
                raise F2DBenchError(
                    f"{run.root} already holds a run made with different settings "
                    f"({'; '.join(_differences(old, grid, run, config))}). Use another --out, or the same config."
                )
            return run
        run.root.mkdir(parents=True, exist_ok=True)
        face_dir = {str(Path(f.path).parent.resolve()) for f in faces}
        atomic_write_json(run.run_json, {
            "f2d_bench_version": __version__,
            "created": utc_now(),
            "config": config.to_dict(),
            "config_hash": config.grid_hash(),
            "faces_dir": sorted(face_dir),
            "prompt_source": str(prompt_set.source),
        })
        atomic_write_text(run.prompts_yaml, Path(prompt_set.source).read_text(encoding="utf-8"))
        atomic_write_text(run.config_yaml, yaml.safe_dump(config.to_dict(), sort_keys=False))
        for m in methods:
            atomic_write_json(run.method_json(m.method_id), {
                "method_id": m.method_id, "name": m.name, "label": m.label, "identity": m.identity(),
                "encodes_faces": m.encodes_faces or m.tunes, **m.setup(), **m.info(),
            })
        # grid.json last: its presence marks a run whose description is complete.
        atomic_write_json(run.grid_json, grid)
        return run


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, ``default`` when the file does not exist; invalid JSON is an error naming it."""
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise F2DBenchError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise F2DBenchError(f"{path} is not valid JSON (not UTF-8 text at byte {exc.start})") from None


def _without_labels(grid: dict) -> dict:
    """The grid minus display labels: renaming a method in reports does not change the experiment."""
    return {**grid, "methods": [{k: v for k, v in m.items() if k != "label"} for m in grid.get("methods", [])]}


def _differences(old: dict, new: dict, run: RunDir, config: "RunConfig") -> list[str]:
    """What differs between two grids, with the config settings behind a differing ``config_hash`` named."""
    new = json.loads(json.dumps(new, default=str))
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    settings: list[str] = []
    if "config_hash" in keys:
        try:
            settings = _setting_differences(run.read_run_json()["config"], config.to_dict())
        except (F2DBenchError, KeyError, TypeError):
            pass  # no readable config in run.json: "config_hash differ" is all there is to say
        if settings:
            keys.remove("config_hash")
    named = {line.split(":")[0].split(".")[0] for line in settings}
    return settings + [f"{k} differ" for k in keys if k not in named] or ["contents differ"]


def _setting_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``key: old in the run, new now`` for each hashed config setting where two plain configs differ."""
    if path in UNHASHED_KEYS or path == "model.device":  # model.device: hashed as "auto" whatever it says
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new), key=str)
                for line in _setting_differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    if old == new:
        return []
    return [f"{path}: {old!r} in the run, {new!r} now"]
