"""Hostile and broken inputs: no code runs from a weight file, bad input gets a clear error and no
traceback, a failed start leaves nothing behind, damaged images are found and made again, and a killed
report or a second writer never leaves a mixed state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, TEST_PHOTOS, small_config_dict
from f2d_bench.cli import main
from f2d_bench.config import config_from_dict, load_config
from f2d_bench.engine import generate_run
from f2d_bench.errors import ConfigError, F2DBenchError, ModelUnavailableError
from f2d_bench.faces.detect import FaceDetector
from f2d_bench.faces.prepare import prepare_faces
from f2d_bench.files import temporary_sibling
from f2d_bench.run_dir import RunDir
from f2d_bench.scorers.identity import adaface
from f2d_bench.weights import WeightsLayoutError


class _RunsCode:
    """Pickles to a call of ``exec`` that writes a marker file: what a booby-trapped checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# --- weight files ---------------------------------------------------------------------------------------


def test_a_checkpoint_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "side-effect"
    state = {f"model.{k}": v for k, v in adaface.build_model("ir_18").state_dict().items()}
    path = tmp_path / "adaface_ir18.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": _RunsCode(marker)}, path)
    # The same file loaded without the guard would run the call: the test's trap is real.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()

    with pytest.raises(WeightsLayoutError, match=r"adaface_ir18\.ckpt.*global exec.*nothing in the file was run"):
        adaface.load_adaface(path, arch="ir_18")
    assert not marker.exists()


# --- photos and ids -------------------------------------------------------------------------------------


