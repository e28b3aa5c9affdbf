"""`f2d-bench report`: a small scored run (two imported methods, every scorer on tiny / random-weight
models) rendered to HTML, its numbers checked against means computed here from records.parquet with plain
pandas, for links that stay inside, for escaping of hostile prompts and labels, and opened in headless
Chromium when it is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    OTHER,
    REPO,
    SAME,
    cli_parser,
    default_catalog,
    external_source,
    face_dir,
    offline_scoring,
    sha256_file,
    small_config_dict,
)
from PIL import Image

from f2d_bench.errors import F2DBenchError
from f2d_bench.report.render import build_report, check_links_inside, fmt, page_links

# Every test here uses the scored run (about 40 s to build and score on two cores): the module is left
# out of `make test-fast`.
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

# A prompt and labels that would run script if any of them reached the page unescaped.
XSS_PROMPT = "{} as a chef <script>alert(1)</script><script>document.body.setAttribute('data-pwned','prompt')</script>"
XSS_LABEL = "Method {} <img src=x onerror=\"document.body.setAttribute('data-pwned','label')\">"
RESAMPLES = 300
TABLE1_COLUMNS = default_catalog().table1_columns


def _prompts_yaml(path: Path) -> Path:
    path.write_text(f"""name: hostile
version: "1"
class_phrase: a person
reference:
  id: ref
  template: "a photo of {{}}"
prompts:
  - id: job-chef
    category: job
    template: {json.dumps(XSS_PROMPT)}
  - id: activity-guitar
    category: activity
    template: "{{}} playing the guitar & singing"
  - id: expression-laughing
    category: expression
    template: "{{}} laughing"
  - id: location-eiffel-tower
    category: location
    template: "{{}} in front of the Eiffel Tower"
