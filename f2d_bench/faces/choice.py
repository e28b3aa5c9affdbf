"""Which face counts when a detector finds several: one function, one named rule, used everywhere.

The face a method encodes from an input photo and the face the identity scorers compare against are
chosen here with the same rule, so that a method is never conditioned on one face and scored against
another (e.g. the blurred mirror "ghost" that FFHQ's reflection padding leaves beside a face that runs
off the photo's edge: MTCNN may rate the ghost a little more probable than the real face, but it is
smaller).

Rules:

``largest``
    The detection with the largest box area. FastComposer's evaluation does this (facenet-pytorch's
    MTCNN with ``select_largest``), and an FFHQ-aligned input crop is centred on its largest face.
``most-confident``
    The detection with the highest MTCNN probability.

Ties keep the detector's order (probability order for :class:`~f2d_bench.faces.detect.FaceDetector`).
"""

from __future__ import annotations

from typing import Sequence

FACE_RULES = ("largest", "most-confident")
#: The rule used when none is named: FastComposer's (the closest peer evaluation).
DEFAULT_FACE_RULE = "largest"
#: The rule that picks the face in an input (face-set) image, for the methods and the identity scorers
#: alike. Fixed rather than configurable: it decides what methods encode, hence their images.
INPUT_FACE_RULE = "largest"


def check_face_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`FACE_RULES`, else ValueError naming the known rules."""
    if rule not in FACE_RULES:
        raise ValueError(f"unknown face rule {rule!r}; known: {', '.join(FACE_RULES)}")
    return rule


def choose_face(detections: Sequence, rule: str = DEFAULT_FACE_RULE, min_prob: float = 0.0):
    """``(detection, n)``: the detection that counts under ``rule`` among those with probability at or
    above ``min_prob`` (0..1), or None when there is none, and how many there were."""
    check_face_rule(rule)
    found = [d for d in detections if d.prob >= min_prob]
    if not found:
        return None, 0
    key = (lambda d: d.area) if rule == "largest" else (lambda d: d.prob)
    return max(found, key=key), len(found)  # max() keeps the first of equal keys
