"""One face rule for methods and scorers: the face F2D encodes is the face identity scoring compares with.

The hard case is real: a photo whose face runs off the image edge, FFHQ-aligned, holds a blurred mirror
"ghost" of the face in its reflection padding, and MTCNN rates the ghost a little more probable than the
real (larger) face.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from f2d_bench.config import ScoringConfig, config_from_dict
from f2d_bench.engine import build_methods
from f2d_bench.errors import ConfigError
from f2d_bench.faces.choice import DEFAULT_FACE_RULE, FACE_RULES, INPUT_FACE_RULE, choose_face
from f2d_bench.faces.detect import Detection, FaceDetector
from f2d_bench.faces.faceset import Face, load_face_set
from f2d_bench.faces.prepare import prepare_faces
from f2d_bench.prompts import load_prompt_set
from f2d_bench.scoring.faces import input_face_detections

from conftest import TEST_PHOTOS, small_config_dict


def _det(box, prob) -> Detection:
    return Detection(box, np.zeros((5, 2)), prob)


def test_rules_choose_by_area_or_probability():
    big, sure = _det((0, 0, 100, 100), 0.95), _det((0, 0, 10, 10), 0.999)
    assert choose_face([sure, big], "largest") == (big, 2)
    assert choose_face([big, sure], "most-confident") == (sure, 2)
    assert choose_face([big, sure], "largest", 0.99) == (sure, 1)
    assert choose_face([], "largest") == (None, 0)
    twin = _det((50, 50, 150, 150), 0.95)  # same area as `big`: the detector's order decides
    assert choose_face([big, twin], "largest")[0] is big and choose_face([twin, big], "largest")[0] is twin
    with pytest.raises(ValueError, match="largest, most-confident"):
        choose_face([big], "biggest")


def test_defaults_follow_fastcomposer_and_config_checks_the_rule():
    assert DEFAULT_FACE_RULE == INPUT_FACE_RULE == "largest" and set(FACE_RULES) == {"largest", "most-confident"}
    assert ScoringConfig().face_policy == "largest"
    with pytest.raises(ConfigError, match="scoring.face_policy"):
        config_from_dict(small_config_dict(scoring={"face_policy": "biggest"}))


def edge_cut_photo(path, fraction: float = 0.2) -> Image.Image:
    """The photo with its left side cut away at ``fraction`` of the face box's width, so that the face
    runs off the image's left edge and FFHQ alignment has to reflect-pad there."""
    image = Image.open(path).convert("RGB")
    x1, _, x2, _ = FaceDetector().detect(image)[0].box
    return image.crop((int(x1 + fraction * (x2 - x1)), 0, image.width, image.height))


@pytest.fixture(scope="module")
def ghost_face(tmp_path_factory) -> Face:
    """obama.jpg cut at the face's edge and prepared: the 512 crop holds the real face and its ghost."""
    src = tmp_path_factory.mktemp("edge-cut")
    edge_cut_photo(TEST_PHOTOS / "obama.jpg").save(src / "obama_cut.png")
    dst = tmp_path_factory.mktemp("edge-cut-prepared") / "faces"
    report = prepare_faces(src, dst, progress=False)
    assert [f.face_id for f in report.faces] == ["obama_cut"]
    [face] = load_face_set(dst)
    return face


def test_ghost_crop_is_the_hard_case(ghost_face):
    found = FaceDetector().detect(Image.open(ghost_face.path))
    assert len(found) == 2
    most_probable, largest = found[0], max(found, key=lambda d: d.area)
    assert most_probable is not largest  # MTCNN prefers the ghost ...
    # ... which lies in the padded (left) part of the crop; the real face sits near the crop's centre.
    centre = lambda d: (d.box[0] + d.box[2]) / 2  # noqa: E731
    assert centre(most_probable) < 200 < centre(largest) < 312


def test_f2d_encodes_the_face_the_identity_scorers_compare_with(ghost_face):
    """F2D's prepare and the scorers' input-face stage pick the same face: the real one, not the ghost."""
    cfg = config_from_dict(small_config_dict(methods=[{"name": "f2d", "params": {"weights": "random"}}],
                                             faces=str(ghost_face.path.parent)))
    [method] = build_methods(cfg, load_prompt_set("smoke"))
    encoded = method.prepare(ghost_face).landmarks
    scored = input_face_detections({ghost_face.face_id: ghost_face}, FaceDetector())[ghost_face.face_id]
    np.testing.assert_array_equal(encoded, scored.landmarks)
    largest = max(FaceDetector().detect(Image.open(ghost_face.path)), key=lambda d: d.area)
    np.testing.assert_array_equal(encoded, largest.landmarks)
    assert "largest" in method.identity()["face_input"]  # the rule is part of the method's identity
