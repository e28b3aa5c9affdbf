"""The offline baselines preset end to end: tune, generate, score and report every tuning baseline."""

from __future__ import annotations

import json

import pytest

from f2d_bench import api
from f2d_bench.cli import main
from f2d_bench.engine import generate_run, tune_run
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring import score_run

from conftest import face_dir

BASELINES = {"textual-inversion", "custom-diffusion", "dreambooth", "celeb-basis"}


def test_methods_lists_the_four_baselines(capsys):
    assert main(["methods"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert BASELINES <= listed


@pytest.mark.slow
def test_the_baselines_preset_tunes_generates_scores_and_reports(tmp_path):
    config = api.resolve_config("baselines-smoke", faces=str(face_dir(tmp_path / "faces", ["obama", "biden"])))
    # The preset's methods and settings on 2 faces, 1 seed and 4 sampling steps, to keep CI short.
    config = config.replace(seeds=(0,), sampling=config.sampling.replace(num_inference_steps=4))
    assert {m.name for m in config.methods} >= BASELINES
    out = tmp_path / "run"
    tuned = tune_run(config, out, progress=False)
    # Every tuning method but full DreamBooth without kept weights (left to generate) tunes both faces.
    assert sorted((label, owned, now) for _, label, owned, now in tuned.methods) == [
        ("celeb-basis", 2, 2), ("custom-diffusion", 2, 2), ("dreambooth-lora", 2, 2), ("textual-inversion", 2, 2)]
    assert any("dreambooth" in note for note in tuned.notes)
    assert generate_run(config, out, progress=False).complete
    score_run(out, progress=False)
    api.report(out, tmp_path / "reports" / "baselines")
    table2 = {r["label"]: r for r in json.loads((tmp_path / "reports" / "baselines" / "aggregates.json")
                                                 .read_text())["table2"]}
    run = RunDir(out)
    labels = {m["method_id"]: m.get("label") for m in run.read_grid()["methods"]}
    for mid, label in labels.items():
        if label == "sd-class":
            continue
        assert table2[label]["encode_n_faces"] == 2 and table2[label]["trained_params"] > 0, label
        assert table2[label]["encode_median_s"] > 0
    assert "full UNet" in table2["dreambooth"]["weights"] and "LoRA" in table2["dreambooth-lora"]["weights"]
    assert table2["celeb-basis"]["trained_params"] == 2 * 32  # 2 x basis size; the tiny text width is 32
    assert (tmp_path / "reports" / "index.html").is_file()
