"""Reference statistics for FID from a folder of images, optionally filtered by caption.

The protocol's reference set is the human-centric part of CC12M: images whose caption contains
"person", "man" or "woman" (paper §4.2). `build_reference` applies that filter (whole words in any
letter case by default; the paper leaves the matching open) and writes the statistics with `save_stats`.

Captions file formats (chosen by suffix: `.jsonl` / `.tsv`; otherwise by the first non-blank character,
`{` meaning JSONL), UTF-8, one image per line, blank lines ignored:
- TSV: `FILENAME<TAB>CAPTION`; only the first tab separates, so captions may contain tabs. An optional
  first line `filename<TAB>caption` is a header and skipped.
- JSONL: `{"filename": "...", "caption": "..."}` per line (other keys are ignored).
FILENAME is relative to the images folder, with `/` between subfolders.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from f2d_bench.errors import ConfigError
from f2d_bench.scorers.fid.backends import FeatureBackend, make_backend
from f2d_bench.scorers.fid.stats import StatsAccumulator, save_stats

#: The caption words that select the reference images (paper §4.2), matched as whole words.
HUMAN_WORDS = ("person", "man", "woman")
# \b needs a non-word character (or the string's edge) on both sides, so "woman" does not contain the
# word "man" and "manager", "personal", "human" match nothing. CC12M's name placeholder "<PERSON>" does
# match "person".
_HUMAN_PATTERN = re.compile(r"\b(?:" + "|".join(HUMAN_WORDS) + r")\b", re.IGNORECASE)
_HUMAN_SUBSTRING = re.compile("|".join(HUMAN_WORDS), re.IGNORECASE)
#: How a caption "contains" the words (the paper does not say): ``word``, whole words in any letter case
#: (the default), or ``substring``, anywhere in any case ("woman" then also holds "man", and "human",
#: "manager", "Germany" match). The choice is recorded in the statistics file and shown with the FID.
CAPTION_MATCHES = {"word": "whole words, any case", "substring": "anywhere in the caption, any case"}
DEFAULT_CAPTION_MATCH = "word"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_BATCH = 64  # images read and sent to the backend at once (bounded memory)


def is_human_caption(caption: str, match: str = DEFAULT_CAPTION_MATCH) -> bool:
    """True when `caption` contains "person", "man" or "woman" (``match``: one of :data:`CAPTION_MATCHES`;
    ``word``: as a whole word, in any letter case)."""
    if match not in CAPTION_MATCHES:
        raise ConfigError(f"caption match {match!r} is not one of {', '.join(CAPTION_MATCHES)}")
    pattern = _HUMAN_PATTERN if match == "word" else _HUMAN_SUBSTRING
    return pattern.search(caption) is not None


def filter_text(metadata: dict) -> str:
    """The caption filter a statistics file records, in words (for fid.json and reports)."""
    words = metadata.get("caption_words")
    if not words:
        return "all images (no caption filter)"
    match = metadata.get("caption_match") or "word"  # files written before the choice existed: whole words
    return f"captions with {' / '.join(words)} ({CAPTION_MATCHES.get(match, match)})"


def read_captions(path: str | Path) -> dict[str, str]:
    """{filename: caption} from a TSV or JSONL captions file (formats in the module docstring).

    Raises ConfigError naming the file and line for a malformed line, or for a filename listed twice
    with different captions.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"captions file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read captions file {str(path)!r} as UTF-8 text: {exc}") from exc

    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".tsv"):
        is_jsonl = suffix == ".jsonl"
    else:
        is_jsonl = text.lstrip().startswith("{")

    captions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        if is_jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: expected a JSON object with keys filename and caption")
            missing = [key for key in ("filename", "caption") if key not in record]
            if missing:
                raise ConfigError(f"{where}: missing key {', '.join(missing)}")
            name, caption = record["filename"], record["caption"]
            if not isinstance(name, str) or not isinstance(caption, str):
                raise ConfigError(f"{where}: filename and caption must be strings")
        else:
            if "\t" not in line:
                raise ConfigError(f"{where}: expected FILENAME<TAB>CAPTION")
            name, caption = line.split("\t", 1)
            if not first_line and name.strip().lower() == "filename" and caption.strip().lower() == "caption":
                continue  # header
        name = name.strip()
        if not name:
            raise ConfigError(f"{where}: empty filename")
        if name in captions and captions[name] != caption:
            raise ConfigError(
                f"{where}: {name!r} is listed again with another caption (first on line {first_line[name]})"
            )
        captions.setdefault(name, caption)
        first_line.setdefault(name, number)
    return captions


