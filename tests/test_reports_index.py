"""The index of a reports folder (`reports/index.html` and `index.json`), `faces prepare --limit`, and the
README's FaceForensics++ recipe run on a folder of small videos made here from the shipped photos.

The quick tests write report folders by hand (broken, older, newer, hostile names) and prepare faces with a
stand-in detector; the slow ones reuse the scored run of test_report.py and write two real reports."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, TEST_PHOTOS, cli_parser, offline_scoring, small_config_dict
from PIL import Image, ImageOps

from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.faces.detect import Detection
from f2d_bench.faces.prepare import prepare_faces, select_sources
from f2d_bench.report.index import REPORT_FORMAT, write_index
from f2d_bench.report.page import check_links_inside, fmt, page_links

HOSTILE = "<img src=x onerror=\"document.body.setAttribute('data-pwned','name')\"> #?%"


def _index(root: Path) -> dict:
    return json.loads((root / "index.json").read_text(encoding="utf-8"))


def _entries(root: Path) -> dict[str, dict]:
    return {e["name"]: e for e in _index(root)["reports"]}


def _tbody(html: str, name_attr: str) -> str:
    """The <tbody> of the reports table whose data-sort-name is ``name_attr`` (already HTML-escaped)."""
    match = re.search(rf'<tbody[^>]*data-sort-name="{re.escape(name_attr)}".*?</tbody>', html, re.DOTALL)
    assert match, name_attr
    return match.group(0)


# -- folders that are not (current) reports ------------------------------------------------------------


def _folder(root: Path, name: str, files: dict[str, str]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for rel, text in files.items():
        (d / rel).write_text(text, encoding="utf-8")
    return d


@pytest.fixture()
def odd_reports(tmp_path) -> Path:
    """A reports folder with one folder of each kind the index must list with a reason, plus the hidden
    entries a report command leaves beside its folder, which it must skip."""
    root = tmp_path / "reports"
    page = "<!DOCTYPE html><title>r</title>"
    _folder(root, "garbled", {"aggregates.json": '{"report_format": 1, "table1": [', "index.html": page})
    _folder(root, "older", {"aggregates.json": json.dumps({"f2d_bench_version": "0.0.9", "table1": []}),
                            "index.html": page})
    _folder(root, "newer", {"aggregates.json": json.dumps({"report_format": REPORT_FORMAT + 1}), "index.html": page})
    _folder(root, "bad-types", {"aggregates.json": json.dumps({"report_format": REPORT_FORMAT, "table1": "x"})})
    _folder(root, "bad-number", {"aggregates.json": json.dumps({
        "report_format": REPORT_FORMAT, "table1_columns": [{"col": "hmean", "name": "hMean"}],
        "table1": [{"method": "m-1", "hmean": "0.5"}]})})
    _folder(root, "page-only", {"index.html": page})
    _folder(root, "notes", {"todo.txt": "not a report"})
    _folder(root, HOSTILE, {"index.html": page, "aggregates.json": "[]"})
    outside = _folder(tmp_path, "elsewhere", {"index.html": page})
    (root / "linked").symlink_to(outside, target_is_directory=True)
    # what `report` and the atomic writers leave beside report folders: never listed
    _folder(root, ".smoke.new-1a2b3c", {"aggregates.json": "{}", "index.html": page})
    _folder(root, ".smoke.old-1a2b3c4d", {"aggregates.json": "{}"})
    (root / ".smoke.lock").write_text("")
    (root / ".index.html.0f0f0f0f.tmp").write_text("partial")
    return root


def test_folders_that_are_not_readable_reports_are_listed_with_their_reason(odd_reports):
    page = write_index(odd_reports)
    assert page == odd_reports / "index.html"
    entries = _entries(odd_reports)
    assert set(entries) == {"garbled", "older", "newer", "bad-types", "bad-number", "page-only", "notes",
                            HOSTILE, "linked"}  # hidden names are skipped
    want = {
        "garbled": ("unreadable", r"aggregates\.json is not valid JSON \(line 1"),
        "older": ("outdated", r"f2d-bench 0\.0\.9.*no report_format.*run f2d-bench report into it again"),
        "newer": ("newer", rf"newer f2d-bench \(report format {REPORT_FORMAT + 1}.*upgrade"),
        "bad-types": ("unreadable", r"table1_columns is not a list"),
        "bad-number": ("unreadable", r"table1\[0\]\.hmean is '0\.5', not a number"),
        "page-only": ("unreadable", r"has index\.html but no aggregates\.json"),
        "notes": ("not a report", r"no index\.html or aggregates\.json"),
        HOSTILE: ("unreadable", r"aggregates\.json is not a JSON object"),
        "linked": ("unreadable", r"outside .*reports; not followed"),
    }
    for name, (status, reason) in want.items():
        assert entries[name]["status"] == status, (name, entries[name])
        assert re.search(reason, entries[name]["reason"]), (name, entries[name]["reason"])
        assert entries[name]["methods"] == []
    assert _index(odd_reports)["leaderboard"] == []
    html = page.read_text(encoding="utf-8")
    for name, (status, _) in want.items():
        if name != HOSTILE:
            assert f"{status}</span>: " in _tbody(html, name)
    # a folder that still has its page is linked; the link to outside is not followed
    hrefs = {v for tag, attr, v in page_links(html) if tag == "a"}
    assert {"older/index.html", "newer/index.html", "garbled/index.html", "page-only/index.html"} <= hrefs
    assert not any(h.startswith("linked/") for h in hrefs)
    check_links_inside(html, odd_reports)


def test_hostile_folder_names_are_escaped_and_links_stay_inside(odd_reports):
    html = write_index(odd_reports).read_text(encoding="utf-8")
    assert "<img src=x" not in html and "&lt;img src=x onerror=" in html
    assert html.count("<script") == 1  # the page's own sorting script only
    link = next(v for tag, attr, v in page_links(html) if tag == "a" and v.endswith("/index.html")
                and "img" in v)
    assert link.startswith("%3Cimg%20src%3Dx") and "%23%3F%25/" in link  # '#', '?', '%' quoted, not parsed
    assert (odd_reports / HOSTILE / "index.html").is_file()
    check_links_inside(html, odd_reports)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert csp.startswith("default-src 'none';") and "script-src 'sha256-" in csp and "style-src 'sha256-" in csp
    assert "unsafe-inline" not in csp and "http" not in csp


def test_rewriting_the_index_replaces_it_whole(odd_reports):
    write_index(odd_reports)
    shutil.rmtree(odd_reports / "notes")
    write_index(odd_reports)
    assert "notes" not in _entries(odd_reports)
    assert not [p.name for p in odd_reports.iterdir() if p.name.endswith(".tmp") and "0f0f0f0f" not in p.name]


def test_reports_index_command(odd_reports, tmp_path, monkeypatch, capsys):
    from f2d_bench.report.cli import register_reports

    parser = cli_parser(register_reports)
    args = parser.parse_args(["reports", "index", str(odd_reports)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"index of reports: {(odd_reports / 'index.html').resolve()}" in out
    assert "0 report(s); also listed:" in out and "1 not a report" in out
    # DIR defaults to ./reports, and a missing folder is a clear error naming it
    monkeypatch.chdir(odd_reports.parent)
    args = parser.parse_args(["reports", "index"])
    assert args.dir == "reports" and args.func(args) == 0
    with pytest.raises(F2DBenchError, match=r"reports folder .*nowhere not found.*f2d-bench report RUN -o"):
        write_index(tmp_path / "nowhere")


# -- faces prepare --limit -------------------------------------------------------------------------------


class _StubDetector:
    """One face at fixed landmarks in every image that is not black; none in a black one."""

    min_face_size = 20

    def detect(self, image):
        if not np.asarray(image).any():
            return []
        landmarks = [[22, 26], [42, 26], [32, 36], [24, 46], [40, 46]]
        return [Detection((12.0, 12.0, 52.0, 56.0), landmarks, 0.999)]


def _photo_folder(root: Path, n: int, black: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        name = f"{i:03d}.png"
        Image.new("RGB", (64, 64), (0, 0, 0) if name in black else (120 + i % 100, 90, 60)).save(root / name)
    return root


def _prepared_ids(dst: Path) -> list[str]:
    return [f["face_id"] for f in json.loads((dst / "manifest.json").read_text())["faces"]]


def test_limit_picks_the_same_sources_twice(tmp_path):
    src = _photo_folder(tmp_path / "src", 130)
    (src / "readme.txt").write_text("not a photo")  # unsupported files are never candidates
    runs = {}
    for name, seed in (("a", None), ("b", None), ("seeded-a", 7), ("seeded-b", 7), ("seeded-other", 8)):
        report = prepare_faces(src, tmp_path / name, limit=100, limit_seed=seed, output_size=16,
                               detector=_StubDetector(), progress=False)
        runs[name] = report
        assert len(report.faces) == 100 and [s.source.name for s in report.skipped] == ["readme.txt"]
    assert _prepared_ids(tmp_path / "a") == _prepared_ids(tmp_path / "b") == [f"{i:03d}" for i in range(100)]
    assert _prepared_ids(tmp_path / "seeded-a") == _prepared_ids(tmp_path / "seeded-b")
    assert _prepared_ids(tmp_path / "seeded-a") != _prepared_ids(tmp_path / "a")
    assert _prepared_ids(tmp_path / "seeded-a") != _prepared_ids(tmp_path / "seeded-other")
    manifest = json.loads((tmp_path / "seeded-a" / "manifest.json").read_text())
    sel = manifest["selection"]
    assert sel["rule"] == "seeded" and sel["limit"] == 100 and sel["seed"] == 7
    assert sel["n_candidates"] == 130 and sel["n_chosen"] == 100
    assert sel["chosen"] == [f"{i}.png" for i in _prepared_ids(tmp_path / "seeded-a")]
    assert sel["candidates_sha256"] == json.loads((tmp_path / "a" / "manifest.json").read_text())["selection"][
        "candidates_sha256"]
    # the documented rule, computed here: the 100 names with the smallest sha256 of "7/<name>"
    import hashlib

    names = sorted(p.name for p in src.glob("*.png"))
    want = sorted(sorted(names, key=lambda n: hashlib.sha256(f"7/{n}".encode()).hexdigest())[:100])
    assert sel["chosen"] == want
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["selection"]["rule"] == "sorted"
    assert "--limit 100: 100 of 130 photos/videos chosen" in runs["a"].summary()


def test_limit_applies_before_detection_and_a_faceless_source_is_not_replaced(tmp_path):
    src = _photo_folder(tmp_path / "src", 12, black=("003.png",))
    report = prepare_faces(src, tmp_path / "out", limit=10, output_size=16, detector=_StubDetector(), progress=False)
    ids = _prepared_ids(tmp_path / "out")
    assert ids == [f"{i:03d}" for i in range(10) if i != 3]  # 9 faces: 010.png does not step in
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == [{"source": "003.png", "reason": "no face with probability >= 0.9"}]
    assert "003.png" in manifest["selection"]["chosen"] and "010.png" not in manifest["selection"]["chosen"]
    assert "not replaced" in report.summary()
    # without --limit every source is used and the manifest says so
    prepare_faces(src, tmp_path / "all", output_size=16, detector=_StubDetector(), progress=False)
    sel = json.loads((tmp_path / "all" / "manifest.json").read_text())["selection"]
    assert sel["rule"] == "all" and sel["n_chosen"] == 12 and "chosen" not in sel


def test_select_sources_rules_and_limit_errors(tmp_path, capsys):
    names = ["b.mp4", "a.mp4", "c.mp4", "A.mp4"]
    assert select_sources(names) == ["A.mp4", "a.mp4", "b.mp4", "c.mp4"]  # code point order
    assert select_sources(names, 2) == ["A.mp4", "a.mp4"]
    assert select_sources(names, 10) == sorted(names)
    seeded = select_sources(names, 2, 0)
    assert len(seeded) == 2 and seeded == select_sources(list(reversed(names)), 2, 0)
    # adding a name that ranks after the chosen ones keeps the choice
    more = select_sources(names + ["z.mp4"], 2, 0)
    assert more == seeded or "z.mp4" in more
    src = _photo_folder(tmp_path / "src", 2)
    with pytest.raises(ConfigError, match="limit_seed .*give --limit N"):
        prepare_faces(src, tmp_path / "x", limit_seed=3, detector=_StubDetector(), progress=False)
    with pytest.raises(ConfigError, match="limit must be"):
        prepare_faces(src, tmp_path / "x", limit=0, detector=_StubDetector(), progress=False)
    assert not (tmp_path / "x").exists()  # nothing written before the arguments are checked
    from f2d_bench.faces.cli import register

    parser = cli_parser(register)
    for bad in (["--limit", "0"], ["--limit-seed", "-1"], ["--limit", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["faces", "prepare", str(src), str(tmp_path / "y"), *bad])
    args = parser.parse_args(["faces", "prepare", str(src), str(tmp_path / "y"), "--limit", "5", "--limit-seed", "2"])
    assert (args.limit, args.limit_seed) == (5, 2)
    capsys.readouterr()


# -- two real reports ------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> str:
    """Run the f2d-bench command line in this process; its stdout."""
    from f2d_bench.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0, argv
    return out.getvalue()


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory):
    """reports/smoke-a: the scored run of test_report.py; reports/smoke-b, a second later: a copy of it in
    which method A lost one face; reports/broken: a report whose aggregates.json was cut short."""
    from test_report import _build_scored_run

    tmp = tmp_path_factory.mktemp("reports-index")
    run = _build_scored_run(tmp)
    rec = pd.read_parquet(run / "records.parquet")
    method_a = sorted(rec["method"].unique(), key=lambda m: rec.loc[rec["method"] == m, "method_label"].iloc[0])[0]
    copy = tmp / "run-b"
    shutil.copytree(run, copy)
    drop = (rec["method"] == method_a) & (rec["face"] == sorted(rec["face"].unique())[0])
    rec[~drop].to_parquet(copy / "records.parquet", index=False)
    root = tmp / "reports"
    printed = {"a": _cli(["report", str(run), "-o", str(root / "smoke-a"), "--resamples", "200"])}
    time.sleep(1.1)  # report dates have whole seconds: smoke-b is the later one
    printed["b"] = _cli(["report", str(copy), "-o", str(root / "smoke-b"), "--resamples", "200"])
    shutil.copytree(root / "smoke-a", root / "broken")
    text = (root / "broken" / "aggregates.json").read_text()
    (root / "broken" / "aggregates.json").write_text(text[: len(text) // 2])
    write_index(root)
    return {"root": root, "run": run, "copy": copy, "method_a": method_a, "printed": printed}


def _table1(report: Path) -> dict[str, dict]:
    return {r["method"]: r for r in json.loads((report / "table1.json").read_text())}


@pytest.mark.slow
def test_report_command_writes_the_index_and_prints_both_paths(two_reports):
    root = two_reports["root"]
    for name, out in (("a", "smoke-a"), ("b", "smoke-b")):
        lines = two_reports["printed"][name].strip().splitlines()
        assert lines[-2] == f"report: {(root / out / 'index.html').resolve()}"
        assert lines[-1] == f"index of reports: {(root / 'index.html').resolve()}"
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temporary folder left


@pytest.mark.slow
def test_index_lists_both_reports_with_the_numbers_of_their_own_json(two_reports):
    root = two_reports["root"]
    entries = _entries(root)
    assert entries["broken"]["status"] == "unreadable" and "not valid JSON" in entries["broken"]["reason"]
    html = (root / "index.html").read_text(encoding="utf-8")
    assert "broken</a>" in _tbody(html, "broken") and "unreadable</span>: " in _tbody(html, "broken")
    for name, run in (("smoke-a", two_reports["run"]), ("smoke-b", two_reports["copy"])):
        e = entries[name]
        agg = json.loads((root / name / "aggregates.json").read_text())
        table1 = _table1(root / name)
        assert e["status"] == "ok" and e["href"] == f"{name}/index.html"
        assert e["generated"] == agg["generated"] and e["runs"][0]["name"] == run.name
        assert e["runs"][0]["config_hash"] == json.loads((run / "run.json").read_text())["config_hash"]
        assert [m["method"] for m in e["methods"]] == list(table1)
        rec = pd.read_parquet(run / "records.parquet")
        prompt_images = rec[~rec["is_reference"] & rec["error"].isna()]  # the images behind Table 1
        assert e["n_faces"] == rec["face"].nunique() and e["n_images"] == len(prompt_images) < len(rec)
        body = _tbody(html, name)
        for m in e["methods"]:
            row = table1[m["method"]]
            for key in ("hmean", "hmean_lo", "hmean_hi", "gmean", "gmean_lo", "gmean_hi", "adaface", "siglip",
                        "n_faces", "n_images", "label"):
                assert m[key] == row[key], (name, m["method"], key)
            assert m["source"] and m["model"] is None  # imported images: no base model of their own
            for col in ("hmean", "gmean"):  # the page shows the same numbers, rounded, with the interval
                assert f"{fmt(row[col])}&nbsp;&dagger;<br><span class=\"ci\">[{fmt(row[col + '_lo'])}, " \
                       f"{fmt(row[col + '_hi'])}]</span>" in body, (name, col)
            assert f"{row['n_faces']} faces<br><span class=\"ci\">{row['n_images']} images" in body
    # the two reports differ where the run copy dropped a face
    a = two_reports["method_a"]
    assert _table1(root / "smoke-a")[a]["n_faces"] == 4 and _table1(root / "smoke-b")[a]["n_faces"] == 3
    assert [e["name"] for e in _index(root)["reports"]][:2] == ["smoke-b", "smoke-a"]  # newest first
    check_links_inside(html, root)


@pytest.mark.slow
def test_leaderboard_has_each_methods_best_and_latest_numbers(two_reports, tmp_path):
    root = two_reports["root"]
    a = two_reports["method_a"]
    board = {m["method"]: m for m in _index(root)["leaderboard"]}
    tables = {name: _table1(root / name) for name in ("smoke-a", "smoke-b")}
    assert set(board) == set(tables["smoke-a"])
    for mid, m in board.items():
        assert m["n_reports"] == 2 and m["latest"]["report"] == "smoke-b"
        best = max(("smoke-a", "smoke-b"), key=lambda n: (tables[n][mid]["hmean"], n == "smoke-b"))
        assert m["best"]["report"] == best, mid
        for which, name in (("best", best), ("latest", "smoke-b")):
            for key in ("adaface", "sphereface", "facenet", "clip", "dclip", "siglip", "hmean", "gmean",
                        "hmean_lo", "hmean_hi", "face_detection_rate", "n_faces", "n_images"):
                assert m[which][key] == tables[name][mid][key], (mid, which, key)
    assert tables["smoke-a"][a]["hmean"] != tables["smoke-b"][a]["hmean"]
    # a method id carries its settings: the same method with other settings is another row
    other = root.parent / "settings"
    shutil.copytree(root, other, ignore=shutil.ignore_patterns("broken", "smoke-b", "index.*"))
    path = other / "smoke-a" / "aggregates.json"
    agg = json.loads(path.read_text())
    other_id = "external-0123abcd"
    for row in agg["table1"]:
        if row["method"] == a:
            row["method"] = other_id
    agg["methods"][other_id] = {**agg["methods"].pop(a), "source": "/elsewhere"}
    shutil.copytree(other / "smoke-a", other / "smoke-c")
    path.write_text(json.dumps(agg))
    write_index(other)
    rows = {m["method"]: m for m in _index(other)["leaderboard"]}
    assert {a, other_id} <= set(rows) and rows[a]["label"] == rows[other_id]["label"]
    assert rows[a]["n_reports"] == 1 and rows[other_id]["n_reports"] == 1


# -- in a browser ----------------------------------------------------------------------------------------


def _page_requests(netlog: Path) -> list[str]:
    """URLs that a page (not the browser itself) asked the network for, from Chromium's NetLog: requests a
    document starts carry its origin as initiator; the browser's own (updates, sign-in) carry none."""
    data = json.loads(netlog.read_text(encoding="utf-8", errors="replace"))
    kinds = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    urls = []
    for ev in data["events"]:
        params = ev.get("params") or {}
        if (kinds.get(ev["type"]) == "URL_REQUEST_START_JOB" and "url" in params
                and params.get("initiator", "not an origin") != "not an origin"):
            urls.append(params["url"])
    return urls


