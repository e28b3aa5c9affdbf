"""``records.parquet``: one row per image with the face stage's result, every metric, hMean and gMean."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from f2d_bench.aggregate.combine import add_combined
from f2d_bench.aggregate.metrics import MetricCatalog
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring.inputs import ImageEntry


def assemble_records(run: RunDir, entries: Sequence[ImageEntry], detections, prompt_set,
                     values: Mapping[str, np.ndarray], catalog: MetricCatalog):
    """The records frame. ``values``: metric -> one value per entry; ``detections``: the face stage's
    frame indexed by image sha. hMean and gMean combine the catalog's mean metrics and exist only when
    every one of them was scored."""
    import pandas as pd

    grid = run.read_grid()
    labels = {m["method_id"]: m.get("label") or m["name"] for m in grid["methods"]}
    rows = []
    for e in entries:
        det = detections.loc[e.sha256]
        rows.append({
            "method": e.key.method_id, "method_label": labels.get(e.key.method_id, e.key.method_id),
            "face": e.key.face_id, "prompt": e.key.prompt_id, "category": prompt_set.by_id(e.key.prompt_id).category,
            "seed": e.key.seed, "path": e.path.relative_to(run.root).as_posix(), "sha256": e.sha256,
            "face_detected": bool(det["face_detected"]), "face_prob": float(det["face_prob"]),
            "n_faces": int(det["n_faces"]), "error": None if pd.isna(det["error"]) else str(det["error"]),
        })
    records = pd.DataFrame(rows)
    for name, column in values.items():
        records[name] = column
    add_combined(records, catalog)
    # The reference prompt's images exist for dCLIP; they are not part of Table 1's averages.
    records["is_reference"] = records["prompt"] == grid["prompt_set"]["reference_id"]
    return records
