"""Means per prompt category, and the paper's best / second / third marks for a table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from f2d_bench.aggregate.bootstrap import _as_columns
from f2d_bench.aggregate.tables import prompt_rows

#: The four prompt categories of the protocol (the reference prompt is not one of them), in report order.
PROMPT_CATEGORIES = ("job", "activity", "expression", "location")

#: Columns where lower is better when ``higher_is_better`` does not say (Table 2: FID and the costs).
LOWER_IS_BETTER = frozenset({"fid", "encode_seconds", "trained_params"})


def category_means(records: pd.DataFrame, columns: str | Iterable[str]) -> pd.DataFrame:
    """Mean of each column per (method, category) over prompt images, as ``method_means`` does per method.

    Reference images and rows with an error are left out; categories other than the four prompt ones are
    ignored. Indexed by (method, category), methods sorted, categories in ``PROMPT_CATEGORIES`` order; only
    (method, category) pairs with images appear. Columns absent from the records are skipped.
    """
    cols = _as_columns(records, columns)
    rows = prompt_rows(records)
    rows = rows[rows["category"].isin(PROMPT_CATEGORIES)]
    table = rows.groupby(["method", "category"], sort=False)[cols].mean()
    rank = {c: i for i, c in enumerate(PROMPT_CATEGORIES)}
    order = sorted(table.index, key=lambda mc: (mc[0], rank[mc[1]]))
    table = table.reindex(pd.MultiIndex.from_tuples(order, names=["method", "category"]))
    return table


def top_k_marks(
    table: pd.DataFrame,
    columns: str | Iterable[str],
    k: int = 3,
    higher_is_better: Mapping[str, bool] | None = None,
) -> dict[tuple[object, str], int]:
    """Rank 1..k of the best rows (index = method) of each column, for bold / underline marks.

    Ranks are competition ranks: tied values share the better rank and the next rank is skipped
    (.5, .5, .4, .3 -> 1, 1, 3, 4), so with k=3 the three top values are marked 1, 1, 3. NaN is never
    ranked. Direction per column: ``higher_is_better[c]`` if given, else higher is better except for the
    columns in ``LOWER_IS_BETTER`` (fid, encode_seconds, trained_params).
    """
    if isinstance(columns, str):
        columns = [columns]
    if k < 1:
        return {}
    higher_is_better = dict(higher_is_better or {})
    marks: dict[tuple[object, str], int] = {}
    for col in columns:
        if col not in table.columns:
            continue
        higher = higher_is_better.get(col, col not in LOWER_IS_BETTER)
        values = pd.to_numeric(table[col], errors="coerce")
        ranks = values.rank(method="min", ascending=not higher, na_option="keep")
        for method, r in ranks.items():
            if pd.notna(r) and r <= k:
                marks[(method, col)] = int(r)
    return marks
