"""Stage 1 of scoring: the face in each generated image (MTCNN), one chosen by the recorded policy.

Cached per image hash in ``scores/faces-<hash>/``; an unreadable image gets its error here and no metric
later. The stage's settings are part of identity scorers' cache keys, because their values depend on
which face was chosen.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from f2d_bench.config import ScoringConfig, canonical_hash
from f2d_bench.errors import F2DBenchError
from f2d_bench.faces.choice import INPUT_FACE_RULE, choose_face
from f2d_bench.run_dir import RunDir
from f2d_bench.scoring.cache import ChunkCache
from f2d_bench.scoring.inputs import ImageEntry

FACE_STAGE_VERSION = "1"

__all__ = ["FACE_STAGE_VERSION", "FaceStage", "choose_face", "detect_faces", "detection_from_row", "face_stage_id",
           "input_face_detections"]


def _stage_identity(scoring: ScoringConfig) -> dict:
    return {"stage": "faces", "version": FACE_STAGE_VERSION, "policy": scoring.face_policy,
            "min_prob": scoring.min_face_prob, "detector": "facenet-pytorch MTCNN"}


def face_stage_id(scoring: ScoringConfig) -> str:
    """``faces-<hash>``: the folder of the face stage, and part of face-dependent scorers' cache keys."""
    return f"faces-{canonical_hash(_stage_identity(scoring), 10)}"


class FaceStage:
    """The face stage's cache for one writer, filled image by image (:meth:`add`), read by image sha
    (:meth:`row`): the rows cached when it was opened and those added since."""

    def __init__(self, run: RunDir, scoring: ScoringConfig, detector, *, writer: str = "all"):
        self.scoring, self.detector = scoring, detector
        self.cache = ChunkCache(run.cache_dir(face_stage_id(scoring)), writer)
        self.cache.describe("stage.json", _stage_identity(scoring))
        frame = self.cache.read()
        self._rows: dict[str, Any] = ({} if frame is None else
                                      {k: r for k, r in zip(frame["cache_key"], frame.to_dict("records"))})
        self._writer = self.cache.writer(scoring.chunk_size)

    def todo(self, entries) -> list[ImageEntry]:
        """``entries`` whose image has no row yet, each image sha once, in order."""
        return list({e.sha256: e for e in entries if e.sha256 not in self._rows}.values())

    def row(self, sha256: str) -> dict | None:
        return self._rows.get(sha256)

    def add(self, e: ImageEntry, read: Callable) -> None:
        """Detect the face in ``e``'s image (``read(path)``: the decoded image, or F2DBenchError)."""
        row: dict[str, Any] = {"cache_key": e.sha256, "error": None, "face_detected": False,
                               "face_prob": np.nan, "n_faces": 0, "face_box": None, "face_landmarks": None}
        try:
            image = read(e.path)
        except F2DBenchError as exc:
            row["error"] = str(exc)
        else:
            pick, n = choose_face(self.detector.detect(image), self.scoring.face_policy, self.scoring.min_face_prob)
            row["n_faces"] = n
            if pick is not None:
                row.update(face_detected=True, face_prob=pick.prob, face_box=list(pick.box),
                           face_landmarks=pick.landmarks.reshape(-1).tolist())
        self._writer.add(row)
        self._rows[e.sha256] = row

    def close(self) -> Any:
        """Write the rows not written yet; returns every row of the cache (``entries``' and any other
        writer's) as a DataFrame indexed by image sha."""
        import pandas as pd

        self._writer.close()
        frame = self.cache.read()
        if frame is None:  # a shard without images
            return pd.DataFrame(columns=["cache_key", "error", "face_detected"]).set_index("cache_key")
        return frame.set_index("cache_key")


def detect_faces(run: RunDir, entries: list[ImageEntry], scoring: ScoringConfig, detector,
                 progress: Callable, *, writer: str = "all") -> Any:
    """Per image sha (the index): the chosen face (or none) and any read error, as a DataFrame of every
    row of the cache (``entries``' and any other writer's). ``writer``: the shard tag of new chunks."""
    from f2d_bench.faces.imageio import read_image

    stage = FaceStage(run, scoring, detector, writer=writer)
    for e in progress(stage.todo(entries), "faces"):
        stage.add(e, read_image)
    return stage.close()


def detection_from_row(row):
    """The Detection a face-stage row holds (None when no face was found)."""
    from f2d_bench.faces.detect import Detection

    if not row["face_detected"]:
        return None
    return Detection(box=tuple(row["face_box"]), landmarks=np.asarray(row["face_landmarks"]).reshape(5, 2),
                     prob=float(row["face_prob"]))


def input_face_detections(faces, detector) -> dict:
    """face id -> the detection the identity scorers compare against in each input face image (None when
    none is found), chosen by :data:`INPUT_FACE_RULE`, the rule the methods encode with. ``faces``: a
    mapping face id -> :class:`~f2d_bench.faces.faceset.Face`."""
    from f2d_bench.faces.imageio import read_image

    return {fid: choose_face(detector.detect(read_image(face.path)), INPUT_FACE_RULE)[0]
            for fid, face in faces.items()}
