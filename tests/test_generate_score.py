"""`generate --score`: images scored while the next ones render, from the pixels just written, into the
same caches as `score`; the records equal those of `generate` then `score`, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from f2d_bench.cli import main
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.errors import F2DBenchError
from f2d_bench.grid import Shard
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring import score_run

from conftest import count_image_reads, face_dir, offline_scoring, run_hashes, small_config_dict
from test_score_shards import _fid_reference

FACES = ["biden", "grace_hopper", "obama"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config (3 faces x 5 prompts x 2 seeds, scored 3 images per batch, FID on) and its run made by
    `generate` then `score`."""
    tmp = tmp_path_factory.mktemp("generate-score")
    faces = face_dir(tmp / "faces", FACES)
    data = small_config_dict(faces=str(faces), batch_size=4,
                             scoring=offline_scoring(scorers=["clip", "facenet"], batch_size=3, chunk_size=4,
                                                     fid_backend="clean-fid-torchscript",
                                                     fid_reference=str(_fid_reference(tmp))))
    baseline = tmp / "baseline"
    assert generate_run(config_from_dict(data), baseline, progress=False).complete
    score_run(baseline, progress=False)
    return data, baseline


def _threads_building_models(monkeypatch) -> list[str]:
    """The name of the thread that builds each identity or CLIP-family scorer model, in build order."""
    import threading

    from f2d_bench.scorers.identity.scorer import IdentityScorer
    from f2d_bench.scorers.text.scorer import _OpenClipScorer

    names: list[str] = []
    for cls, method, attr in ((IdentityScorer, "model", "_model"), (_OpenClipScorer, "bundle", "_bundle")):
        original = getattr(cls, method)

        def building(self, original=original, attr=attr):
            if getattr(self, attr) is None:
                names.append(threading.current_thread().name)
            return original(self)

        monkeypatch.setattr(cls, method, building)
    return names


def _same_outputs(out: Path, baseline: Path) -> None:
    run, clean = RunDir(out), RunDir(baseline)
    assert run_hashes(out) == run_hashes(baseline)
    pd.testing.assert_frame_equal(run.records(), clean.records(), check_exact=True)
    assert (out / "table1.csv").read_bytes() == (baseline / "table1.csv").read_bytes()
    assert json.loads(run.fid_json.read_text()) == json.loads(clean.fid_json.read_text())


def test_generate_score_equals_generate_then_score_from_the_pixels_written(setup, tmp_path, monkeypatch, capsys):
    data, baseline = setup
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    reads = count_image_reads(monkeypatch)
    built = _threads_building_models(monkeypatch)
    assert main(["generate", "--config", str(config), "--out", str(out), "--score", "--no-progress"]) == 0
    # Seeded random builds draw from torch's global RNG: none may run on the scoring thread while a
    # method builds its own, so every model was built before that thread started.
    assert built == ["MainThread", "MainThread"]
    text = capsys.readouterr().out
    assert "30 images written" in text and "scored 30 images" in text and "clip: 30 computed" in text
    _same_outputs(out, baseline)
    # Every stage took the images from memory: no generated PNG was decoded.
    assert not [p for p in reads if (out / "images") in p.parents]
    # The caches are the one source of truth: a later score computes nothing.
    again = score_run(out, progress=False)
    assert again.computed == {"clip": 0, "facenet": 0}
    pd.testing.assert_frame_equal(RunDir(out).records(), RunDir(baseline).records(), check_exact=True)


def test_resumed_generate_score_scores_old_and_new_images_alike(setup, tmp_path):
    """A run whose last face was lost (a kill before its images): the images that exist are read from
    disk, the new ones from memory, in the same order as `score`, so the values are the same."""
    data, baseline = setup
    out = tmp_path / "run"
    shutil.copytree(baseline, out, ignore=shutil.ignore_patterns("scores", "records.parquet", "table1.csv",
                                                                 "fid.json"))
    for png in (out / "images").rglob("*.png"):
        if png.parent.parent.name == "obama":
            png.unlink()
    summary = generate_run(config_from_dict(data), out, progress=False, score=True)
    assert summary.written == 10 and summary.score.computed == {"clip": 30, "facenet": 30}
    _same_outputs(out, baseline)


