"""Face alignment: FFHQ-style crops for the personalization methods, ArcFace-template crops for F2D/AdaFace.

Both take the five MTCNN landmarks, ordered image-left eye, image-right eye, nose tip, image-left mouth
corner, image-right mouth corner, as (x, y) pixels of the source image.

FFHQ (NVlabs/ffhq-dataset, ``recreate_aligned_images``) is re-implemented from its published description
(PROTOCOL.md section 9): dlib's eye centres and mouth corners are exactly what the 5 landmarks give.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from f2d_bench.faces.imageio import to_rgb8

# --- FFHQ constants (all from recreate_aligned_images) -------------------------------------------------
_FFHQ_EYE_SCALE = 2.0  # half-width of the crop = at least 2x the eye-to-eye distance ...
_FFHQ_MOUTH_SCALE = 1.8  # ... and at least 1.8x the eye-to-mouth distance
_FFHQ_CENTER_SHIFT = 0.1  # crop centre lies 10% of the eye-to-mouth vector below the eye midpoint
_FFHQ_BORDER = 0.1  # crop border around the quad, as a fraction of qsize ...
_FFHQ_MIN_BORDER = 3  # ... but at least 3 pixels
_FFHQ_MIN_PAD = 0.3  # reflect padding, when needed at all, is at least 30% of qsize on every side
_FFHQ_BLUR = 0.02  # Gaussian sigma of the padded area, as a fraction of qsize
_FFHQ_BLUR_REACH = 3.0  # blur weight = clip(3 * mask + 1): reaches 1/3 of a pad width into the image
_FFHQ_SUPERSAMPLE = 4  # FFHQ renders at 4096 for 1024 output: quad transform at 4x, then Lanczos down
_FFHQ_PIXEL_CENTER = 0.5  # FFHQ passes quad + 0.5 to PIL (integer landmark = pixel centre)


def as_landmarks5(landmarks5) -> np.ndarray:
    """A 5x2 float64 array of finite landmark coordinates (pixels), or ValueError."""
    points = np.asarray(landmarks5, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5x2 landmarks, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("landmarks contain NaN or infinity")
    return points


def ffhq_quad(landmarks5) -> tuple[np.ndarray, float]:
    """The oriented square FFHQ crops, in source pixels.

    Returns ``(quad, qsize)``: quad is 4x2 (x, y) corners in the order top-left, bottom-left,
    bottom-right, top-right of the output (PIL's QUAD order); qsize is the side length in pixels.
    """
    points = as_landmarks5(landmarks5)
    eye_left, eye_right = points[0], points[1]
    mouth_left, mouth_right = points[3], points[4]
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    # x axis: the eye line, averaged with the eye-to-mouth direction turned by 90 degrees, so that a
    # tilted or foreshortened face still gets a sensible orientation.
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
    norm = np.hypot(*x)
    if norm == 0:
        raise ValueError("degenerate landmarks: eyes and mouth coincide")
    x = x / norm
    x = x * max(np.hypot(*eye_to_eye) * _FFHQ_EYE_SCALE, np.hypot(*eye_to_mouth) * _FFHQ_MOUTH_SCALE)
    y = np.flipud(x) * np.array([-1.0, 1.0])
    center = eye_avg + eye_to_mouth * _FFHQ_CENTER_SHIFT
    quad = np.stack([center - x - y, center - x + y, center + x + y, center + x - y])
    qsize = float(np.hypot(*x) * 2.0)
    return quad, qsize


def _pad_and_fade(image: Image.Image, pad: tuple[int, int, int, int], qsize: float) -> Image.Image:
    """Reflect-pad (left, top, right, bottom), blur the padding and fade it toward the median colour."""
    from scipy.ndimage import gaussian_filter

    left, top, right, bottom = pad
    pixels = np.pad(
        np.asarray(image, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect"
    )
    height, width, _ = pixels.shape
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    xs = np.arange(width, dtype=np.float32)[None, :, None]
    # mask: 0 on the original image's edge, rising to 1 at the outer edge of the padding, negative inside.
    mask_x = 1.0 - np.minimum(xs / left, (width - 1 - xs) / right)
    mask_y = 1.0 - np.minimum(ys / top, (height - 1 - ys) / bottom)
    mask = np.maximum(mask_x, mask_y)
    sigma = qsize * _FFHQ_BLUR
    blurred = gaussian_filter(pixels, [sigma, sigma, 0])
    pixels += (blurred - pixels) * np.clip(mask * _FFHQ_BLUR_REACH + 1.0, 0.0, 1.0)
    pixels += (np.median(pixels, axis=(0, 1)) - pixels) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def ffhq_align(image: Image.Image, landmarks5, output_size: int = 512) -> Image.Image:
    """FFHQ-aligned square crop of the face with these landmarks, ``output_size`` pixels wide, RGB.

    Steps (FFHQ's): shrink very large faces, crop the quad's bounding box plus a border, reflect-pad
    where the quad leaves the image (blurred, fading to the median colour), quad transform at 4x the
    output size with bilinear sampling, then Lanczos downsampling.
    """
    if output_size < 1:
        raise ValueError(f"output_size must be a positive number of pixels, got {output_size}")
    img = to_rgb8(image)
    quad, qsize = ffhq_quad(landmarks5)

    # Shrink: resampling a face many times larger than the output aliases; FFHQ pre-shrinks by an
    # integer factor when the quad is at least 4x the output size.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        size = (int(np.rint(img.width / shrink)), int(np.rint(img.height / shrink)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        quad = quad / shrink
        qsize = qsize / shrink

    # Crop to the quad's bounding box plus a border (the border keeps the bilinear taps inside).
    border = max(int(np.rint(qsize * _FFHQ_BORDER)), _FFHQ_MIN_BORDER)
    x0, y0 = np.floor(quad.min(axis=0)).astype(int)
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int)
    crop = (
        max(x0 - border, 0),
        max(y0 - border, 0),
        min(x1 + border, img.width),
        min(y1 + border, img.height),
    )
    if crop[2] - crop[0] < img.width or crop[3] - crop[1] < img.height:
        img = img.crop(crop)
        quad = quad - np.array(crop[:2], dtype=np.float64)

    # Pad where the quad (plus border) still leaves the image.
    x0, y0 = np.floor(quad.min(axis=0)).astype(int)
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int)
    pad = np.array(
        [
            max(-x0 + border, 0),
            max(-y0 + border, 0),
            max(x1 - img.width + border, 0),
            max(y1 - img.height + border, 0),
        ]
    )
    # FFHQ's threshold: pads of up to border - 4 pixels are left to PIL (it fills them with black).
    if pad.max() > border - 4:
        # (at least 1 pixel: the fade divides by each pad width; only matters for absurdly small faces)
        pad = np.maximum(pad, max(int(np.rint(qsize * _FFHQ_MIN_PAD)), 1))
        img = _pad_and_fade(img, tuple(int(p) for p in pad), qsize)
        quad = quad + pad[:2].astype(np.float64)

    render = output_size * _FFHQ_SUPERSAMPLE
    data = (quad + _FFHQ_PIXEL_CENTER).flatten().tolist()
    img = img.transform((render, render), Image.Transform.QUAD, data, Image.Resampling.BILINEAR)
    return img.resize((output_size, output_size), Image.Resampling.LANCZOS)


# --- ArcFace template ----------------------------------------------------------------------------------
#: The 5-point template of the ArcFace/InsightFace 112x112 crop, (x, y) pixels, same landmark order.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE_112.setflags(write=False)


def similarity_transform(src_pts, dst_pts) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking src to dst.

    Umeyama's closed form (1991). src_pts, dst_pts: Nx2 (x, y), N >= 2. Returns the 2x3 float64 matrix
    M with ``dst ~ M @ [x, y, 1]``, usable by ``cv2.warpAffine``.
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"expected two Nx2 point sets with N >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var == 0:
        raise ValueError("source points all coincide: no similarity transform is defined")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    # Force a proper rotation (det +1): a mirrored face must not be "aligned" by flipping it.
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def arcface_align(image, landmarks5, size: int = 112, interpolation: int | None = None) -> np.ndarray:
    """Warp the face onto the ArcFace template: ``size`` x ``size`` x 3 uint8 RGB.

    image: PIL image (any mode) or HxWx3 uint8 RGB array. The template is scaled by size/112.
    interpolation: a cv2 flag, default ``cv2.INTER_AREA`` as in F2D's code (for a warp, OpenCV treats
    INTER_AREA as bilinear). Pixels from outside the source are black, as with OpenCV's default border.
    """
    import cv2

    if interpolation is None:
        interpolation = cv2.INTER_AREA
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if isinstance(image, Image.Image):
        pixels = np.asarray(to_rgb8(image))
    else:
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got {pixels.shape} {pixels.dtype}")
    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    matrix = similarity_transform(as_landmarks5(landmarks5), template)
    return cv2.warpAffine(np.ascontiguousarray(pixels), matrix, (size, size), flags=interpolation)
