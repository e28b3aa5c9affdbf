"""Decoding a run's images once per `score` run, in worker threads, for every stage to share.

A worker reads a PNG and decodes it with :func:`~f2d_bench.faces.imageio.read_image` (8-bit RGB, EXIF
orientation applied), the function every stage called itself before; ``workers = 0`` calls it in the
scoring thread. Threads, not processes: Pillow releases the GIL while it inflates and unfilters a PNG
(the bulk of the time), so threads decode in parallel, without pickling 0.8 MB per 512x512 image back
and without re-importing the caller's main module in spawned processes (measured on 2 cores, 96 PNGs
of 512x512: 58 images/s in-process, 91 with 2 threads, 76 with 2 spawned processes). Decoding runs
ahead: the next block's images decode while the scorers' models run on this block's.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from f2d_bench.errors import F2DBenchError

#: At most this many decoding threads by default: a 512x512 PNG decodes in ~15 ms on one core, so a
#: few threads keep up with any GPU scorer, and more would take cores from the models.
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """``scoring.workers`` when not set: one core is left to the models (0 on a one-core machine)."""
    return min(MAX_DEFAULT_WORKERS, max(0, (os.cpu_count() or 1) - 1))


def decode_file(path: Path):
    """The image at ``path`` as 8-bit RGB, or the F2DBenchError that reading it raised (returned, so a
    worker's failure reaches the stage that asks for the image)."""
    from f2d_bench.faces.imageio import read_image

    try:
        return read_image(path)
    except F2DBenchError as exc:
        return exc


class ImageDecoder:
    """Decoded images by path, held until released. ``workers``: decoding threads (0: decode in the
    calling thread when an image is loaded)."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError(f"scoring.workers must be >= 0, got {workers}")
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="f2d-decode") if workers else None
        self._held: dict[Path, object] = {}  # path -> Future, PIL image or F2DBenchError
        #: How many files this decoder has decoded (a held path is not decoded again).
        self.decoded = 0

    def load(self, paths: Iterable[Path]) -> None:
        """Start decoding those of ``paths`` not held yet (in the workers: returns at once) and hold them."""
        for path in dict.fromkeys(map(Path, paths)):
            if path not in self._held:
                self._held[path] = self._pool.submit(decode_file, path) if self._pool else decode_file(path)
                self.decoded += 1

    def put(self, path: Path, image) -> None:
        """Hold ``image`` as the decoded file at ``path`` (``generate --score``: the pixels just written
        there, which equal what decoding the PNG gives)."""
        self._held[Path(path)] = image

    def get(self, path: Path):
        """The image at ``path`` (decoded now if not held); raises F2DBenchError for an unreadable file."""
        path = Path(path)
        if path not in self._held:
            self.load([path])
        value = self._held[path]
        if isinstance(value, Future):
            value = self._held[path] = value.result()
        if isinstance(value, F2DBenchError):
            raise value
        return value

    def release(self, paths: Iterable[Path]) -> None:
        for p in paths:
            self._held.pop(Path(p), None)

    def keep_only(self, paths: Iterable[Path]) -> None:
        """Release every image but those at ``paths``."""
        keep = set(map(Path, paths))
        self.release([p for p in self._held if p not in keep])

    def close(self) -> None:
        self._held.clear()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
