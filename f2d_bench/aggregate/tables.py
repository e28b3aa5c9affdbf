"""Table-1-style means per method from records.parquet (pure pandas; no model code)."""

from __future__ import annotations

import pandas as pd

from f2d_bench.aggregate.metrics import MetricCatalog


def prompt_rows(records: pd.DataFrame) -> pd.DataFrame:
    """The rows that enter the means: prompt images (not references) without an error."""
    rows = records
    if "is_reference" in rows.columns:
        rows = rows[~rows["is_reference"].astype(bool)]
    if "error" in rows.columns:
        rows = rows[rows["error"].isna()]
    return rows


def method_means(records: pd.DataFrame, catalog: MetricCatalog) -> pd.DataFrame:
    """One row per method: the mean of every Table 1 column (the catalog's mean metrics, hMean and gMean)
    and of its other metrics over the method's prompt images.

    The reference images ("a photo of S*") are left out: they exist for dCLIP. ``face_detection_rate``
    (0..1) stands beside the identity columns, because an image with no face scores 0.0 there.
    Unreadable images (a non-empty ``error``) are left out of the means and counted in ``n_errors``; a
    method whose prompt images are all unreadable keeps its row, with empty means and 0 images.
    """
    rows = records[~records["is_reference"]]
    ok = prompt_rows(records)
    cols = [c for c in catalog.table1_columns if c in rows.columns]
    extra = [s["name"] for s in catalog.specs if not s.get("in_mean") and s["name"] in rows.columns]
    methods = pd.Index(sorted(rows["method"].unique()), name="method")
    table = ok.groupby("method", sort=True)[cols + extra].mean().reindex(methods)
    table.insert(0, "label", rows.groupby("method")["method_label"].first().reindex(methods))
    table["face_detection_rate"] = ok.groupby("method")["face_detected"].mean()
    table["n_images"] = ok.groupby("method").size().reindex(methods, fill_value=0)
    if "hmean" in ok.columns:
        # hMean/gMean are empty where a metric is (e.g. dCLIP without a readable reference image):
        # their means then cover fewer images, and this says how many.
        table["n_hmean"] = ok.groupby("method")["hmean"].count().reindex(methods, fill_value=0)
    table["n_errors"] = rows.groupby("method")["error"].apply(lambda e: int(e.notna().sum())).reindex(table.index)
    return table
