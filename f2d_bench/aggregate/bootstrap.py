"""Per-method means with face-level bootstrap intervals, and paired differences between methods.

Faces are the independent unit of the protocol: the 160 images of one face (40 prompts x 4 seeds) share
an input identity and are strongly correlated, so an interval that resamples images would be far too
narrow. Here each resample draws FACES with replacement, and a drawn face brings all of its images. The
prompts are held fixed (every face has the same 40): the intervals say how the numbers would move with
another sample of faces, not with another prompt list.

The point estimate is the same as :func:`f2d_bench.aggregate.tables.method_means`: the mean over the
method's prompt images, reference images and rows with a non-empty ``error`` left out, NaN values of a
column skipped. Per (face, column) the sum and the count of valid values are computed once; a resampled
mean is ``sum(w_f * sum_f) / sum(w_f * count_f)`` with ``w_f`` the number of times face f was drawn
(a ratio estimator, which equals the pooled image mean when w = 1). Only faces with at least one valid
value in a column take part in that column's resampling.

Pure numpy/pandas; deterministic given ``seed``. The random stream of a method (or of a pair of methods)
is derived from ``seed`` and the method names, so adding or removing another method leaves its interval
unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from f2d_bench.aggregate.tables import prompt_rows

__all__ = ["face_bootstrap_ci", "face_sums", "paired_differences"]


def _as_columns(records: pd.DataFrame, columns: str | Iterable[str]) -> list[str]:
    """Requested columns that the records have (absent metric columns are skipped, as in method_means)."""
    if isinstance(columns, str):
        columns = [columns]
    return [c for c in columns if c in records.columns]


def face_sums(rows: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (method, face): the sum and the number of non-NaN values of each column."""
    values = rows[list(columns)].astype(np.float64)
    keys = [rows["method"], rows["face"]]
    sums = values.groupby(keys, sort=True).sum(min_count=0)
    counts = values.notna().groupby(keys, sort=True).sum().astype(np.float64)
    return sums, counts


def _rng(seed: int, *names: str) -> np.random.Generator:
    """A generator keyed by the seed and stable hashes of the names (never Python's salted hash())."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), *(zlib.crc32(str(n).encode("utf-8")) for n in names)])
    )


def _draw_weights(rng: np.random.Generator, n_faces: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, n_faces) matrix: how often each face is drawn in each resample (rows sum to n)."""
    idx = rng.integers(0, n_faces, size=(n_resamples, n_faces))
    flat = idx + (np.arange(n_resamples) * n_faces)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n_faces).reshape(n_resamples, n_faces).astype(np.float64)


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


#: Faces an interval needs: resampling a single face always draws that face, and its zero-width
#: "interval" would read as certainty; with fewer faces the interval (and P(A better)) is left empty.
MIN_FACES = 2


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def face_bootstrap_ci(
    records: pd.DataFrame,
    columns: str | Iterable[str],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per method and column: the image mean ``c`` and a face-level percentile bootstrap ``c_lo``, ``c_hi``.

    Returns a DataFrame indexed by ``method`` (sorted) with, for each requested column present in the
    records, the three columns ``c``, ``c_lo``, ``c_hi`` (in the requested order), then ``n_faces`` (faces
    with at least one prompt image kept). Columns absent from the records are skipped. A column with
    fewer than ``MIN_FACES`` faces gets its mean and no interval (NaN).
    """
    _check(n_resamples, confidence)
    cols = _as_columns(records, columns)
    rows = prompt_rows(records)
    sums, counts = face_sums(rows, cols)
    methods = sorted(rows["method"].unique())
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        s_m = sums.loc[method]
        n_m = counts.loc[method]
        shared_w: np.ndarray | None = None
        entry: dict[str, float] = {}
        for col in cols:
            valid = n_m[col].to_numpy() > 0
            s = s_m[col].to_numpy()[valid]
            n = n_m[col].to_numpy()[valid]
            if n.size == 0:
                entry[col] = entry[f"{col}_lo"] = entry[f"{col}_hi"] = float("nan")
                continue
            if valid.all():  # the usual case: one resampling of the method's faces for every column
                if shared_w is None:
                    shared_w = _draw_weights(_rng(seed, method), n.size, n_resamples)
                w = shared_w
            else:
                w = _draw_weights(_rng(seed, method, col), n.size, n_resamples)
            boot = (w @ s) / (w @ n)
            entry[col] = float(s.sum() / n.sum())
            entry[f"{col}_lo"], entry[f"{col}_hi"] = (
                _percentile_interval(boot, confidence) if n.size >= MIN_FACES else (float("nan"), float("nan")))
        entry["n_faces"] = len(n_m)
        out[method] = entry
    order = [k for c in cols for k in (c, f"{c}_lo", f"{c}_hi")] + ["n_faces"]
    table = pd.DataFrame.from_dict(out, orient="index").reindex(columns=order)
    if len(table):
        table["n_faces"] = table["n_faces"].astype(int)
    table.index.name = "method"
    return table


PAIR_COLUMNS = ("method_a", "method_b", "column", "diff", "lo", "hi", "p_a_better", "n_faces")


def paired_differences(
    records: pd.DataFrame,
    columns: str | Iterable[str] = ("hmean", "gmean"),
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """For every pair a < b of methods (sorted by name) and column: mean_a - mean_b with a paired interval.

    Only the faces both methods have (at least one valid value of the column each) count; both means are
    image means over those faces. Each resample draws the shared faces once and uses the same draw for
    both methods (paired), so face-to-face variation common to both cancels. ``p_a_better`` is the share
    of resamples with a difference > 0, a tie counting half: identical methods give 0.5, not a verdict.
    Columns: method_a, method_b, column, diff, lo, hi, p_a_better, n_faces (shared faces); with fewer than
    ``MIN_FACES`` shared faces, lo, hi and p_a_better are NaN.
    """
    _check(n_resamples, confidence)
    cols = _as_columns(records, columns)
    rows = prompt_rows(records)
    sums, counts = face_sums(rows, cols)
    methods = sorted(rows["method"].unique())
    result = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            sa, na, sb, nb = sums.loc[a], counts.loc[a], sums.loc[b], counts.loc[b]
            for col in cols:
                fa = na.index[na[col].to_numpy() > 0]
                fb = nb.index[nb[col].to_numpy() > 0]
                shared = fa.intersection(fb, sort=False).sort_values()
                if len(shared) == 0:
                    result.append((a, b, col, np.nan, np.nan, np.nan, np.nan, 0))
                    continue
                s_a, n_a = sa.loc[shared, col].to_numpy(), na.loc[shared, col].to_numpy()
                s_b, n_b = sb.loc[shared, col].to_numpy(), nb.loc[shared, col].to_numpy()
                diff = s_a.sum() / n_a.sum() - s_b.sum() / n_b.sum()
                w = _draw_weights(_rng(seed, a, b, col), len(shared), n_resamples)
                boot = (w @ s_a) / (w @ n_a) - (w @ s_b) / (w @ n_b)
                lo, hi = _percentile_interval(boot, confidence)
                p_better = float(np.mean(boot > 0) + 0.5 * np.mean(boot == 0))
                if len(shared) < MIN_FACES:
                    lo = hi = p_better = float("nan")
                result.append((a, b, col, float(diff), lo, hi, p_better, len(shared)))
    return pd.DataFrame(result, columns=list(PAIR_COLUMNS))
