"""Turn a folder of photos and videos into an FFHQ-aligned face set (``DST/{face_id}.png`` + manifest).

Every source either gives exactly one face or is listed as skipped with its reason; nothing is dropped
silently. Outputs are written atomically (temporary file in DST, then ``os.replace``), so an interrupted
run never leaves a half-written PNG or manifest behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from PIL import Image

from f2d_bench.files import atomic_write_bytes, atomic_write_text
from f2d_bench.store import png_bytes
from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.faces.align import ffhq_align
from f2d_bench.faces.choice import choose_face
from f2d_bench.faces.detect import DETECTOR_NAME, Detection, FaceDetector
from f2d_bench.faces.faceset import IMAGE_EXTENSIONS, MANIFEST_NAME, PREPARING_NAME, check_class_word, sanitize_face_id
from f2d_bench.faces.imageio import read_image, read_video_frame
from f2d_bench.faces.quality import describe, input_quality, source_crop_size, thresholds

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
#: An optional file in SRC giving class words per face id ({"obama": "man", ...}); read by prepare_faces.
CLASS_WORDS_FILE = "class_words.json"
SEVERAL_POLICIES = ("skip", "largest")
MANIFEST_VERSION = 1
# Landmarks and boxes are stored rounded to 1/1000 pixel: exact enough, and a readable manifest.
_DECIMALS = 3


@dataclass(frozen=True)
class PreparedFace:
    """A face that was written: ``file`` is the aligned PNG in DST, ``source`` the photo or video."""

    face_id: str
    file: Path
    source: Path
    frame_index: int | None
    detection: Detection
    n_detections_ignored: int
    n_other_faces: int = 0
    #: Input-quality measures and flags (:func:`f2d_bench.faces.quality.input_quality`).
    quality: dict | None = None
    #: The face's class word ("man", "woman") or None (see :func:`prepare_faces`).
    class_word: str | None = None

    @property
    def flags(self) -> list[str]:
        return list((self.quality or {}).get("flags", []))

    def to_manifest(self) -> dict:
        return {
            "face_id": self.face_id,
            "file": self.file.name,
            "source": self.source.name,
            "frame_index": self.frame_index,
            "box": [round(v, _DECIMALS) for v in self.detection.box],
            "landmarks": [[round(float(v), _DECIMALS) for v in point] for point in self.detection.landmarks],
            "prob": float(self.detection.prob),
            "n_detections_ignored": self.n_detections_ignored,
            "n_other_faces": self.n_other_faces,
            "quality": self.quality,
            "class_word": self.class_word,
        }


@dataclass(frozen=True)
class SkippedSource:
    """A file in SRC that gave no face, and why."""

    source: Path
    reason: str


@dataclass
class PrepareReport:
    """What :func:`prepare_faces` did: faces written (sorted by id) and sources skipped (by file name)."""

    dst: Path
    faces: list[PreparedFace] = field(default_factory=list)
    skipped: list[SkippedSource] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)  # which sources were used: see select_sources

    @property
    def manifest_path(self) -> Path:
        return self.dst / MANIFEST_NAME

    def summary(self) -> str:
        """A few human-readable lines: counts, then every skipped source with its reason."""
        lines = [
            f"faces prepare: {len(self.faces)} face(s) written to {self.dst}, "
            f"{len(self.skipped)} source(s) skipped"
        ]
        sel = self.selection
        if sel.get("limit") is not None:
            how = "the first by file name" if sel["rule"] == "sorted" else f"a sample seeded {sel['seed']}"
            lines.append(
                f"  --limit {sel['limit']}: {sel['n_chosen']} of {sel['n_candidates']} photos/videos chosen "
                f"({how}) before detection; chosen ones without a face are skipped, not replaced"
            )
        lines += [f"  skipped {item.source.name}: {item.reason}" for item in self.skipped]
        ignored = sum(face.n_detections_ignored for face in self.faces)
        if ignored:
            lines.append(
                f"  {ignored} detection(s) below min_prob {self.settings.get('min_prob')} ignored "
                "in the written faces' sources"
            )
        several = [face.face_id for face in self.faces if face.n_other_faces]
        if several:
            lines.append(f"  several faces, largest kept: {', '.join(several)}")
        flagged = [face for face in self.faces if face.flags]
        if flagged:
            lines.append(f"  {len(flagged)} weak input(s) flagged (kept; see manifest.json 'quality'):")
            lines += [f"    {face.face_id}: {', '.join(face.flags)}" for face in flagged]
        return "\n".join(lines)


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write_bytes(path, png_bytes(image, {}))


def _save_json(data: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def select_sources(names: list[str], limit: int | None = None, seed: int | None = None) -> list[str]:
    """The file names ``faces prepare --limit`` uses, in name order (all of them when ``limit`` is None).

    The choice depends on the names alone, never on what detection finds, so it is the same on every
    machine and with every detector version. Names compare by Unicode code point.

    sorted (``seed`` None): the first ``limit`` names in sorted order.
    seeded: the ``limit`` names whose sha256 of ``"<seed>/<name>"`` (UTF-8, hex) is smallest. A name's rank
        depends only on the seed and itself, so adding files to the folder keeps a chosen name chosen unless
        a new name ranks before it.
    """
    ordered = sorted(names)
    if limit is None:
        return ordered
    if seed is None:
        return ordered[:limit]
    rank = {n: hashlib.sha256(f"{seed}/{n}".encode("utf-8")).hexdigest() for n in ordered}
    return sorted(sorted(ordered, key=lambda n: (rank[n], n))[:limit])


def _selection(candidates: list[str], chosen: list[str], limit: int | None, seed: int | None) -> dict:
    """The manifest's record of which sources were used (``candidates_sha256``: of the sorted candidate
    names joined by newlines, so that another copy of the source folder can be checked against it)."""
    record = {
        "rule": "all" if limit is None else ("sorted" if seed is None else "seeded"),
        "limit": limit, "seed": seed, "n_candidates": len(candidates), "n_chosen": len(chosen),
        "candidates_sha256": hashlib.sha256("\n".join(sorted(candidates)).encode("utf-8")).hexdigest(),
        "applies_to": "photos and videos of SRC, before face detection",
    }
    if limit is not None:
        record["chosen"] = list(chosen)
    return record


def _validate(frame_index: int, several: str, min_prob: float, output_size: int, min_face_size: float = 0) -> None:
    if isinstance(min_face_size, bool) or not min_face_size >= 0:
        raise ConfigError(f"min_face_size must be a number of source pixels >= 0, got {min_face_size}")
    if several not in SEVERAL_POLICIES:
        raise ConfigError(f"several must be one of {', '.join(SEVERAL_POLICIES)}, got {several!r}")
    if not 0.0 <= min_prob <= 1.0:
        raise ConfigError(f"min_prob must be a probability in [0, 1], got {min_prob}")
    if int(output_size) != output_size or output_size < 16:
        raise ConfigError(f"output_size must be an integer number of pixels >= 16, got {output_size}")
    if int(frame_index) != frame_index or frame_index < 0:
        raise ConfigError(f"frame_index must be an integer >= 0, got {frame_index}")


def _collect_sources(src: Path, dst: Path) -> tuple[list[tuple[str, Path, bool]], list[SkippedSource]]:
    """(face_id, path, is_video) for every supported file in ``src``, plus the unsupported ones."""
    sources, skipped = [], []
    dst_resolved = dst.resolve()
    for path in sorted(src.iterdir()):
        if path.name.startswith("."):
            # OS metadata (.DS_Store) or a file someone hid: listed, so that no photo vanishes unseen.
            skipped.append(SkippedSource(path, "hidden file (its name starts with '.'); rename it to use it"))
            continue
        if path.name == CLASS_WORDS_FILE and path.is_file():
            continue  # face metadata, read by prepare_faces
        if path.is_dir():
            if path.resolve() != dst_resolved:
                skipped.append(SkippedSource(path, "is a directory (sub-directories are not searched)"))
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or suffix in VIDEO_EXTENSIONS:
            sources.append((sanitize_face_id(path.stem), path, suffix in VIDEO_EXTENSIONS))
        else:
            supported = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
            reason = f"unsupported file type {suffix or '(none)'!r} (supported: {supported})"
            skipped.append(SkippedSource(path, reason))
    by_id: dict[str, list[Path]] = {}
    for face_id, path, _ in sources:
        by_id.setdefault(face_id, []).append(path)
    clashes = {face_id: paths for face_id, paths in by_id.items() if len(paths) > 1}
    if clashes:
        details = "; ".join(
            f"{' and '.join(str(p) for p in paths)} both give face id {face_id!r}"
            for face_id, paths in clashes.items()
        )
        raise F2DBenchError(f"face id collision in {src}: {details}. Rename the files so their ids differ.")
    return sources, skipped


def _class_words(src: Path, face_ids: set[str], given: Mapping[str, str] | None,
                 default: str | None) -> dict[str, str]:
    """face id -> class word for the faces of ``src`` (see :func:`prepare_faces`); errors name the bad entry."""
    layers = []
    sidecar = src / CLASS_WORDS_FILE
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise F2DBenchError(f"{sidecar} is not readable JSON ({exc}); it must map face ids to class words") from exc
        if not isinstance(data, dict):
            raise F2DBenchError(f"{sidecar} must be a JSON object mapping face ids to class words, got "
                                f"{type(data).__name__}")
        layers.append((str(sidecar), data))
    if given:
        layers.append(("--class-word", dict(given)))
    words: dict[str, str] = {}
    if default is not None:
        default = check_class_word(default, "--class-word (default for every face)")
        words = dict.fromkeys(face_ids, default)
    for where, mapping in layers:
        unknown = sorted(str(k) for k in mapping if k not in face_ids)
        if unknown:
            raise ConfigError(f"{where}: class word given for {', '.join(map(repr, unknown))}, which no photo or "
                              f"video of {src} gives (face ids: {', '.join(sorted(face_ids)) or 'none'})")
        for face_id, word in mapping.items():
            words[face_id] = check_class_word(word, f"{where}, face {face_id!r}")
    return words


#: errno values of a source file that cannot be opened, whatever the system's health.
_UNOPENABLE = (errno.ELOOP, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG)


def _previous_outputs(manifest_path: Path) -> set[str]:
    """PNG names a previous run listed in its manifest (best effort: a broken manifest lists none)."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        names = {str(entry["file"]) for entry in manifest.get("faces", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    # Only plain names of PNGs: never follow a manifest outside DST.
    return {name for name in names if Path(name).name == name and name.endswith(".png")}