def list_images(images_dir: Path) -> list[str]:
    """Image files under `images_dir` (recursive), as sorted `/`-separated relative paths."""
    return sorted(
        p.relative_to(images_dir).as_posix()
        for p in images_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _read_rgb(path: Path) -> Image.Image:
    # convert("RGB") without EXIF rotation or alpha compositing: what pytorch-fid and clean-fid do.
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


@dataclass
class ReferenceSummary:
    """What `build_reference` did. `count` images went into the statistics."""

    out: Path
    backend: dict
    count: int
    candidates: int  # images that passed the caption filter and exist (before --limit)
    captions_total: int | None = None  # lines in the captions file (None without one)
    captions_matching: int | None = None
    missing: list[str] = field(default_factory=list)  # matching captions whose image file is absent
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (filename, reason)
    limit: int | None = None
    caption_match: str = DEFAULT_CAPTION_MATCH

    def text(self) -> str:
        """A short human-readable report."""
        lines = [f"reference statistics: {self.out} ({self.count} images, backend {self.backend['name']})"]
        if self.captions_total is not None:
            lines.append(
                f"captions: {self.captions_matching} of {self.captions_total} contain "
                f"{' / '.join(HUMAN_WORDS)} ({CAPTION_MATCHES[self.caption_match]}); image file missing for "
                f"{len(self.missing)} of them"
            )
        lines.append(f"candidate images: {self.candidates}" + (f", limit {self.limit}" if self.limit else ""))
        if self.unreadable:
            lines.append(f"unreadable images skipped: {len(self.unreadable)}")
            lines += [f"  {name}: {reason}" for name, reason in self.unreadable[:20]]
            if len(self.unreadable) > 20:
                lines.append(f"  ... and {len(self.unreadable) - 20} more")
        if self.count <= 2048:
            lines.append(
                f"note: {self.count} images <= 2048 feature dimensions, so the covariance is singular; FID "
                "is still defined but strongly biased upward. Papers use 10k-50k reference images."
            )
        return "\n".join(lines)


def build_reference(
    images_dir: str | Path,
    out_npz: str | Path,
    backend: FeatureBackend | str,
    captions: Path | None = None,
    limit: int | None = None,
    progress: bool = False,
    caption_match: str = DEFAULT_CAPTION_MATCH,
) -> ReferenceSummary:
    """Compute Inception statistics of the images in `images_dir` and write them to `out_npz`.

    With `captions`, only images whose caption `is_human_caption` (by `caption_match`) are used; images
    without a caption entry are ignored. Candidates are taken in sorted path order; `limit` stops after that many
    readable images. Unreadable images are skipped and listed in the summary. `backend`: a
    FeatureBackend or a backend name. The file's metadata records the counts, the filter and
    `backend.describe()`. Raises ConfigError when the folder is missing or fewer than 2 images are
    readable (a covariance needs 2).
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ConfigError(f"images folder {str(images_dir)!r} does not exist or is not a folder")
    if Path(out_npz).suffix != ".npz":  # checked before the (long) feature pass, not after it
        raise ConfigError(f"output file {str(out_npz)!r} must end in .npz")
    if limit is not None and int(limit) < 2:
        raise ConfigError(f"limit must be >= 2 (a covariance needs 2 images), got {limit}")
    if caption_match not in CAPTION_MATCHES:
        raise ConfigError(f"caption match {caption_match!r} is not one of {', '.join(CAPTION_MATCHES)}")
    if isinstance(backend, str):
        backend = make_backend(backend)

    available = list_images(images_dir)
    summary = ReferenceSummary(out=Path(out_npz), backend=backend.describe(), count=0, candidates=0, limit=limit,
                               caption_match=caption_match)
    if captions is not None:
        table = read_captions(captions)
        matching = sorted(name for name, caption in table.items() if is_human_caption(caption, caption_match))
        present = set(available)
        candidates = [name for name in matching if name in present]
        summary.captions_total = len(table)
        summary.captions_matching = len(matching)
        summary.missing = [name for name in matching if name not in present]
    else:
        candidates = available
    summary.candidates = len(candidates)

    accumulator = StatsAccumulator()
    batch: list[Image.Image] = []
    for index, name in enumerate(candidates):
        if limit is not None and accumulator.count + len(batch) >= limit:
            break
        try:
            batch.append(_read_rgb(images_dir / name))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            summary.unreadable.append((name, f"{type(exc).__name__}: {exc}"))
        if len(batch) == _BATCH:
            accumulator.add(backend.features(batch))
            batch = []
            if progress:
                print(f"fid-ref: {accumulator.count} images ({index + 1}/{len(candidates)} read)", file=sys.stderr)
    accumulator.add(backend.features(batch))
    summary.count = accumulator.count
    summary.backend = backend.describe()  # now with the hash of the file actually loaded

    if accumulator.count < 2:
        raise ConfigError(
            f"only {accumulator.count} readable image(s) selected from {str(images_dir)!r} "
            f"({len(candidates)} candidate(s), {len(summary.unreadable)} unreadable); FID needs at least 2"
        )
    mu, sigma = accumulator.stats()
    extra = {
        "images_dir": images_dir.name,
        "captions_file": Path(captions).name if captions is not None else None,
        "caption_words": list(HUMAN_WORDS) if captions is not None else None,
        "caption_match": caption_match if captions is not None else None,
        "captions_total": summary.captions_total,
        "captions_matching": summary.captions_matching,
        "missing": len(summary.missing),
        "candidates": summary.candidates,
        "unreadable": len(summary.unreadable),
        "limit": limit,
        "backend_info": summary.backend,
    }
    save_stats(out_npz, mu, sigma, accumulator.count, backend.name, extra)
    return summary
