"""The ``faces`` command: ``f2d-bench faces prepare SRC DST``."""

from __future__ import annotations

import argparse
from pathlib import Path

from f2d_bench.argtypes import int_at_least, number_at_least, probability

_PREPARE_DESCRIPTION = """\
Detect the face in every photo (jpg, jpeg, png, webp) and video (mp4, avi, mov, mkv, webm) of SRC with
MTCNN, align it the way FFHQ does, and write DST/<face_id>.png plus DST/manifest.json. The face id is
the file name without extension, with characters other than letters, digits, '.', '_', '-' replaced by
'_'. A source with no face, several faces, or that cannot be read is skipped and listed with its reason.
Re-running on the same DST replaces its contents consistently.

Each written face is printed with its input-quality measures (detection probability, the crop's size in
source pixels and its upscaling, the share of padding, the faces found again in the crop) and flagged
when weak; manifest.json records them under "quality". --min-face-size skips faces below a size.

--limit N uses N of the photos and videos, chosen by file name before any detection: the first N names in
sorted (code point) order, or with --limit-seed S the N names with the smallest sha256 of "S/<name>". A
chosen source without a usable face is skipped, not replaced, so the same folder always gives the same
choice; manifest.json records it under "selection" (rule, limit, seed, chosen names, a hash of all names).

--class-word gives faces a class word ("man", "woman"; manifest.json's "class_word"), which methods such as
FastComposer need: --class-word obama=man for one face (repeatable), --class-word man for every other face.
SRC/class_words.json, a JSON object of face id -> class word, is read too (--class-word NAME=WORD wins over
it, and it wins over the default). Class words can also be edited in manifest.json later."""


def _class_word_option(text: str) -> tuple[str | None, str]:
    """``NAME=WORD`` -> (NAME, WORD); ``WORD`` -> (None, WORD), the default for every face."""
    name, sep, word = text.partition("=")
    if not sep:
        name, word = None, text
    if (name is not None and not name.strip()) or not word.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=WORD (e.g. obama=man) or WORD (e.g. man), got {text!r}")
    return (name.strip() if name is not None else None), word.strip()


def _class_words(options) -> tuple[dict[str, str], str | None]:
    """The --class-word options as (face id -> word, default word); a face or the default given twice
    with different words is an error naming it."""
    from f2d_bench.errors import ConfigError

    per_face: dict[str, str] = {}
    default = None
    for name, word in options or []:
        if name is None:
            if default is not None and default != word:
                raise ConfigError(f"--class-word: two defaults given ({default!r} and {word!r}); give one")
            default = word
        else:
            if per_face.get(name, word) != word:
                raise ConfigError(f"--class-word: face {name!r} given {per_face[name]!r} and {word!r}; give one")
            per_face[name] = word
    return per_face, default


def _prepare(args: argparse.Namespace) -> int:
    from f2d_bench.faces.prepare import prepare_faces  # torch and MTCNN load only when used

    class_words, class_word = _class_words(getattr(args, "class_word", None))

    report = prepare_faces(
        args.src,
        args.dst,
        frame_index=args.frame,
        several=args.several,
        min_prob=args.min_prob,
        output_size=args.size,
        min_face_size=args.min_face_size,
        limit=getattr(args, "limit", None),
        limit_seed=getattr(args, "limit_seed", None),
        class_words=class_words,
        class_word=class_word,
        progress=True,  # prints one line per source, then the summary (stderr); not repeated here
    )
    print(f"output: {report.dst} (manifest: {report.manifest_path})")
    return 0 if report.faces else 1


def register(subparsers) -> None:
    """Add the ``faces`` command (with its ``prepare`` subcommand) to an argparse subparsers object."""
    faces = subparsers.add_parser("faces", help="prepare input face sets (detect and FFHQ-align faces)",
                                  description="Work with input face sets: the aligned photos of the identities "
                                              "to personalize.")
    commands = faces.add_subparsers(dest="faces_command", metavar="SUBCOMMAND", required=True)
    prepare = commands.add_parser("prepare", help="detect and FFHQ-align one face per photo or video",
                                  description=_PREPARE_DESCRIPTION,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prepare.add_argument("src", type=Path, metavar="SRC", help="directory of photos and/or videos (not recursive)")
    prepare.add_argument("dst", type=Path, metavar="DST",
                         help="output directory for the aligned PNGs and manifest.json")
    prepare.add_argument("--frame", type=int_at_least(0), default=0, metavar="N",
                         help="0-based frame index read from each video")
    prepare.add_argument("--several", choices=("skip", "largest"), default="skip",
                         help="when several faces reach --min-prob: skip the source, or keep the largest face")
    prepare.add_argument("--min-prob", type=probability, default=0.9, metavar="P",
                         help="ignore detections whose MTCNN face probability is below P (0..1)")
    prepare.add_argument("--size", type=int_at_least(16), default=512, metavar="PX",
                         help="side of the aligned square output, pixels")
    prepare.add_argument("--min-face-size", type=number_at_least(0.0), default=0.0, metavar="PX",
                         help="skip a face whose aligned crop spans fewer than PX source pixels per side (it "
                              "would be upscaled more than SIZE/PX times); 0 keeps all. Kept faces are still "
                              "flagged when weak (small, padded, uncertain, several faces in the crop)")
    # SUPPRESS: no "(default: None)" in the help; absent options are read as None.
    prepare.add_argument("--limit", type=int_at_least(1), default=argparse.SUPPRESS, metavar="N",
                         help="use N photos/videos, chosen by file name before detection (default: all)")
    prepare.add_argument("--limit-seed", type=int_at_least(0), default=argparse.SUPPRESS, metavar="S",
                         help="with --limit: a sample seeded S instead of the first N sorted names")
    prepare.add_argument("--class-word", type=_class_word_option, action="append", default=argparse.SUPPRESS,
                         metavar="[NAME=]WORD",
                         help="class word of face NAME (repeatable), or without NAME of every face not named "
                              "(default: SRC/class_words.json where present, else none)")
    prepare.set_defaults(func=_prepare)
