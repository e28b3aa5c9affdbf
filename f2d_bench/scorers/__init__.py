"""Scorers: per-image metrics (identity, text fidelity) and set-level FID.

Built-ins are listed by name without importing them; third-party packages add scorers through the
entry-point group ``f2d_bench.scorers``.
"""

from f2d_bench.registry import Registry

SCORERS = Registry(
    kind="scorer",
    group="f2d_bench.scorers",
    builtins={
        "adaface": ("f2d_bench.scorers.identity.scorer:AdaFaceScorer",
                    "AdaFace IR-101 cosine similarity to the input face (Table 1)"),
        "sphereface": ("f2d_bench.scorers.identity.scorer:SphereFaceScorer",
                       "SphereFace cosine similarity to the input face (Table 1)"),
        "facenet": ("f2d_bench.scorers.identity.scorer:FaceNetScorer",
                    "FaceNet (InceptionResnetV1, VGGFace2) cosine similarity to the input face (Table 1)"),
        "dlib": ("f2d_bench.scorers.identity.scorer:DlibScorer",
                 "dlib ResNet cosine similarity to the input face (extra; real weights offline)"),
        "deepface": ("f2d_bench.scorers.identity.deepface_face:DeepFaceScorer",
                     "deepface model (model_name, default ArcFace) cosine similarity to the input face "
                     "(optional: pip install 'f2d-bench[deepface]')"),
        "clip": ("f2d_bench.scorers.text.scorer:ClipScorer",
                 "CLIP score and directional CLIP against the reference image (Table 1)"),
        "siglip": ("f2d_bench.scorers.text.scorer:SiglipScorer",
                   "SigLIP cosine (and sigmoid probability) of image and prompt (Table 1)"),
    },
)

#: Scorers run by `f2d-bench score` when none are named.
DEFAULT_SCORERS = ("adaface", "sphereface", "facenet", "dlib", "clip", "siglip")


def check_scoring(names, settings) -> None:
    """Raise ConfigError unless every scorer in ``names`` and in ``settings`` (a run config's
    ``scoring.settings``) is installed and takes the settings given, so that a typo fails when a run
    starts rather than after hours of generation. Importing the scorer classes loads no model."""
    from f2d_bench.errors import ConfigError

    installed = SCORERS.names()
    unknown = sorted(set(settings) - set(installed))
    if unknown:
        raise ConfigError(f"scoring.settings.{unknown[0]}: no such scorer; installed: {', '.join(installed)}")
    for name in dict.fromkeys([*names, *settings]):
        cls = SCORERS.load(name)  # an unknown name: a ConfigError with the closest names
        extra = sorted(set(settings.get(name, {})) - set(cls.defaults) - {"precision"})  # every scorer's
        if extra:
            raise ConfigError(f"scoring.settings.{name}.{extra[0]}: scorer {name} has no such setting; "
                              f"allowed: {cls.allowed_settings()}")
        if name in names and hasattr(cls, "check_installed"):
            cls.check_installed()  # an optional extra that is missing fails here, not after hours of work