""", encoding="utf-8")
    return path


def _build_scored_run(tmp: Path) -> Path:
    """Two `external` methods made of real photo crops (A: mostly the same person; B: more often another
    person and a noise image without a face), scored by every scorer with tiny / random weights."""
    from f2d_bench.config import config_from_dict
    from f2d_bench.engine import generate_run
    from f2d_bench.scoring import score_run

    faces = face_dir(tmp / "faces", SAME)
    rng = np.random.default_rng(0)
    plans = {
        "A": lambda f: {"job-chef": SAME[f], "activity-guitar": OTHER[f], "location-eiffel-tower": SAME[f],
                        "expression-laughing": SAME[f], "ref": f},
        "B": lambda f: {"job-chef": OTHER[f], "activity-guitar": OTHER[f], "location-eiffel-tower": SAME[f],
                        "expression-laughing": None, "ref": f},
    }
    methods = []
    for name, plan in plans.items():
        src = external_source(tmp / f"src-{name}", SAME, plan, rng=rng, noise_size=96)
        methods.append({"name": "external", "label": XSS_LABEL.replace("{}", name),
                        "params": {"source": str(src), "trained_params": 1.2e7 if name == "A" else None}})
    data = small_config_dict(
        faces=str(faces), prompts=str(_prompts_yaml(tmp / "prompts.yaml")), seeds=[0], methods=methods,
        scoring=offline_scoring())
    out = tmp / "run"
    assert generate_run(config_from_dict(data), out, progress=False).complete
    score_run(out, progress=False)
    return out


def _add_fid_and_upper_bound(run: Path) -> None:
    """What `score --fid-ref` and `upper-bound` write, in their documented formats."""
    from f2d_bench.aggregate.best_of_n import best_of_n_curve
    from f2d_bench.upper_bound import UpperBoundSummary, write_outputs

    rec = pd.read_parquet(run / "records.parquet")
    methods = sorted(rec["method"].unique())
    fid = {m: {"value": 100.0 + 10 * i, "backend": "pytorch-fid", "n_generated": 16, "n_reference": 321,
               "reference": "/refs/cc12m-person.npz"} for i, m in enumerate(methods)}
    (run / "scores" / "fid.json").write_text(json.dumps(fid), encoding="utf-8")
    curve = best_of_n_curve(rec, ns=(1,), k=1)
    (run / "upper_bound").mkdir(exist_ok=True)
    write_outputs(UpperBoundSummary(run_dir=run, scored_dir=run, n=1, ns=[1], column="hmean", curve=curve))


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    run = _build_scored_run(tmp_path_factory.mktemp("report-run"))
    _add_fid_and_upper_bound(run)
    return run


@pytest.fixture(scope="module")
def report(scored_run, tmp_path_factory) -> Path:
    return build_report([scored_run], tmp_path_factory.mktemp("report") / "out", n_resamples=RESAMPLES)


def _html(report: Path) -> str:
    return report.read_text(encoding="utf-8")


def _prompt_rows(rec: pd.DataFrame) -> pd.DataFrame:
    """What the tables average, selected here by hand: prompt images (no reference) without an error."""
    return rec[~rec["is_reference"].astype(bool) & rec["error"].isna()]


def _expected_means(rec: pd.DataFrame, by="method") -> pd.DataFrame:
    """Plain pandas means over the prompt rows, with the detection rate and the image count."""
    rows = _prompt_rows(rec)
    out = rows.groupby(by)[list(TABLE1_COLUMNS)].mean()
    out["face_detection_rate"] = rows.groupby(by)["face_detected"].mean()
    out["n_images"] = rows.groupby(by).size()
    return out


class _Table1Cells(HTMLParser):
    """(method id, column) -> the first number shown in each Table 1 cell of the page."""

    def __init__(self):
        super().__init__()
        self.in_table1 = self.in_td = self.in_code = False
        self.method = self.col = None
        self.text = ""
        self.cells: dict[tuple[str, str], str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.in_table1 = a.get("id") == "table1"
        if self.in_table1 and tag == "code":
            self.in_code, self.text = True, ""
        if self.in_table1 and tag == "td" and "data-col" in a:
            self.in_td, self.col, self.text = True, a["data-col"], ""

    def handle_endtag(self, tag):
        if tag == "code" and self.in_code:
            self.in_code, self.method = False, self.text.strip()
        if tag == "td" and self.in_td:
            self.in_td = False
            self.cells[(self.method, self.col)] = re.match(r"[-\d.–]+", self.text.strip()).group(0)

    def handle_data(self, data):
        if self.in_code or self.in_td:
            self.text += data


# -- contents and numbers -----------------------------------------------------------------------------


def test_report_has_every_section_and_file(report):
    html = _html(report)
    for section in ("table1", "table2", "categories", "pairs", "plots", "upper-bound", "paper", "images", "metadata"):
        assert f'<section id="{section}"' in html, section
    out = report.parent
    for name in ("table1", "table2", "categories", "paired", "best_of_n"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.json").is_file(), name
    for svg in ("plots/means.svg", "plots/tradeoff.svg", "plots/categories.svg", "upper_bound/run0-best_of_n-hmean-n1.svg"):
        assert (out / svg).read_text(encoding="utf-8").lstrip().startswith("<?xml"), svg
        assert f'src="{svg}"' in html, svg
    assert "Reference: the paper's published numbers" in html and "Face2Diffusion" in html
    for meta in ("EulerAncestralDiscreteScheduler", "facenet-pytorch MTCNN", "open_clip_torch", "cpu_count"):
        assert meta in html, meta


def test_table1_numbers_equal_means_computed_from_the_records(report, scored_run):
    rec = pd.read_parquet(scored_run / "records.parquet")
    means = _expected_means(rec)
    assert len(means) == 2 and (means["n_images"] == 16).all()  # 4 faces x 4 prompts, reference left out
    csv = pd.read_csv(report.parent / "table1.csv", index_col=0)
    assert list(csv.index) == list(means.index)
    for c in (*TABLE1_COLUMNS, "face_detection_rate", "n_images"):
        np.testing.assert_allclose(csv[c].to_numpy(float), means[c].to_numpy(float), rtol=1e-12, err_msg=c)
    # table1.json holds the same rows
    rows = json.loads((report.parent / "table1.json").read_text())
    assert [r["method"] for r in rows] == list(means.index)
    for r in rows:
        for c in (*TABLE1_COLUMNS, "face_detection_rate", "n_images"):
            assert r[c] == pytest.approx(means.loc[r["method"], c], rel=1e-12), (r["method"], c)
    # a face-level interval: it holds the mean, and each resample is a weighted mean of per-face means,
    # so it stays within their range
    per_face = _prompt_rows(rec).groupby(["method", "face"])[list(TABLE1_COLUMNS)].mean()
    for m in means.index:
        for c in TABLE1_COLUMNS:
            lo, mean, hi = csv.loc[m, f"{c}_lo"], csv.loc[m, c], csv.loc[m, f"{c}_hi"]
            faces = per_face.loc[m, c]
            eps = 1e-12
            assert faces.min() - eps <= lo <= mean + eps and mean - eps <= hi <= faces.max() + eps, (m, c)
            if faces.max() - faces.min() > 1e-9:  # faces differ: the interval is not a single point
                assert hi - lo > 0, (m, c)
    assert (csv["n_faces"] == 4).all()
    # what the page shows is the same numbers, rounded
    parser = _Table1Cells()
    parser.feed(_html(report))
    for m in means.index:
        for c in (*TABLE1_COLUMNS, "face_detection_rate"):
            assert parser.cells[(m, c)] == fmt(means.loc[m, c]), (m, c)
    # method B has 4 noise images of 16: detection rate 12/16
    assert sorted(csv["face_detection_rate"]) == [pytest.approx(0.75), pytest.approx(1.0)]


#: The base model and sampling line under a method's name (absent for external images).
_SETUP = r'(?:<br><span class="setup">[^<]*</span>)?'


def test_top_three_marks_and_random_weight_notes(report):
    html = _html(report)
    csv = pd.read_csv(report.parent / "table1.csv", index_col=0)
    best = csv["face_detection_rate"].idxmax()
    cell = re.search(rf'{re.escape(best)}</code>{_SETUP}</th>.*?data-col="face_detection_rate">(.*?)</td>', html, re.DOTALL)
    assert cell.group(1).startswith("<strong>"), cell.group(1)
    worst = csv["face_detection_rate"].idxmin()
    cell = re.search(rf'{re.escape(worst)}</code>{_SETUP}</th>.*?data-col="face_detection_rate">(.*?)</td>', html, re.DOTALL)
    assert cell.group(1).startswith("<u>"), cell.group(1)
    assert "<strong>best</strong>, <u>second</u>" in html
    # adaface ... siglip were scored with random weights, hMean/gMean combine them: all six marked
    assert "random weights: not meaningful" in html
    for name in ("AdaFace", "SphereFace", "FaceNet", "CLIP", "dCLIP", "SigLIP", "hMean", "gMean"):
        assert re.search(rf'title="random weights: not meaningful">{name}&nbsp;&dagger;', html), name
    assert '<th class="" title="">face det.</th>' in html  # the detection rate is not a model output


def test_table2_fid_parameters_and_encoding_time(report, scored_run):
    t2 = pd.read_csv(report.parent / "table2.csv", index_col=0)
    fid = json.loads((scored_run / "scores" / "fid.json").read_text())
    for m, r in fid.items():
        assert t2.loc[m, "fid"] == r["value"] and t2.loc[m, "fid_backend"] == "pytorch-fid"
        assert t2.loc[m, "fid_n_generated"] == 16 and t2.loc[m, "fid_n_reference"] == 321
        # imported images: nothing is encoded, so no time (not a near-zero one ranked best)
        assert np.isnan(t2.loc[m, "encode_median_s"]) and t2.loc[m, "encode_n_faces"] == 0
        assert t2.loc[m, "weights"] == json.loads((scored_run / "methods" / m / "method.json").read_text())["weights"]
    assert sorted(t2["trained_params"].fillna(-1)) == [-1, 1.2e7]
    html = _html(report)
    assert "1.20e7" in html and ">321<" in html and "100.00" in html
    # 16 generated and 321 reference images: each FID is marked as too few to compare
    assert len(re.findall(r"1[01]0\.00(?:</\w+>)?&nbsp;&Dagger;", html)) == 2 and "FID from fewer than 2,048 generated or reference" in html


def test_categories_pairs_and_best_of_n_tables(report, scored_run):
    rec = pd.read_parquet(scored_run / "records.parquet")
    cats = pd.read_csv(report.parent / "categories.csv", index_col=[0, 1])
    want = _prompt_rows(rec).groupby(["method", "category"])[list(TABLE1_COLUMNS)].mean()
    assert sorted(cats.index) == sorted(want.index) and len(cats) == 2 * 4
    got = cats.loc[list(want.index), list(TABLE1_COLUMNS)]
    np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-12)
    assert set(cats.index.get_level_values("category")) == {"job", "activity", "expression", "location"}
    # categories in the report's order within each method
    for m in want.index.get_level_values("method").unique():
        assert list(cats.loc[m].index) == ["job", "activity", "expression", "location"]
    pairs = pd.read_csv(report.parent / "paired.csv")
    assert list(pairs["column"]) == ["hmean", "gmean"]
    means = pd.read_csv(report.parent / "table1.csv", index_col=0)
    a, b = pairs.loc[0, "method_a"], pairs.loc[0, "method_b"]
    assert pairs.loc[0, "diff"] == pytest.approx(means.loc[a, "hmean"] - means.loc[b, "hmean"])
    best = pd.read_csv(report.parent / "best_of_n.csv")
    assert set(best["variant"]) == {"expected", "first"} and len(best) == 4


# -- files and links ----------------------------------------------------------------------------------


def test_thumbnails_and_full_images_exist_inside_the_report(report, scored_run):
    out = report.parent.resolve()
    html = _html(report)
    links = page_links(html)
    assert links, "no links at all"
    thumbs = [v for tag, attr, v in links if tag == "img" and v.startswith("thumbs/")]
    fulls = [v for tag, attr, v in links if tag == "a" and v.startswith("full/")]
    rec = pd.read_parquet(scored_run / "records.parquet")
    assert len(thumbs) == len(rec) + 4  # every image of the small run plus the 4 input faces
    assert len(fulls) == len(thumbs)
    for v in thumbs:
        with Image.open(out / v) as im:
            assert max(im.size) <= 160 and im.format == "JPEG"
    for v in fulls:  # the copies are byte-identical to the run's images
        sha = Path(v).stem
        assert sha256_file(out / v) == sha
    up = [v for tag, attr, v in links if v == "../index.html"]
    assert len(up) == 1 and (out.parent / "index.html").is_file()  # the one link out: the reports index
    assert "report" in (out.parent / "index.html").read_text(encoding="utf-8")
    for tag, attr, v in links:
        if v.startswith("#") or v == "../index.html":
            continue
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", v, re.IGNORECASE) and not v.startswith("/"), v
        target = (out / v).resolve()
        assert target.is_relative_to(out) and target.is_file(), v
    check_links_inside(html, out, also=frozenset({"../index.html"}))  # the page's own check agrees
    with pytest.raises(F2DBenchError, match="index.html"):
        check_links_inside(html, out)  # and the link up is let through by name only


@pytest.mark.parametrize("link", [
    '<a href="../outside.html">x</a>', '<img src="/etc/passwd">', '<a href="https://example.com/">x</a>',
    '<a href="javascript:alert(1)">x</a>', '<img src="file:///etc/passwd">', '<link href="//cdn.example/x.css">',
    '<img src="thumbs/missing.jpg">', '<img srcset="plots/means.svg 1x, ../x.png 2x">',
])
def test_link_check_rejects_links_that_leave_the_report(report, link):
    with pytest.raises(F2DBenchError):
        check_links_inside(f"<html><body>{link}</body></html>", report.parent)
    check_links_inside('<a href="#table1">t</a><img src="plots/means.svg">', report.parent)


def test_user_text_is_escaped(report):
    html = _html(report)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=" in html
    assert html.count("<script") == 1  # the page's own viewer script only
    # the report's JSON carries the label as data, unchanged
    rows = json.loads((report.parent / "table1.json").read_text())
    # rows follow method ids, which hash the (temporary) source paths: compare as a set
    assert {r["label"] for r in rows} == {XSS_LABEL.replace("{}", "A"), XSS_LABEL.replace("{}", "B")}


def test_report_imports_no_torch(scored_run, tmp_path):
    code = (
        "import sys\n"
        "from f2d_bench.report.render import build_report\n"
        f"build_report([{str(scored_run)!r}], {str(tmp_path / 'r')!r}, n_resamples=50)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'open_clip'))\n"
        "print('HEAVY', heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout
    assert (tmp_path / "r" / "index.html").is_file()


def test_cli_register_writes_the_report(scored_run, tmp_path, capsys):
    from f2d_bench.report.cli import register

    parser = cli_parser(register)
    args = parser.parse_args(["report", str(scored_run), "-o", str(tmp_path / "r"), "--resamples", "50",
                              "--grid-faces", "2", "--grid-seeds", "1"])
    assert args.func(args) == 0
    assert str(tmp_path / "r" / "index.html") in capsys.readouterr().out
    html = (tmp_path / "r" / "index.html").read_text()
    assert "Showing 2 of 4 faces" in html


@pytest.mark.parametrize("option, value, says", [
    ("--confidence", "1.5", "strictly between 0 and 1"), ("--confidence", "0", "strictly between 0 and 1"),
    ("--confidence", "nan", "must be a number"), ("--resamples", "0", "integer >= 1"),
    ("--grid-faces", "-1", "integer >= 0"), ("--grid-seeds", "two", "must be an integer"),
])
def test_report_options_out_of_range_are_usage_errors(tmp_path, capsys, option, value, says):
    from f2d_bench.report.cli import register

    with pytest.raises(SystemExit) as exc:
        cli_parser(register).parse_args(["report", "RUN", "-o", str(tmp_path / "r"), option, value])
    assert exc.value.code == 2 and says in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_report_settings_out_of_range_are_refused_by_the_library_too(scored_run, tmp_path):
    for bad in ({"confidence": 1.0}, {"n_resamples": 0}, {"grid_faces": -2}):
        with pytest.raises(F2DBenchError, match="report settings out of range"):
            build_report([scored_run], tmp_path / "r", **bad)
    assert not (tmp_path / "r").exists()


def test_two_runs_are_merged(scored_run, tmp_path):
    rec = pd.read_parquet(scored_run / "records.parquet")
    a, b = sorted(rec["method"].unique())
    runs = []
    for keep in (a, b):  # each copy holds one method's records
        copy = tmp_path / f"run-{keep}"
        shutil.copytree(scored_run, copy)
        rec[rec["method"] == keep].to_parquet(copy / "records.parquet", index=False)
        runs.append(copy)
    index = build_report(runs, tmp_path / "merged", n_resamples=RESAMPLES)
    merged = pd.read_csv(index.parent / "table1.csv", index_col=0)
    want = _expected_means(rec)
    assert list(merged.index) == list(want.index)
    np.testing.assert_allclose(merged["hmean"].to_numpy(float), want["hmean"].to_numpy(float), rtol=1e-12)
    assert "Run 2: run-" in index.read_text()


def _variant(scored_run: Path, tmp_path: Path, edit, drop_metrics=()) -> str:
    """The page of a copy of the scored run whose records are ``edit(records)`` (a new frame, or None for
    one changed in place) and whose scoring.json no longer declares ``drop_metrics`` (as a run scored with
    fewer scorers has)."""
    copy = tmp_path / "variant"
    shutil.copytree(scored_run, copy)
    rec = pd.read_parquet(copy / "records.parquet")
    edited = edit(rec)
    (rec if edited is None else edited).to_parquet(copy / "records.parquet", index=False)
    scoring_json = copy / "scores" / "scoring.json"
    scoring = json.loads(scoring_json.read_text())
    scoring["metrics"] = [m for m in scoring["metrics"] if m["name"] not in drop_metrics]
    scoring_json.write_text(json.dumps(scoring))
    return build_report([copy], tmp_path / "r", n_resamples=50).read_text(encoding="utf-8")


def test_identical_methods_highlight_no_pair(scored_run, tmp_path):
    def same_as_a(rec):
        a, b = sorted(rec["method"].unique())
        values = rec[rec["method"] == a].set_index(["face", "prompt", "seed"])
        for c in rec.columns:
            if pd.api.types.is_float_dtype(rec[c]):
                rows = rec["method"] == b
                rec.loc[rows, c] = values[c].reindex(pd.MultiIndex.from_frame(rec.loc[rows, ["face", "prompt", "seed"]])).to_numpy()
        rec["face_detected"] = True

    html = _variant(scored_run, tmp_path, same_as_a)
    pairs = html[html.index('<section id="pairs"'):html.index('<section id="plots"')]
    assert pairs.count("[0.0000, 0.0000]") == 2  # hMean and gMean: no difference at all
    assert 'class="clear"' not in pairs  # a highlighted row says "the interval excludes 0"


def test_a_run_without_siglip_has_no_combined_group_and_says_why_nothing_is_compared(scored_run, tmp_path):
    def no_siglip(rec):
        return rec.drop(columns=["siglip", "hmean", "gmean"])

    html = _variant(scored_run, tmp_path, no_siglip, drop_metrics=("siglip",))
    head = re.search(r'<section id="table1">.*?<thead>\s*<tr>(.*?)</tr>', html, re.DOTALL).group(1)
    assert re.findall(r'colspan="(\d+)">([^<]+)<', head) == [("4", "Identity"), ("2", "Text")]
    assert "No hMean or gMean to compare: they need all six protocol metrics, and siglip were not scored." in html


def test_an_unreadable_method_keeps_its_row_and_one_face_gives_no_interval(scored_run, tmp_path):
    def one_face_b_unreadable(rec):
        rec = rec[rec["face"] == sorted(rec["face"].unique())[0]].copy()
        b = rec["method"] == sorted(rec["method"].unique())[1]
        rec["error"] = rec["error"].astype(object)
        rec.loc[b, "error"] = "cannot read image: truncated"
        for c in ("adaface", "clip", "hmean", "gmean"):
            rec.loc[b, c] = np.nan
        return rec

    html = _variant(scored_run, tmp_path, one_face_b_unreadable)
    t1 = pd.read_csv(tmp_path / "r" / "table1.csv", index_col=0)
    a, b = sorted(t1.index)
    assert t1.loc[b, "n_images"] == 0 and t1.loc[b, "n_errors"] == 4 and np.isnan(t1.loc[b, "hmean"])
    assert t1.loc[a, "n_faces"] == 1 and np.isfinite(t1.loc[a, "hmean"])
    assert np.isnan(t1.loc[a, "hmean_lo"]) and np.isnan(t1.loc[a, "hmean_hi"])  # no interval from one face
    assert "4 unreadable" in html and "Only one method has readable prompt images: nothing to compare." in html


def test_the_count_behind_hmean_is_shown_when_it_is_smaller(scored_run, tmp_path):
    def three_without_dclip(rec):
        a = rec.index[(rec["method"] == sorted(rec["method"].unique())[0]) & ~rec["is_reference"]][:3]
        rec.loc[a, ["dclip", "hmean", "gmean"]] = np.nan

    html = _variant(scored_run, tmp_path, three_without_dclip)
    assert "hMean/gMean over 13" in html and html.count("hMean/gMean over") == 1


def test_published_counts_best_of_n_column_and_index_image_count(report, scored_run):
    html = _html(report)
    assert ">1,024<" in html  # CelebBasis's trained parameters, not "1.02e3"
    assert "Best hMean among N images" in html and "best hMean, N up to 1" in html
    assert "may not match the run" not in html  # the curve was computed from the records as they are
    rec = pd.read_parquet(scored_run / "records.parquet")
    facts = json.loads((report.parent / "aggregates.json").read_text())
    assert facts["n_images"] == len(_prompt_rows(rec)) == 32  # the images behind Table 1, not the references


def test_a_curve_from_an_earlier_scoring_is_marked_out_of_date(scored_run, tmp_path):
    from f2d_bench.run_dir import RunDir
    from f2d_bench.scoring import score_run

    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    score_run(run, scoring=RunDir(run).config().scoring.replace(identity_clamp=True), progress=False)
    html = _html(build_report([run], tmp_path / "out", n_resamples=RESAMPLES))
    assert "may not match the run" in html
    assert "scoring.identity_clamp is False in the curve, True in the run&#39;s records" in html
    assert f"<code>f2d-bench upper-bound {run} --n 1</code> brings it up to date" in html


def test_the_trade_off_plot_puts_the_paper_on_the_metrics_it_averages(monkeypatch, tmp_path):
    from matplotlib.axes import Axes

    from f2d_bench.aggregate.metrics import MetricCatalog
    from f2d_bench.aggregate.paper import PAPER_TABLE1
    from f2d_bench.report.plots import plot_tradeoff

    drawn = []
    real = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or real(self, x, y, *a, **k))
    specs = [{"name": n, "in_mean": True, "identity": n in ("adaface", "sphereface", "facenet")}
             for n in ("adaface", "sphereface", "facenet", "clip", "dclip")]
    table = pd.DataFrame({n: [0.5] for n in ("adaface", "sphereface", "facenet", "clip", "dclip")}, index=["m"])
    plot_tradeoff(table, PAPER_TABLE1, tmp_path / "t.svg", MetricCatalog(tuple(specs)))
    px, py = drawn[0]
    np.testing.assert_allclose(px, PAPER_TABLE1[["clip", "dclip"]].mean(axis=1))  # SigLIP left out, as for the run
    np.testing.assert_allclose(py, PAPER_TABLE1[["adaface", "sphereface", "facenet"]].mean(axis=1))


def test_the_face_sets_selection_and_sources_are_shown(scored_run, tmp_path):
    from f2d_bench.faces.source import resolve_face_set

    builtin = resolve_face_set("builtin:test-faces")[0].path.parent
    copy, faces = tmp_path / "run", tmp_path / "faces"
    shutil.copytree(scored_run, copy)
    run_json = json.loads((copy / "run.json").read_text())
    shutil.copytree(run_json["faces_dir"][0], faces)
    shutil.copy(builtin / "manifest.json", faces / "manifest.json")
    (copy / "run.json").write_text(json.dumps({**run_json, "faces_dir": [str(faces)]}))
    manifest = json.loads((faces / "manifest.json").read_text())
    html = build_report([copy], tmp_path / "r", n_resamples=50).read_text(encoding="utf-8")
    sel = manifest["selection"]
    assert f"faces: {sel['n_chosen']} of {sel['n_candidates']} sources" in html
    assert f"aligned to {manifest['settings']['output_size']} px" in html
    sources = pd.read_csv(tmp_path / "r" / "per_face.csv", index_col=0)["source"]
    entry = {e["face_id"]: e["source"] for e in manifest["faces"]}
    assert sources.to_dict() == {f: entry[f] for f in sources.index}


def test_unscored_run_is_a_clear_error(tmp_path, scored_run):
    copy = tmp_path / "unscored"
    shutil.copytree(scored_run, copy)
    (copy / "records.parquet").unlink()
    with pytest.raises(F2DBenchError, match="score it first"):
        build_report([copy], tmp_path / "r")


def test_report_refuses_a_folder_it_would_delete_and_replaces_an_earlier_report(scored_run, tmp_path, monkeypatch):
    """The report swaps in a whole folder: -o must not name a folder of other files, a run or its parent,
    nor sit beside an index.html that is not f2d-bench's; an earlier report is replaced."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "paper-draft.tex").write_text("keep me")
    with pytest.raises(F2DBenchError, match=r"not empty and holds no f2d-bench report"):
        build_report([scored_run], notes, n_resamples=RESAMPLES)
    assert (notes / "paper-draft.tex").read_text() == "keep me" and sorted(os.listdir(notes)) == ["paper-draft.tex"]

    runs = tmp_path / "runs"
    run = runs / "paper"
    shutil.copytree(scored_run, run)
    for target in (run, runs):  # the run itself, and the folder holding it
        with pytest.raises(F2DBenchError, match="holds the run"):
            build_report([run], target, n_resamples=RESAMPLES)
    assert (run / "records.parquet").is_file() and (run / "run.json").is_file()

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>my lab page</html>")
    with pytest.raises(F2DBenchError, match=r"not an f2d-bench reports index"):
        build_report([run], site / "r", n_resamples=RESAMPLES)
    assert (site / "index.html").read_text() == "<html>my lab page</html>" and not (site / "r").exists()

    out = tmp_path / "reports" / "r"
    first = build_report([run], out, n_resamples=RESAMPLES)
    (out / "stale.txt").write_text("from an earlier report")
    second = build_report([run], out, n_resamples=RESAMPLES)  # an earlier report is replaced whole
    assert first == second and second.is_file() and not (out / "stale.txt").exists()
    empty = tmp_path / "reports" / "empty"
    empty.mkdir()
    assert build_report([run], empty, n_resamples=RESAMPLES).is_file()

    # A link is followed to its folder: the index rewritten is that folder's, never the link's neighbour.
    (site / "latest").symlink_to(out, target_is_directory=True)
    assert build_report([run], site / "latest", n_resamples=RESAMPLES) == out / "index.html"
    assert (site / "index.html").read_text() == "<html>my lab page</html>" and (site / "latest").is_symlink()
    assert not [p for p in site.iterdir() if p.name.startswith(".")]
    # The working folder (-o .) is refused: the swap would pull it from under the process.
    monkeypatch.chdir(empty)
    with pytest.raises(F2DBenchError, match="is the working folder"):
        build_report([run], ".", n_resamples=RESAMPLES)


