"""`f2d-bench report RUN [RUN...] -o DIR`: the argparse wiring (the work is in :mod:`render`)."""

from __future__ import annotations

import argparse


def _cmd_report(args: argparse.Namespace) -> int:
    from f2d_bench import api

    index = api.report(args.runs, args.out, grid_faces=args.grid_faces, grid_seeds=args.grid_seeds,
                       n_resamples=args.resamples, confidence=args.confidence)
    print(f"report: {index.resolve()}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` command to ``subparsers`` (the object ``add_subparsers()`` returned)."""
    p = subparsers.add_parser(
        "report", help="HTML report of scored runs: the paper's tables, plots, image grids",
        description="Write a static HTML report (index.html with CSS, SVG plots, CSV/JSON and images beside it) "
                    "of one or more scored runs, merged. It opens from disk with no network.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="scored run directories (f2d-bench score RUN)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="report folder (created)")
    p.add_argument("--grid-faces", type=int, default=8, metavar="N",
                   help="faces shown in each method's image grid (0: all; default 8)")
    p.add_argument("--grid-seeds", type=int, default=4, metavar="N",
                   help="seeds shown per face and prompt (0: all; default 4)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of faces (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    p.set_defaults(func=_cmd_report)
    return p
