"""``--ray``: a run split into many shards and executed by Ray actors that keep their pipeline loaded.

The driver cuts the run into ``4 x workers`` shards (the usual ``Shard(i, N)`` of ``--shard i/N``),
starts one actor per worker (one GPU each, or one CPU where the cluster has no GPU) and hands each idle
actor the next shard. An actor runs :func:`f2d_bench.engine.generate_run` (or ``tune_run``) on the shard
with the pipeline it loaded once; for ``score`` it keeps one :class:`~f2d_bench.scoring.ScoreSession`
(scorers loaded once) and fills the caches with each shard's values, and the driver then assembles
records.parquet (FID over the whole run included) as a plain ``score`` would, computing nothing twice. When an actor dies (its process killed, its spot machine gone), the
driver starts a new one and gives it that shard again: the dead process's writer lock went with it,
and the shard's next writer removes whatever it left half-written. Nothing is kept in the driver that
the run directory does not hold, so a killed driver is resumed by running the same command again.

Ray is an optional extra (``pip install 'f2d-bench[ray]'``), imported only here.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from f2d_bench.config import RunConfig, config_from_dict
from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.grid import Shard

INSTALL_HINT = "pip install 'f2d-bench[ray]'"
#: Shards per worker: enough that a slow or lost worker delays a small part of the run only.
SHARDS_PER_WORKER = 4
#: Attempts per shard on workers that die under it, before the run stops with an error.
MAX_TRIES = 3
#: How long a shard waits for a writer lock still held by a process of an earlier, killed driver (s).
LOCK_WAIT_S = 120.0
#: Environment variables (by prefix) a remote cluster's workers get from the driver: caches, offline
#: switches. A local instance's workers inherit the whole environment anyway.
FORWARDED_ENV_PREFIXES = ("F2D_BENCH_", "HF_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH_HOME")
#: Lock messages of a shard still held by a process of a killed driver: RunStore.writer_lock's, and
#: ScoreSession's (f2d_bench.scoring.score.SCORE_BUSY, not imported here: it would load the scorers' stack).
_BUSY = ("another process is writing the images", "another process is scoring")


def import_ray():
    """The ``ray`` module, or an error that says how to install it."""
    # No usage reports sent home from a benchmark (a sandbox without network would wait on them).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise F2DBenchError(f"--ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


class ShardWorker:
    """One Ray actor: runs shards of one run directory, with the base pipeline loaded once.

    ``kind`` is ``generate``, ``tune`` or ``score``; ``config`` the run config as a plain dict (for
    ``score``: with the scoring settings to use); ``cwd`` the driver's working directory, entered when
    it exists here, so relative paths in the config mean the same; ``scorers``: score's scorer names;
    ``compile``: generate with compiled modules (``generate --compile``; each worker compiles once).
    """

    def __init__(self, kind: str, config: dict, run_dir: str, cwd: str, scorers: list[str] | None = None,
                 compile: bool = False):
        # Nothing here can fail: an error in an actor's constructor reaches the driver as a dead actor,
        # without its cause (and would be restarted as one). ready() does the work.
        self.kind, self.run_dir, self.scorers, self.compile = kind, run_dir, scorers, compile
        self._config, self._cwd = config, cwd
        self.session = None  # score's ScoreSession, made by ready()

    def ready(self) -> dict:
        """Read the config, then load the base pipeline when a method renders with it (score: the scoring
        session); returns pid, host and GPU ids. An error here reaches the driver with its cause."""
        import ray

        self._setup()
        if self.kind == "score":
            from f2d_bench.scoring import ScoreSession

            self.session = ScoreSession(self.run_dir, scorers=self.scorers, scoring=self.config.scoring,
                                        progress=False)
        else:
            from f2d_bench.engine import build_methods
            from f2d_bench.prompts import load_prompt_set

            methods = build_methods(self.config, load_prompt_set(self.config.prompts), self.pipeline)
            if any(m.uses_pipeline for m in methods):
                self.pipeline()
        return {"pid": os.getpid(), "host": socket.gethostname(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def _setup(self) -> None:
        """Enter the driver's directory, read the config, make the pipeline provider (once)."""
        if hasattr(self, "config"):
            return
        if self._cwd and os.path.isdir(self._cwd):
            os.chdir(self._cwd)
        self.config = config_from_dict(self._config, "the --ray driver's config")
        if self.kind != "score":
            from f2d_bench.engine import PipelineProvider

            self.pipeline = PipelineProvider(self.config, compile=self.compile)

    def run(self, index: int, count: int) -> dict:
        """Generate (or tune) shard ``index`` of ``count``; returns its summary as plain data."""
        self._setup()
        shard = Shard(index, count)
        deadline = time.monotonic() + LOCK_WAIT_S
        # A worker of a killed driver may still be finishing this shard: wait for its lock here, since
        # each start of the shard records the environment and loads the methods' weights again.
        from f2d_bench.files import lock_is_held

        lock = self._lock_path(shard)
        while lock is not None and time.monotonic() < deadline and lock_is_held(lock):
            time.sleep(1.0)
        while True:
            try:
                return self._run(shard)
            except F2DBenchError as exc:
                # A worker of a killed driver may still be finishing this shard: wait for its lock.
                if not any(b in str(exc) for b in _BUSY) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _lock_path(self, shard: Shard) -> Path | None:
        """The lock a second process of ``shard`` would find busy (tune waits on its own per-face locks)."""
        from f2d_bench.run_dir import RunDir

        run = RunDir(self.run_dir)
        if self.kind == "generate":
            return run.writer_lock_path(shard.tag)
        return run.score_lock_path(shard.tag) if self.kind == "score" else None

    def _run(self, shard: Shard) -> dict:
        if self.kind == "score":
            return {**self.session.work(shard), "notes": []}
        from f2d_bench.engine import generate_run, tune_run

        if self.kind == "tune":
            s = tune_run(self.config, self.run_dir, shard=shard, progress=False, pipeline=self.pipeline)
            return {"shard": shard.tag, "methods": [list(m) for m in s.methods], "notes": s.notes,
                    "seconds": s.seconds}
        s = generate_run(self.config, self.run_dir, shard=shard, progress=False, pipeline=self.pipeline,
                         compile=self.compile)
        return {"shard": shard.tag, "written": s.written, "seconds": s.seconds,
                "notes": [f"{m.label}: {r}" for m in s.methods for r in m.problems],
                "skipped": [f"{key}: {why}" for m in s.methods for key, why in m.skipped]}


