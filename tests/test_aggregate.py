"""Face-level bootstrap intervals, paired differences, category breakdowns, marks and the paper's tables."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from conftest import default_catalog, record_row

from f2d_bench.aggregate.bootstrap import face_bootstrap_ci, paired_differences
from f2d_bench.aggregate.breakdown import PROMPT_CATEGORIES, category_means, top_k_marks
from f2d_bench.aggregate.combine import (
    geometric_mean_rows,
    harmonic_mean_rows,
)
from f2d_bench.aggregate.paper import PAPER_COLUMNS, PAPER_SOURCE, PAPER_TABLE1, PAPER_TABLE2
from f2d_bench.aggregate.tables import method_means


_row = record_row  # a records.parquet row with the value in "hmean"


def _records(rows) -> pd.DataFrame:
    return pd.DataFrame(rows)


def _synthetic(method, face_values, images_per_face, *, noise=0.0, rng=None, face_prefix="f"):
    """Every face f has images ``face_values[f] + noise * N(0, 1)``."""
    rows = []
    for f, v in enumerate(face_values):
        for i in range(images_per_face):
            x = v + (noise * rng.standard_normal() if noise else 0.0)
            rows.append(_row(method, f"{face_prefix}{f:04d}", float(x), seed=i, prompt=f"p{i}"))
    return rows


# --- means -------------------------------------------------------------------------------------------


def test_means_equal_hand_computation_and_exclude_reference_and_error_rows():
    rows = [
        _row("a", "f1", 0.1, gmean=1.0), _row("a", "f1", 0.3, gmean=2.0), _row("a", "f2", 0.8, gmean=3.0),
        _row("a", "f2", 100.0, gmean=100.0, is_reference=True, category="reference"),
        _row("a", "f1", -50.0, gmean=-50.0, error="unreadable image"),
        _row("b", "f1", 0.5, gmean=np.nan), _row("b", "f2", 0.7, gmean=0.2),
    ]
    rec = _records(rows)
    ci = face_bootstrap_ci(rec, ["hmean", "gmean"], n_resamples=200)
    assert list(ci.index) == ["a", "b"]
    assert list(ci.columns) == ["hmean", "hmean_lo", "hmean_hi", "gmean", "gmean_lo", "gmean_hi", "n_faces"]
    # image means over the prompt images: a: (0.1 + 0.3 + 0.8) / 3, b: (0.5 + 0.7) / 2; NaN skipped
    assert ci.loc["a", "hmean"] == pytest.approx(1.2 / 3, abs=1e-15)
    assert ci.loc["a", "gmean"] == pytest.approx(2.0, abs=1e-15)
    assert ci.loc["b", "hmean"] == pytest.approx(0.6, abs=1e-15)
    assert ci.loc["b", "gmean"] == pytest.approx(0.2, abs=1e-15)
    # the same point estimates as Table 1's method_means
    mm = method_means(rec, default_catalog())
    assert np.allclose(ci[["hmean", "gmean"]].to_numpy(), mm[["hmean", "gmean"]].to_numpy())
    # reference / error values (100, -50) never reach an interval
    assert ci["hmean_hi"].max() <= 0.8 and ci["hmean_lo"].min() >= 0.1
    # face-level resamples of a: {f1, f1} -> 0.2, {f1, f2} -> 0.4, {f2, f2} -> 0.8, each pair end 25% likely
    assert ci.loc["a", "hmean_lo"] == pytest.approx(0.2) and ci.loc["a", "hmean_hi"] == pytest.approx(0.8)
    assert list(ci["n_faces"]) == [2, 2]


def test_absent_columns_are_skipped_and_result_is_deterministic():
    rng = np.random.default_rng(1)
    rec = _records(_synthetic("m", rng.uniform(0, 1, 30), 4))
    a = face_bootstrap_ci(rec, ["hmean", "dclip"], seed=3)
    b = face_bootstrap_ci(rec, ["hmean", "dclip"], seed=3)
    c = face_bootstrap_ci(rec, ["hmean"], seed=4)
    assert "dclip" not in a.columns
    pd.testing.assert_frame_equal(a, b)
    assert (a.loc["m", "hmean_lo"], a.loc["m", "hmean_hi"]) != (c.loc["m", "hmean_lo"], c.loc["m", "hmean_hi"])
    # another method added to the records does not change m's interval
    other = _records(_synthetic("z", rng.uniform(0, 1, 5), 2))
    d = face_bootstrap_ci(pd.concat([rec, other], ignore_index=True), ["hmean"], seed=3)
    assert d.loc["m", "hmean_lo"] == a.loc["m", "hmean_lo"] and d.loc["m", "hmean_hi"] == a.loc["m", "hmean_hi"]


# --- intervals ---------------------------------------------------------------------------------------


def test_interval_contains_mean_and_shrinks_with_more_faces():
    rng = np.random.default_rng(0)
    small = _records(_synthetic("m", rng.normal(0.2, 0.05, 10), 8, noise=0.02, rng=rng))
    large = _records(_synthetic("m", rng.normal(0.2, 0.05, 200), 8, noise=0.02, rng=rng))
    ci_s = face_bootstrap_ci(small, ["hmean"]).loc["m"]
    ci_l = face_bootstrap_ci(large, ["hmean"]).loc["m"]
    for ci in (ci_s, ci_l):
        assert ci["hmean_lo"] < ci["hmean"] < ci["hmean_hi"]
    w_s, w_l = ci_s["hmean_hi"] - ci_s["hmean_lo"], ci_l["hmean_hi"] - ci_l["hmean_lo"]
    # width ~ 1 / sqrt(n_faces): sqrt(200 / 10) = 4.5
    assert w_l < w_s / 2.5


def test_resampling_is_over_faces_not_images():
    """Images within a face are identical, faces differ: the interval must be as wide as a face bootstrap."""
    rng = np.random.default_rng(7)
    n_faces, per_face, n_boot = 40, 16, 4000
    face_values = rng.uniform(0.0, 0.4, n_faces)
    rec = _records(_synthetic("m", face_values, per_face))
    ci = face_bootstrap_ci(rec, ["hmean"], n_resamples=n_boot, seed=11).loc["m"]
    width = ci["hmean_hi"] - ci["hmean_lo"]

    # face-level bootstrap done here with a plain loop
    r = np.random.default_rng(123)
    face_boot = np.array([face_values[r.integers(0, n_faces, n_faces)].mean() for _ in range(n_boot)])
    face_width = np.subtract(*np.quantile(face_boot, [0.975, 0.025]))
    # image-level bootstrap: 640 "independent" images would give an interval sqrt(16) = 4x narrower
    images = np.repeat(face_values, per_face)
    image_boot = np.array([images[r.integers(0, images.size, images.size)].mean() for _ in range(n_boot)])
    image_width = np.subtract(*np.quantile(image_boot, [0.975, 0.025]))

    assert image_width < face_width / 3
    assert width == pytest.approx(face_width, rel=0.12)
    assert abs(width - face_width) < abs(width - image_width)


def test_unequal_images_per_face_use_the_ratio_estimator():
    # face f1: 3 images of 0.0, face f2: 1 image of 1.0 -> image mean 0.25; resamples {f1,f1}: 0, {f2,f2}: 1,
    # {f1,f2}: 0.25 -> with many resamples the 95% interval is [0, 1]
    rows = [_row("m", "f1", 0.0, seed=s) for s in range(3)] + [_row("m", "f2", 1.0)]
    ci = face_bootstrap_ci(_records(rows), "hmean", n_resamples=2000).loc["m"]
    assert ci["hmean"] == 0.25 and ci["hmean_lo"] == 0.0 and ci["hmean_hi"] == 1.0


def test_paper_sized_records_give_intervals_around_the_means_and_are_deterministic():
    """3 methods x 100 faces x 160 images (the paper's grid per method), every Table 1 column.

    How fast this runs is measured in benchmarks/, not asserted here."""
    rng = np.random.default_rng(0)
    rows = []
    for m in ("a", "b", "c"):
        rows += _synthetic(m, rng.uniform(0, 1, 100), 160, noise=0.1, rng=rng)
    rec = _records(rows)
    for c in PAPER_COLUMNS:
        rec[c] = rec["hmean"]
    ci = face_bootstrap_ci(rec, PAPER_COLUMNS, seed=5)
    means = rec.groupby("method")["hmean"].mean()
    per_face = rec.groupby(["method", "face"])["hmean"].mean()
    for m in ("a", "b", "c"):
        for c in PAPER_COLUMNS:
            assert ci.loc[m, c] == pytest.approx(means[m], abs=1e-12), (m, c)
            assert per_face[m].min() <= ci.loc[m, f"{c}_lo"] < ci.loc[m, c] < ci.loc[m, f"{c}_hi"] <= per_face[m].max()
    assert list(ci["n_faces"]) == [100, 100, 100]
    pd.testing.assert_frame_equal(face_bootstrap_ci(rec, PAPER_COLUMNS, seed=5), ci)
    diffs = paired_differences(rec, ["hmean"], seed=5)
    pd.testing.assert_frame_equal(paired_differences(rec, ["hmean"], seed=5), diffs)
    for _, r in diffs.iterrows():
        assert r["diff"] == pytest.approx(means[r["method_a"]] - means[r["method_b"]], abs=1e-12)
        assert r["lo"] < r["diff"] < r["hi"]


# --- paired differences --------------------------------------------------------------------------------


def test_identical_methods_give_zero_difference():
    rng = np.random.default_rng(2)
    base = _synthetic("a", rng.uniform(0, 0.5, 50), 4, noise=0.05, rng=rng)
    rows = base + [{**r, "method": "b"} for r in base]
    rec = _records(rows)
    rec["gmean"] = rec["hmean"] * 2
    pd_ = paired_differences(rec)
    assert list(pd_.columns[:7]) == ["method_a", "method_b", "column", "diff", "lo", "hi", "p_a_better"]
    assert list(pd_["column"]) == ["hmean", "gmean"]
    for _, r in pd_.iterrows():
        assert (r["method_a"], r["method_b"]) == ("a", "b")
        assert r["diff"] == pytest.approx(0.0, abs=1e-12)
        assert r["lo"] <= 1e-12 and r["hi"] >= -1e-12 and abs(r["lo"]) < 1e-12 and abs(r["hi"]) < 1e-12
        assert r["p_a_better"] == 0.5  # every resample a tie: no side is better


def test_better_on_every_face_is_significant_and_pairing_cancels_face_variation():
    rng = np.random.default_rng(3)
    face_values = rng.uniform(0.0, 0.6, 60)  # large spread between faces
    a = _synthetic("a", face_values + 0.01, 4)  # a is better by 0.01 on every face
    b = _synthetic("b", face_values, 4)
    c = _synthetic("c", face_values[:30], 4)  # c has only the first 30 faces
    rec = _records(a + b + c)
    res = paired_differences(rec, ["hmean"]).set_index(["method_a", "method_b"])
    assert list(res.index) == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = res.loc[("a", "b")]
    assert ab["diff"] == pytest.approx(0.01) and ab["p_a_better"] == 1.0 and ab["lo"] > 0
    # paired: the interval is (up to rounding) just the 0.01; unpaired it would span the face spread
    assert ab["hi"] - ab["lo"] < 1e-9
    # a and c share 30 faces only: the difference is over those, not over a's 60 faces
    ac = res.loc[("a", "c")]
    assert ac["n_faces"] == 30 and ac["diff"] == pytest.approx(0.01)
    assert res.loc[("b", "c"), "diff"] == pytest.approx(0.0, abs=1e-12)
    # b < a on every face: p(b better) = 0 when the pair is read the other way round
    flipped = paired_differences(rec.replace({"method": {"a": "z"}}), ["hmean"]).set_index(["method_a", "method_b"])
    assert flipped.loc[("b", "z"), "p_a_better"] == 0.0 and flipped.loc[("b", "z"), "hi"] < 0


def test_paired_differences_exclude_reference_and_error_rows():
    rows = [
        _row("a", "f1", 0.4), _row("a", "f2", 0.6),
        _row("b", "f1", 0.3), _row("b", "f2", 0.5),
        _row("a", "f1", 9.0, is_reference=True, category="reference"),
        _row("b", "f2", 9.0, error="decode failed"),
        _row("b", "f3", 9.0, error="decode failed"),  # b's only f3 image errored: f3 is not shared
        _row("a", "f3", 0.9),
    ]
    res = paired_differences(_records(rows), "hmean", n_resamples=500).iloc[0]
    assert res["n_faces"] == 2
    assert res["diff"] == pytest.approx(0.5 - 0.4)
    assert res["p_a_better"] == 1.0 and res["lo"] == pytest.approx(0.1) and res["hi"] == pytest.approx(0.1)


# --- breakdowns and marks --------------------------------------------------------------------------------


def test_category_means_by_hand():
    rows = [
        _row("a", "f1", 0.1, category="job"), _row("a", "f2", 0.3, category="job"),
        _row("a", "f1", 0.5, category="location"),
        _row("a", "f1", 0.9, category="reference", is_reference=True),
        _row("a", "f1", 0.7, category="expression", error="bad"),
        _row("b", "f1", 0.2, category="activity"), _row("b", "f1", 0.4, category="expression"),
        _row("b", "f2", 0.6, category="expression"),
    ]
    rec = _records(rows)
    rec["clip"] = rec["hmean"] / 10
    cm = category_means(rec, ["hmean", "clip", "siglip"])
    assert cm.index.names == ["method", "category"]
    assert list(cm.index) == [("a", "job"), ("a", "location"), ("b", "activity"), ("b", "expression")]
    assert list(cm.columns) == ["hmean", "clip"]
    assert cm.loc[("a", "job"), "hmean"] == pytest.approx(0.2)
    assert cm.loc[("a", "location"), "hmean"] == pytest.approx(0.5)
    assert cm.loc[("b", "activity"), "clip"] == pytest.approx(0.02)
    assert cm.loc[("b", "expression"), "hmean"] == pytest.approx(0.5)
    assert set(PROMPT_CATEGORIES) == {"job", "activity", "expression", "location"}


def test_top_k_marks_with_ties_and_lower_is_better():
    table = pd.DataFrame(
        {"hmean": [0.5, 0.5, 0.4, 0.3, np.nan], "fid": [70.0, 80.0, 60.0, 60.0, 50.0], "x": [1, 2, 3, 4, 5]},
        index=["a", "b", "c", "d", "e"],
    )
    marks = top_k_marks(table, ["hmean", "fid", "x"], higher_is_better={"x": False})
    hm = {m: r for (m, c), r in marks.items() if c == "hmean"}
    assert hm == {"a": 1, "b": 1, "c": 3}  # tie shares rank 1, NaN is never ranked
    fid = {m: r for (m, c), r in marks.items() if c == "fid"}
    assert fid == {"e": 1, "c": 2, "d": 2}  # lower is better by default for fid; d ties c; a (70) is 4th
    x = {m: r for (m, c), r in marks.items() if c == "x"}
    assert x == {"a": 1, "b": 2, "c": 3}
    # explicit direction overrides the default; k limits the marks
    assert top_k_marks(table, "fid", k=1, higher_is_better={"fid": True}) == {("b", "fid"): 1}


def test_top_k_marks_on_paper_table1():
    marks = top_k_marks(PAPER_TABLE1, PAPER_COLUMNS)
    assert marks[("Face2Diffusion", "hmean")] == 1 and marks[("FastComposer", "hmean")] == 2
    assert marks[("CelebBasis", "hmean")] == 3
    assert marks[("CustomDiffusion", "adaface")] == 1
    # gMean: TextualInversion and Perfusion tie at .0575 but are far from the top
    assert ("Perfusion", "gmean") not in marks


# --- the paper's tables ------------------------------------------------------------------------------------


def test_paper_table1_values():
    assert PAPER_TABLE1.shape == (10, 8)
    assert list(PAPER_TABLE1.columns) == list(PAPER_COLUMNS) == list(default_catalog().table1_columns)
    assert PAPER_TABLE1.loc["Face2Diffusion", "hmean"] == 0.1749
    assert PAPER_TABLE1.loc["Face2Diffusion", "gmean"] == 0.2252
    assert PAPER_TABLE1.loc["FastComposer", "clip"] == 0.2495
    assert PAPER_TABLE1.loc["CustomDiffusion", "facenet"] == 0.6458
    assert PAPER_TABLE1.loc["ELITE", "siglip"] == 0.0671
    assert PAPER_TABLE1.loc["TextualInversion", "adaface"] == 0.1654
    assert PAPER_SOURCE == "Shiohara & Yamasaki, CVPR 2024, Tables 1 and 2"


def test_paper_hmean_is_not_a_mean_of_the_column_means():
    """Table 1's hMean / gMean are averages of per-image means: the means of the columns are far larger."""
    cols = PAPER_TABLE1[list(PAPER_COLUMNS[:6])].to_numpy()
    h_of_cols = harmonic_mean_rows(cols)
    g_of_cols = geometric_mean_rows(cols)
    for i, method in enumerate(PAPER_TABLE1.index):
        # per-image means average to at most the mean of the columns (Jensen); here always well below
        assert PAPER_TABLE1.loc[method, "hmean"] < 0.8 * h_of_cols[i], method
        assert PAPER_TABLE1.loc[method, "gmean"] < 0.8 * g_of_cols[i], method
    f2d = list(PAPER_TABLE1.index).index("Face2Diffusion")
    assert round(h_of_cols[f2d], 3) == 0.316 and round(g_of_cols[f2d], 3) == 0.333


def test_paper_table2():
    assert list(PAPER_TABLE2.columns) == ["fid", "trained_params", "encode_seconds"]
    assert PAPER_TABLE2["fid"].to_dict() == {
        "CustomDiffusion": 86.18, "CelebBasis": 69.87, "FastComposer": 77.62, "Face2Diffusion": 69.33
    }
    assert PAPER_TABLE2.loc["Face2Diffusion", "trained_params"] == 1.20e7
    assert PAPER_TABLE2["trained_params"].to_dict() == {  # "#Params" as printed: 5.71x10^7, 1024, ...
        "CustomDiffusion": 5.71e7, "CelebBasis": 1024, "FastComposer": 8.88e8, "Face2Diffusion": 1.20e7}
    assert PAPER_TABLE2["encode_seconds"].to_dict() == {
        "CustomDiffusion": 140.0, "CelebBasis": 220.0, "FastComposer": 0.026, "Face2Diffusion": 0.006
    }
    assert top_k_marks(PAPER_TABLE2, ["fid"], k=1) == {("Face2Diffusion", "fid"): 1}


def test_no_torch_imported():
    code = (
        "import sys, f2d_bench.aggregate.bootstrap, f2d_bench.aggregate.breakdown, f2d_bench.aggregate.paper;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('f2d_bench.methods')"
        " or m.startswith('f2d_bench.scorers')]; print(bad); sys.exit(1 if bad else 0)"
    )
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
