"""The optional deepface identity scorer, through deepface's real loading path.

deepface's real weights never load here, so each model is built with deepface's own architecture class,
given seeded random weights, saved under the file name deepface asks for in a temporary DEEPFACE_HOME,
and loaded back by deepface itself. The scorer's embedding must equal ``DeepFace.represent(...,
detector_backend="skip")`` on the same crop; a missing file must be our error, before any download.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("deepface", reason="the deepface extra is not installed (pip install 'f2d-bench[deepface]')")
torch = pytest.importorskip("torch")

from f2d_bench.errors import F2DBenchError, ModelUnavailableError  # noqa: E402
from f2d_bench.faces.detect import FaceDetector  # noqa: E402
from f2d_bench.faces.faceset import Face  # noqa: E402
from f2d_bench.scorers import DEFAULT_SCORERS, SCORERS, check_scoring  # noqa: E402
from f2d_bench.scorers.base import ScoreItem, ScoringContext  # noqa: E402
from f2d_bench.scorers.identity import deepface_face as dfs  # noqa: E402

TEST_PHOTOS = Path(__file__).resolve().parents[1] / "f2d_bench" / "assets" / "faces"
PHOTOS = ["obama.jpg", "obama2.jpg", "biden.jpg"]


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random BN statistics and affines on top of the default init, so that a copy that missed
    any tensor (or a buffer left at its default) would compute something else."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif tensor.ndim == 1:
                tensor.copy_(tensor + 0.1 * torch.randn(tensor.shape, generator=gen))
    return model.eval()


def _architectures():
    """deepface's pytorch networks and the weight file names its loaders ask for."""
    from deepface.models.facial_recognition.pytorch import ArcFace, Facenet

    return {"ArcFace": (ArcFace.base_model, "arcface_weights.pth"),
            "Facenet512": (lambda: Facenet.InceptionResNetV1(dimension=512), "facenet512_weights.pth")}


@pytest.fixture(scope="module")
def deepface_home(tmp_path_factory):
    """A DEEPFACE_HOME holding random-weight ArcFace and Facenet512 files in deepface's layout."""
    home = tmp_path_factory.mktemp("deepface-home")
    weights = home / ".deepface" / "weights"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    for seed, (build, file_name) in enumerate(_architectures().values()):
        torch.save(_randomise(build(), seed).state_dict(), weights / file_name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPFACE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def detections():
    detector = FaceDetector()
    out = {}
    for name in PHOTOS:
        image = Image.open(TEST_PHOTOS / name).convert("RGB")
        out[name] = (image, detector.detect(image)[0])
    return out


@pytest.fixture(scope="module")
def arcface(deepface_home):
    return dfs.load_deepface("ArcFace", device="cpu")


def _represent(model_name: str, crop_rgb: np.ndarray) -> np.ndarray:
    """deepface's public API on the same crop, its own detector skipped; L2-normalised."""
    from deepface import DeepFace

    out = DeepFace.represent(np.ascontiguousarray(crop_rgb[:, :, ::-1]), model_name=model_name,
                             detector_backend="skip")
    vector = np.asarray(out[0]["embedding"], dtype=np.float64)
    return vector / np.linalg.norm(vector)


def test_weights_folder_is_deepface_s(deepface_home):
    from deepface.commons import folder_utils

    assert dfs.weights_dir() == deepface_home / ".deepface" / "weights"
    assert Path(folder_utils.get_deepface_home()) == deepface_home


def test_missing_weights_names_path_and_url_before_any_download(tmp_path, monkeypatch):
    from deepface.models.facial_recognition.pytorch import ArcFace

    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError) as err:
        dfs.load_deepface("ArcFace")
    message = str(err.value)
    assert str(tmp_path / ".deepface" / "weights" / "arcface_weights.pth") in message
    assert ArcFace.WEIGHTS_URL[0] in message and "allow_download" in message
    # nothing was fetched or left behind, and deepface's own function is back in place
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    from deepface.commons import weight_utils

    assert weight_utils.download_weights_if_necessary.__module__ == "deepface.commons.weight_utils"


def test_wrong_file_is_refused_naming_it(tmp_path, monkeypatch):
    from f2d_bench.weights import WeightsLayoutError

    weights = tmp_path / ".deepface" / "weights"
    weights.mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(3)}, weights / "arcface_weights.pth")  # not ArcFace's keys
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    with pytest.raises(WeightsLayoutError, match="arcface_weights.pth.*RuntimeError"):
        dfs.load_deepface("ArcFace")


def test_scorer_missing_weights_error_comes_from_scoring(tmp_path, monkeypatch, detections):
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    image, det = detections["obama.jpg"]
    scorer = dfs.DeepFaceScorer({"model_name": "Facenet512"}, _context({"obama": det}))
    with pytest.raises(ModelUnavailableError, match="facenet512_weights.pth"):
        scorer.score([_item(image, det, "obama")])


@pytest.mark.parametrize("model_name,dim,size,crop", [("ArcFace", 512, 112, "arcface"),
                                                       ("Facenet512", 512, 160, "box")])