def _choose(
    detections: list[Detection], min_prob: float, several: str
) -> tuple[Detection | None, int, int, str]:
    """(chosen detection or None, n ignored below min_prob, n other faces, reason when None)."""
    kept = [d for d in detections if d.prob >= min_prob]
    ignored = len(detections) - len(kept)
    if not kept:
        reason = f"no face with probability >= {min_prob}"
        if ignored:
            best = max(d.prob for d in detections)
            reason += f" ({ignored} weaker detection(s) ignored, best {best:.3f})"
        return None, ignored, 0, reason
    if len(kept) > 1 and several == "skip":
        probs = ", ".join(f"{d.prob:.3f}" for d in kept)
        reason = (
            f"{len(kept)} faces with probability >= {min_prob} ({probs}); crop the photo to one person, "
            "or keep the largest face with several='largest' (--several largest)"
        )
        return None, ignored, len(kept) - 1, reason
    chosen, _ = choose_face(kept, "largest")  # the shared rule, as the methods and scorers choose
    return chosen, ignored, len(kept) - 1, ""


def prepare_faces(
    src: str | Path,
    dst: str | Path,
    *,
    frame_index: int = 0,
    several: str = "skip",
    min_prob: float = 0.9,
    output_size: int = 512,
    min_face_size: float = 0,
    limit: int | None = None,
    limit_seed: int | None = None,
    detector: FaceDetector | None = None,
    progress: bool = True,
    class_words: Mapping[str, str] | None = None,
    class_word: str | None = None,
) -> PrepareReport:
    """Detect, FFHQ-align and write one face per source file of ``src`` into ``dst``.

    src: directory of images (jpg, jpeg, png, webp) and/or videos (mp4, avi, mov, mkv, webm); not recursive.
    dst: output directory (created); receives ``{face_id}.png`` (output_size x output_size RGB) and
        ``manifest.json``. Face ids are the sanitized file stems; two sources with the same id are an
        error raised before anything is written. Re-running replaces the outputs and removes the PNGs
        that the previous manifest listed and this run no longer produces.
    frame_index: 0-based frame read from each video.
    several: what to do when more than one face reaches min_prob: "skip" the source, or keep the
        "largest" box (by area).
    min_prob: detections below this MTCNN probability (0..1) are ignored (and counted).
    min_face_size: skip a face whose aligned crop spans fewer source pixels per side than this (it would
        be upscaled more than ``output_size / min_face_size`` times); 0 keeps every face. Kept faces get
        input-quality measures and flags (:mod:`f2d_bench.faces.quality`) in the manifest's ``quality``.
    limit: use only this many of the photos and videos, chosen by :func:`select_sources` before detection
        (the paper's face set is one frame from each of 100 videos); a chosen source without a usable face
        is skipped with its reason and not replaced by another, so the same folder always gives the same
        choice. The manifest's ``selection`` records the rule, the chosen names and the candidates' hash.
    limit_seed: choose a seeded sample of ``limit`` sources instead of the first ``limit`` names.
    class_words: face id -> class word ("man", "woman"), written into the manifest's ``class_word`` (methods
        such as FastComposer need one per face). Ids must be face ids of SRC's sources.
    class_word: the class word of every face that ``class_words`` and ``SRC/class_words.json`` leave out.
        Per face, ``class_words`` wins over ``SRC/class_words.json`` (an optional JSON object of face id ->
        class word kept beside the photos), which wins over ``class_word``; a face none of them names gets
        no class word (``class_word`` null in the manifest; edit it there later if needed).
    progress: print one line per source and the summary to stderr.
    """
    src, dst = Path(src), Path(dst)
    _validate(frame_index, several, min_prob, output_size, min_face_size)
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ConfigError(f"limit must be a whole number of sources >= 1, got {limit}")
    if limit_seed is not None and limit is None:
        raise ConfigError("limit_seed chooses which sources --limit keeps; give --limit N with it")
    if limit_seed is not None and (isinstance(limit_seed, bool) or int(limit_seed) != limit_seed or limit_seed < 0):
        raise ConfigError(f"limit_seed must be a whole number >= 0, got {limit_seed}")
    if not src.is_dir():
        what = "is not a directory" if src.exists() else "not found"
        raise F2DBenchError(f"source directory {src} {what}: give a directory of photos and/or videos")
    if dst.exists() and dst.resolve() == src.resolve():
        raise F2DBenchError(f"output directory {dst} is the source directory; choose another one")
    if dst.exists() and not dst.is_dir():
        raise F2DBenchError(f"output path {dst} exists and is not a directory")
    if dst.is_dir() and not (dst / MANIFEST_NAME).exists() and not (dst / PREPARING_NAME).exists():
        # Not a face set this command wrote: its files (a user's own crops) would be overwritten unasked.
        others = sorted(p.name for p in dst.iterdir())
        if others:
            raise F2DBenchError(
                f"output directory {dst} already holds files that faces prepare did not write ({', '.join(others[:3])}"
                f"{' ...' if len(others) > 3 else ''}); choose a new or empty folder")

    sources, skipped = _collect_sources(src, dst)
    words = _class_words(src, {face_id for face_id, _, _ in sources}, class_words, class_word)
    names = [path.name for _, path, _ in sources]
    chosen = select_sources(names, limit, limit_seed)
    keep = set(chosen)
    sources = [s for s in sources if s[1].name in keep]
    dst.mkdir(parents=True, exist_ok=True)
    detector = detector or FaceDetector()
    settings = {
        "min_prob": min_prob,
        "several": several,
        "output_size": int(output_size),
        "frame_index": int(frame_index),
        "detector": DETECTOR_NAME,
        "detector_min_face_size": getattr(detector, "min_face_size", None),
        "alignment": "FFHQ recreate_aligned_images (quad transform at 4x, Lanczos downsampling)",
        "face_rule": "largest",  # among several faces (several: largest); with one face, that face
        "min_face_size": min_face_size,
        "quality_flags": thresholds(),
    }
    report = PrepareReport(dst=dst, skipped=skipped, settings=settings,
                           selection=_selection(names, chosen, limit, limit_seed))
    previous = _previous_outputs(dst / MANIFEST_NAME)
    atomic_write_text(dst / PREPARING_NAME, "faces prepare is writing this folder\n")

    def note(index: int, path: Path, message: str) -> None:
        if progress:
            print(f"[{index}/{len(sources)}] {path.name}: {message}", file=sys.stderr, flush=True)

    for index, (face_id, path, is_video) in enumerate(sources, start=1):
        try:
            image = read_video_frame(path, frame_index) if is_video else read_image(path)
        except (F2DBenchError, OSError) as exc:
            # A source this process cannot open (a symlink loop, no read permission) is that source's
            # problem, listed with the others; a failure of the system itself (EIO, EMFILE) stops the run.
            if isinstance(exc, OSError) and exc.errno not in _UNOPENABLE:
                raise
            reason = str(exc) if isinstance(exc, F2DBenchError) else f"cannot open {path}: {exc.strerror}"
            report.skipped.append(SkippedSource(path, reason))
            note(index, path, f"skipped: {reason}")
            continue
        chosen, ignored, others, reason = _choose(detector.detect(image), min_prob, several)
        if chosen is None:
            report.skipped.append(SkippedSource(path, reason))
            note(index, path, f"skipped: {reason}")
            continue
        try:
            size = source_crop_size(chosen.landmarks)
            if size < min_face_size:
                reason = (f"face too small: its aligned crop spans {size:.0f} source pixels, below --min-face-size "
                          f"{min_face_size:g} (it would be upscaled x{output_size / size:.1f})")
                report.skipped.append(SkippedSource(path, reason))
                note(index, path, f"skipped: {reason}")
                continue
            aligned = ffhq_align(image, chosen.landmarks, output_size)
        except ValueError as exc:  # degenerate landmarks
            report.skipped.append(SkippedSource(path, f"cannot align the face: {exc}"))
            note(index, path, f"skipped: cannot align the face: {exc}")
            continue
        out = dst / f"{face_id}.png"
        _save_png(aligned, out)
        # Detecting again in the crop shows what the methods and scorers will find there (e.g. a ghost).
        quality = input_quality(chosen, image.size, output_size, detector.detect(aligned), min_prob)
        report.faces.append(
            PreparedFace(face_id, out, path, frame_index if is_video else None, chosen, ignored, others, quality,
                         words.get(face_id))
        )
        note(index, path, f"face {face_id} ({describe(quality)})")

    report.faces.sort(key=lambda face: face.face_id)
    report.skipped.sort(key=lambda item: item.source.name)
    if not report.faces and previous:
        # A mistyped source or too strict a setting must not empty a face set that runs were made from.
        (dst / PREPARING_NAME).unlink()
        raise F2DBenchError(
            f"no face came out of {src} ({len(report.skipped)} source(s) skipped); the face set already in {dst} "
            f"({len(previous)} face(s)) is kept as it was. Check the source folder and the settings, or prepare "
            "into a new folder")
    manifest = {
        "version": MANIFEST_VERSION,
        "source_dir": str(src.resolve()),
        "settings": settings,
        "selection": report.selection,
        "faces": [face.to_manifest() for face in report.faces],
        "skipped": [{"source": item.source.name, "reason": item.reason} for item in report.skipped],
    }
    _save_json(manifest, dst / MANIFEST_NAME)
    # Only after the new manifest is in place: drop crops of the previous run that are now stale.
    for name in previous - {face.file.name for face in report.faces}:
        (dst / name).unlink(missing_ok=True)
    (dst / PREPARING_NAME).unlink()
    if progress:
        print(report.summary(), file=sys.stderr, flush=True)
    return report
