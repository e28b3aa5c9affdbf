"""Table-1-style means per method from records.parquet (pure pandas; no model code)."""

from __future__ import annotations

import pandas as pd

from f2d_bench.aggregate.combine import MEAN_METRICS

#: Columns of Table 1, then the combined means.
TABLE1_COLUMNS = (*MEAN_METRICS, "hmean", "gmean")


def method_means(records: pd.DataFrame) -> pd.DataFrame:
    """One row per method: the mean of every Table 1 column over the method's prompt images.

    The reference images ("a photo of S*") are left out: they exist for dCLIP. ``face_detection_rate``
    (0..1) stands beside the identity columns, because an image with no face scores 0.0 there.
    Unreadable images (a non-empty ``error``) are left out of the means and counted in ``n_errors``.
    """
    rows = records[~records["is_reference"]]
    ok = rows[rows["error"].isna()]
    cols = [c for c in TABLE1_COLUMNS if c in rows.columns]
    extra = [c for c in ("dlib", "siglip_prob") if c in rows.columns]
    table = ok.groupby("method", sort=True)[cols + extra].mean()
    table.insert(0, "label", ok.groupby("method")["method_label"].first())
    table["face_detection_rate"] = ok.groupby("method")["face_detected"].mean()
    table["n_images"] = ok.groupby("method").size()
    if "hmean" in ok.columns:
        # hMean/gMean are empty where a metric is (e.g. dCLIP without a readable reference image):
        # their means then cover fewer images, and this says how many.
        table["n_hmean"] = ok.groupby("method")["hmean"].count()
    table["n_errors"] = rows.groupby("method")["error"].apply(lambda e: int(e.notna().sum())).reindex(table.index)
    return table