# -- in a browser -------------------------------------------------------------------------------------


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@needs_chromium
def test_chromium_opens_the_page_without_errors_and_runs_no_injected_script(report, tmp_path):
    res = _chromium(tmp_path, "--dump-dom", report.resolve().as_uri())
    dom = res.stdout
    assert res.returncode == 0 and "<table" in dom, res.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-report-ready="1"' in body, body  # the viewer script ran (allowed by its CSP hash)
    assert 'data-broken-images="0"' in body, body  # every thumbnail, face and plot loaded
    assert "data-js-error" not in body, body
    assert "data-pwned" not in body, body  # neither the prompt's script nor the label's onerror ran
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console  # no console messages: no errors, no CSP violations
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert dom.count("<script") == 1
    for section in ('id="table1"', 'id="table2"', 'id="categories"', 'id="pairs"', 'id="paper"'):
        assert section in dom
    assert 'src="plots/means.svg"' in dom and 'src="plots/tradeoff.svg"' in dom


@needs_chromium
def test_chromium_screenshot_shows_a_rendered_page(report, tmp_path):
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", report.resolve().as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1280, 1600)
        colours = im.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # text, tables and a plot, not a blank page
        # the header band is the page's own light background, not Chromium's error page
        assert im.getpixel((5, 5)) == (245, 247, 249)


