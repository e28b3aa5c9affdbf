"""The offline encoder-baselines preset end to end: FastComposer, ELITE and IP-Adapter-FaceID with seeded
random stand-ins for their released files, through generate, score and report."""

from __future__ import annotations

import json
import re

import pytest

from f2d_bench import api
from f2d_bench.cli import main
from f2d_bench.engine import generate_run
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring import score_run

from conftest import face_dir

ENCODERS = {"fastcomposer", "elite", "ip-adapter-faceid"}


def test_methods_lists_the_encoders_with_their_base_and_sampling(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert ENCODERS <= set(lines)
    assert "released on runwayml/stable-diffusion-v1-5" in lines["fastcomposer"]
    assert "native: LMSDiscreteScheduler, 100 steps, CFG 5.0" in lines["elite"]


@pytest.mark.slow
def test_the_encoders_preset_generates_scores_and_reports(tmp_path):
    faces = face_dir(tmp_path / "faces", ["obama", "grace_hopper"])
    (faces / "manifest.json").write_text(json.dumps({"faces": [
        {"face_id": "obama", "file": "obama.png", "class_word": "man"},
        {"face_id": "grace_hopper", "file": "grace_hopper.png", "class_word": "woman"}]}))
    config = api.resolve_config("encoders-smoke", faces=str(faces))
    config = config.replace(seeds=(0,), sampling=config.sampling.replace(num_inference_steps=4))
    assert {m.name for m in config.methods} >= ENCODERS
    out = tmp_path / "run"
    assert generate_run(config, out, progress=False).complete
    score_run(out, progress=False)
    report = api.report(out, tmp_path / "reports" / "encoders")
    run = RunDir(out)
    infos = {m["label"]: run.method_info(m["method_id"]) for m in run.read_grid()["methods"]}
    assert infos["ip-adapter-faceid"]["sampling_mode"] == "native"
    assert infos["fastcomposer"]["replaces"] == ["unet", "text_encoder"]
    table2 = {r["label"]: r for r in json.loads((report.parent / "aggregates.json").read_text())["table2"]}
    for label in ENCODERS:
        assert table2[label]["encode_n_faces"] == 2 and table2[label]["trained_params"] > 0, label
        assert "random" in table2[label]["weights"], label
    html = report.read_text(encoding="utf-8")
    setups = dict(re.findall(r'<th class="method">([^<]+)<br><code>[^<]+</code><br><span class="setup">([^<]+)</span>', html))
    assert "native sampling: DDIM, 30 steps, CFG 7.5, 64x64" in setups["ip-adapter-faceid"]
    assert "with its own unet, text_encoder | protocol sampling: EulerAncestral, 4 steps" in setups["fastcomposer"]
    assert setups["sd-class"].startswith("f2d-bench/tiny-sd14")