@dataclass
class RaySummary:
    """What a ``--ray`` run did. Times in seconds: ``init`` (connecting to or starting Ray), ``ready``
    (starting the first worker and loading its pipeline or scoring session; the others join as they get
    ready), ``work`` (the shards, from the first handed out; for score, the driver's assembly of the
    records is not part of it)."""

    kind: str
    run_dir: Path
    workers: int
    worker_kind: str  # "GPU" or "CPU"
    shards: int
    init_seconds: float
    ready_seconds: float
    work_seconds: float
    expected: int = 0  # images of the grid (generate); existing images (score)
    done: int = 0  # images present at the end (generate)
    written: int = 0  # images (generate) written by this run
    tuned: dict[str, list] = field(default_factory=dict)  # method id -> [label, faces, tuned now] (tune)
    scored: int = 0  # images of the shards finished (score)
    computed: dict[str, int] = field(default_factory=dict)  # scorer -> rows computed by the workers (score)
    score: Any = None  # the driver's assembly: a ScoreSummary (score)
    worker_deaths: int = 0
    retried: list[str] = field(default_factory=list)  # shard tags handed out again after a death
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    compile: bool = False  # generate --compile: every worker compiled its UNet and VAE decoder

    @property
    def complete(self) -> bool:
        if self.kind == "score":
            return self.score is not None
        return self.kind == "tune" or self.done == self.expected

    @property
    def images_per_second(self) -> float:
        """Images written (score: scored) per second of ``work`` (start-up excluded)."""
        n = self.scored if self.kind == "score" else self.written
        return n / self.work_seconds if self.work_seconds > 0 else 0.0

    def text(self) -> str:
        lines = [f"run {self.run_dir} ({self.kind} over Ray: {self.workers} {self.worker_kind} workers, "
                 f"{self.shards} shards)"]
        if self.kind == "generate":
            lines.append(f"  {self.done}/{self.expected} images, {self.written} new "
                         f"({self.images_per_second:.2f} images/s while working)")
            if self.compile:
                lines.append("  torch.compile in every worker: UNet and VAE decoder, every call padded to the batch size")
        if self.kind == "score":
            lines.append(f"  {self.scored}/{self.expected} images scored in shards "
                         f"({self.images_per_second:.2f} images/s while working); records assembled by the driver")
        for mid, (label, faces, now) in self.tuned.items():
            lines.append(f"  {label} [{mid}]: {faces}/{faces} faces tuned, {now} now")
        lines += [f"  note: {n}" for n in self.notes[:10]]
        lines += [f"  not generated {s}" for s in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more not generated")
        if self.worker_deaths:
            lines.append(f"  {self.worker_deaths} worker(s) died; shards handed out again: {', '.join(self.retried)}")
        lines.append(f"  Ray start {self.init_seconds:.1f} s, first worker ready {self.ready_seconds:.1f} s, "
                     f"work {self.work_seconds:.1f} s")
        if self.score is not None:
            lines.append(self.score.text())
        return "\n".join(lines)


class ManifestLines:
    """The lines of a run's manifests, read incrementally: images written so far, for a progress bar.

    Only bytes appended since the last call are read; a manifest rewritten by a resuming writer (a new
    file) is counted again from its start.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._seen: dict[Path, tuple[int, int, int]] = {}  # path -> (inode, bytes read, lines)

    def count(self) -> int:
        total = 0
        for path in self.folder.glob("*.jsonl") if self.folder.is_dir() else []:
            try:
                st = path.stat()
                inode, read, lines = self._seen.get(path, (st.st_ino, 0, 0))
                if inode != st.st_ino or st.st_size < read:
                    read, lines = 0, 0
                if st.st_size > read:
                    with open(path, "rb") as fh:
                        fh.seek(read)
                        lines += fh.read(st.st_size - read).count(b"\n")
                self._seen[path] = (st.st_ino, st.st_size, lines)
            except FileNotFoundError:
                continue
            total += lines
        return total


def previous_shard_count(run_dir: Path) -> int | None:
    """The N of an earlier sharded run of ``run_dir`` (its manifests ``shard-i-of-N``), when there is one N.

    Resuming with the same N puts every remaining image into the batch it would have had, so the run
    ends with the same pixels as one that was never interrupted.
    """
    from f2d_bench.run_dir import RunDir

    counts = RunDir(run_dir).store.layouts() - {1}
    return counts.pop() if len(counts) == 1 else None


def _connect(ray, address: str | None, workers: int | None) -> bool:
    """Connect to Ray (start a local instance for ``None``/``local``); True when started here."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address in (None, "", "local"):
        # Only small summaries travel through the object store: no need for Ray's default 30% of RAM.
        ray.init(address="local", num_cpus=max(workers or 0, os.cpu_count() or 1),
                 object_store_memory=128 * 1024 * 1024, **quiet)
    else:
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        try:
            ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                     **{k: v for k, v in quiet.items() if k != "include_dashboard"})
        except (ConnectionError, ValueError) as exc:  # no cluster there, or not an address
            raise F2DBenchError(
                f"--ray {address}: cannot join a Ray cluster there ({exc}). Start one with `ray start --head` "
                "(then --ray auto on its machines, or --ray HOST:PORT), or give --ray without an address to "
                "start one on this machine") from None
    return True


