"""The Python API: what the ``f2d-bench`` commands do, callable from a notebook or a script.

::

    from f2d_bench import api
    run = api.generate("smoke", out="runs/smoke")        # a preset name, a YAML path or a RunConfig
    scores = api.score(run.run_dir)                       # ScoreSummary; .table holds Table 1's means
    curve = api.upper_bound(run.run_dir, n=4)             # best-of-N (Fig. 7)
    page = api.report([run.run_dir], out="reports/smoke")  # path of index.html

Every function is safe to call again: finished work is kept and only what is missing is computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from f2d_bench.config import RunConfig, config_from_dict, load_config, load_preset, preset_names
from f2d_bench.grid import UNSHARDED, Shard
from f2d_bench.upper_bound import upper_bound  # the best-of-N curve of Fig. 7 (its own module)

if TYPE_CHECKING:
    from f2d_bench.config import ScoringConfig
    from f2d_bench.engine import GenerationSummary, TuneSummary
    from f2d_bench.scoring import ScoreSummary

__all__ = ["generate", "report", "resolve_config", "score", "scoring_settings", "upper_bound"]


def resolve_config(config: RunConfig | str | Path, *, faces: str | None = None, batch_size: int | None = None,
                   device: str | None = None) -> RunConfig:
    """A RunConfig from a RunConfig, a preset name (``smoke``, ``paper``) or a YAML file, with overrides."""
    if not isinstance(config, RunConfig):
        config = load_preset(str(config)) if str(config) in preset_names() else load_config(config)
    data = config.to_dict()
    if faces is not None:
        data["faces"] = faces
    if batch_size is not None:
        data["batch_size"] = batch_size
    if device is not None:
        data["model"]["device"] = device
    return config_from_dict(data, "overrides") if data != config.to_dict() else config


def generate(config: RunConfig | str | Path, *, out: str | Path | None = None, shard: Shard | str = UNSHARDED,
             faces: str | None = None, batch_size: int | None = None, device: str | None = None,
             progress: bool = True, compile: bool = False, score: bool = False) -> "GenerationSummary":
    """Generate (or complete) a run's grid; ``out`` defaults to ``runs/<config name>``.

    ``compile``: torch.compile the UNet and VAE decoder (images within float noise of eager ones);
    ``score``: score each image as it is written (the summary's ``score``: the ScoreSummary)."""
    from f2d_bench.engine import generate_run

    config = resolve_config(config, faces=faces, batch_size=batch_size, device=device)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    return generate_run(config, Path(out) if out else Path("runs") / config.name, shard=shard, progress=progress,
                        compile=compile, score=score)


def tune(config: RunConfig | str | Path, *, out: str | Path | None = None, shard: Shard | str = UNSHARDED,
         faces: str | None = None, device: str | None = None, progress: bool = True) -> "TuneSummary":
    """Tune every face (this shard's, split by face) for the config's tuning methods, ahead of ``generate``."""
    from f2d_bench.engine import tune_run

    config = resolve_config(config, faces=faces, device=device)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    return tune_run(config, Path(out) if out else Path("runs") / config.name, shard=shard, progress=progress)


def scoring_settings(run_dir: str | Path, *, config: str | Path | None = None, device: str | None = None,
                     batch_size: int | None = None, fid_reference: str | None = None,
                     fid_backend: str | None = None) -> "ScoringConfig":
    """The ScoringConfig a score of ``run_dir`` uses: the run's own (``config``: the ``scoring:`` section
    of another run config instead), with the keyword arguments that are not None applied."""
    from f2d_bench.run_dir import RunDir

    scoring = load_config(config).scoring if config else RunDir(run_dir).config().scoring
    changes = {"device": device, "batch_size": batch_size, "fid_reference": fid_reference,
               "fid_backend": fid_backend}
    changes = {k: v for k, v in changes.items() if v is not None}
    return scoring.replace(**changes) if changes else scoring


def score(run_dir: str | Path, *, scorers: Sequence[str] | None = None, config: str | Path | None = None,
          device: str | None = None, batch_size: int | None = None, fid_reference: str | None = None,
          fid_backend: str | None = None, shard: Shard | str = UNSHARDED, progress: bool = True) -> "ScoreSummary":
    """Score every image of a run (settings: see :func:`scoring_settings`).

    ``shard`` (``i/N``): score only that shard's images into the caches; the shard that completes the
    set of N writes records.parquet (FID over the whole run), else a later unsharded ``score`` does,
    computing nothing twice.
    """
    from f2d_bench.scoring import score_run

    scoring = scoring_settings(run_dir, config=config, device=device, batch_size=batch_size,
                               fid_reference=fid_reference, fid_backend=fid_backend)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    return score_run(run_dir, scorers=scorers, scoring=scoring, progress=progress, shard=shard)


def report(run_dirs: str | Path | Sequence[str | Path], out: str | Path, *, grid_faces: int = 8,
           grid_seeds: int = 4, n_resamples: int = 2000, confidence: float = 0.95) -> Path:
    """Write the static HTML report of scored runs into ``out``; returns the path of its index.html."""
    from f2d_bench.report.render import build_report

    return build_report(run_dirs, out, grid_faces=grid_faces, grid_seeds=grid_seeds, n_resamples=n_resamples,
                        confidence=confidence)
