"""FID for the Face2Diffusion protocol (paper Table 2): Inception features, their Gaussian statistics and
the Fréchet distance, with pytorch-fid's or clean-fid's preprocessing.

    backend = make_backend("clean-fid-torchscript")           # or "pytorch-fid"
    build_reference("cc12m/", "cc12m-human.npz", backend, captions=Path("cc12m.tsv"))
    result = fid_from_features(backend.features(images), load_stats("cc12m-human.npz"), backend.name)

Names are imported lazily, so `import f2d_bench.scorers.fid.cli` (for --help) loads neither numpy nor torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FeatureBackend": "backends",
    "PytorchFidBackend": "backends",
    "CleanFidTorchscriptBackend": "backends",
    "make_backend": "backends",
    "clean_resize": "backends",
    "BACKEND_NAMES": "backends",
    "DEFAULT_BACKEND": "backends",
    "INCEPTION_DIM": "backends",
    "FIDResult": "stats",
    "FeatureStats": "stats",
    "StatsAccumulator": "stats",
    "feature_stats": "stats",
    "frechet_distance": "stats",
    "fid_from_features": "stats",
    "save_stats": "stats",
    "load_stats": "stats",
    "build_reference": "reference",
    "ReferenceSummary": "reference",
    "is_human_caption": "reference",
    "read_captions": "reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
