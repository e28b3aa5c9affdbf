"""The peers' evaluation conventions as named settings, checked against re-typed peer evaluation steps.

FastComposer (``evaluation/single_object/single_object_evaluation.py``): facenet-pytorch's MTCNN with
``keep_all=True`` (its faces come largest first), the first face of each image, InceptionResnetV1, the
similarity clamped at 0, 0.0 when the generated image has no face. CelebBasis (``evaluation/clip_eval.py``,
``IdentityEvaluator``): an FFHQ-like 512 crop with a black border, normalised, resampled by a fixed
affine grid with zero padding, resized to 112, the CosFace sphere20; images without a face are dropped.

Both are re-typed here from the peers' code, step by step, independently of the harness's own crop code,
and fed the same weights as the harness's scorer (random: no published weights load offline); the
detection (landmarks) stays the harness's, as the scorer uses it.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from f2d_bench.config import ScoringConfig, config_from_dict
from f2d_bench.errors import ConfigError
from f2d_bench.faces.choice import INPUT_FACE_RULE, choose_face
from f2d_bench.faces.detect import FaceDetector
from f2d_bench.faces.faceset import Face
from f2d_bench.grid import ItemKey
from f2d_bench.report.numbers import identity_both_ways, per_face_results
from f2d_bench.scorers.base import ScoreItem, ScoringContext
from f2d_bench.scorers.identity import sphereface
from f2d_bench.scorers.identity.scorer import FaceNetScorer, SphereFaceScorer
from f2d_bench.scoring.score import identity_conventions

from conftest import TEST_PHOTOS, record_row, small_config_dict
from test_identity_models import _randomise

PHOTOS = ["astronaut.png", "biden.jpg", "camera.png", "franz-kafka.jpg", "grace_hopper.jpg", "obama.jpg",
          "obama2.jpg", "obama3.jpg"]


def two_person_collage() -> Image.Image:
    """biden.jpg (600 px high) beside obama2.jpg (400 px high): MTCNN is surer of Biden's face, Obama's
    is larger."""
    left, right = (Image.open(TEST_PHOTOS / n).convert("RGB") for n in ("biden.jpg", "obama2.jpg"))
    left = left.resize((round(left.width * 600 / left.height), 600), Image.Resampling.LANCZOS)
    right = right.resize((round(right.width * 400 / right.height), 400), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (left.width + right.width, 600), (128, 128, 128))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    """The shipped photos, the collage and a noise image without a face."""
    out = {name: Image.open(TEST_PHOTOS / name).convert("RGB") for name in PHOTOS}
    out["collage"] = two_person_collage()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out["noise"] = Image.fromarray(noise)
    return out


@pytest.fixture(scope="module")
def detections(images) -> dict[str, list]:
    detector = FaceDetector()
    return {name: detector.detect(image) for name, image in images.items()}


def test_collage_is_a_case_where_the_rules_differ(detections):
    found = detections["collage"]
    assert len(found) == 2 and detections["noise"] == []
    assert choose_face(found, "largest")[0] is not choose_face(found, "most-confident")[0]


def _pairs(images):
    """Ordered (generated, reference) pairs: every image against every shipped photo but itself."""
    return [(g, r) for g, r in itertools.product(images, PHOTOS) if g != r]


def _harness_values(scorer_cls, settings, images, detections, scoring: ScoringConfig, model=None,
                    randomise: bool = False):
    """The scorer and (generated, reference) -> the harness's value: the scorer on the face stage's
    choice, then the scoring's identity conventions, as `score` applies them. ``model``: the network to
    use (default: the scorer's seeded random weights; ``randomise`` adds random BatchNorm statistics and
    biases, so that the sphere20's embeddings differ more between faces)."""
    context = ScoringContext(prompt_set=None, device="cpu", input_detections={
        r: choose_face(detections[r], INPUT_FACE_RULE)[0] for r in PHOTOS})
    scorer = scorer_cls(settings, context)
    if model is not None:
        scorer._model = model
    elif randomise:
        scorer._model = _randomise(scorer.model())
    pairs = _pairs(images)
    items = [ScoreItem(key=ItemKey("m", r, "p", 0), image=images[g], prompt=None,
                       face=Face(r, TEST_PHOTOS / r), reference_path=None,
                       detection=choose_face(detections[g], scoring.face_policy, scoring.min_face_prob)[0])
             for g, r in pairs]
    raw = np.array([row[scorer.metric] for row in scorer.score(items)])
    detected = np.array([item.detection is not None for item in items])
    values = identity_conventions({scorer.metric: raw}, [scorer.metric], detected, scoring)[scorer.metric]
    return scorer, dict(zip(pairs, values))


# --- FastComposer ------------------------------------------------------------------------------------


def _fastcomposer_similarities(resnet, images) -> dict:
    """FastComposer's ``compute_average_similarity`` on every pair, re-typed."""
    from facenet_pytorch import MTCNN

    face_detector = MTCNN(image_size=160, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7],
                          factor=0.709, post_process=True, device="cpu", keep_all=True)
    faces = {name: face_detector(image) for name, image in images.items()}  # largest first
    out = {}
    with torch.no_grad():
        for g, r in _pairs(images):
            generated = faces[g]
            if generated is None:
                out[(g, r)] = 0.0
                continue
            generated = generated[:1].reshape(1, 3, 160, 160)
            reference = faces[r][:1].reshape(1, 3, 160, 160)
            similarity = resnet(generated) @ resnet(reference).T
            out[(g, r)] = max(similarity.item(), 0.0)
    return out


