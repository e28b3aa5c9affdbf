"""Reading face photos and video frames as 8-bit RGB PIL images.

Everything downstream (MTCNN, alignment, the identity models) expects 8-bit RGB, so every input goes
through :func:`to_rgb8` once, here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from f2d_bench.errors import F2DBenchError
from f2d_bench.files import system_failure

# Transparent areas are composited onto white: cut-out portraits then look like studio shots instead of
# showing whatever colour happens to be stored under alpha 0 (often black).
_BACKGROUND = (255, 255, 255)


def _scale_to_8bit(values: np.ndarray, sixteen_bit: bool | None = None) -> np.ndarray:
    """Map integer pixel values to uint8.

    A 16-bit range (0..65535) is divided by 257, so that 8-bit data stored as x*257 maps back exactly.
    ``sixteen_bit``: the file says so (Pillow's I;16 modes: always); None when it does not (Pillow's
    32-bit mode "I" holds both), where values above 255 mean 16 bits and the others are taken as 8-bit.
    """
    values = values.astype(np.float64)
    if sixteen_bit is None:
        sixteen_bit = bool(values.size and values.max() > 255)
    if sixteen_bit:
        values = np.clip(values, 0, 65535) / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB image (a new image, or ``image`` itself when already RGB).

    Handles L, LA, P (with or without transparency), RGBA, CMYK, 16-bit grayscale (I;16, I;16B, I;16L),
    32-bit integer (I) and float (F, 0..1) images. Alpha is composited onto white. Other modes fall back
    to Pillow's ``convert("RGB")``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        gray = _scale_to_8bit(np.asarray(image), sixteen_bit=True if mode.startswith("I;16") else None)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        # Float images are usually 0..1; anything larger is taken as an integer range.
        values = values * 255.0 if values.size and values.max() <= 1.0 else values
        return Image.fromarray(_scale_to_8bit(values), "L").convert("RGB")
    if mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        return _composite(image.convert("RGBA"))
    if mode == "P":
        if "transparency" in image.info:
            return _composite(image.convert("RGBA"))
        return image.convert("RGB")
    # L, CMYK, YCbCr, 1, ...: Pillow's own conversion is the right one.
    return image.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB, applying its EXIF orientation.

    Raises F2DBenchError naming the file when it is missing or not a readable image.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not a reason to fail; very large photos are legitimate.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                # Phone photos store rotation in EXIF; MTCNN needs the upright face.
                image = ImageOps.exif_transpose(opened)
                image.load()
    except FileNotFoundError:
        raise F2DBenchError(f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # A system failure (EIO, EMFILE) is not the image's: it goes on as itself, so no caller records
        # it as the image's fault.
        if system_failure(exc):
            raise
        raise F2DBenchError(f"cannot read image {path}: {exc}") from exc
    return to_rgb8(image)


def read_video_frame(path: str | Path, index: int = 0) -> Image.Image:
    """Read frame ``index`` (0-based) of a video file as 8-bit RGB.

    Frames are decoded sequentially up to ``index`` (seeking is inexact for many codecs), so a large
    index costs time proportional to it. Raises F2DBenchError naming the file when it cannot be opened or
    when ``index`` is out of range (the message gives the frame count).
    """
    import cv2  # local import: cv2 is heavy and only videos need it here

    path = Path(path)
    if index < 0:
        raise F2DBenchError(f"frame index must be >= 0, got {index} for video {path}")
    if not path.is_file():
        raise F2DBenchError(f"video file not found: {path}")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise F2DBenchError(f"cannot open video {path} (unsupported or corrupt file)")
        # The container's frame count can be missing or wrong (too low as well as too high): only
        # decoding tells whether frame ``index`` exists.
        for count in range(index + 1):
            # count = frames decoded so far
            if not capture.grab():
                if count == 0:
                    raise F2DBenchError(f"cannot decode any frame of video {path}")
                raise F2DBenchError(
                    f"frame {index} is out of range for video {path}: it has {count} frames "
                    f"(valid indices 0..{count - 1})"
                )
        ok, frame = capture.retrieve()
        if not ok or frame is None:
            raise F2DBenchError(f"cannot decode frame {index} of video {path}")
    finally:
        capture.release()
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    else:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return Image.fromarray(frame, "RGB")