def test_sharded_generate_score_leaves_other_shards_references_to_the_assembly(setup, tmp_path):
    data, baseline = setup
    out = tmp_path / "run"
    config = config_from_dict(data)
    first = generate_run(config, out, shard=Shard(1, 2), progress=False, score=True)
    assert not first.score.assembled and first.score.waiting == ["2/2"]
    owned = sum(Shard(1, 2).owns(k) for k in RunDir(out).keys())
    # Its prompt images whose reference image shard 2 renders could not be scored yet.
    assert first.written == owned and 0 < first.score.computed["clip"] < owned
    second = generate_run(config, out, shard=Shard(2, 2), progress=False, score=True)
    assert second.score.assembled and RunDir(out).records_parquet.exists()
    # The same shards generated, then scored (a shard's batches hold other images than unsharded ones).
    plain = tmp_path / "plain"
    for i in (1, 2):
        generate_run(config, plain, shard=Shard(i, 2), progress=False)
    score_run(plain, progress=False)
    assert run_hashes(out) == run_hashes(plain)
    # Scorer batches of 3 hold other images too: the values agree to float noise.
    pd.testing.assert_frame_equal(RunDir(out).records(), RunDir(plain).records(), check_exact=False,
                                  rtol=1e-5, atol=1e-6)
    assert score_run(out, progress=False).computed == {"clip": 0, "facenet": 0}


def test_a_failing_scorer_stops_the_generate_early_and_keeps_its_images(setup, tmp_path, monkeypatch):
    import threading

    from f2d_bench.methods.sd_class import SDClassMethod
    from f2d_bench.scorers.identity.scorer import FaceNetScorer

    data, _ = setup
    failed = threading.Event()
    render = SDClassMethod.generate

    def broken(self, items):
        failed.set()
        raise RuntimeError("out of memory (simulated)")

    def later_faces_wait(self, requests):
        # The first face renders at once; later ones wait for the scorer to fail on the first face's
        # images, so the failure comes mid-run however fast the two threads are.
        if requests[0].key.face_id != FACES[0]:
            failed.wait(timeout=120)
        return render(self, requests)

    monkeypatch.setattr(FaceNetScorer, "score", broken)
    monkeypatch.setattr(SDClassMethod, "generate", later_faces_wait)
    out = tmp_path / "run"
    config = config_from_dict({**data, "batch_size": 2})
    with pytest.raises(F2DBenchError, match=r"scoring while generating stopped: RuntimeError: out of memory "
                                            r"\(simulated\).*generate without --score"):
        generate_run(config, out, progress=False, score=True)
    assert failed.is_set()
    status = RunDir(out).status()[0]
    assert 0 < status.done < status.expected  # stopped before the end, every written image whole
    assert RunDir(out).store.damaged(RunDir(out).keys()) == {}
    assert not list(out.rglob("*.tmp"))


def test_a_failed_generation_stops_the_scoring_thread_at_once_however_far_it_lags(setup, tmp_path, monkeypatch):
    """abort() ends the scoring after the group it is in: the faces settled behind it are not scored on the
    way out (a Ctrl-C or a crash would otherwise wait for all of them), and are left to a later score."""
    import threading
    import time

    from f2d_bench.methods.sd_class import SDClassMethod
    from f2d_bench.scoring.live import LiveScore

    data, _ = setup
    in_first = threading.Event()
    render, score_group = SDClassMethod.generate, LiveScore._score
    scored: list[str] = []

    def last_face_fails(self, requests):
        if requests[-1].key.face_id == FACES[-1]:
            in_first.wait(timeout=120)  # every earlier face is settled; the scorer is still on the first
            raise RuntimeError("the GPU fell off the bus (simulated)")
        return render(self, requests)

    def slow_scorer(self, group, pixels):
        scored.append(group[0].face_id)
        if len(scored) == 1:
            in_first.set()
            deadline = time.monotonic() + 120
            while not self._stop and time.monotonic() < deadline:  # lag until the generation has failed
                time.sleep(0.01)
        return score_group(self, group, pixels)

    monkeypatch.setattr(SDClassMethod, "generate", last_face_fails)
    monkeypatch.setattr(LiveScore, "_score", slow_scorer)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="fell off the bus"):
        generate_run(config_from_dict({**data, "batch_size": 2}), out, progress=False, score=True)
    assert scored == [FACES[0]]  # the second face was settled and waiting, and was not scored
    run = RunDir(out)
    assert {k.face_id for k in run.keys() if run.store.has_image(k)} == set(FACES[:2])
    score_run(out, progress=False)  # a later score does the rest
    assert set(run.records()["face"]) == set(FACES[:2])


def test_scorers_that_disagree_on_tf32_are_refused(setup, tmp_path):
    data, _ = setup
    scoring = offline_scoring(scorers=["clip", "facenet"])
    scoring["settings"]["clip"]["precision"] = "tf32"
    config = config_from_dict({**data, "scoring": scoring})
    with pytest.raises(F2DBenchError, match="disagree on TF32.*clip: tf32.*facenet: fp32"):
        generate_run(config, tmp_path / "run", progress=False, score=True)