@pytest.mark.slow  # about 30 s of MTCNN and InceptionResnetV1 on two cores
def test_facenet_with_fastcomposer_settings_equals_fastcomposer(images, detections):
    scoring = ScoringConfig(face_policy="largest", identity_clamp=True, no_face="zero")
    scorer, ours = _harness_values(FaceNetScorer, {"weights": "random"}, images, detections, scoring)
    theirs = _fastcomposer_similarities(scorer.model(), images)
    assert set(ours) == set(theirs) and len(ours) == 10 * 8 - 8
    diff = max(abs(ours[k] - theirs[k]) for k in ours)
    assert diff < 1e-6, diff
    assert all(ours[("noise", r)] == 0.0 for r in PHOTOS)
    # Random weights embed every face much alike (and give no negative cosine, so the clamp is checked
    # in test_identity_conventions_clamp_and_drop); the face rule is checked on the crops themselves:
    # FastComposer's face of the collage is the largest one's crop, bit for bit, not the most confident's.
    from facenet_pytorch import MTCNN

    from f2d_bench.scorers.identity import facenet

    theirs_face = MTCNN(image_size=160, margin=0, keep_all=True, post_process=True)(images["collage"])[0]
    largest, confident = (choose_face(detections["collage"], rule)[0] for rule in ("largest", "most-confident"))
    ours_face = facenet.preprocess([facenet.crop_facenet(images["collage"], largest)])[0]
    other_face = facenet.preprocess([facenet.crop_facenet(images["collage"], confident)])[0]
    assert torch.equal(ours_face, theirs_face)
    assert (other_face - theirs_face).abs().mean() > 0.1


# --- CelebBasis --------------------------------------------------------------------------------------

# CelebBasis's constants: its norm_crop "ffhq" template (512) and the affine_grid matrix it applies after.
_FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                      [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
_THETA = [[1.07695457, -0.03625215, -1.56352194 / 512], [0.03625215, 1.07695457, -5.32134629 / 512]]


def _similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (what skimage's SimilarityTransform.estimate fits): x' = a x - b y + c,
    y' = b x + a y + d, solved as a linear system."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.astype(np.float64), dst.astype(np.float64)):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, c, d = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, c], [b, a, d]])


def _celebbasis_faces(images, detections) -> dict[str, torch.Tensor]:
    """name -> CelebBasis's (1, 3, 112, 112) recognizer input, re-typed from IdentityEvaluator; images
    without a face are left out (CelebBasis drops them)."""
    from torchvision import transforms

    to_tensor = transforms.Compose([transforms.ToPILImage(), transforms.Resize(512), transforms.ToTensor(),
                                    transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))])
    out = {}
    for name, image in images.items():
        pick = choose_face(detections[name], INPUT_FACE_RULE)[0]
        if pick is None:
            continue
        ori = transforms.Normalize((0.5,) * 3, (0.5,) * 3)(transforms.ToTensor()(image))[None]  # [-1, 1]
        img = ((ori + 1.0) * 127.5).permute(0, 2, 3, 1).numpy().astype(np.uint8)[0]
        matrix = _similarity_lstsq(pick.landmarks, _FFHQ_512)
        cropped = cv2.warpAffine(img, matrix, (512, 512), borderValue=0.0)
        face = to_tensor(cropped)[None]
        grid = F.affine_grid(torch.tensor([_THETA]).float(), size=face.size(), align_corners=True)
        face = F.grid_sample(face, grid, align_corners=True, mode="bilinear", padding_mode="zeros")
        out[name] = F.interpolate(face, size=112, mode="bilinear", align_corners=True)
    return out


def _celebbasis_similarities(model, images, detections) -> dict:
    faces = _celebbasis_faces(images, detections)
    out = {}
    with torch.no_grad():
        feats = {n: F.normalize(model(f), dim=-1, p=2) for n, f in faces.items()}
        for g, r in _pairs(images):
            if g in feats:
                out[(g, r)] = F.cosine_similarity(feats[g][:, None, :], feats[r][None, :, :], dim=-1).mean().item()
    return out