def test_embedding_equals_deepface_represent(deepface_home, detections, model_name, dim, size, crop):
    model = dfs.load_deepface(model_name, device="cpu")
    assert model.weight_files == [deepface_home / ".deepface" / "weights" / _architectures()[model_name][1]]
    assert (model.input_size, model.embedding_dim, dfs.default_crop(model_name)) == ((size, size), dim, crop)
    image, det = detections["obama.jpg"]
    face = dfs.crop_deepface(image, det, crop, model.crop_size)
    assert face.shape == (size, size, 3) and face.dtype == np.uint8
    ours = dfs.embed_crops(model, [face])
    assert ours.shape == (1, dim) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours[0], _represent(model_name, face), atol=1e-5)


def test_deterministic_batched_and_follows_the_face(arcface, detections):
    crops = [dfs.crop_deepface(im, d, "arcface", arcface.crop_size) for im, d in detections.values()]
    batch = dfs.embed_crops(arcface, crops)
    assert batch.shape == (len(PHOTOS), 512)
    np.testing.assert_array_equal(batch, dfs.embed_crops(arcface, crops))  # same input, same bits
    for i, crop in enumerate(crops):  # one at a time: the same up to float rounding
        np.testing.assert_allclose(dfs.embed_crops(arcface, [crop])[0], batch[i], atol=1e-5)
    # different faces, different embeddings; and the crop matters (random weights: no identity claim)
    assert float(batch[0] @ batch[2]) < 0.9999
    box = dfs.crop_deepface(*detections["obama.jpg"], "box", arcface.crop_size)
    assert float(dfs.embed_crops(arcface, [box])[0] @ batch[0]) < 0.9999
    # deepface's own loader read the file: other weights, other embedding
    with torch.no_grad():
        arcface.client.model.dense.weight.mul_(-1.0)
    try:
        assert float(dfs.embed_crops(arcface, crops[:1])[0] @ batch[0]) < 0.99
    finally:
        with torch.no_grad():
            arcface.client.model.dense.weight.mul_(-1.0)


def test_model_input_is_deepface_s_preprocessing(arcface, detections):
    face = dfs.crop_deepface(*detections["biden.jpg"], "arcface", 112)
    x = dfs.model_input(arcface, [face])
    assert x.shape == (1, 112, 112, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], face[:, :, ::-1] / 255.0, atol=1e-6)  # BGR, 0..1 ("base")
    arc = dfs.model_input(arcface, [face], normalization="ArcFace")
    np.testing.assert_allclose(arc[0], (face[:, :, ::-1].astype(np.float64) - 127.5) / 128, atol=1e-4)


def _context(input_detections) -> ScoringContext:
    return ScoringContext(prompt_set=None, device="cpu", input_detections=input_detections)


def _item(image, det, face_id, path=None) -> ScoreItem:
    return ScoreItem(key=None, image=image, prompt=None, face=Face(face_id, path or TEST_PHOTOS / f"{face_id}.jpg"),
                     reference_path=None, detection=det)


def test_scorer_scores_cosine_and_zero_without_face(deepface_home, detections):
    obama, obama_det = detections["obama.jpg"]
    scorer = dfs.DeepFaceScorer({"model_name": "ArcFace"}, _context({"obama": obama_det}))
    assert scorer.metric == "deepface_arcface" and [m.name for m in scorer.metrics] == ["deepface_arcface"]
    assert scorer.settings == {"weights": "official", "model_name": "ArcFace", "engine": "pytorch",
                               "crop": "arcface", "normalization": "base", "allow_download": False}
    items = [_item(*detections["obama2.jpg"], "obama"), _item(*detections["biden.jpg"], "obama"),
             _item(obama, None, "obama"), _item(obama, obama_det, "obama")]
    values = scorer.score(items)
    assert [set(v) for v in values] == [{"deepface_arcface"}] * 4
    model = scorer.model()
    ref = dfs.embed_crops(model, [dfs.crop_deepface(obama, obama_det, "arcface", 112)])[0]
    for (image, det), v in zip([detections["obama2.jpg"], detections["biden.jpg"]], values):
        expected = float(ref @ _represent("ArcFace", dfs.crop_deepface(image, det, "arcface", 112)))
        assert v["deepface_arcface"] == pytest.approx(expected, abs=1e-5)
    assert values[2]["deepface_arcface"] == 0.0  # no face in the generated image
    assert values[3]["deepface_arcface"] == pytest.approx(1.0, abs=1e-5)  # the input photo itself
    described = scorer.describe()
    assert described["settings"]["model_name"] == "ArcFace" and described["metric"] == "deepface_arcface"
    assert described["deepface"] and described["weight_files"][0].endswith("arcface_weights.pth")
    assert scorer.note() is None


