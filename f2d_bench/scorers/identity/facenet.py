"""FaceNet as packaged by facenet-pytorch: ``InceptionResnetV1`` (the installed package's own class).

Input: the MTCNN box cropped with margin 0 and resized to 160x160 (facenet-pytorch's ``extract_face``,
no landmark warp), RGB, ``(x - 127.5) / 128`` (facenet-pytorch's ``fixed_image_standardization``;
range about -1..1). Output with ``classify=False``: (N, 512), already L2-normalised by the network.
Learnable parameters without the classifier: 23,482,624.

Weights: facenet-pytorch's state dicts (``20180402-114759-vggface2.pt``, the default, and
``20180408-102900-casia-webface.pt``), converted from David Sandberg's TensorFlow FaceNet. They hold the
backbone keys plus the training classifier ``logits.weight`` [classes, 512] / ``logits.bias`` [classes]
(8631 VGGFace2 or 10575 CASIA-WebFace identities), which the embedding does not use: checked, dropped.
facenet-pytorch downloads them from GitHub into ``$TORCH_HOME/checkpoints`` (``pretrained='vggface2'``);
:func:`load_facenet` reads the same cache, or a local path, and loads every file strictly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from f2d_bench.errors import ModelUnavailableError
from f2d_bench.scorers.identity import model_device
from f2d_bench.scorers.identity.crops import box_crop, box_of, l2_normalise, stack_crops
from f2d_bench.weights import WeightsLayoutError, load_checked, read_torch_file, require_file

INPUT_SIZE = 160  # pixels, square
EMBEDDING_DIM = 512

#: facenet-pytorch's published weight files: name -> (URL, number of training identities).
PRETRAINED: dict[str, tuple[str, int]] = {
    "vggface2": (
        "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
        8631,
    ),
    "casia-webface": (
        "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
        10575,
    ),
}


def _inception_resnet_v1():
    try:
        from facenet_pytorch import InceptionResnetV1
    except ImportError as exc:
        raise ModelUnavailableError(
            "facenet-pytorch is not installed; install it with `pip install --no-deps facenet-pytorch==2.6.0`"
        ) from exc
    return InceptionResnetV1


def build_facenet() -> nn.Module:
    """facenet-pytorch's ``InceptionResnetV1(pretrained=None, classify=False)``, fresh weights, eval mode."""
    return _inception_resnet_v1()(pretrained=None, classify=False).eval()


def cached_weights_path(pretrained: str = "vggface2") -> Path:
    """Where facenet-pytorch keeps (or would download) the named weights: ``$TORCH_HOME/checkpoints``."""
    url, _ = _pretrained(pretrained)
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "checkpoints" / os.path.basename(url)


def _pretrained(name: str) -> tuple[str, int]:
    if name not in PRETRAINED:
        raise ValueError(f"unknown facenet-pytorch weights {name!r}; known: {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


def _published(name: str) -> str:
    url, _ = _pretrained(name)
    return (
        f"facenet-pytorch publishes the {name} weights at {url} and downloads them into "
        f"{cached_weights_path(name)} (TORCH_HOME) on first use; a copy placed there is used offline."
    )


def load_facenet(
    path=None, pretrained: str = "vggface2", device="cpu", allow_download: bool = True
) -> nn.Module:
    """InceptionResnetV1 with facenet-pytorch weights, loaded strictly, in eval mode on ``device``.

    path: a local state-dict file in facenet-pytorch's layout. None: the ``pretrained`` file in
    facenet-pytorch's cache, downloaded first when missing and ``allow_download`` (network to GitHub).
    Raises ModelUnavailableError when no file is available, WeightsLayoutError for another layout.
    """
    url, classes = _pretrained(pretrained)
    if path is None:
        path = cached_weights_path(pretrained)
        if not path.is_file() and allow_download:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), progress=False)
            except Exception as exc:  # no network, a proxy error page, a full disk ...
                raise ModelUnavailableError(
                    f"could not download FaceNet weights from {url} ({exc}). {_published(pretrained)} "
                    "Download it elsewhere and pass its local path."
                ) from exc
    file = require_file(path, what=f"FaceNet ({pretrained}) weights", published=_published(pretrained))
    state = read_torch_file(file)  # a plain state dict: no pickled code needed
    model = build_facenet()
    # The training classifier says which training set the file is from: the run records ``pretrained``
    # (the protocol's VGGFace2), so a file of the other set is refused rather than scored under its name.
    rows = state.get("logits.weight") if isinstance(state, dict) else None
    if isinstance(rows, torch.Tensor) and rows.ndim == 2 and rows.shape[0] != classes:
        known = ", ".join(f"{name}: {n}" for name, (_, n) in PRETRAINED.items())
        raise WeightsLayoutError(
            f"{str(file)!r}: its classifier (logits.weight) has {rows.shape[0]} classes, the {pretrained} weights "
            f"{classes} ({known}); set the facenet scorer's pretrained to the file's training set, or, for "
            "weights of your own, save them without the logits.* classifier")
    head = {"logits.weight": (classes, EMBEDDING_DIM), "logits.bias": (classes,)}
    load_checked(
        model, state, source=f"{str(file)!r} (facenet-pytorch InceptionResnetV1 state dict)", optional=head
    )
    return model.to(device).eval()


def crop_facenet(image, detection_or_box) -> np.ndarray:
    """facenet-pytorch's box crop (margin 0) resized to 160x160: (160, 160, 3) uint8 RGB."""
    return box_crop(image, box_of(detection_or_box), INPUT_SIZE)


def preprocess(crops) -> torch.Tensor:
    """(N, 160, 160, 3) RGB uint8 -> (N, 3, 160, 160) float32 ``(x - 127.5) / 128``."""
    batch = stack_crops(crops, INPUT_SIZE, INPUT_SIZE)
    pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return (pixels - 127.5) / 128.0


@torch.inference_mode()
def embed_batch(model: nn.Module, crops) -> np.ndarray:
    """(N, 512) float32 unit embeddings of crops from :func:`crop_facenet`."""
    features = model(preprocess(crops).to(model_device(model)))
    # the network already normalises (classify=False); renormalising in float32 only removes rounding
    return l2_normalise(features.float().cpu().numpy())


def embed_facenet(model: nn.Module, image, detection_or_box) -> np.ndarray:
    """The (512,) float32 unit embedding of the face in this box (a Detection or (x1, y1, x2, y2))."""
    return embed_batch(model, [crop_facenet(image, detection_or_box)])[0]
