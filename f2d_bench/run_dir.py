"""A run directory's own description: the resolved config and the grid, written once, checked on resume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import yaml

from f2d_bench import __version__
from f2d_bench.errors import F2DBenchError
from f2d_bench.grid import ItemKey, grid_keys
from f2d_bench.runinfo import utc_now
from f2d_bench.store import RunStore, atomic_write_json, atomic_write_text, file_sha256

if TYPE_CHECKING:
    from f2d_bench.config import RunConfig
    from f2d_bench.faces.faceset import Face
    from f2d_bench.methods.base import Method
    from f2d_bench.prompts import PromptSet


@dataclass
class MethodStatus:
    method_id: str
    label: str
    expected: int
    done: int


class RunDir:
    """``run.json`` (config, dates, version) and ``grid.json`` (faces, prompts, seeds, methods)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.store = RunStore(self.root)

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls, root: str | Path, config: "RunConfig", faces: Sequence["Face"], prompt_set: "PromptSet",
        methods: Sequence["Method"],
    ) -> "RunDir":
        """Write the run's description, or check that an existing run was made with the same grid.

        Resuming with another batch size or shard is fine; another model, sampling setting, face,
        prompt, seed or method is an error, because the run's images would then mix two experiments.
        """
        run = cls(root)
        grid = {
            "faces": [{"face_id": f.face_id, "sha256": file_sha256(f.path)} for f in faces],
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
            if _without_labels(old) != _without_labels(json.loads(json.dumps(grid, default=str))):
                raise F2DBenchError(
                    f"{run.root} already holds a run made with different settings "
                    f"({', '.join(_differences(old, grid))} differ). Use another --out, or the same config."
                )
            return run
        run.root.mkdir(parents=True, exist_ok=True)
        face_dir = {str(Path(f.path).parent.resolve()) for f in faces}
        atomic_write_json(run.root / "run.json", {
            "f2d_bench_version": __version__,
            "created": utc_now(),
            "config": config.to_dict(),
            "config_hash": config.grid_hash(),
            "faces_dir": sorted(face_dir),
            "prompt_source": str(prompt_set.source),
        })
        atomic_write_text(run.root / "prompts.yaml", Path(prompt_set.source).read_text(encoding="utf-8"))
        atomic_write_text(run.root / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        for m in methods:
            atomic_write_json(run.store.method_dir(m.method_id) / "method.json", {
                "method_id": m.method_id, "name": m.name, "label": m.label, "identity": m.identity(),
                **m.info(),
            })
        # grid.json last: its presence marks a run whose description is complete.
        atomic_write_json(run.grid_json, grid)
        return run

    # -- reading ----------------------------------------------------------------------------------
    @property
    def grid_json(self) -> Path:
        return self.root / "grid.json"

    def read_grid(self) -> dict:
        try:
            return json.loads(self.grid_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise F2DBenchError(
                f"{self.root} is not an f2d-bench run directory (no grid.json); create one with f2d-bench generate"
            ) from None
        except json.JSONDecodeError as exc:
            raise F2DBenchError(f"{self.grid_json} is not valid JSON (line {exc.lineno}): {exc.msg}") from None

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


def _without_labels(grid: dict) -> dict:
    """The grid minus display labels: renaming a method in reports does not change the experiment."""
    return {**grid, "methods": [{k: v for k, v in m.items() if k != "label"} for m in grid.get("methods", [])]}


def _differences(old: dict, new: dict) -> list[str]:
    new = json.loads(json.dumps(new, default=str))
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)] or ["contents"]
