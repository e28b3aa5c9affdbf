"""Identity x Text: hMean and gMean of the mean metrics (Table 1's six), per image.

The paper's Table 1 values follow only from per-image means averaged afterwards (for F2D the means of
the column averages would be 0.316 and 0.333, the paper reports 0.1749 and 0.2252). A negative metric
(dCLIP often is) makes both means undefined, so each metric is clamped at 0 first; an image with no face
has identity metrics 0.0 (the paper's rule) and therefore hMean = gMean = 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from f2d_bench.aggregate.metrics import PROTOCOL_MEAN, MetricCatalog

if TYPE_CHECKING:
    import pandas as pd


def clamped(values: np.ndarray) -> np.ndarray:
    """Values clamped below at 0; NaN stays NaN."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(values), np.nan, np.maximum(values, 0.0))


def _row_means(values: np.ndarray, positive_mean) -> np.ndarray:
    """``positive_mean`` of each row after clamping at 0; a row with a 0 gives 0 (the limit of both means
    as a value goes to 0), a row with a NaN gives NaN."""
    v = clamped(values)
    out = np.full(v.shape[0], np.nan)
    ok = ~np.isnan(v).any(axis=1)
    zero = ok & (v == 0).any(axis=1)
    pos = ok & ~zero
    out[zero] = 0.0
    out[pos] = positive_mean(v[pos])
    return out


def harmonic_mean_rows(values: np.ndarray) -> np.ndarray:
    """Harmonic mean of each row of ``values`` (n_images, n_metrics) after clamping at 0. Range [0, max]."""
    return _row_means(values, lambda v: v.shape[1] / np.sum(1.0 / v, axis=1))


def geometric_mean_rows(values: np.ndarray) -> np.ndarray:
    """Geometric mean of each row after clamping at 0 (0 if any value is 0, NaN if any is NaN)."""
    return _row_means(values, lambda v: np.exp(np.mean(np.log(v), axis=1)))


def add_combined(records: "pd.DataFrame", catalog: MetricCatalog) -> None:
    """Set ``records``' hmean and gmean columns from the six metrics the protocol combines, when every one
    was scored (else leave the frame as it is). A further metric a plugin scorer declares ``in_mean`` is a
    Table 1 column, but never a seventh term of the paper's hMean and gMean."""
    means = list(PROTOCOL_MEAN)
    if catalog.combines and all(m in records.columns for m in means):
        table = records[means].to_numpy(dtype=np.float64)
        records["hmean"] = harmonic_mean_rows(table)
        records["gmean"] = geometric_mean_rows(table)