def _existing_images(run_dir: Path) -> int:
    """Images of the run directory's grid that exist (what ``score`` scores)."""
    from f2d_bench.run_dir import RunDir

    run = RunDir(run_dir)
    return sum(run.store.has_image(k) for k in run.keys())


def _grid_size(config: RunConfig) -> int:
    """Images of the grid, counted without loading any model."""
    from f2d_bench.faces.source import resolve_face_set
    from f2d_bench.prompts import load_prompt_set

    prompts = load_prompt_set(config.prompts).all_prompts()
    return len(config.methods) * len(resolve_face_set(config.faces)) * len(prompts) * len(config.seeds)


def assembly_scoring(scoring):
    """The settings the driver assembles a ``score --ray`` with, and a note when they differ.

    The workers scored on their devices; the driver (often a login or head node without a GPU) only
    reads their caches, which no device is part of. A device it lacks is replaced by the CPU, where it
    computes what a lost shard left (rarely anything) instead of failing after all the GPU work.
    """
    from f2d_bench.devices import resolve_device

    try:
        resolve_device(scoring.device)
        return scoring, None
    except ConfigError:
        return scoring.replace(device="cpu"), (
            f"scoring.device {scoring.device!r} is not available on this driver: it assembled the workers' "
            "cached values on the CPU")