def test_tiny_images_find_no_face_instead_of_crashing(tmp_path):
    detector = FaceDetector()
    for size in (1, 8, 19):
        assert detector.detect(Image.new("RGB", (size, size), (120, 90, 60))) == []
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TEST_PHOTOS / "obama.jpg", src / "obama.jpg")
    Image.new("RGB", (1, 1)).save(src / "one.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(src / "eight.png")
    report = prepare_faces(src, tmp_path / "faces", detector=detector, progress=False)
    assert [f.face_id for f in report.faces] == ["obama"]
    reasons = {s.source.name: s.reason for s in report.skipped}
    assert set(reasons) == {"one.png", "eight.png"} and all("no face" in r for r in reasons.values())
    manifest = json.loads((tmp_path / "faces" / "manifest.json").read_text())
    assert [f["face_id"] for f in manifest["faces"]] == ["obama"]


def test_double_dots_and_hidden_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(TEST_PHOTOS / "obama.jpg", src / "a..b.jpg")
    shutil.copy(TEST_PHOTOS / "biden.jpg", src / "..hidden..jpg")
    report = prepare_faces(src, tmp_path / "faces", progress=False)
    assert [f.face_id for f in report.faces] == ["a_b"]
    assert [s.source.name for s in report.skipped] == ["..hidden..jpg"]
    assert "hidden" in report.skipped[0].reason
    # The id is usable by the whole pipeline (it failed in generate before).
    data = small_config_dict(faces=str(tmp_path / "faces"), seeds=[0],
                             sampling={"num_inference_steps": 2, "height": 32, "width": 32})
    assert generate_run(config_from_dict(data), tmp_path / "run", progress=False).complete


# --- configs and starts ----------------------------------------------------------------------------------


def test_a_config_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: test\n# caf\xe9 au lait\nmethods: [{name: sd-class}]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: line 2 is not UTF-8.*save the file as UTF-8"):
        load_config(path)
    assert main(["generate", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "line 2 is not UTF-8" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_nothing_and_the_fixed_config_runs(tmp_path):
    out = tmp_path / "run"
    missing = small_config_dict(seeds=[0], model={"pretrained": str(tmp_path / "no-such-model")})
    with pytest.raises(ModelUnavailableError, match="does not exist") as info:
        generate_run(config_from_dict(missing), out, progress=False)
    assert "hf download" not in str(info.value)  # a local path is not a Hub id
    assert not out.exists()
    typo = small_config_dict(seeds=[0], scoring={"scorers": ["adaface", "clip-score"]})
    with pytest.raises(ConfigError, match="clip-score"):
        generate_run(config_from_dict(typo), out, progress=False)
    bad_setting = small_config_dict(seeds=[0], scoring={"settings": {"adaface": {"chekpoint": "x.ckpt"}}})
    with pytest.raises(ConfigError, match=r"scoring\.settings\.adaface\.chekpoint"):
        generate_run(config_from_dict(bad_setting), out, progress=False)
    assert not out.exists()
    fixed = small_config_dict(seeds=[0], sampling={"num_inference_steps": 2, "height": 32, "width": 32})
    assert generate_run(config_from_dict(fixed), out, progress=False).complete


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", "a..b"])
def test_run_names_are_plain_names(name):
    with pytest.raises(ConfigError, match="plain name"):
        config_from_dict(small_config_dict(name=name))


# --- damaged images -------------------------------------------------------------------------------------


@pytest.fixture()
def small_run(tmp_path):
    data = small_config_dict(seeds=[0], sampling={"num_inference_steps": 2, "height": 32, "width": 32})
    out = tmp_path / "run"
    assert generate_run(config_from_dict(data), out, progress=False).complete
    return out, data


def test_a_truncated_image_is_found_by_status_verify_and_generated_again(small_run, capsys):
    out, data = small_run
    run = RunDir(out)
    key = run.keys()[3]
    path = run.image_path(key)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a disk or a copy cut it short
    assert main(["status", str(out)]) == 0  # plain status counts files, as before
    capsys.readouterr()
    assert main(["status", str(out), "--verify", "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert list(status["damaged"]) == [key.as_string()]
    assert status["done"] == status["expected"] - 1
    assert status["methods"][key.method_id]["done"] == status["methods"][key.method_id]["expected"] - 1
    assert main(["status", str(out), "--verify"]) == 1
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert total.split()[1] == f"{status['done']}/{status['expected']}"  # the text says the same
    summary = generate_run(config_from_dict(data), out, progress=False)
    assert summary.written == 1 and any("damaged" in p for m in summary.methods for p in m.problems)
    assert path.read_bytes() == good  # the same key gives the same pixels again
    assert main(["status", str(out), "--verify"]) == 0


@pytest.mark.parametrize("first, then", [("1/1", "2/2"), ("2/2", "1/1")])
def test_a_damaged_image_another_shard_layout_wrote_is_generated_again(tmp_path, first, then):
    from f2d_bench.grid import Shard

    data = small_config_dict(seeds=[0], sampling={"num_inference_steps": 2, "height": 32, "width": 32})
    out, config = tmp_path / "run", config_from_dict(data)
    generate_run(config, out, shard=Shard.parse(first), progress=False)
    run = RunDir(out)
    resume = Shard.parse(then)
    key = next(k for k in run.keys() if resume.owns(k) and run.store.has_image(k))
    path = run.image_path(key)
    good = path.read_bytes()
    path.write_bytes(good[:-20])  # lost its end after the first writer recorded it
    summary = generate_run(config, out, shard=resume, progress=False)
    assert any("1 damaged image(s)" in p for m in summary.methods for p in m.problems)
    assert path.read_bytes() == good
    assert main(["status", str(out), "--verify"]) == 0  # no stale line of the first writer is left


def test_the_repair_locks_only_the_writer_whose_line_it_drops(tmp_path):
    from f2d_bench.grid import Shard

    data = small_config_dict(seeds=[0], sampling={"num_inference_steps": 2, "height": 32, "width": 32})
    out, config = tmp_path / "run", config_from_dict(data)
    generate_run(config, out, shard=Shard(1, 2), progress=False)
    run = RunDir(out)
    new = [Shard(1, 4), Shard(3, 4)]  # both own keys shard 1/2 wrote: the resumed run's layout
    key = next(k for k in run.keys() if Shard(1, 2).owns(k) and new[0].owns(k))
    path = run.image_path(key)
    good = path.read_bytes()
    path.write_bytes(b"x")
    (run.manifests_dir / "shard-3-of-4.jsonl").touch()
    with run.store.writer_lock("shard-1-of-2"):  # the writer whose line it is still runs: nothing changes
        with pytest.raises(F2DBenchError, match="shard-1-of-2 is writing images of .* another --shard layout"):
            generate_run(config, out, shard=new[0], progress=False)
        assert path.read_bytes() == b"x" and key in run.store.manifest_records()
    with run.store.writer_lock("shard-3-of-4"):  # a running shard of the new layout holds no line of it
        generate_run(config, out, shard=new[0], progress=False)
    assert path.read_bytes() == good
    assert run.store.manifest_records()[key].writer == "shard-1-of-4"


def test_a_writer_of_another_layout_still_running_is_left_alone(tmp_path):
    """While shard 1/2 runs, shard 1/3 must not start: it owns some of the same keys and would take 1/2's
    files in flight (its temporary files, its images not yet recorded) for what a kill left."""
    from f2d_bench.grid import Shard

    data = small_config_dict(seeds=[0], sampling={"num_inference_steps": 2, "height": 32, "width": 32})
    out, config = tmp_path / "run", config_from_dict(data)
    generate_run(config, out, shard=Shard(2, 2), progress=False)
    run = RunDir(out)
    key = next(k for k in run.keys() if Shard(1, 2).owns(k) and Shard(1, 3).owns(k))
    in_flight = temporary_sibling(run.image_path(key))
    in_flight.parent.mkdir(parents=True, exist_ok=True)
    in_flight.write_bytes(b"half a PNG that shard 1/2 is writing")

    def images():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()}

    before = images()
    with run.store.writer_lock("shard-1-of-2"):
        for other in (Shard(1, 3), Shard(1, 1)):
            with pytest.raises(F2DBenchError, match=r"shard-1-of-2 is writing images of .* another --shard "
                                                    r"layout .*resume with one layout"):
                generate_run(config, out, shard=other, progress=False)
        assert in_flight.read_bytes() == b"half a PNG that shard 1/2 is writing"
        assert images() == before and len(run.store.manifest_records()) == len(before) - 1  # the tmp file
    assert generate_run(config, out, shard=Shard(1, 3), progress=False).complete  # once 1/2 is gone
    assert not in_flight.exists()  # then it is a kill's leftover, and removed


def test_a_line_left_by_a_kill_inside_the_repair_is_dropped_later(tmp_path):
    from f2d_bench.grid import Shard

    data = small_config_dict(seeds=[0], sampling={"num_inference_steps": 2, "height": 32, "width": 32})
    out, config = tmp_path / "run", config_from_dict(data)
    generate_run(config, out, progress=False)
    run = RunDir(out)
    key = next(k for k in run.keys() if Shard(1, 2).owns(k))
    good = run.image_path(key).read_bytes()
    run.image_path(key).write_bytes(b"x")
    stale = run.store.manifest_records()[key]
    run.image_path(key).unlink()  # a kill after the repair removed the image, before it dropped the line
    generate_run(config, out, shard=Shard(1, 2), progress=False)  # made again, with its own line
    assert run.image_path(key).read_bytes() == good
    assert stale.sha256 == run.store.manifest_records()[key].sha256  # same bytes: nothing conflicts
    # the same with a line recording other bytes (an image that had changed before its repair)
    lines = (run.manifests_dir / "all.jsonl").read_text().splitlines()
    fake = [json.dumps({**json.loads(line), "sha256": "0" * 64}) if json.loads(line)["key"] == key.to_dict() else line
            for line in lines]
    (run.manifests_dir / "all.jsonl").write_text("\n".join(fake) + "\n")
    assert "0" * 64 in (run.manifests_dir / "all.jsonl").read_text()  # the fake line is in place
    generate_run(config, out, shard=Shard(1, 2), progress=False)
    assert "0" * 64 not in (run.manifests_dir / "all.jsonl").read_text()
    assert main(["status", str(out), "--verify"]) == 0


def test_output_into_a_closed_pipe_stops_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "f2d_bench", "methods"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does once it has its line
    assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as any Unix tool stopped by a closed pipe
    assert proc.stderr.read() == ""


def test_score_warns_about_missing_images(small_run):
    from f2d_bench.scoring import score_run

    out, _ = small_run
    run = RunDir(out)
    gone = run.keys()[0]
    run.image_path(gone).unlink()
    summary = score_run(out, scorers=["dlib"], progress=False)
    assert summary.missing == [gone.as_string()]
    assert "1 image(s) the grid expects do not exist" in summary.text()


def test_a_second_writer_of_the_same_shard_is_refused(small_run):
    out, data = small_run
    with RunDir(out).store.writer_lock("all"):
        with pytest.raises(F2DBenchError, match="another process is writing"):
            generate_run(config_from_dict(data), out, progress=False)
    generate_run(config_from_dict(data), out, progress=False)  # released: the same call goes through


# --- a killed report ------------------------------------------------------------------------------------


def _report_state(folder: Path) -> str | None:
    """Which report ``folder`` holds ("old", "new"), checking that its page and data files agree."""
    if not folder.exists():
        return None
    page = (folder / "index.html").read_text(encoding="utf-8")
    data = json.loads((folder / "aggregates.json").read_text(encoding="utf-8"))
    resamples = data["n_resamples"]
    assert f"({resamples} resamples of faces" in page  # the page and its data files are of one report
    return {50: "old", 60: "new"}[resamples]


@pytest.mark.slow
def test_a_report_killed_while_writing_leaves_the_old_or_the_new_report(small_run, tmp_path):
    from f2d_bench.scoring import score_run

    out, _ = small_run
    score_run(out, scorers=["dlib"], progress=False)
    report = tmp_path / "report"
    assert main(["report", str(out), "-o", str(report), "--resamples", "50"]) == 0
    assert _report_state(report) == "old"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    states = set()
    for delay in (0.5, 1.0, 1.5, 2.0, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "f2d_bench", "report", str(out), "-o", str(report),
                                 "--resamples", "60"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        states.add(_report_state(report))
        if _report_state(report) == "new":
            break
    assert states <= {"old", "new"}
    assert main(["report", str(out), "-o", str(report), "--resamples", "60"]) == 0
    assert _report_state(report) == "new"
    # A finished report removes what killed ones left (their temporary folders).
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.new-")]


def test_a_file_given_as_the_run_folder_is_named_as_such(tmp_path, capsys):
    config = tmp_path / "real.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(seeds=[0])), encoding="utf-8")
    before = config.read_bytes()
    assert main(["generate", "--config", str(config), "--out", str(config), "--no-progress"]) != 0
    assert main(["status", str(config)]) != 0
    err = capsys.readouterr().err
    assert err.count(f"{config} is a file, not a run directory") == 2, err
    assert config.read_bytes() == before
