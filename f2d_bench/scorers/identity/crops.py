"""Face crops shared by the identity models: landmark warps onto a template, and plain box crops.

Every function takes the image as a PIL image (any mode, converted to 8-bit RGB) or an HxWx3 uint8 RGB
array, and returns HxWx3 uint8 RGB arrays. Colour order and normalisation are each model's business
(see the model modules); crops are always RGB.

Coordinates are (x, y) pixels, x to the right, y down, as in :class:`f2d_bench.faces.detect.Detection`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from f2d_bench.faces.align import as_landmarks5, similarity_transform
from f2d_bench.faces.imageio import to_rgb8


def rgb_array(image) -> np.ndarray:
    """``image`` (PIL, any mode; or HxWx3 uint8 RGB array) as a C-contiguous HxWx3 uint8 RGB array."""
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(to_rgb8(image)))
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"expected a PIL image or an HxWx3 uint8 RGB array, got {pixels.shape} {pixels.dtype}"
        )
    return np.ascontiguousarray(pixels)


def landmarks_of(detection_or_landmarks) -> np.ndarray:
    """The 5x2 float64 landmarks of a Detection (``.landmarks``) or of a 5x2 array-like."""
    return as_landmarks5(getattr(detection_or_landmarks, "landmarks", detection_or_landmarks))


def box_of(detection_or_box) -> tuple[float, float, float, float]:
    """The (x1, y1, x2, y2) box of a Detection (``.box``) or of a 4-sequence, as floats."""
    box = getattr(detection_or_box, "box", detection_or_box)
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.shape != (4,) or not np.all(np.isfinite(values)):
        raise ValueError(f"expected a box (x1, y1, x2, y2) or a Detection, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in values)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty box {box!r}: need x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


def warp_to_template(
    image, landmarks5, template, size: tuple[int, int], interpolation: int | None = None
) -> np.ndarray:
    """Similarity-warp the face so that its 5 landmarks land on ``template``.

    template: 5x2 (x, y) pixel positions in the output crop, same landmark order as MTCNN's.
    size: (width, height) of the crop in pixels, as OpenCV takes it.
    interpolation: a cv2 flag; default bilinear (``cv2.INTER_LINEAR``, what ``cv2.warpAffine`` does
    when given no flag, as the official SphereFace and AdaFace alignment code calls it).
    Pixels from outside the source are black (OpenCV's default constant border).
    Returns height x width x 3 uint8 RGB.
    """
    import cv2

    if interpolation is None:
        interpolation = cv2.INTER_LINEAR
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    matrix = similarity_transform(landmarks_of(landmarks5), np.asarray(template, dtype=np.float64))
    return cv2.warpAffine(rgb_array(image), matrix, (width, height), flags=interpolation)


def box_crop(image, box, size: int) -> np.ndarray:
    """facenet-pytorch's ``extract_face`` with margin 0, on a PIL image: crop the box, resize to square.

    The box is truncated to integer pixels and clipped to the image exactly as ``extract_face`` does
    (``int(max(x1, 0))``, ..., ``int(min(x2, width))``), then Pillow crops and resizes it to
    ``size`` x ``size`` with BILINEAR (Pillow's bilinear filter widens when shrinking, i.e. antialiases).
    Returns size x size x 3 uint8 RGB.
    """
    pil = to_rgb8(image) if isinstance(image, Image.Image) else Image.fromarray(rgb_array(image), "RGB")
    x1, y1, x2, y2 = box_of(box)
    clipped = (int(max(x1, 0)), int(max(y1, 0)), int(min(x2, pil.width)), int(min(y2, pil.height)))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(f"box {box_of(box)} lies outside the {pil.width}x{pil.height} image")
    face = pil.crop(clipped).resize((int(size), int(size)), Image.Resampling.BILINEAR)
    return np.asarray(face, dtype=np.uint8)


def stack_crops(crops, height: int, width: int) -> np.ndarray:
    """A list of HxWx3 uint8 RGB crops (or an NxHxWx3 array) as one NxHxWx3 uint8 array.

    Raises ValueError when a crop has another shape or dtype: a crop of the wrong size would be
    silently resized by nothing, so it is refused here.
    """
    if isinstance(crops, np.ndarray) and crops.ndim == 3:
        crops = crops[None]
    batch = (
        np.stack([np.asarray(c) for c in crops]) if len(crops) else np.zeros((0, height, width, 3), np.uint8)
    )
    if batch.ndim != 4 or batch.shape[1:] != (height, width, 3) or batch.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 crops of {height}x{width}x3 (RGB), got {batch.shape[1:]} {batch.dtype}"
        )
    return batch


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean length, float32. A zero row stays zero (no NaN)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
