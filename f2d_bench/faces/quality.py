"""Input-quality measures of a prepared face: how much the crop was upscaled, how much of it is padding,
how sure the detector was, and whether the aligned crop shows more than one face.

A weak input is kept (it may be all a user has) but flagged, in the face set's manifest and in reports,
so that results on it can be read with care.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from f2d_bench.faces.align import ffhq_quad

#: A face whose aligned crop spans fewer source pixels per side than this is flagged ``small``: fewer than
#: the identity recognizers' 112-pixel input, so every pixel the methods and scorers see is interpolated.
SMALL_FACE_PX = 112
#: A crop with more than this share of its area outside the source photo is flagged ``padded`` (the
#: reflection padding FFHQ fills it with is a blurred mirror, and may hold a "ghost" face).
PADDED_SHARE = 0.01
#: A face whose MTCNN probability is below this is flagged ``uncertain``.
UNCERTAIN_PROB = 0.99
#: Every flag, in the order they are listed.
FLAGS = ("small", "padded", "uncertain", "several-faces-in-crop", "no-face-in-crop")

# Sample points per side for the padding share: 1/128 of the side is far finer than the flag's 1%.
_SAMPLES = 128


def source_crop_size(landmarks5) -> float:
    """Side of the FFHQ crop of this face in source pixels (``output_size / this`` is the upscaling)."""
    return ffhq_quad(landmarks5)[1]


def padding_share(landmarks5, width: int, height: int) -> float:
    """Share (0..1) of the FFHQ crop's area that lies outside a ``width`` x ``height`` source image."""
    quad, _ = ffhq_quad(landmarks5)
    steps = (np.arange(_SAMPLES) + 0.5) / _SAMPLES
    u, v = np.meshgrid(steps, steps)
    # quad corners: top-left, bottom-left, bottom-right, top-right of the output
    points = quad[0] + u[..., None] * (quad[3] - quad[0]) + v[..., None] * (quad[1] - quad[0])
    x, y = points[..., 0], points[..., 1]
    outside = (x < 0) | (x > width) | (y < 0) | (y > height)
    return float(outside.mean())


def input_quality(detection, image_size: tuple[int, int], output_size: int,
                  crop_detections: Sequence | None, min_prob: float) -> dict:
    """The quality record of one prepared face (the manifest's ``quality``).

    detection: the chosen face in the source image; image_size: (width, height) of the source in pixels;
    output_size: side of the aligned crop in pixels; crop_detections: what the detector finds in the
    aligned crop (None: not checked); min_prob: detections below this probability are not counted there.
    Keys: ``source_crop_px`` (the crop's side in source pixels), ``upscale`` (output pixels per source
    pixel; above 1 the crop was enlarged), ``padding_share`` (0..1), ``prob``, ``faces_in_crop`` (None if
    not checked) and ``flags`` (names from :data:`FLAGS`).
    """
    size = source_crop_size(detection.landmarks)
    share = padding_share(detection.landmarks, *image_size)
    faces = None if crop_detections is None else sum(d.prob >= min_prob for d in crop_detections)
    flags = []
    if size < SMALL_FACE_PX:
        flags.append("small")
    if share > PADDED_SHARE:
        flags.append("padded")
    if detection.prob < UNCERTAIN_PROB:
        flags.append("uncertain")
    if faces is not None and faces > 1:
        flags.append("several-faces-in-crop")
    if faces == 0:
        flags.append("no-face-in-crop")
    return {"source_crop_px": round(size, 1), "upscale": round(output_size / size, 3),
            "padding_share": round(share, 4), "prob": float(detection.prob), "faces_in_crop": faces,
            "flags": flags}


def thresholds() -> dict:
    """The flag thresholds, as the manifest records them."""
    return {"small_below_source_px": SMALL_FACE_PX, "padded_above_share": PADDED_SHARE,
            "uncertain_below_prob": UNCERTAIN_PROB}


def describe(quality: dict) -> str:
    """One short line for ``faces prepare``'s printout."""
    parts = [f"p={quality['prob']:.4f}", f"{quality['source_crop_px']:.0f} source px (x{quality['upscale']:.2f})",
             f"padding {100 * quality['padding_share']:.1f}%"]
    if quality.get("faces_in_crop") is not None:
        parts.append(f"{quality['faces_in_crop']} face(s) in crop")
    text = ", ".join(parts)
    return f"{text}; FLAGGED: {', '.join(quality['flags'])}" if quality["flags"] else text