def _open(tmp_path: Path, url: str, tag: str):
    """Chromium's DOM of ``url`` after its scripts ran, its console lines, and the page's network requests."""
    from test_report import _chromium

    netlog = tmp_path / f"{tag}.netlog.json"
    res = _chromium(tmp_path, f"--log-net-log={netlog}", "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return res.stdout, console, _page_requests(netlog)


@pytest.mark.slow
def test_chromium_opens_the_index_offline_without_errors(two_reports, tmp_path):
    from test_report import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    # the check sees a page's network request: a page with one external image
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    _, _, requests = _open(tmp_path, control.as_uri(), "control")
    assert requests == ["http://127.0.0.1:9/x.png"]

    dom, console, requests = _open(tmp_path, (two_reports["root"] / "index.html").resolve().as_uri(), "index")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-index-ready="1"' in body, body  # its script ran, allowed by the CSP hash
    assert "data-js-error" not in body and "data-pwned" not in body, body  # hostile labels stayed text
    assert not console, console  # no errors, no CSP violations
    assert requests == [], requests
    assert "&lt;img src=x onerror=" in dom


@pytest.mark.slow
def test_chromium_sorts_and_filters_by_method(two_reports, tmp_path):
    from test_report import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    root, a = two_reports["root"], two_reports["method_a"]
    entries = _entries(root)
    base = (root / "index.html").resolve().as_uri()
    dom, console, _ = _open(tmp_path, f"{base}#method={a}&sort=name&dir=desc", "filtered")
    assert not console, console
    bodies = re.findall(r'<tbody class="unit report-[^"]*" data-sort-name="([^"]*)"[^>]*?( hidden="")?>', dom)
    assert [n for n, _ in bodies] == ["smoke-b", "smoke-a", "broken"]  # by name, descending
    assert dict(bodies)["broken"] and not dict(bodies)["smoke-a"]  # no method matches in the broken folder
    other = next(m["method"] for m in entries["smoke-a"]["methods"] if m["method"] != a)
    assert re.search(rf'<tr data-method-text="{other} [^"]*"[^>]*hidden', dom)  # the other method's lines
    assert not re.search(rf'<tr data-method-text="{a} [^"]*"[^>]*hidden', dom)
    board = re.findall(r'<tbody class="unit" data-method-text="([^ "]*)[^"]*"[^>]*?( hidden="")?>', dom)
    assert dict(board)[other] and not dict(board)[a]
    # by hMean, highest first, among the methods shown: method A's hMean decides the order of its reports
    hmean = {n: next(m["hmean"] for m in entries[n]["methods"] if m["method"] == a) for n in ("smoke-a", "smoke-b")}
    assert hmean["smoke-a"] != hmean["smoke-b"]
    want = sorted(hmean, key=lambda n: -hmean[n])
    direction = "desc" if want != ["smoke-b", "smoke-a"] else "asc"  # the order that differs from newest first
    want = want if direction == "desc" else want[::-1]
    dom, _, _ = _open(tmp_path, f"{base}#method={a}&sort=hmean&dir={direction}", "by-hmean")
    names = re.findall(r'<tbody class="unit report-[^"]*" data-sort-name="([^"]*)"', dom)
    assert names == [*want, "broken"]  # a folder without numbers last, either way


# -- the README's recipe ---------------------------------------------------------------------------------


def _recipe_commands() -> list[list[str]]:
    """The f2d-bench commands of the README's FaceForensics++ recipe, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### The paper's recipe", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()
                if line.startswith("f2d-bench ")]
    return [c[1:] for c in commands]


def _write_video(path: Path, photo: Path, n_frames: int = 3) -> None:
    import cv2

    frame = np.asarray(ImageOps.pad(Image.open(photo).convert("RGB"), (320, 320), color=(128, 128, 128)))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (320, 320))
    assert writer.isOpened()
    for _ in range(n_frames):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.mark.slow
def test_readme_recipe_runs_on_a_folder_of_videos(tmp_path, monkeypatch):
    """The recipe as written, in a folder laid out like FaceForensics++'s download; only the GPU preset
    becomes a tiny CPU config and the best-of-16 a best-of-2 (the commands are otherwise unchanged)."""
    import yaml

    commands = _recipe_commands()
    assert [c[0] for c in commands] == ["faces", "generate", "score", "upper-bound", "report"]
    assert commands[0][:2] == ["faces", "prepare"] and "--frame" in commands[0]
    assert commands[0][commands[0].index("--limit") + 1] == "100"
    assert "--preset" in commands[1] and commands[1][commands[1].index("--preset") + 1] == "paper"
    videos = tmp_path / commands[0][2]
    videos.mkdir(parents=True)
    for i, photo in enumerate(("biden.jpg", "grace_hopper.jpg", "obama.jpg")):
        _write_video(videos / f"{i:03d}.mp4", TEST_PHOTOS / photo)
    config = small_config_dict(name="paper-on-cpu", seeds=[0], scoring=offline_scoring())
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        argv = list(argv)
        if "--preset" in argv:
            i = argv.index("--preset")
            argv[i:i + 2] = ["--config", "cpu.yaml", "--no-progress"]
        if argv[0] == "upper-bound":
            argv[argv.index("--n") + 1] = "2"
            argv.append("--no-progress")
        if argv[0] == "score":
            argv.append("--no-progress")
        _cli(argv)
    manifest = json.loads((tmp_path / "faces" / "manifest.json").read_text())
    assert [f["face_id"] for f in manifest["faces"]] == ["000", "001", "002"]
    assert all(f["frame_index"] == int(commands[0][commands[0].index("--frame") + 1]) for f in manifest["faces"])
    assert manifest["selection"]["rule"] == "sorted" and manifest["selection"]["n_candidates"] == 3
    out = Path(commands[-1][commands[-1].index("-o") + 1])
    assert (tmp_path / out / "index.html").is_file() and (tmp_path / out / "best_of_n.csv").is_file()
    entries = _entries((tmp_path / out).parent)
    entry = entries[out.name]
    assert entry["status"] == "ok" and entry["n_faces"] == 3
    assert entry["methods"][0]["model"]["pretrained"] == "f2d-bench/tiny-sd14"
    assert entry["methods"][0]["sampling"]["num_inference_steps"] == 4
