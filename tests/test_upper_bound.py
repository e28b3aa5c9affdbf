"""Best-of-N (Fig. 7): the closed form against enumeration, and `upper-bound` end to end on the tiny pipeline."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from f2d_bench.aggregate.best_of_n import best_of_n_curve, best_of_n_weights, expected_best_of_n
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.errors import F2DBenchError
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring import score_run
from f2d_bench.upper_bound import choose_batch_size, register, upper_bound

from conftest import cli_parser, face_dir, offline_scoring, record_row, sha256_file, small_config_dict

# -- the closed form ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [6, 8])
def test_closed_form_equals_enumeration_of_all_subsets(k):
    rng = np.random.default_rng(k)
    for trial in range(3):
        values = rng.normal(size=k)
        if trial == 2:
            values[:3] = values[0]  # ties
        for n in range(1, k + 1):
            brute = np.mean([max(s) for s in itertools.combinations(values, n)])
            assert expected_best_of_n(values, n) == pytest.approx(brute, rel=1e-12, abs=1e-12), (k, n)


def test_n1_is_the_mean_nk_the_max_and_weights_sum_to_one():
    v = np.array([0.3, -0.1, 0.9, 0.25, 0.5, 0.0, 0.7, 0.1, 0.2, 0.6, 0.45, 0.35, 0.05, 0.8, 0.15, 0.4])
    assert expected_best_of_n(v, 1) == pytest.approx(v.mean(), abs=1e-15)
    assert expected_best_of_n(v, 16) == v.max()
    for n in range(1, 17):
        assert best_of_n_weights(16, n).sum() == pytest.approx(1.0, abs=1e-14)
    # non-decreasing in n
    e = [expected_best_of_n(v, n) for n in range(1, 17)]
    assert all(a <= b + 1e-15 for a, b in zip(e, e[1:]))
    assert np.isnan(expected_best_of_n(np.array([0.1, np.nan, 0.3]), 2))
    with pytest.raises(ValueError):
        expected_best_of_n(v[:3], 4)
    with pytest.raises(ValueError):
        expected_best_of_n(v, 0)


def _records(values_by_pair: dict, method="m1", label="Method 1") -> pd.DataFrame:
    rows = []
    for (face, prompt), values in values_by_pair.items():
        for seed, v in enumerate(values):
            rows.append(record_row(method, face, v, prompt=prompt, seed=seed, method_label=label))
    return pd.DataFrame(rows)


def test_curve_first_variant_by_hand_and_exclusions():
    rec = _records({("a", "p1"): [0.1, 0.5, 0.2, 0.4], ("a", "p2"): [0.3, 0.1, 0.6, 0.2],
                    ("b", "p1"): [0.2, 0.2, np.nan, 0.9],  # NaN: left out, counted
                    ("b", "p2"): [0.7, 0.1, 0.3]})          # 3 seeds: left out, counted
    ref = _records({("a", "ref"): [9.0, 9.0, 9.0, 9.0]})
    ref["is_reference"] = True
    bad = _records({("a", "p3"): [9.0, 9.0, 9.0, 9.0]})
    bad["error"] = "unreadable"
    rec = pd.concat([rec, ref, bad], ignore_index=True).sample(frac=1.0, random_state=0)  # order must not matter
    curve = best_of_n_curve(rec, ns=(1, 2, 4), k=4)
    assert list(curve.columns[:6]) == ["method", "method_label", "n", "variant", "value", "n_pairs"]
    first = curve[curve["variant"] == "first"].set_index("n")["value"]
    # pair (a,p1): first 1 -> 0.1, first 2 -> 0.5, all -> 0.5; pair (a,p2): 0.3, 0.3, 0.6
    assert first[1] == pytest.approx((0.1 + 0.3) / 2)
    assert first[2] == pytest.approx((0.5 + 0.3) / 2)
    assert first[4] == pytest.approx((0.5 + 0.6) / 2)
    exp = curve[curve["variant"] == "expected"].set_index("n")["value"]
    assert exp[1] == pytest.approx((0.3 + 0.3) / 2)  # means of the two pairs
    assert exp[2] == pytest.approx((expected_best_of_n([0.1, 0.5, 0.2, 0.4], 2)
                                    + expected_best_of_n([0.3, 0.1, 0.6, 0.2], 2)) / 2)
    assert exp[4] == first[4]
    row = curve.iloc[0]
    assert (row["n_pairs"], row["n_too_few"], row["n_nan"], row["method_label"]) == (2, 1, 1, "Method 1")
    with pytest.raises(ValueError):
        best_of_n_curve(rec, ns=(8,), k=4)


def test_batch_size_is_halved_when_that_avoids_regenerating_parent_images():
    from f2d_bench.grid import grid_keys

    keys = grid_keys(["m"], ["f1", "f2"], ["p1", "p2"], list(range(16)))
    present = {k for k in keys if k.seed < 4}
    assert choose_batch_size(keys, present, 8) == 4
    assert choose_batch_size(keys, {k for k in keys if k.seed < 8}, 8) == 8
    assert choose_batch_size(keys, present, 5) == 5


# -- end to end on the tiny pipeline -------------------------------------------------------------------
# (generate, score and top up take about 8 s on two cores: these tests are marked slow)


_sha = sha256_file


@pytest.fixture(scope="module")
def topped_up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upper-bound")
    faces = face_dir(tmp / "faces", ("obama", "biden"))
    data = small_config_dict(
        faces=str(faces), seeds=[0, 1], batch_size=4,
        scoring=offline_scoring(scorers=["adaface", "sphereface", "facenet", "clip", "siglip"]))
    parent = tmp / "run"
    assert generate_run(config_from_dict(data), parent, progress=False).complete
    # scored with a setting the run config lacks (as `score --config` does): the top-up must follow it
    score_run(parent, scoring=config_from_dict(data).scoring.replace(identity_clamp=True), progress=False)
    parent_sha = {k: _sha(RunDir(parent).store.image_path(k)) for k in RunDir(parent).keys()}

    # --no-generate on a parent with 2 seeds and n=4: a clear error, nothing created
    with pytest.raises(F2DBenchError) as err:
        upper_bound(parent, 4, generate=False, progress=False)
    no_generate_message = str(err.value)
    assert not (parent / "upper_bound").exists()

    first = upper_bound(parent, 4, progress=False)
    second = upper_bound(parent, 4, progress=False)
    return parent, parent_sha, no_generate_message, first, second


@pytest.mark.slow
def test_no_generate_names_what_is_missing_and_what_to_run(topped_up):
    _, _, message, _, _ = topped_up
    # 1 method x 2 faces x (4 prompts + reference): every pair lacks 2 seeds
    assert "10 of 10 (method, face, prompt) pairs" in message and "fewer than 4 images" in message
    assert "20 images missing" in message and "upper-bound" in message and "--n 4" in message


@pytest.mark.slow
def test_top_up_reuses_parent_images_and_generates_only_the_missing_seeds(topped_up):
    parent, parent_sha, _, first, _ = topped_up
    child = RunDir(parent / "upper_bound" / "n4")
    assert first.scored_dir == child.root
    assert child.read_grid()["seeds"] == [0, 1, 2, 3]
    assert first.linked == 20 and first.generated == 20
    keys = child.keys()
    assert len(keys) == 40 and all(child.store.has_image(k) for k in keys)
    for key, sha in parent_sha.items():
        assert _sha(child.store.image_path(key)) == sha
        # hard links where the file system allows them (tmp does): no second copy of the bytes
        assert child.store.image_path(key).stat().st_ino == (parent / key.relpath).stat().st_ino
    assert first.batch_size == 2  # batches of 2 = the new seeds of a pair only (config: 4)
    # the manifest holds every image; the linked ones keep the parent's config hash
    records = child.store.manifest_records()
    assert set(records) == set(keys)
    parent_hash = json.loads((parent / "run.json").read_text())["config_hash"]
    assert {records[k].config_hash for k in parent_sha} == {parent_hash}
    # the writers of the linked images are on the child's record, once, so a top-up in another dtype stops
    made = [r for r in RunDir(parent).environment() if r.get("rendering")]
    assert made and all(child.environment().count(r) == 1 for r in made)
    # scored as the parent's last score was, not as its run config says
    assert json.loads(child.scoring_json.read_text())["scoring"]["identity_clamp"] is True
    assert (child.records()[["adaface", "sphereface", "facenet"]].fillna(0) >= 0).all().all()
    # parent's score caches were copied: only the new images were scored
    assert first.score_chunks_copied > 0
    assert set(first.score_computed.values()) == {20}
    # the parent itself is untouched
    assert RunDir(parent).read_grid()["seeds"] == [0, 1]


@pytest.mark.slow
def test_outputs_and_curve(topped_up):
    parent, _, _, first, _ = topped_up
    out = parent / "upper_bound"
    assert first.outputs == {ext: out / f"best_of_n-hmean-n4.{ext}" for ext in ("csv", "json", "svg")}
    csv = pd.read_csv(out / "best_of_n-hmean-n4.csv")
    assert set(csv["variant"]) == {"expected", "first"} and sorted(set(csv["n"])) == [1, 2, 4]
    assert (csv["n_pairs"] == 8).all() and (csv["n_too_few"] == 0).all()
    meta = json.loads((out / "best_of_n-hmean-n4.json").read_text())
    assert meta["N"] == 4 and meta["ns"] == [1, 2, 4] and meta["column"] == "hmean"
    # the scoring the curve used: the parent's last score (identity_clamp set by `score`, not the config)
    assert meta["scoring"]["rules"]["identity_clamp"] is True
    assert set(meta["scoring"]["scorers"]) == {"adaface", "sphereface", "facenet", "clip", "siglip"}
    assert meta["counts"]["generated"] == 20 or meta["counts"]["generated"] == 0  # the second call rewrote it
    assert len(meta["curve"]) == len(csv)
    svg = (out / "best_of_n-hmean-n4.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "hMean" in svg
    for _, rows in csv[csv["variant"] == "expected"].groupby("method"):
        v = rows.sort_values("n")["value"].to_numpy()
        assert np.all(np.diff(v) >= -1e-12)
    # a non-trivial column (hMean is 0 here: no faces in tiny-model images): expected curve rises from the mean
    rec = pd.read_parquet(first.scored_dir / "records.parquet")
    clip = best_of_n_curve(rec, ns=(1, 2, 4), column="clip", k=4)
    exp = clip[clip["variant"] == "expected"].sort_values("n")["value"].to_numpy()
    assert exp[0] == pytest.approx(rec.loc[~rec["is_reference"], "clip"].mean())
    assert exp[0] < exp[1] < exp[2]
    assert "expected" in first.text() and "best_of_n-hmean-n4.svg" in first.text()
    from f2d_bench.report.fig7 import plot_best_of_n

    plot_best_of_n(first.curve, out / "again.svg")
    assert (out / "again.svg").read_bytes() == (out / "best_of_n-hmean-n4.svg").read_bytes()  # deterministic


@pytest.mark.slow
def test_second_call_resumes_without_work(topped_up):
    _, _, _, first, second = topped_up
    assert (second.linked, second.generated, second.score_chunks_copied) == (0, 0, 0)
    assert set(second.score_computed.values()) == {0}
    pd.testing.assert_frame_equal(first.curve, second.curve)


@pytest.mark.slow
def test_no_generate_after_top_up_and_direct_use_of_a_parent_with_all_seeds(topped_up):
    parent, _, _, first, _ = topped_up
    again = upper_bound(parent, 4, generate=False, progress=False)
    assert again.generated == 0 and set(again.score_computed.values()) == {0}
    pd.testing.assert_frame_equal(first.curve, again.curve)
    # n=2: the parent's own seeds suffice, no child run
    direct = upper_bound(parent, 2, generate=False, progress=False)
    assert direct.scored_dir == parent and not (parent / "upper_bound" / "n2").exists()
    assert sorted(set(direct.curve["n"])) == [1, 2]


@pytest.mark.slow
def test_curves_of_other_n_and_columns_stay_and_the_report_takes_each_columns_largest_n(topped_up):
    from f2d_bench.report.data import best_of_n_curves

    parent = topped_up[0]
    upper_bound(parent, 2, generate=False, progress=False)
    upper_bound(parent, 4, generate=False, progress=False, column="gmean")
    out = parent / "upper_bound"
    assert {p.name for p in out.glob("best_of_n*.csv")} == {
        "best_of_n-hmean-n4.csv", "best_of_n-hmean-n2.csv", "best_of_n-gmean-n4.csv"}
    run = RunDir(parent)
    curves = best_of_n_curves(run, run.scoring_info())
    assert [(c.column, c.n, c.csv.name, c.svg.name, c.stale) for c in curves] == [
        ("hmean", 4, "best_of_n-hmean-n4.csv", "best_of_n-hmean-n4.svg", []),
        ("gmean", 4, "best_of_n-gmean-n4.csv", "best_of_n-gmean-n4.svg", [])]
    # the run scored again since with another face rule, or a scorer in another precision
    info = run.scoring_info()
    info["identity_clamp"] = False
    info["scorers"][0]["precision"] = "bf16"
    assert best_of_n_curves(run, info)[0].stale == [
        "scoring.identity_clamp is True in the curve, False in the run's records",
        f"{info['scorers'][0]['name']}: precision differ between the curve and the run's records"]
    # a curve of the earlier single-file layout is still read; it records no scoring, and says so
    legacy = out / "best_of_n.csv"
    shutil.copyfile(out / "best_of_n-hmean-n2.csv", legacy)
    (out / "best_of_n.json").write_text(json.dumps({"N": 16, "column": "hmean"}))
    try:
        first = best_of_n_curves(run, run.scoring_info())[0]
        assert (first.csv, first.n, first.svg) == (legacy, 16, None)
        assert first.stale == ["the curve does not record the scoring it used"]
    finally:
        legacy.unlink()
        (out / "best_of_n.json").unlink()


@pytest.mark.slow
def test_seeds_outside_range_are_an_error(topped_up, tmp_path):
    parent = topped_up[0]
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(parent / "run.json", fake / "run.json")
    grid = json.loads((parent / "grid.json").read_text())
    grid["seeds"] = [0, 7]
    (fake / "grid.json").write_text(json.dumps(grid))
    with pytest.raises(F2DBenchError, match=r"seed\(s\) \[7\] are not among them"):
        upper_bound(fake, 4, progress=False)


@pytest.mark.slow
def test_command_line(topped_up, capsys):
    parent = topped_up[0]
    parser = cli_parser(register)
    with pytest.raises(SystemExit):
        parser.parse_args(["upper-bound", "--help"])
    help_text = capsys.readouterr().out
    assert "--no-generate" in help_text and "Fig. 7" in help_text and "--n N" in help_text
    args = parser.parse_args(["upper-bound", str(parent), "--n", "4", "--no-generate", "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "best_of_n-hmean-n4.csv" in out and "expected" in out
    args = parser.parse_args(["upper-bound", str(parent), "--n", "8", "--no-generate", "--no-progress"])
    with pytest.raises(F2DBenchError, match="fewer than 8 images"):
        args.func(args)


def test_a_faceless_image_counts_zero_in_the_best_of_n_under_either_no_face_rule():
    from f2d_bench.aggregate.best_of_n import no_face_counts_zero
    from f2d_bench.aggregate.metrics import MetricCatalog
    from f2d_bench.config import ScoringConfig
    from f2d_bench.scoring.score import identity_conventions

    identity, text = ("adaface", "sphereface", "facenet"), ("clip", "dclip", "siglip")
    catalog = MetricCatalog(tuple({"name": m, "in_mean": True, "identity": m in identity} for m in identity + text))
    # pair f1: four images, every metric 0.5; pair f2: seed 0 has no face (text 0.3), seeds 1-3 all 0.1
    detected = np.array([True] * 4 + [False] + [True] * 3)
    raw = {m: np.array([0.5] * 4 + [0.0] + [0.1] * 3) for m in identity}
    raw.update({m: np.array([0.5] * 4 + [0.3] + [0.1] * 3) for m in text})
    curves = {}
    for rule in ("zero", "drop"):
        values = identity_conventions(raw, identity, detected, ScoringConfig(no_face=rule))
        rec = pd.DataFrame([record_row("m", face, None, prompt="p", seed=seed, face_detected=bool(det),
                                       **{m: values[m][i] for m in values})
                            for i, (face, seed, det) in enumerate(zip(["f1"] * 4 + ["f2"] * 4, list(range(4)) * 2,
                                                                      detected))]).drop(columns="hmean")
        curves[rule] = best_of_n_curve(no_face_counts_zero(rec, catalog), ns=(1, 4), k=4)
    for rule, curve in curves.items():
        exp = curve[curve["variant"] == "expected"].set_index("n")
        assert (exp["n_pairs"] == 2).all() and (exp["n_nan"] == 0).all(), rule  # drop kept f2 out before
        assert exp.loc[1, "value"] == pytest.approx((0.5 + (0.0 + 0.1 * 3) / 4) / 2), rule  # the faceless one: 0
        assert exp.loc[4, "value"] == pytest.approx((0.5 + 0.1) / 2), rule
    pd.testing.assert_frame_equal(curves["zero"], curves["drop"])


@pytest.mark.slow
def test_the_upper_bound_of_a_run_scored_with_no_face_drop_keeps_its_faceless_pairs(topped_up):
    parent, _, _, first, _ = topped_up
    scoring = RunDir(parent).config().scoring.replace(identity_clamp=True)
    try:
        score_run(parent, scoring=scoring.replace(no_face="drop"), progress=False)  # cached values: no work
        drop = upper_bound(parent, 4, generate=False, progress=False)
        # The tiny model draws no faces: every image is faceless, hMean 0 under the paper's rule either way.
        assert (drop.curve["n_pairs"] == 8).all() and (drop.curve["n_nan"] == 0).all()
        pd.testing.assert_frame_equal(first.curve, drop.curve)
        meta = json.loads((parent / "upper_bound" / "best_of_n-hmean-n4.json").read_text())
        assert "0.0" in meta["no_face"]
    finally:
        score_run(parent, scoring=scoring, progress=False)


def test_a_run_scored_without_every_mean_metric_is_refused_before_anything_is_generated(tmp_path):
    data = small_config_dict(faces=str(face_dir(tmp_path / "faces", ("obama",))), seeds=[0], batch_size=4,
                             scoring=offline_scoring(scorers=["adaface", "clip"]))
    parent = tmp_path / "run"
    assert generate_run(config_from_dict(data), parent, progress=False).complete
    score_run(parent, progress=False)
    with pytest.raises(F2DBenchError, match=r"give no sphereface, facenet, siglip: its hmean .* --scorers "
                                            r"adaface,clip,sphereface,facenet,siglip\).* nothing was generated"):
        upper_bound(parent, 2, progress=False)
    assert not (parent / "upper_bound").exists()