def test_every_method_cell_shows_how_the_method_rendered(report):
    """Each table names the method with its base model and sampling (here: images imported from elsewhere)."""
    html = _html(report)
    # The rows of this run's methods (the paper's own rows name no run method).
    rows = [r for r in re.findall(r'<th class="method">.*?</th>', html, re.DOTALL) if "Method " in r]
    assert len(rows) >= 8 and all('<span class="setup">external images</span>' in r for r in rows), rows[:3]


# -- merging runs --------------------------------------------------------------------------------------


def _two_copies(scored_run, tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(scored_run, a)
    shutil.copytree(scored_run, b)
    return a, b


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_merged_runs_must_use_one_photo_and_one_prompt_per_id(scored_run, tmp_path):
    from f2d_bench.report.data import load_runs

    a, b = _two_copies(scored_run, tmp_path)
    merged = load_runs([a, b])
    n = len(pd.read_parquet(a / "records.parquet"))
    assert len(merged.records) == n and merged.duplicates == n  # the same images: the first run's kept
    face = json.loads((b / "grid.json").read_text())["faces"][0]["face_id"]

    def other_photo(grid):
        grid["faces"][0]["sha256"] = "0" * 64  # another person's photo under the same file name

    _edit_json(b / "grid.json", other_photo)
    with pytest.raises(F2DBenchError, match=rf"face id '{face}' is one photo in .* and another in .*separately"):
        load_runs([a, b])
    shutil.copy(a / "grid.json", b / "grid.json")

    def other_prompt(grid):
        grid["prompts"][0]["template"] = "{} riding a horse"

    _edit_json(b / "grid.json", other_prompt)
    with pytest.raises(F2DBenchError, match=r"prompt id .* riding a horse"):
        load_runs([a, b])


def test_runs_scored_differently_are_named_on_the_page(scored_run, tmp_path):
    from f2d_bench.report.data import load_runs, scoring_differences

    a, b = _two_copies(scored_run, tmp_path)
    assert scoring_differences(load_runs([a, b]).runs) == []

    def other_scoring(scoring):
        scoring["no_face"] = "drop"
        scoring["scorers"][0]["precision"] = "bf16"

    _edit_json(b / "scores" / "scoring.json", other_scoring)
    first = json.loads((a / "scores" / "scoring.json").read_text())["scorers"][0]["name"]
    lines = scoring_differences(load_runs([a, b]).runs)
    assert lines == ["scoring.no_face is 'zero' in a, 'drop' in b", f"{first}: precision differ between a and b"]
    html = build_report([a, b], tmp_path / "r", n_resamples=50).read_text(encoding="utf-8")
    assert "scored differently" in html and "precision differ between a and b" in html


def test_a_face_tuned_once_counts_once_in_the_time_per_face(scored_run, tmp_path):
    from f2d_bench.report.data import load_runs

    a, b = _two_copies(scored_run, tmp_path)  # b: what an upper-bound child holds, linked from a
    mid = sorted(pd.read_parquet(a / "records.parquet")["method"].unique())[0]
    for run in (a, b):
        for face, seconds in (("obama", 10.0), ("biden", 30.0)):
            folder = run / "methods" / mid / "faces" / face
            folder.mkdir(parents=True)
            (folder / "tune.json").write_text(json.dumps({"face_id": face, "seconds": seconds, "files": {}}))
    assert load_runs([a, b]).prepare_seconds()[mid] == [30.0, 10.0]  # sorted by face id, not twice each


def test_a_face_prepared_by_several_shards_counts_once_and_a_method_that_prepares_nothing_has_no_time(
        scored_run, tmp_path):
    from f2d_bench.report.data import load_runs
    from f2d_bench.run_dir import RunDir

    a, b = _two_copies(scored_run, tmp_path)
    mids = sorted(pd.read_parquet(a / "records.parquet")["method"].unique())
    # the external methods prepare nothing: nothing was recorded, and their method.json says so
    assert all(not RunDir(a).prepare_times_jsonl(m).exists() for m in mids)
    assert all(RunDir(a).method_info(m)["encodes_faces"] is False for m in mids)
    table2 = pd.read_csv(build_report([a], tmp_path / "r1", n_resamples=50).parent / "table2.csv", index_col=0)
    assert (table2["encode_n_faces"] == 0).all() and table2["encode_median_s"].isna().all()
    # an encoding method: two shards and a resume measured obama three times, biden once
    info = json.loads((a / "methods" / mids[0] / "method.json").read_text())
    for run in (a, b):
        (run / "methods" / mids[0] / "method.json").write_text(json.dumps({**info, "encodes_faces": True}))
        with (run / "methods" / mids[0] / "prepare_times.jsonl").open("w") as fh:
            for face, seconds in (("obama", 1.0), ("obama", 3.0), ("biden", 5.0), ("obama", 2.5)):
                fh.write(json.dumps({"face_id": face, "seconds": seconds}) + "\n")
    assert RunDir(a).prepare_seconds(mids[0]) == {"biden": 5.0, "obama": 2.5}
    assert load_runs([a, b]).prepare_seconds()[mids[0]] == [5.0, 2.5]  # one per face, not per run given
