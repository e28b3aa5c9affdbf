"""hMean and gMean per image, checked against scipy's means, hand-computed literals and the 0 / NaN rules."""

import math

import numpy as np
import pytest
from scipy import stats

from f2d_bench.aggregate.combine import clamped, geometric_mean_rows, harmonic_mean_rows


def test_literal_rows():
    rows = np.array([[1.0, 4.0, 4.0],     # hmean 3 / (1 + 1/4 + 1/4) = 2; gmean 16 ** (1/3)
                     [2.0, 8.0, 4.0],     # hmean 3 / (7/8) = 24/7; gmean 64 ** (1/3) = 4
                     [0.5, 0.5, 0.5]])    # both 0.5
    np.testing.assert_allclose(harmonic_mean_rows(rows), [2.0, 24 / 7, 0.5], rtol=1e-14)
    np.testing.assert_allclose(geometric_mean_rows(rows), [16 ** (1 / 3), 4.0, 0.5], rtol=1e-14)
    # per row, not over the whole matrix or per column
    assert harmonic_mean_rows(np.array([[1.0, 1.0], [4.0, 4.0]])).tolist() == [1.0, 4.0]


def test_paper_row_against_scipy_and_its_published_rounding():
    # F2D's Table 1 column averages: their means are 0.316 / 0.333; the paper's 0.1749 / 0.2252 need
    # per-image means
    row = np.array([[0.3143, 0.4215, 0.5313, 0.2486, 0.2020, 0.3856]])
    got_h, got_g = harmonic_mean_rows(row)[0], geometric_mean_rows(row)[0]
    assert got_h == pytest.approx(stats.hmean(row[0]), rel=1e-12)
    assert got_g == pytest.approx(stats.gmean(row[0]), rel=1e-12)
    assert round(got_h, 3) == 0.316 and round(got_g, 3) == 0.333


def test_random_rows_equal_scipy_on_the_clamped_values():
    rng = np.random.default_rng(0)
    rows = rng.uniform(-0.2, 1.0, (400, 6))  # about a sixth of the values negative
    rows[::7, 2] = 0.0  # exact zeros as well
    h, g = harmonic_mean_rows(rows), geometric_mean_rows(rows)
    assert h.shape == g.shape == (400,)
    n_positive = 0
    for i, row in enumerate(rows):
        v = np.maximum(row, 0.0)
        if (v > 0).all():
            n_positive += 1
            assert h[i] == pytest.approx(stats.hmean(v), rel=1e-12), i
            assert g[i] == pytest.approx(stats.gmean(v), rel=1e-12), i
            assert h[i] <= g[i] <= v.mean() + 1e-15  # HM <= GM <= AM
        else:  # a negative (clamped to 0) or zero value: both means are 0
            assert h[i] == 0.0 and g[i] == 0.0, i
    assert 20 < n_positive < 380  # both branches were exercised


def test_negative_values_are_clamped_and_zero_gives_zero():
    rows = np.array([[0.5, 0.5, 0.5, 0.2, -0.1, 0.3],   # negative dCLIP -> 0 -> both means 0
                     [0.0, 0.0, 0.0, 0.25, 0.2, 0.3],   # no face: identity metrics 0.0
                     [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    assert list(harmonic_mean_rows(rows)) == [0.0, 0.0, 0.5]
    assert list(geometric_mean_rows(rows)) == [0.0, 0.0, 0.5]
    # clamping keeps positive values and leaves the input untouched
    assert harmonic_mean_rows(np.array([[2.0, -5.0, 2.0]]))[0] == 0.0
    assert rows[0, 4] == -0.1


def test_clamped_values():
    out = clamped(np.array([-1.0, -0.0, 0.0, 0.2, np.nan, 3.5, -np.inf]))
    assert out.dtype == np.float64
    assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.2]
    assert np.isnan(out[4])  # NaN stays NaN, not 0
    assert out[5:].tolist() == [3.5, 0.0]
    ints = clamped([-2, 3])  # lists and integers too
    assert ints.dtype == np.float64 and ints.tolist() == [0.0, 3.0]
    np.testing.assert_array_equal(clamped(np.array([[-1.0, 2.0], [np.nan, -3.0]])),
                                  np.array([[0.0, 2.0], [np.nan, 0.0]]))


def test_nan_gives_nan_even_beside_a_zero():
    rows = np.array([[0.5, np.nan, 0.5, 0.5, 0.5, 0.5],
                     [0.0, np.nan, 0.5, 0.5, 0.5, 0.5],    # NaN wins over the 0 rule
                     [-0.3, np.nan, 0.5, 0.5, 0.5, 0.5],
                     [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])      # other rows are not affected
    for fn in (harmonic_mean_rows, geometric_mean_rows):
        out = fn(rows)
        assert np.isnan(out[:3]).all(), fn.__name__
        assert out[3] == 0.5, fn.__name__


def test_mean_of_per_image_means_differs_from_mean_of_means():
    rows = np.array([[0.9, 0.9, 0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.9, 0.9, 0.9]])
    per_image = harmonic_mean_rows(rows)
    assert per_image == pytest.approx([stats.hmean(rows[0]), stats.hmean(rows[1])], rel=1e-12)
    assert per_image == pytest.approx([0.18, 0.18], rel=1e-12)  # 6 / (3 / 0.9 + 3 / 0.1)
    of_means = harmonic_mean_rows(rows.mean(axis=0, keepdims=True))[0]
    assert math.isclose(of_means, 0.5)
    assert per_image.mean() < of_means  # 0.18 vs 0.5: the reason the paper's numbers are per image


def test_a_seventh_in_mean_metric_is_a_column_but_not_a_term_of_hmean():
    import pandas as pd

    from f2d_bench.aggregate.combine import add_combined
    from f2d_bench.aggregate.metrics import PROTOCOL_MEAN, MetricCatalog

    six = {m: [0.2, 0.5] for m in PROTOCOL_MEAN}
    catalog = MetricCatalog(tuple({"name": m, "in_mean": True} for m in (*PROTOCOL_MEAN, "plugin")))
    records = pd.DataFrame({**six, "plugin": [0.9, 0.0]})  # a plugin scorer declaring in_mean
    add_combined(records, catalog)
    assert "plugin" in catalog.table1_columns
    assert records["hmean"].tolist() == pytest.approx([0.2, 0.5]) and records["gmean"].tolist() == pytest.approx([0.2, 0.5])
