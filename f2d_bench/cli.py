"""The ``f2d-bench`` command line. Heavy libraries are imported inside the commands, not here."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path

from f2d_bench import __version__
from f2d_bench.errors import F2DBenchError

DESCRIPTION = """\
f2d-bench: the Face2Diffusion (CVPR 2024) face-personalization evaluation protocol as a tool.

  f2d-bench faces prepare RAW_DIR faces/        detect, FFHQ-align and crop a face set
  f2d-bench tune --preset baselines-smoke       per-face tuning ahead of generate (resumable, by face)
  f2d-bench generate --preset smoke             the method x face x prompt x seed grid (resumable)
  f2d-bench generate --preset smoke --ray       the same over Ray workers (--shard auto: SLURM, torchrun)
  f2d-bench status runs/smoke                   images done / expected per method
  f2d-bench score runs/smoke                    every metric per image -> records.parquet
  f2d-bench upper-bound runs/smoke --n 16       best-of-N hMean curve (tops the grid up to N seeds)
  f2d-bench report runs/smoke -o reports/smoke  static HTML report: tables, CIs, plots, image grids
  f2d-bench reports index [reports]             index of a reports folder: every report, a leaderboard
  f2d-bench methods                             installed generation methods
"""


def _shard(args: argparse.Namespace):
    """(shard, launch) of the command; ``--shard auto`` says what it read and pins the device (before torch
    starts), and its launch is what it read (None otherwise)."""
    from f2d_bench.launch.environment import shard_argument

    if args.ray and args.shard:
        raise F2DBenchError("--ray splits the run into shards itself; leave out --shard")
    if not args.ray and (args.workers is not None or args.ray_shards is not None):
        raise F2DBenchError("--workers and --ray-shards go with --ray")
    if args.ray:
        return None, None
    shard, found, launch = shard_argument(args.shard)
    if found:
        print(found, flush=True)
    return shard, launch


def _ray(args: argparse.Namespace, kind: str, config, out: Path, **more) -> int:
    from f2d_bench.launch.ray_executor import run_with_ray

    summary = run_with_ray(kind, config, out, address=args.ray, workers=args.workers, shards=args.ray_shards,
                           progress=not args.no_progress, **more)
    return _outcome(summary, out, "some work is missing (see above); re-run the same command to retry it")


def _outcome(summary, out: Path, incomplete: str) -> int:
    """Print a generate or Ray summary and where its outputs are; exit status 1 when work is missing."""
    print(summary.text())
    print(f"outputs: {out.resolve()}")
    if not summary.complete:
        print(incomplete, file=sys.stderr)
        return 1
    return 0


def _add_ray_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help=f"{what} over a Ray cluster: one worker per GPU (CPU workers without GPUs), "
                             "many more shards than workers, a dead worker's shard retried. Without ADDRESS "
                             "a local Ray instance on this machine's GPUs; `auto` or host:port joins a "
                             "running cluster (needs pip install 'f2d-bench[ray]')")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="with --ray: number of workers (default: the cluster's GPUs, else its CPUs)")
    earlier = "" if what == "score" else ", or the count an earlier --ray run of this run directory used"
    parser.add_argument("--ray-shards", type=int, metavar="N",
                        help=f"with --ray: shards to split the run into (default: 4 per worker{earlier})")


def _cmd_generate(args: argparse.Namespace) -> int:
    from f2d_bench import api

    shard, launch = _shard(args)
    config = api.resolve_config(args.config or args.preset, faces=args.faces, batch_size=args.batch_size,
                                device=args.device)
    out = Path(args.out) if args.out else Path("runs") / config.name
    if launch is not None:
        from f2d_bench.launch.environment import check_array_layout
        from f2d_bench.run_dir import RunDir

        check_array_layout(launch, RunDir(out).store.layouts(), out)
    if args.ray:
        status = _ray(args, "generate", config, out, compile=args.compile)
        if args.score:
            # Scored by the workers once generation ends: under Ray most images' reference images come
            # from other shards, so scoring beside generation would leave most of them waiting. Images
            # that could not be made (status 1) do not hold back the others' scores, as without --ray.
            from f2d_bench.run_dir import RunDir

            run = RunDir(out)
            if not any(r.done for r in run.status()):
                print("nothing to score: no image could be made (see above)", file=sys.stderr)
                return status
            return max(status, _ray(args, "score", run.config().replace(scoring=config.scoring), out))
        return status
    summary = api.generate(config, out=out, shard=shard, progress=not args.no_progress, compile=args.compile,
                           score=args.score)
    return _outcome(summary, out, "some images are missing (see above); re-run the same command to retry them")


def _cmd_tune(args: argparse.Namespace) -> int:
    from f2d_bench import api

    shard, _ = _shard(args)
    config = api.resolve_config(args.config or args.preset, faces=args.faces, device=args.device)
    out = Path(args.out) if args.out else Path("runs") / config.name
    if args.ray:
        return _ray(args, "tune", config, out)
    summary = api.tune(config, out=out, shard=shard, progress=not args.no_progress)
    print(summary.text())
    print(f"outputs: {out.resolve()} (methods/<method>/faces/<face>/)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from f2d_bench.run_dir import RunDir

    run = RunDir(args.run_dir)
    rows = run.status()
    tmp = run.store.temporary_files()
    found = run.store.damaged(run.keys()) if args.verify else {}
    damaged = {k.as_string(): why for k, why in found.items()}
    # a damaged image is not done: it is generated again
    done = {r.method_id: r.done - sum(k.method_id == r.method_id for k in found) for r in rows}
    if args.json:
        print(json.dumps({
            "run_dir": str(run.root),
            "expected": sum(r.expected for r in rows),
            "done": sum(done.values()),
            "methods": {r.method_id: {"label": r.label, "expected": r.expected, "done": done[r.method_id]}
                        for r in rows},
            "temporary_files": len(tmp),
            **({"damaged": damaged} if args.verify else {}),
        }, indent=2))
        return 1 if damaged else 0
    width = max((len(r.label) + len(r.method_id) + 3 for r in rows), default=10)
    for r in rows:
        name = f"{r.label} [{r.method_id}]"
        pct = 100.0 * done[r.method_id] / r.expected if r.expected else 100.0
        print(f"{name:<{width}}  {done[r.method_id]:>7}/{r.expected:<7} {pct:5.1f}%")
    print(f"{'total':<{width}}  {sum(done.values()):>7}/{sum(r.expected for r in rows):<7}")
    if tmp:
        print(f"{len(tmp)} temporary file(s) from an interrupted writer; the next generate of that shard removes them")
    if args.verify:
        print(f"verified every image against its manifest hash: {len(damaged)} damaged")
        for key, why in list(damaged.items())[:20]:
            print(f"  {key}: {why}")
        if damaged:
            print("run the same generate command again: it removes damaged images and generates them anew")
    return 1 if damaged else 0


def _cmd_score(args: argparse.Namespace) -> int:
    from f2d_bench import api

    shard, _ = _shard(args)
    names = [n.strip() for n in args.scorers.split(",") if n.strip()] if args.scorers else None
    settings = dict(config=args.config, device=args.device, batch_size=args.batch_size,
                    fid_reference=args.fid_ref, fid_backend=args.fid_backend)
    if args.ray:
        from f2d_bench.run_dir import RunDir

        config = RunDir(args.run_dir).config().replace(scoring=api.scoring_settings(args.run_dir, **settings))
        return _ray(args, "score", config, Path(args.run_dir), scorers=names)
    summary = api.score(args.run_dir, scorers=names, shard=shard, progress=not args.no_progress, **settings)
    print(summary.text())
    print(f"outputs: {Path(args.run_dir).resolve()} (records.parquet, table1.csv, scores/)")
    return 0


def _cmd_scorers(args: argparse.Namespace) -> int:
    from f2d_bench.scorers import DEFAULT_SCORERS, SCORERS

    for entry in SCORERS.entries().values():
        default = "*" if entry.name in DEFAULT_SCORERS else " "
        print(f"{default} {entry.name:<11} {entry.summary or entry.target}  ({entry.origin})")
        if args.metrics:
            for m in SCORERS.load(entry.name).metrics:
                arrow = "higher is better" if m.higher_is_better else "lower is better"
                print(f"      {m.name:<12} [{m.low:g}, {m.high:g}] {arrow}: {m.description}")
    print("* run by default")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from f2d_bench.methods import METHODS

    entries = METHODS.entries()
    width = max(map(len, entries), default=0)
    for entry in entries.values():
        summary, setup = entry.summary, ""
        try:
            cls = METHODS.load(entry.name)
        except F2DBenchError as exc:
            cls, summary = None, f"cannot be loaded: {exc}"
        if cls is not None:
            summary = summary or cls.summary or entry.target
            facts = [f"released on {cls.released_base}"] if cls.released_base else []
            if cls.native_sampling:
                n = cls.native_sampling
                facts.append(f"native: {n.get('scheduler')}, {n.get('num_inference_steps')} steps, "
                             f"CFG {n.get('guidance_scale')}")
            setup = f" [{'; '.join(facts)}]" if facts else ""
        print(f"{entry.name:<{width}}  {summary}{setup}  ({entry.origin})")
    return 0


def _add_run_arguments(p: argparse.ArgumentParser, *, shard_help: str) -> None:
    """What generate and tune share: the config or preset, the run directory, shard, faces, device."""
    from f2d_bench.config import preset_names

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="run config (YAML)")
    src.add_argument("--preset", choices=preset_names(), help="a shipped preset: %(choices)s")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--shard", metavar="i/N|auto", help=shard_help)
    p.add_argument("--faces", metavar="DIR", help="face set directory (overrides the config's `faces`)")
    p.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N (overrides model.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="f2d-bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"f2d-bench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate", help="generate the method x face x prompt x seed grid (resumable, shardable)",
        description=(
            "Generate every image of a run's grid: for each method, face, prompt (plus the reference "
            "prompt 'a photo of S*') and seed. Finished images are skipped, so re-running the same "
            "command resumes a killed run. With --shard i/N, N processes or machines split the grid by a "
            "stable hash of each image's key and together produce exactly the unsharded set."
        ),
    )
    _add_run_arguments(gen, shard_help=(
        "generate only shard i of N (1-based); auto: i, N and the GPU from SLURM (array or srun tasks) or "
        "torchrun/accelerate (RANK, WORLD_SIZE, LOCAL_RANK)"))
    gen.add_argument("--batch-size", type=int, metavar="B", help="images per pipeline call (overrides the config)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet and VAE decoder (static shapes: every call padded to the batch "
                          "size; compiled kernels cached under the f2d-bench cache folder for later runs). "
                          "Images agree with eager ones within float noise, not bit for bit; method ids stay "
                          "the same and the run's environment record notes it")
    gen.add_argument("--score", action="store_true",
                     help="score each image while the next ones render (the run config's scoring: section), so "
                          "a finished generate leaves records.parquet; the score caches are the same as "
                          "f2d-bench score's, which then computes nothing again. With --shard, the shard that "
                          "finishes last writes the records; with --ray, the workers score after generating")
    _add_ray_arguments(gen, "generate")
    gen.set_defaults(func=_cmd_generate)

    tu = sub.add_parser(
        "tune", help="tune the per-face methods of a run ahead of generate (resumable, shardable by face)",
        description=(
            "Tune every face for each method of the config that learns per face (TextualInversion, "
            "DreamBooth, ...), keeping the artifacts in the run directory for generate, score and "
            "upper-bound. Finished faces are kept, so re-running resumes a killed run; with --shard i/N, "
            "N processes split the faces. generate tunes whatever is still missing itself."
        ),
    )
    _add_run_arguments(tu, shard_help=(
        "tune only the faces of shard i of N (1-based); auto: from SLURM or torchrun, as for generate"))
    _add_ray_arguments(tu, "tune")
    tu.set_defaults(func=_cmd_tune)

    st = sub.add_parser("status", help="images done / expected per method of a run",
                        description="Show how many images of a run's grid exist, per method (all shards).")
    st.add_argument("run_dir", metavar="RUN_DIR")
    st.add_argument("--json", action="store_true", help="print JSON with the keys `expected` and `done`")
    st.add_argument("--verify", action="store_true",
                    help="also read every image and compare it with its manifest hash (damaged images; exit 1)")
    st.set_defaults(func=_cmd_status)

    me = sub.add_parser("methods", help="list installed generation methods",
                        description="List the generation methods: built-ins and those installed through "
                                    "the entry-point group f2d_bench.methods.")
    me.set_defaults(func=_cmd_methods)

    sc = sub.add_parser(
        "score", help="compute every metric of every image of a run into records.parquet",
        description=(
            "Score every image of a run: faces in each image (MTCNN), identity similarity to the input "
            "face (AdaFace, SphereFace, FaceNet, dlib), text fidelity (CLIP, directional CLIP, SigLIP), "
            "and hMean/gMean per image. Values are cached per image hash and scorer version: re-running "
            "computes only what is missing, and a regenerated image is rescored. Scorer settings come "
            "from the run config's `scoring:` section. With --shard i/N (or auto, or --ray), processes "
            "split the images by the same key hash as generate --shard and fill the same caches; a shard "
            "writes no records.parquet: the shard that finishes the set of N assembles it from the caches "
            "(FID over all of each method's images), or a plain `f2d-bench score RUN_DIR` afterwards does, "
            "computing nothing twice; with --ray the driver does. Shards of one run may run at once."
        ),
    )
    sc.add_argument("run_dir", metavar="RUN_DIR")
    sc.add_argument("--config", metavar="FILE",
                    help="take the `scoring:` section from this run config instead of the run's own "
                         "(other checkpoints, variants or policies; the images are not touched)")
    sc.add_argument("--scorers", metavar="NAMES", help="comma-separated scorer names (default: the config's, else all)")
    sc.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N (overrides scoring.device)")
    sc.add_argument("--batch-size", type=int, metavar="B", help="images per scorer call")
    sc.add_argument("--fid-ref", metavar="FILE.npz",
                    help="reference statistics from `f2d-bench fid-ref build`: also compute FID per method")
    sc.add_argument("--fid-backend", choices=["pytorch-fid", "clean-fid-torchscript"],
                    help="Inception backend for FID (must match the reference's; default: the config's)")
    sc.add_argument("--shard", metavar="i/N|auto",
                    help="score only shard i of N (1-based; the images of generate --shard i/N); auto: i, N and "
                         "the GPU from SLURM or torchrun, as for generate. The last shard to finish writes "
                         "records.parquet")
    sc.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_ray_arguments(sc, "score")
    sc.set_defaults(func=_cmd_score)

    scs = sub.add_parser("scorers", help="list installed scorers and their metrics",
                         description="List the scorers: built-ins and those installed through the entry-point "
                                     "group f2d_bench.scorers.")
    scs.add_argument("--metrics", action="store_true", help="also list each scorer's metrics (imports them)")
    scs.set_defaults(func=_cmd_scorers)

    from f2d_bench.faces.cli import register as register_faces
    from f2d_bench.scorers.fid.cli import register as register_fid

    from f2d_bench.report.cli import register as register_report
    from f2d_bench.report.cli import register_reports
    from f2d_bench.upper_bound import register as register_upper_bound

    register_faces(sub)
    register_fid(sub)
    register_upper_bound(sub)
    register_report(sub)
    register_reports(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except F2DBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output left (`f2d-bench methods | head -1`): no message, and the status of a
        # command a closed pipe stopped, as for any Unix tool (128 + SIGPIPE). Later writes to the closed
        # pipe go nowhere, so the interpreter's exit stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(f"error: the disk is full ({exc.filename or 'while writing'}). Finished files are kept and "
                  "no partial file remains; free some space and run the same command again.", file=sys.stderr)
            return 3
        from f2d_bench.files import system_failure

        if not system_failure(exc):
            raise  # not the system's: a bug, with its traceback
        # The system's (EIO, EACCES, EMFILE, ...): nothing was recorded as a file's fault.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}. Finished files are kept; fix the cause and run the same "
              "command again.", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; run the same command again to resume", file=sys.stderr)
        return 130
