"""`f2d-bench score` end to end with real models that work offline (MTCNN, dlib) on real photos.

The "generated" images are imported with the `external` method: prepared crops of the test photos, so
that same-person and different-person pairs, a no-face image and a corrupt file are all known.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from f2d_bench.cli import main
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring import score_run
from f2d_bench.scoring.faces import choose_face

from conftest import (
    OTHER,
    REPO,
    SAME,
    external_source,
    face_dir,
    offline_scoring,
    prepared_crops,
    small_config_dict,
)


def _build(tmp: Path, chunk_size: int = 256) -> tuple[Path, dict]:
    """The smoke prompts for 4 faces, imported: the same person (job-chef, location), another person
    (activity-guitar), the input photo (ref) and a noise image without a face (expression-laughing)."""
    faces = face_dir(tmp / "faces", SAME)
    plan = lambda fid: {"job-chef": SAME[fid], "activity-guitar": OTHER[fid],  # noqa: E731
                        "location-eiffel-tower": SAME[fid], "ref": fid, "expression-laughing": None}
    src = external_source(tmp / "elsewhere", SAME, plan, rng=np.random.default_rng(0), noise_size=256)
    data = small_config_dict(faces=str(faces), seeds=[0],
                             methods=[{"name": "external", "params": {"source": str(src)}}],
                             scoring={"scorers": ["dlib"], "chunk_size": chunk_size, "batch_size": 4,
                                      "settings": {"clip": {"model": "tiny"}}})
    out = tmp / "run"
    summary = generate_run(config_from_dict(data), out, progress=False)
    assert summary.complete
    return out, data


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The run of `_build`, scored (about 8 s on two cores: every test using it is marked slow)."""
    out, data = _build(tmp_path_factory.mktemp("scoring"))
    summary = score_run(out, progress=False)
    return out, data, summary, pd.read_parquet(out / "records.parquet")


@pytest.mark.slow
def test_records_have_one_row_per_image_and_every_column(scored):
    out, _, summary, rec = scored
    assert len(rec) == len(RunDir(out).keys()) == 4 * 5 == summary.n_images
    for col in ("method", "face", "prompt", "category", "seed", "path", "sha256", "face_detected",
                "face_prob", "error", "dlib", "is_reference"):
        assert col in rec.columns, col
    assert set(rec["category"]) == {"job", "activity", "expression", "location", "reference"}
    assert rec["error"].isna().all()


@pytest.mark.slow
def test_dlib_same_person_beats_different_person(scored):
    rec = scored[3].set_index(["face", "prompt"])["dlib"]
    for fid in SAME:
        same, other = rec[(fid, "job-chef")], rec[(fid, "activity-guitar")]
        assert same > other, (fid, same, other)
    assert rec[("biden", "ref")] > 0.99  # the input photo itself
    assert rec[("obama", "job-chef")] > 0.85 and rec[("obama", "activity-guitar")] < 0.85


@pytest.mark.slow
def test_no_face_gives_zero_and_face_detected_false(scored):
    rec = scored[3]
    noise = rec[rec["prompt"] == "expression-laughing"]
    assert (~noise["face_detected"]).all() and (noise["dlib"] == 0.0).all()
    assert rec[rec["prompt"] != "expression-laughing"]["face_detected"].all()
    assert scored[2].no_face == 4


@pytest.mark.slow
def test_rescoring_uses_the_cache_and_a_changed_image_is_rescored(scored, tmp_path):
    out, _, _, before = scored
    again = score_run(out, progress=False)
    assert again.computed == {"dlib": 0}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "records.parquet"), before)


