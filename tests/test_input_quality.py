"""Input-quality flags: measured by `faces prepare`, printed per face, recorded in the manifest.

The shipped photos are clean inputs and must not be flagged; a tiny copy and an edge-cut copy of one of
them are weak inputs and must be.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from f2d_bench.faces.align import ffhq_quad
from f2d_bench.faces.cli import register
from f2d_bench.faces.prepare import prepare_faces
from f2d_bench.faces.quality import SMALL_FACE_PX, padding_share, source_crop_size
from f2d_bench.faces.source import builtin_test_faces_dir

from conftest import TEST_PHOTOS, cli_parser
from test_face_rule import edge_cut_photo

# obama.jpg's aligned crop spans about 425 source pixels; this scale makes it about 60
TINY_SCALE = 0.14


def _frontal(cx: float, cy: float, eye_gap: float = 40.0) -> np.ndarray:
    """Five upright landmarks around (cx, cy), pixels."""
    return np.array([[cx - eye_gap / 2, cy - 10], [cx + eye_gap / 2, cy - 10], [cx, cy + 10],
                     [cx - 15, cy + 30], [cx + 15, cy + 30]], dtype=np.float64)


def test_padding_share_and_crop_size():
    inside = _frontal(500, 500)
    assert padding_share(inside, 1000, 1000) == 0.0
    quad, qsize = ffhq_quad(inside)
    assert source_crop_size(inside) == pytest.approx(qsize)
    # the same face with the image's corner at the crop's centre: about three quarters lie outside
    centre = quad.mean(axis=0)
    shifted = inside - centre
    assert padding_share(shifted, 1000, 1000) == pytest.approx(0.75, abs=0.02)
    # cut at the crop's vertical centre line: half outside
    assert padding_share(inside - [centre[0], 0], 1000, 1000) == pytest.approx(0.5, abs=0.02)


@pytest.mark.slow  # prepares the shipped photos when no earlier test did (about 10-50 s)
def test_shipped_photos_are_measured_and_not_flagged():
    manifest = json.loads((builtin_test_faces_dir() / "manifest.json").read_text())
    assert len(manifest["faces"]) == 8
    for face in manifest["faces"]:
        q = face["quality"]
        assert q["flags"] == [], (face["face_id"], q)
        assert q["faces_in_crop"] == 1 and q["padding_share"] == 0.0 and q["prob"] > 0.99
        assert q["source_crop_px"] >= SMALL_FACE_PX
        assert q["upscale"] == pytest.approx(512 / q["source_crop_px"], rel=1e-3)
    assert manifest["settings"]["quality_flags"]["small_below_source_px"] == SMALL_FACE_PX
    assert manifest["settings"]["face_rule"] == "largest"


@pytest.fixture(scope="module")
def weak_sources(tmp_path_factory):
    """A clean photo, a tiny copy and an edge-cut copy of obama.jpg."""
    src = tmp_path_factory.mktemp("weak")
    shutil.copy(TEST_PHOTOS / "grace_hopper.jpg", src / "clean.jpg")
    photo = Image.open(TEST_PHOTOS / "obama.jpg").convert("RGB")
    size = (round(photo.width * TINY_SCALE), round(photo.height * TINY_SCALE))
    photo.resize(size, Image.Resampling.LANCZOS).save(src / "tiny.png")
    edge_cut_photo(TEST_PHOTOS / "obama.jpg").save(src / "edge_cut.png")
    return src


def test_weak_inputs_are_flagged_printed_and_recorded(weak_sources, tmp_path, capsys):
    dst = tmp_path / "faces"
    report = prepare_faces(weak_sources, dst, progress=True)
    err = capsys.readouterr().err
    flags = {f.face_id: f.flags for f in report.faces}
    assert flags["clean"] == []
    assert "small" in flags["tiny"] and "padded" not in flags["tiny"]
    assert {"padded", "several-faces-in-crop"} <= set(flags["edge_cut"]) and "small" not in flags["edge_cut"]
    manifest = {f["face_id"]: f for f in json.loads((dst / "manifest.json").read_text())["faces"]}
    tiny, cut = manifest["tiny"]["quality"], manifest["edge_cut"]["quality"]
    assert tiny["source_crop_px"] < SMALL_FACE_PX and tiny["upscale"] > 512 / SMALL_FACE_PX
    assert 0.1 < cut["padding_share"] < 0.7 and cut["faces_in_crop"] == 2  # cut at the left and the top
    assert manifest["tiny"]["quality"]["flags"] == flags["tiny"]
    # one line per face with its measures, and the flagged faces again in the summary
    lines = {name: next(line for line in err.splitlines() if f"{name}." in line) for name in ("clean", "tiny")}
    assert "source px" in lines["clean"] and "FLAGGED" not in lines["clean"]
    assert "FLAGGED: small" in lines["tiny"]
    assert "2 weak input(s) flagged" in err and "edge_cut: padded" in err


def test_min_face_size_skips_small_faces(weak_sources, tmp_path):
    report = prepare_faces(weak_sources, tmp_path / "faces", min_face_size=SMALL_FACE_PX, progress=False)
    assert sorted(f.face_id for f in report.faces) == ["clean", "edge_cut"]
    [skipped] = report.skipped
    assert skipped.source.name == "tiny.png" and "face too small" in skipped.reason
    assert json.loads((tmp_path / "faces" / "manifest.json").read_text())["settings"]["min_face_size"] == 112
    args = cli_parser(register).parse_args(["faces", "prepare", "a", "b", "--min-face-size", "90"])
    assert args.min_face_size == 90.0
    with pytest.raises(SystemExit):
        cli_parser(register).parse_args(["faces", "prepare", "a", "b", "--min-face-size", "-1"])


@pytest.mark.slow  # prepares, generates (external), scores with dlib and writes a report: about 30 s
def test_report_lists_flagged_faces_beside_per_face_results(weak_sources, tmp_path):
    from f2d_bench.config import config_from_dict
    from f2d_bench.engine import generate_run
    from f2d_bench.report.render import build_report
    from f2d_bench.scoring import score_run

    from conftest import small_config_dict

    faces = tmp_path / "faces"
    prepare_faces(weak_sources, faces, progress=False)
    src = tmp_path / "elsewhere"
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    for fid in ("clean", "tiny", "edge_cut"):
        for pid in ("job-chef", "activity-guitar", "location-eiffel-tower", "ref", "expression-laughing"):
            (src / fid / pid).mkdir(parents=True)
            if pid == "expression-laughing":
                Image.fromarray(noise).save(src / fid / pid / "0.png")  # no face
            else:
                shutil.copy(faces / f"{fid}.png", src / fid / pid / "0.png")
    data = small_config_dict(faces=str(faces), seeds=[0],
                             methods=[{"name": "external", "params": {"source": str(src)}}],
                             scoring={"scorers": ["dlib"], "no_face": "drop"})
    run = tmp_path / "run"
    assert generate_run(config_from_dict(data), run, progress=False).complete
    score_run(run, progress=False)
    recorded = json.loads((run / "scores" / "scoring.json").read_text())
    assert (recorded["no_face"], recorded["identity_clamp"], recorded["input_face_rule"]) == ("drop", False, "largest")
    report = build_report([run], tmp_path / "report", n_resamples=50)
    html = report.read_text()
    assert "Weak input faces" in html and "Identity means, both ways" in html
    warning = next(line for line in html.splitlines() if "Weak input faces" in line)
    assert "edge_cut" in warning and "tiny" in warning and "clean" not in warning
    import pandas as pd

    per_face = pd.read_csv(tmp_path / "report" / "per_face.csv", index_col="face", keep_default_na=False)
    assert per_face.loc["clean", "flags"] == "" and "small" in per_face.loc["tiny", "flags"]
    both = pd.read_csv(tmp_path / "report" / "identity_both_ways.csv", index_col="method")
    # one prompt image in four has no face: 0.0 there pulls the mean below the detected-only mean
    [row] = both.itertuples()
    assert row.n_images == 12 and row.n_detected == 9 and row.dlib_zero == pytest.approx(row.dlib_detected * 0.75)
