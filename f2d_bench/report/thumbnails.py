"""Images inside the report directory: a full copy and a small JPEG thumbnail of each image shown.

Files are named by the SHA-256 of their content, so a name never comes from user text and the same image
shown twice (or by a second report into the same folder) is written once.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from f2d_bench.files import atomic_write, atomic_write_bytes, file_sha256

THUMB_SIZE = 160
_SHA = re.compile(r"[0-9a-f]{64}")
_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved, links followed) lies inside ``root``."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def export_image(source: Path, out_dir: Path, sha256: str | None = None, *, full_dir: str = "full",
                 thumb_dir: str = "thumbs") -> tuple[str, str] | None:
    """Copy ``source`` to ``out_dir/full/<sha>.<ext>`` and write ``out_dir/thumbs/<sha>.jpg``.

    Returns the two paths relative to ``out_dir`` (POSIX), or None when the image cannot be read (the
    page then shows the cell as unreadable).
    """
    source = Path(source)
    if not source.is_file():
        return None
    ext = source.suffix.lower() if source.suffix.lower() in _EXTENSIONS else ".png"
    sha = sha256 if isinstance(sha256, str) and _SHA.fullmatch(sha256) else file_sha256(source)
    full_rel = f"{full_dir}/{sha}{ext}"
    thumb_rel = f"{thumb_dir}/{sha}.jpg"
    full, thumb = out_dir / full_rel, out_dir / thumb_rel
    try:
        if not thumb.is_file():
            with Image.open(source) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB_SIZE, THUMB_SIZE))
                atomic_write(thumb, lambda fh: im.save(fh, format="JPEG", quality=85))
        if not full.is_file():
            atomic_write_bytes(full, source.read_bytes())
    except (OSError, Image.DecompressionBombError, ValueError):
        return None
    return thumb_rel, full_rel