def test_settings_are_checked_and_resolved(deepface_home):
    ctx = _context({})
    facenet = dfs.DeepFaceScorer({"model_name": "VGG-Face"}, ctx)
    assert (facenet.metric, facenet.settings["crop"]) == ("deepface_vgg_face", "box")
    assert dfs.DeepFaceScorer({"model_name": "SFace"}, ctx).settings["crop"] == "arcface"
    # the settings (model name included) are the cache key
    assert dfs.DeepFaceScorer({}, ctx).cache_id != dfs.DeepFaceScorer({"model_name": "Facenet512"}, ctx).cache_id
    with pytest.raises(F2DBenchError, match="unknown model_name 'ArcFace2'.*Facenet512"):
        dfs.DeepFaceScorer({"model_name": "ArcFace2"}, ctx)
    with pytest.raises(F2DBenchError, match="crop must be one of"):
        dfs.DeepFaceScorer({"crop": "ffhq"}, ctx)
    with pytest.raises(F2DBenchError, match="weights must be 'official'"):
        dfs.DeepFaceScorer({"weights": "random"}, ctx)
    with pytest.raises(F2DBenchError, match="unknown setting 'detector_backend'"):
        dfs.DeepFaceScorer({"detector_backend": "retinaface"}, ctx)


def test_engine_conflict_is_refused(monkeypatch):
    monkeypatch.setenv("DEEPFACE_BACKEND_ENGINE", "onnx")
    with pytest.raises(F2DBenchError, match="DEEPFACE_BACKEND_ENGINE is set to 'onnx'"):
        dfs.select_engine("pytorch")
    monkeypatch.setenv("DEEPFACE_BACKEND_ENGINE", "pytorch")
    assert dfs.select_engine("pytorch") == "pytorch"
    with pytest.raises(F2DBenchError, match="engine must be one of"):
        dfs.select_engine("jax")


def test_registered_optional_and_checked():
    assert "deepface" in SCORERS.names() and "deepface" not in DEFAULT_SCORERS
    assert SCORERS.load("deepface") is dfs.DeepFaceScorer
    check_scoring(["deepface"], {"deepface": {"model_name": "Facenet512", "crop": "box"}})
    with pytest.raises(F2DBenchError, match="scoring.settings.deepface.model"):
        check_scoring(["deepface"], {"deepface": {"model": "ArcFace"}})


def test_without_deepface_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepface", None)  # `import deepface` now raises ImportError
    with pytest.raises(ModelUnavailableError, match=r"pip install 'f2d-bench\[deepface\]'"):
        dfs.DeepFaceScorer({}, _context({}))
    SCORERS.load("deepface")  # listing and settings checks still work without it
    check_scoring(["clip"], {"deepface": {"model_name": "ArcFace"}})  # settings alone: not selected
    with pytest.raises(ModelUnavailableError, match=r"pip install 'f2d-bench\[deepface\]'"):
        check_scoring(["deepface"], {})  # selected: refused when the run starts


@pytest.mark.slow
def test_score_run_records_model_and_settings(tmp_path, deepface_home):
    """`score` with only the deepface scorer and a non-default model: that model's column, and its
    settings in scoring.json."""
    import pandas as pd

    from f2d_bench.config import config_from_dict
    from f2d_bench.engine import generate_run
    from f2d_bench.scoring import score_run

    from conftest import SAME, external_source, face_dir, small_config_dict

    same = {"obama": "obama2", "biden": "biden"}
    faces = face_dir(tmp_path / "faces", same)
    plan = lambda fid: {"job-chef": SAME[fid], "activity-guitar": None,  # noqa: E731
                        "location-eiffel-tower": SAME[fid], "ref": fid, "expression-laughing": SAME[fid]}
    src = external_source(tmp_path / "src", same, plan, rng=np.random.default_rng(0), noise_size=128)
    data = small_config_dict(faces=str(faces), seeds=[0],
                             methods=[{"name": "external", "params": {"source": str(src)}}],
                             scoring={"scorers": ["deepface"], "device": "cpu",
                                      "settings": {"deepface": {"model_name": "Facenet512"}}})
    out = tmp_path / "run"
    assert generate_run(config_from_dict(data), out, progress=False).complete
    score_run(out, progress=False)
    info = json.loads((out / "scores" / "scoring.json").read_text())
    (entry,) = [s for s in info["scorers"] if s["name"] == "deepface"]
    assert entry["settings"]["model_name"] == "Facenet512" and entry["settings"]["crop"] == "box"
    assert entry["settings"]["engine"] == "pytorch" and entry["deepface"]
    assert [m["name"] for m in info["metrics"]] == ["deepface_facenet512"]
    assert entry["weight_files"] == [str(deepface_home / ".deepface" / "weights" / "facenet512_weights.pth")]
    rec = pd.read_parquet(out / "records.parquet").set_index(["face", "prompt"])
    assert rec.loc[("biden", "ref"), "deepface_facenet512"] == pytest.approx(1.0, abs=1e-4)
    assert rec.loc[("obama", "activity-guitar"), "deepface_facenet512"] == 0.0  # noise: no face
    assert os.environ["DEEPFACE_HOME"] == str(deepface_home)