def run_with_ray(
    kind: str, config: RunConfig, run_dir: str | Path, *, address: str | None = None, workers: int | None = None,
    shards: int | None = None, progress: bool = True, max_tries: int = MAX_TRIES,
    on_worker: Callable[[dict], Any] | None = None, scorers: list[str] | None = None, compile: bool = False,
) -> RaySummary:
    """Run ``kind`` (``generate``, ``tune`` or ``score``) of ``config`` in ``run_dir`` over Ray; safe to re-run.

    address: None or ``local`` starts a local instance (all of this machine's GPUs and CPUs), ``auto``
    or ``host:port`` / ``ray://host:port`` joins a cluster; an already initialised Ray is used as is.
    workers: actors to start (default: the cluster's GPUs, else its CPUs). shards: how many shards to cut
    the run into (default: an earlier sharded run's N, else 4 per worker). on_worker: called with
    ``{"pid", "host", "gpus", "slot"}`` each time a worker is ready.

    score: ``config`` is the run's config with the scoring settings to use (``config.scoring``; its
    device decides GPU or CPU workers), ``scorers`` the scorer names (default: the settings'); shards
    default to 4 per worker; the driver assembles records.parquet at the end (``summary.score``).
    compile: generate with compiled UNets and VAE decoders (``generate --compile``).
    """
    if kind not in ("generate", "tune", "score"):
        raise ValueError(f"kind must be 'generate', 'tune' or 'score', not {kind!r}")
    ray = import_ray()
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm.auto import tqdm

    from f2d_bench.run_dir import RunDir

    run_dir = Path(run_dir).resolve()
    # config errors before Ray starts
    expected = _grid_size(config) if kind == "generate" else _existing_images(run_dir) if kind == "score" else 0
    device = config.scoring.device if kind == "score" else config.model.device
    setting = "scoring.device" if kind == "score" else "model.device"
    t0 = time.perf_counter()
    started = _connect(ray, address, workers)
    init_s = time.perf_counter() - t0
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        if gpus and device.startswith("cuda:"):
            raise ConfigError(f"{setting} {device!r}: each Ray worker sees only its own GPU; "
                              "use auto or cuda (--device cuda)")
        cpus = int(resources.get("CPU", 1))
        n_workers = workers if workers is not None else gpus or cpus
        if n_workers < 1:
            raise ConfigError(f"--workers {n_workers}: need at least one worker")
        # Each worker takes a CPU (and a GPU): more than the cluster has would never all start.
        for have, what in ((cpus, "CPUs"), *(((gpus, "GPUs"),) if gpus else ())):
            if n_workers > have:
                raise ConfigError(f"--workers {n_workers}: the Ray cluster has {have} {what} and each worker "
                                  f"takes one; ask for at most {have}")
        # Images' batches depend on N (generate keeps an earlier N); a score's values do not need to.
        earlier = previous_shard_count(run_dir) if kind != "score" else None
        n_shards = shards if shards is not None else earlier or SHARDS_PER_WORKER * n_workers
        if n_shards < 1:
            raise ConfigError(f"--ray-shards {n_shards}: need at least one shard")
        options = {"num_cpus": 1, "num_gpus": 1 if gpus else 0}
        actor_cls = ray.remote(ShardWorker).options(**options)
        summary = RaySummary(kind, run_dir, n_workers, "GPU" if gpus else "CPU", n_shards, init_s, 0.0, 0.0,
                             expected=expected, compile=compile and kind == "generate")

        actors: dict[int, Any] = {}
        inflight: dict[Any, tuple[str, int, int | None]] = {}  # ref -> (what, slot, shard index)
        busy: dict[int, int | None] = {}  # slot -> shard index it runs
        tries: dict[int, int] = {}
        pending = deque(range(1, n_shards + 1))
        counter = ManifestLines(run_dir / "manifests")
        bar = None

        ready: set[int] = set()  # slots whose worker has loaded and takes shards

        def start(slot: int) -> None:
            actors[slot] = actor_cls.remote(kind, config.to_dict(), str(run_dir), os.getcwd(), scorers, compile)
            inflight[actors[slot].ready.remote()] = ("ready", slot, None)
            busy[slot] = None
            ready.discard(slot)

        def submit(slot: int) -> None:
            index = pending.popleft()
            tries[index] = tries.get(index, 0) + 1
            inflight[actors[slot].run.remote(index, n_shards)] = ("run", slot, index)
            busy[slot] = index

        def lost(slot: int) -> None:
            """The worker of ``slot`` died: its calls are dropped, its shard goes back to the queue."""
            summary.worker_deaths += 1
            if summary.worker_deaths > max_tries * max(n_workers, n_shards):
                raise F2DBenchError(f"{summary.worker_deaths} Ray workers died; see the Ray logs and run the "
                                    "same command again to resume")
            for ref, (_, s, _) in list(inflight.items()):
                if s == slot:
                    del inflight[ref]
            index = busy.pop(slot, None)
            if index is not None:
                tag = Shard(index, n_shards).tag
                if tries[index] >= max_tries:
                    raise F2DBenchError(f"{tag}: its worker died {tries[index]} times; see the Ray logs "
                                        "(out of memory?) and run the same command again to resume")
                summary.retried.append(tag)
                pending.appendleft(index)
            try:
                ray.kill(actors[slot], no_restart=True)
            except Exception:  # already gone
                pass
            start(slot)

        def collect(ref) -> Any:
            """The result of ``ref``; a shard's own error stops the run (it would fail again)."""
            what, slot, index = inflight.pop(ref)
            try:
                return what, slot, index, ray.get(ref)
            except RayActorError:
                inflight[ref] = (what, slot, index)  # lost() drops it with the slot's other calls
                lost(slot)
                return None
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                where = f"shard {index}/{n_shards}" if index else "starting a worker"
                if isinstance(cause, F2DBenchError):
                    raise F2DBenchError(f"{where} on a Ray worker: {cause}") from None
                raise

        in_images = kind in ("generate", "score")
        work_start = None

        def note_ready(slot: int, info: dict) -> None:
            nonlocal bar, work_start
            ready.add(slot)
            if on_worker is not None:
                on_worker({**info, "slot": slot})
            if bar is None:  # the first worker is ready: the work starts
                summary.ready_seconds = time.perf_counter() - t0 - init_s
                bar = tqdm(total=expected if in_images else n_shards,
                           unit="img" if in_images else "shard", disable=not progress, dynamic_ncols=True,
                           desc=f"{kind} on {n_workers} {summary.worker_kind} workers")
                bar.update(min(counter.count(), expected) if kind == "generate" else 0)
                work_start = time.perf_counter()

        try:
            if progress:
                print(f"{kind}: starting {n_workers} {summary.worker_kind} workers for {n_shards} shards "
                      f"(Ray started in {init_s:.1f} s)", file=sys.stderr, flush=True)
            for slot in range(n_workers):
                start(slot)
            # Each worker takes shards as soon as it is ready: one the cluster cannot place yet (its GPUs
            # busy) holds nothing up.
            while pending or any(what == "run" for what, _, _ in inflight.values()):
                for slot in list(actors):
                    if slot in ready and busy.get(slot) is None and pending:
                        submit(slot)
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in done:
                    got = collect(ref)
                    if got is None:
                        continue
                    what, slot, index, result = got
                    if what == "ready":
                        note_ready(slot, result)
                        continue
                    busy[slot] = None
                    summary.notes += [n for n in result["notes"] if n not in summary.notes]
                    if kind == "tune":
                        for mid, label, owned, now in result["methods"]:
                            row = summary.tuned.setdefault(mid, [label, 0, 0])
                            row[1] += owned
                            row[2] += now
                        bar.update(1)
                    elif kind == "score":
                        summary.scored += result["images"]
                        for name, n in result["computed"].items():
                            summary.computed[name] = summary.computed.get(name, 0) + n
                        bar.update(result["images"])
                    else:
                        summary.written += result["written"]
                        summary.skipped += result["skipped"]
                if kind == "generate" and bar is not None:
                    bar.update(min(counter.count(), expected) - bar.n)
            summary.work_seconds = time.perf_counter() - work_start if work_start is not None else 0.0
        finally:
            if bar is not None:
                bar.close()
            for actor in actors.values():
                try:
                    ray.kill(actor)
                except Exception:
                    pass
        if kind == "score":
            from f2d_bench.scoring import score_run

            # The whole run once: what a lost shard left missing, FID per method, records.parquet.
            scoring, note = assembly_scoring(config.scoring)
            if note:
                summary.notes.append(note)
            summary.score = score_run(run_dir, scorers=scorers, scoring=scoring, progress=progress,
                                      computed=summary.computed)
        if kind == "generate":
            rows = RunDir(run_dir).status()
            summary.expected = sum(r.expected for r in rows)
            summary.done = sum(r.done for r in rows)
        return summary
    finally:
        if started:
            ray.shutdown()