@pytest.mark.slow  # about 25 s on two cores
def test_sphereface_celebbasis_mode_equals_celebbasis_evaluation(images, detections):
    scoring = ScoringConfig(face_policy="largest", no_face="drop")
    settings = {"weights": "random", "variant": "cosface-sphere20-112", "crop": "celebbasis"}
    scorer, ours = _harness_values(SphereFaceScorer, settings, images, detections, scoring, randomise=True)
    theirs = _celebbasis_similarities(scorer.model(), images, detections)
    kept = [k for k in ours if k[0] != "noise"]
    assert set(theirs) == set(kept)
    diff = max(abs(ours[k] - theirs[k]) for k in kept)
    assert diff < 1e-3, diff
    assert all(np.isnan(ours[("noise", r)]) for r in PHOTOS)  # dropped, not 0.0
    # The one-step warp to the same template is not CelebBasis's chain: its values differ by more.
    _, warp = _harness_values(SphereFaceScorer, {**settings, "crop": "warp"}, images, detections, scoring,
                              model=scorer.model())
    assert max(abs(warp[k] - theirs[k]) for k in kept) > max(3 * diff, 5e-4)


def test_sphereface_default_crop_is_celebbasis_and_checked():
    context = ScoringContext(prompt_set=None, device="cpu", input_detections={})
    assert SphereFaceScorer({"weights": "random"}, context).settings["crop"] == "celebbasis"
    assert SphereFaceScorer({"weights": "random", "variant": "cosface-sphere20-112-arcface"},
                            context).settings["crop"] == "warp"
    with pytest.raises(Exception, match="crop mode 'celebbasis'"):
        SphereFaceScorer({"weights": "random", "variant": "sphere20a-112x96", "crop": "celebbasis"}, context)
    with pytest.raises(Exception, match="unknown SphereFace crop mode"):
        SphereFaceScorer({"weights": "random", "crop": "bogus"}, context)


def test_celebbasis_input_has_the_zero_padded_frame(images, detections):
    """The frame CelebBasis's zero padding leaves is mid-gray (0.0) and a few pixels wide."""
    pick = choose_face(detections["obama2.jpg"], "largest")[0]
    x = sphereface.celebbasis_input(images["obama2.jpg"], pick)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    gray = (x.abs() < 1e-6).all(dim=0)
    assert 0.05 < gray.float().mean().item() < 0.3  # the issue measured 15.7% of the input
    assert gray[:, :3].all() and gray[:3, :].all() and not gray[40:70, 40:70].any()


# --- the conventions as settings ---------------------------------------------------------------------


def test_clamp_and_no_face_are_checked_and_recorded():
    cfg = config_from_dict(small_config_dict(scoring={"identity_clamp": True, "no_face": "drop"}))
    assert cfg.scoring.to_dict()["identity_clamp"] is True and cfg.scoring.to_dict()["no_face"] == "drop"
    with pytest.raises(ConfigError, match="scoring.no_face"):
        config_from_dict(small_config_dict(scoring={"no_face": "skip"}))


def test_identity_conventions_clamp_and_drop():
    values = {"adaface": np.array([0.5, -0.2, 0.0, np.nan]), "clip": np.array([-0.1, 0.2, 0.3, 0.4])}
    detected = np.array([True, True, False, False])
    same = identity_conventions(values, ["adaface"], detected, ScoringConfig())
    np.testing.assert_array_equal(same["adaface"], values["adaface"])
    both = identity_conventions(values, ["adaface"], detected, ScoringConfig(identity_clamp=True, no_face="drop"))
    np.testing.assert_array_equal(both["adaface"], [0.5, 0.0, np.nan, np.nan])
    np.testing.assert_array_equal(both["clip"], values["clip"])  # text metrics untouched
    assert values["adaface"][1] == -0.2  # the input is not changed in place


def test_report_numbers_show_identity_means_both_ways_and_flags():
    rows = [record_row("m", "a", 0.0, column="adaface", face_detected=False),
            record_row("m", "a", 0.6, column="adaface", prompt="q"),
            record_row("m", "b", 0.4, column="adaface"),
            record_row("m", "b", 0.9, column="adaface", prompt="ref", is_reference=True)]
    records = pd.DataFrame(rows)
    both = identity_both_ways(records, ["adaface"])
    assert both.loc["m", "adaface_zero"] == pytest.approx((0.0 + 0.6 + 0.4) / 3)
    assert both.loc["m", "adaface_detected"] == pytest.approx(0.5)
    assert (both.loc["m", "n_images"], both.loc["m", "n_detected"]) == (3, 2)
    # the same with a dropped (NaN) value where no face was found
    dropped = records.assign(adaface=[np.nan, 0.6, 0.4, 0.9])
    pd.testing.assert_frame_equal(identity_both_ways(dropped, ["adaface"]), both)
    quality = {"a": {"source_crop_px": 60.0, "upscale": 8.5, "padding_share": 0.0, "prob": 0.999,
                     "faces_in_crop": 1, "flags": ["small"]}}
    faces = per_face_results(records, ["adaface"], quality)
    assert faces.loc["a", "adaface"] == pytest.approx(0.3) and faces.loc["a", "flags"] == "small"
    assert faces.loc["b", "face_detection_rate"] == 1.0 and faces.loc["b", "flags"] == "" and not faces.loc["b", "quality_recorded"]
