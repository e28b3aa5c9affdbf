"""Best-of-N (paper Fig. 7): the expected best hMean among N images per (face, prompt), averaged.

With k images per (face, prompt) and their values sorted ascending ``v_1..v_k``, the expected maximum of
N images drawn at random without replacement is ``sum_i v_i * C(i-1, N-1) / C(k, N)`` (PROTOCOL.md
section 8): ``v_i`` is the maximum of exactly ``C(i-1, N-1)`` of the ``C(k, N)`` subsets. It uses all k
images for every N, so the curve has less noise than the maximum over the first N seeds, which is
reported beside it (variant ``first``). Pure numpy/pandas: no model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np
import pandas as pd

from f2d_bench.aggregate.combine import add_combined
from f2d_bench.aggregate.metrics import MetricCatalog
from f2d_bench.aggregate.tables import prompt_rows

#: Ns of Fig. 7.
DEFAULT_NS = (1, 2, 4, 8, 16)
VARIANTS = ("expected", "first")


def best_of_n_weights(k: int, n: int) -> np.ndarray:
    """Weights ``C(i-1, n-1) / C(k, n)`` for i = 1..k (ascending order of the values); they sum to 1."""
    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer))):
        raise TypeError(f"k and n must be integers, got {k!r} and {n!r}")
    if not 1 <= n <= k:
        raise ValueError(f"best of n needs 1 <= n <= k, got n={n}, k={k}")
    total = comb(k, n)
    # int / int is correctly rounded, so each weight is exact to the last bit.
    return np.array([comb(i - 1, n - 1) / total for i in range(1, k + 1)], dtype=np.float64)


def expected_best_of_n(values, n: int) -> float:
    """E[max of n of ``values`` drawn without replacement], in closed form.

    ``values`` is 1-D with k >= n entries. Any NaN makes the result NaN (the group is invalid; callers
    skip and count it): a missing value would otherwise silently shift the weights.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    w = best_of_n_weights(int(v.shape[0]), int(n))
    if np.isnan(v).any():
        return float("nan")
    return float(np.sort(v) @ w)


def no_face_counts_zero(records: pd.DataFrame, catalog: MetricCatalog) -> pd.DataFrame:
    """``records`` with the paper's rule for a readable image without a face: identity metrics 0.0, and
    hMean and gMean recomputed (0 when the text metrics are finite).

    Fig. 7 takes "the best image of the N generated": a faceless image is one of them, and the worst by
    hMean, so the best of N is another image unless all N lack a face. ``scoring.no_face: drop`` (NaN)
    is a convention for Table 1's means; in a best of N it would remove every (face, prompt) pair with
    one faceless image, the pairs a method renders worst. Under ``zero`` this changes nothing.
    """
    out = records.copy()
    if "face_detected" not in out.columns:
        return out
    no_face = ~out["face_detected"].astype(bool)
    if "error" in out.columns:
        no_face &= out["error"].isna()
    for name in catalog.identity_metrics:
        if name in out.columns:
            out.loc[no_face, name] = 0.0
    add_combined(out, catalog)
    return out


def best_of_n_curve(
    records: pd.DataFrame, ns: Sequence[int] = DEFAULT_NS, column: str = "hmean", k: int = 16,
) -> pd.DataFrame:
    """Fig. 7's curve per method: the mean over (face, prompt) pairs of the best ``column`` among n images.

    Only prompt images count (not ``is_reference``) and, when an ``error`` column exists, only readable
    images. Each pair needs ``k`` seeds: a pair with more uses its ``k`` lowest seeds, a pair with fewer
    is left out and counted (``n_too_few``), as is a pair with a NaN among its k values (``n_nan``).

    Variants: ``expected`` is the closed form over all k images; ``first`` is the maximum over the first
    n seeds in seed order (what one would get by generating only n images).

    Returns columns method, method_label, n, variant, value, n_pairs, n_too_few, n_nan; one row per
    (method, variant, n). ``value`` is NaN for a method with no complete pair.
    """
    ns = [int(n) for n in ns]
    if not ns:
        raise ValueError("ns is empty")
    bad = [n for n in ns if not 1 <= n <= k]
    if bad:
        raise ValueError(f"every N must be in 1..k={k}; got {bad}")
    missing = [c for c in ("method", "face", "prompt", "seed", column) if c not in records.columns]
    if missing:
        raise KeyError(f"records lack the column(s) {', '.join(missing)}"
                       + (" (hmean needs every metric that enters the mean to be scored)" if column in missing else ""))
    rows = prompt_rows(records)
    labels = (records.groupby("method")["method_label"].first() if "method_label" in records.columns
              else pd.Series(dtype=object))
    weights = {n: best_of_n_weights(k, n) for n in ns}

    out = []
    for method in sorted(records["method"].unique()):
        mrows = rows[rows["method"] == method].sort_values(["face", "prompt", "seed"])
        groups = []
        too_few = nan_pairs = 0
        for _, g in mrows.groupby(["face", "prompt"], sort=True):
            if len(g) < k:
                too_few += 1
                continue
            vals = g[column].to_numpy(dtype=np.float64)[:k]  # sorted by seed: the k lowest seeds
            if np.isnan(vals).any():
                nan_pairs += 1
                continue
            groups.append(vals)
        mat = np.stack(groups) if groups else np.empty((0, k))
        ordered = np.sort(mat, axis=1)
        label = labels.get(method, method)
        for variant in VARIANTS:
            for n in ns:
                if variant == "expected":
                    per_pair = ordered @ weights[n]
                else:
                    per_pair = mat[:, :n].max(axis=1) if len(mat) else np.empty(0)
                out.append({"method": method, "method_label": label, "n": n, "variant": variant,
                            "value": float(per_pair.mean()) if len(per_pair) else float("nan"),
                            "n_pairs": len(mat), "n_too_few": too_few, "n_nan": nan_pairs})
    curve = pd.DataFrame(out, columns=["method", "method_label", "n", "variant", "value", "n_pairs",
                                       "n_too_few", "n_nan"])
    curve.attrs.update(column=column, k=k, ns=list(ns))
    return curve
