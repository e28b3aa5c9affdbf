"""Face-identity models for scoring: the exact architectures, strict loaders for the official weight
files, and embedding functions that do each model's own crop and normalisation.

Modules (import them directly; this package imports none of them, so that e.g. dlib loads only when
used):

- :mod:`.adaface`    AdaFace IR-18/50/101 (mk-minchul/AdaFace Lightning ``.ckpt``; CVLface ``model.pt``)
- :mod:`.sphereface` SphereFace variants (``VARIANTS``; default: CelebBasis's CosFace sphere20, 112x112,
  with CelebBasis's crop chain; also clcarwin's sphere20a and opensphere's SFNet-20)
- :mod:`.facenet`    facenet-pytorch InceptionResnetV1 (VGGFace2 or CASIA-WebFace state dict)
- :mod:`.dlib_face`  dlib's ResNet face descriptor with its 5-point shape predictor
- :mod:`.crops`      shared crops: template warps and facenet-pytorch's box crop

Every ``embed_*`` returns L2-normalised float32 vectors, so the cosine similarity of two faces is their
dot product (range -1..1). Loaders check the file's keys and shapes against the architecture before
loading and raise :class:`WeightsLayoutError` (a :class:`ModelUnavailableError`) naming the file and a
few offending keys; a missing file raises :class:`ModelUnavailableError` saying where the official
weights are published and that a local path can be given.

File checks and strict loading are :mod:`f2d_bench.weights`'s (shared with F2D's checkpoints); its
:class:`WeightsLayoutError` is re-exported here.
"""

from __future__ import annotations

import torch

from f2d_bench.weights import WeightsLayoutError

__all__ = ["WeightsLayoutError", "model_device", "parameter_count"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def parameter_count(model: torch.nn.Module) -> int:
    """Number of learnable scalars (buffers such as BatchNorm running statistics not included)."""
    return sum(p.numel() for p in model.parameters())