@pytest.mark.slow
def test_changed_image_is_rescored(tmp_path):
    out, _ = _build(tmp_path)
    score_run(out, progress=False)
    run = RunDir(out)
    key = [k for k in run.keys() if k.face_id == "obama" and k.prompt_id == "job-chef"][0]
    # regenerate one image (as a new generate would): remove it, change the source, generate again
    run.store.image_path(key).unlink()
    src = tmp_path / "elsewhere" / "obama" / "job-chef" / "0.png"
    shutil.copy(tmp_path / "elsewhere" / "biden" / "ref" / "0.png", src)
    generate_run(run.config(), out, progress=False)
    summary = score_run(out, progress=False)
    assert summary.computed == {"dlib": 1}
    rec = pd.read_parquet(out / "records.parquet").set_index(["face", "prompt"])
    assert rec.loc[("obama", "job-chef"), "dlib"] < 0.85  # now Biden's photo


@pytest.mark.slow
def test_unreadable_grayscale_rgba_16bit_images(tmp_path):
    out, _ = _build(tmp_path)
    run = RunDir(out)
    keys = {(k.face_id, k.prompt_id): k for k in run.keys()}
    path = lambda f, p: run.store.image_path(keys[(f, p)])  # noqa: E731
    data = path("obama", "job-chef").read_bytes()
    path("obama", "job-chef").write_bytes(data[: len(data) // 3])  # truncated
    Image.open(path("biden", "job-chef")).convert("L").save(path("biden", "job-chef"))
    Image.open(path("grace_hopper", "job-chef")).convert("RGBA").save(path("grace_hopper", "job-chef"))
    gray16 = (np.asarray(Image.open(path("obama2", "job-chef")).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(path("obama2", "job-chef"))
    summary = score_run(out, progress=False)
    rec = pd.read_parquet(out / "records.parquet").set_index(["face", "prompt"])
    assert summary.errors == 1 and "obama" in str(rec.loc[("obama", "job-chef"), "path"])
    assert isinstance(rec.loc[("obama", "job-chef"), "error"], str)
    assert np.isnan(rec.loc[("obama", "job-chef"), "dlib"])
    for fid in ("biden", "grace_hopper", "obama2"):  # converted, scored, still the same person
        assert rec.loc[(fid, "job-chef"), "face_detected"], fid
        assert rec.loc[(fid, "job-chef"), "dlib"] > 0.85, fid


@pytest.mark.slow
def test_score_killed_midway_ends_with_the_same_table(scored, tmp_path):
    out, _ = _build(tmp_path, chunk_size=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "f2d_bench", "score", str(out), "--no-progress", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    folder = out / "scores"
    while time.time() < deadline and proc.poll() is None:
        if len(list(folder.glob("dlib-*/chunk-*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "score finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "records.parquet").exists()
    assert main(["score", str(out), "--no-progress"]) == 0
    got = pd.read_parquet(out / "records.parquet")
    want = scored[3]
    cols = ["face", "prompt", "seed", "face_detected", "dlib"]
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True), want[cols].reset_index(drop=True))


def test_face_policy():
    from f2d_bench.faces.detect import Detection

    big = Detection((0, 0, 100, 100), np.zeros((5, 2)), 0.95)
    sure = Detection((0, 0, 10, 10), np.zeros((5, 2)), 0.999)
    assert choose_face([big, sure], "largest", 0.0) == (big, 2)
    assert choose_face([big, sure], "most-confident", 0.0) == (sure, 2)
    assert choose_face([big, sure], "largest", 0.99) == (sure, 1)
    assert choose_face([], "largest", 0.0) == (None, 0)


def test_scorers_command_lists_metrics(capsys):
    assert main(["scorers", "--metrics"]) == 0
    out = capsys.readouterr().out
    for name in ("adaface", "sphereface", "facenet", "dlib", "clip", "siglip"):
        assert name in out


@pytest.mark.slow
def test_table1_means_match_a_hand_computation(scored):
    out, _, summary, rec = scored
    table = pd.read_csv(out / "table1.csv", index_col=0)
    prompts = rec[rec["prompt"] != "ref"]
    assert table.loc[prompts["method"].iloc[0], "dlib"] == pytest.approx(prompts["dlib"].mean())
    assert table.iloc[0]["face_detection_rate"] == pytest.approx(12 / 16)  # 4 noise images of 16
    assert table.iloc[0]["n_images"] == 16


@pytest.mark.slow
def test_fid_per_method_against_a_reference(tmp_path):
    out, data = _build(tmp_path)
    crops = list(prepared_crops().values())
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    for p in crops:
        img = Image.open(p).convert("RGB").resize((128, 128))
        img.save(ref_dir / f"{p.stem}.png")
        img.transpose(Image.FLIP_LEFT_RIGHT).save(ref_dir / f"{p.stem}-flip.png")
    ref = tmp_path / "ref.npz"
    assert main(["fid-ref", "build", str(ref_dir), "--out", str(ref), "--backend", "clean-fid-torchscript",
                 "--quiet"]) == 0
    assert main(["score", str(out), "--no-progress", "--fid-ref", str(ref),
                 "--fid-backend", "clean-fid-torchscript"]) == 0
    fid = __import__("json").loads((out / "scores" / "fid.json").read_text())
    [(mid, r)] = fid.items()
    assert r["backend"] == "clean-fid-torchscript" and r["n_generated"] == 16 and r["n_reference"] == 16
    assert r["reference_filter"] == "all images (no caption filter)"
    assert np.isfinite(r["value"]) and r["value"] > 1.0  # 4 noise images among 16: far from the photos
    assert "stale" not in r and len(r["images"]) == 64  # the digest of the 16 images FID was computed over
    # a plain score keeps the FID while the images are those it was computed over ...
    assert main(["score", str(out), "--no-progress"]) == 0
    assert __import__("json").loads((out / "scores" / "fid.json").read_text()) == fid
    # ... and marks it once one changed (here: one removed), keeping the value
    next(p for p in (out / "images").rglob("*.png") if p.parent.name != "ref").unlink()
    assert main(["score", str(out), "--no-progress"]) == 0
    [stale] = __import__("json").loads((out / "scores" / "fid.json").read_text()).values()
    assert stale["value"] == r["value"] and "images changed since (15 now): score again with --fid-ref" in stale["stale"]
    from f2d_bench.report.render import build_report

    html = build_report([out], tmp_path / "report", n_resamples=20).read_text(encoding="utf-8")
    assert "FID out of date, not ranked" in html and "&sect;" in html


def test_f2d_grid_generates_and_scores_end_to_end(tmp_path):
    """F2D (official structure, random weights) on the tiny pipeline with real photos, then every scorer."""
    faces = face_dir(tmp_path / "faces", ("obama", "biden"))
    data = small_config_dict(
        faces=str(faces), seeds=[0], methods=[{"name": "f2d", "params": {"weights": "random"}}],
        scoring=offline_scoring())
    out = tmp_path / "run"
    assert generate_run(config_from_dict(data), out, progress=False).complete
    summary = score_run(out, progress=False)
    rec = pd.read_parquet(out / "records.parquet")
    assert len(rec) == 2 * 5 and rec["method"].str.startswith("f2d-").all()
    for col in ("adaface", "sphereface", "facenet", "dlib", "clip", "siglip", "siglip_prob"):
        assert rec[col].notna().all(), col
    prompts, refs = rec[~rec["is_reference"]], rec[rec["is_reference"]]
    # dCLIP (and so hMean/gMean) is defined for prompt images, not for the reference images themselves
    for col in ("dclip", "hmean", "gmean"):
        assert prompts[col].notna().all() and refs[col].isna().all(), col
    assert rec["clip"].nunique() > 1  # not a constant
    assert summary.notes["adaface"] == "random weights: not meaningful" and summary.notes["dlib"] == ""
    scoring = __import__("json").loads((out / "scores" / "scoring.json").read_text())
    notes = {s["name"]: s["note"] for s in scoring["scorers"]}
    assert notes["clip"] == "random weights: not meaningful" and notes["dlib"] is None


@pytest.mark.slow
def test_changed_face_settings_rescore_identity_but_not_text(scored, tmp_path):
    out, _, _, before = scored
    strict = RunDir(out).config().scoring.replace(min_face_prob=1.0)  # no face passes
    summary = score_run(out, scoring=strict, progress=False)
    assert summary.computed == {"dlib": len(before)}  # identity depends on the chosen face: recomputed
    rec = pd.read_parquet(out / "records.parquet")
    assert not rec["face_detected"].any() and (rec["dlib"] == 0.0).all()
    score_run(out, progress=False)  # back to the run's own settings: the earlier values again
    pd.testing.assert_frame_equal(pd.read_parquet(out / "records.parquet"), before)


@pytest.mark.slow
def test_unreadable_reference_image_leaves_dclip_empty_and_the_run_goes_on(tmp_path):
    out, _ = _build(tmp_path)
    run = RunDir(out)
    ref = [k for k in run.keys() if k.face_id == "biden" and k.prompt_id == "ref"][0]
    run.store.image_path(ref).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    summary = score_run(out, scorers=["clip"], progress=False)
    rec = pd.read_parquet(out / "records.parquet").set_index(["face", "prompt"])
    assert summary.errors == 1 and isinstance(rec.loc[("biden", "ref"), "error"], str)
    said = summary.text()  # the file named, and what to do
    assert f"unreadable images: 1 (metrics empty, see the `error` column), e.g. cannot read image " \
           f"{run.store.image_path(ref)}" in said and "generate command again" in said
    assert np.isnan(rec.loc[("biden", "job-chef"), "dclip"]) and np.isfinite(rec.loc[("biden", "job-chef"), "clip"])
    assert np.isfinite(rec.loc[("obama", "job-chef"), "dclip"])


@pytest.mark.slow
def test_a_file_system_read_error_stops_the_score_and_is_not_cached_as_the_images_fault(tmp_path, monkeypatch,
                                                                                        capsys):
    import errno

    from f2d_bench.faces import imageio

    out, _ = _build(tmp_path)
    run = RunDir(out)
    victim = run.store.image_path([k for k in run.keys() if k.prompt_id == "job-chef"][0])
    opened = imageio.Image.open

    def flaky(path, *args, **kwargs):  # EIO for one file, as a failing disk or network mount gives
        if Path(path) == victim:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(imageio.Image, "open", flaky)
    with pytest.raises(OSError) as err:  # as itself: no stage records it as the image's fault
        score_run(out, progress=False)
    assert err.value.errno == errno.EIO and err.value.filename == str(victim)
    assert main(["score", str(out), "--no-progress"]) == 4  # the command says what failed, no traceback
    assert f"error: Input/output error ({victim}). Finished files are kept" in capsys.readouterr().err
    monkeypatch.setattr(imageio.Image, "open", opened)
    summary = score_run(out, progress=False)  # once the disk reads again: the image is scored
    rec = pd.read_parquet(out / "records.parquet")
    assert summary.errors == 0 and rec["error"].isna().all() and rec["dlib"].notna().all()


def test_score_of_a_non_run_is_a_clear_error(tmp_path, capsys):
    assert main(["score", str(tmp_path)]) == 2
    assert "not an f2d-bench run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_scoring_a_subset_keeps_the_other_scorers_columns(tmp_path):
    out, _ = _build(tmp_path)
    score_run(out, progress=False)  # the run's own scorers: dlib
    dlib_before = pd.read_parquet(out / "records.parquet")["dlib"]
    summary = score_run(out, scorers=["clip"], progress=False)  # then CLIP alone
    assert summary.computed == {"clip": 20}
    rec = pd.read_parquet(out / "records.parquet")
    assert rec["clip"].notna().all()
    pd.testing.assert_series_equal(rec["dlib"], dlib_before)  # from dlib's cache, not recomputed, not lost
    # CLIP and dCLIP are two of the six metrics hMean and gMean combine: neither exists, in the records
    # or in Table 1, rather than a mean of two metrics under the paper's name
    assert "hmean" not in rec.columns and "gmean" not in rec.columns
    assert {"clip", "dclip"} <= set(summary.table.columns) and "hmean" not in summary.table.columns
