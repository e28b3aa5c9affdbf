"""The generation engine: the grid of every method, batched, resumable and shardable.

For each method the engine lists the keys its shard owns in canonical order (face, prompt, seed), cuts
them into fixed batches, skips batches whose images all exist, calls ``prepare`` once per face and
``generate`` once per batch with one seeded CPU generator per image, and writes each new image
atomically. Running the same command again continues where a killed run stopped. With ``compile``
(``generate --compile``) the UNet and VAE decoder are compiled and every pipeline call is padded to the
batch size (padding requests whose images are discarded), so no shape is compiled twice.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from f2d_bench.config import MethodConfig, ModelConfig, RunConfig
from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.faces.faceset import Face
from f2d_bench.faces.source import resolve_face_set
from f2d_bench.files import exclusive_lock
from f2d_bench.grid import UNSHARDED, ItemKey, Shard, fixed_batches, grid_keys
from f2d_bench.methods import METHODS
from f2d_bench.methods.base import GenerationRequest, Method, MethodContext, Skipped, check_method_name
from f2d_bench.prompts import PromptSet, load_prompt_set
from f2d_bench.run_dir import RunDir
from f2d_bench.store import BackgroundWriter
from f2d_bench.runinfo import environment, utc_now
from f2d_bench.tuning.artifacts import TunedFaces
from f2d_bench.tuning.stage import non_square_note, tuned_prepared


@dataclass
class MethodProgress:
    method_id: str
    label: str
    expected: int  # images this shard owns
    done: int = 0
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    problems: list[str] = field(default_factory=list)


@dataclass
class GenerationSummary:
    run_dir: Path
    shard: Shard
    methods: list[MethodProgress]
    seconds: float
    compile: bool = False  # the UNet and VAE decoder ran compiled (generate --compile)
    score: Any = None  # generate --score: the ScoreSummary of the images scored while generating

    @property
    def written(self) -> int:
        return sum(m.written for m in self.methods)

    @property
    def complete(self) -> bool:
        return all(m.done == m.expected for m in self.methods)

    def text(self) -> str:
        lines = [f"run {self.run_dir} (shard {self.shard.index}/{self.shard.count})"]
        if self.compile:
            lines.append("  torch.compile: UNet and VAE decoder, every call padded to the batch size")
        for m in self.methods:
            lines.append(f"  {m.label} [{m.method_id}]: {m.done}/{m.expected} images, {m.written} new")
            for reason in m.problems[:10]:
                lines.append(f"    note: {reason}")
            for key, reason in m.skipped[:10]:
                lines.append(f"    not generated {key}: {reason}")
            if len(m.skipped) > 10:
                lines.append(f"    ... and {len(m.skipped) - 10} more not generated")
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"  {self.written} images written in {self.seconds:.1f} s ({rate:.2f} images/s)")
        if self.score is not None:
            lines.append(self.score.text())
        return "\n".join(lines)


class PipelineProvider:
    """Loads each base model on first use and shares it between the methods that render with it.

    One model (its id and revision) is loaded once; methods that need another scheduler get a pipeline
    sharing the same modules (``with_scheduler``). ``loader``: a callable returning a ready pipeline for
    the run's own ``model`` (benchmarks, Ray workers and tests pass one); other base models always load
    through ``load_sd_pipeline``. ``compile``: compile each model's UNet and VAE decoder once loaded
    (``f2d_bench.pipelines.compile``; ``use_compile`` turns it on later).
    """

    def __init__(self, config: RunConfig, loader: Callable[[], Any] | None = None, compile: bool = False):
        self._config = config
        self._loader = loader
        self.compile = False
        self._models: dict[tuple, Any] = {}  # (pretrained, revision) -> the pipeline loaded first
        self._pipes: dict[tuple, Any] = {}   # (pretrained, revision, scheduler) -> pipeline
        if compile:
            self.use_compile()

    def use_compile(self) -> None:
        """Compile the models loaded so far and every one loaded later (the scheduler views share them)."""
        from f2d_bench.pipelines.compile import compile_pipeline

        self.compile = True
        for pipe in self._models.values():
            compile_pipeline(pipe)

    def __call__(self):
        """The run's own base pipeline with the run's scheduler."""
        return self.get(self._config.model, self._config.sampling.scheduler)

    def get(self, model: ModelConfig, scheduler: str):
        from f2d_bench.pipelines.loading import load_sd_pipeline, with_scheduler

        key = (model.pretrained, model.revision)
        if (*key, scheduler) in self._pipes:
            return self._pipes[(*key, scheduler)]
        if key not in self._models:
            run_model = self._config.model
            if self._loader is not None and key == (run_model.pretrained, run_model.revision):
                self._models[key] = self._loader()
            else:
                self._models[key] = load_sd_pipeline(model.pretrained, revision=model.revision, dtype=model.dtype,
                                                     device=model.device, scheduler=scheduler)
            if self.compile:
                from f2d_bench.pipelines.compile import compile_pipeline

                compile_pipeline(self._models[key])
        pipe = self._models[key]
        if type(pipe.scheduler).__name__ != scheduler:
            pipe = with_scheduler(pipe, scheduler)
        self._pipes[(*key, scheduler)] = pipe
        return pipe

    def loaded(self) -> int:
        """Number of distinct base models loaded so far."""
        return len(self._models)


def method_context(config: RunConfig, prompt_set: PromptSet, mc: MethodConfig, cls: type[Method],
                   provider: PipelineProvider) -> MethodContext:
    """The context of one configured method: its base model, its sampling, and its pipeline."""
    model = mc.base_model(config.model)
    sampling = config.sampling
    if mc.sampling == "native":
        if not cls.native_sampling:
            raise ConfigError(f"sampling: native, but method {mc.name} has no native sampling of its own; "
                              "use sampling: protocol")
        sampling = sampling.replace(**cls.native_sampling)
    return MethodContext(config=config, prompt_set=prompt_set, model=model, sampling=sampling,
                         sampling_mode=mc.sampling, pipeline=lambda: provider.get(model, sampling.scheduler))


def build_methods(config: RunConfig, prompt_set: PromptSet, pipeline=None, *, compile: bool = False) -> list[Method]:
    """Instantiate the config's methods; two entries with the same settings are an error.

    ``pipeline``: a PipelineProvider to share, or a callable returning the run's base pipeline;
    ``compile``: render with compiled UNets and VAE decoders (PipelineProvider).
    """
    provider = pipeline if isinstance(pipeline, PipelineProvider) else PipelineProvider(config, pipeline)
    if compile and not provider.compile:
        provider.use_compile()
    methods: list[Method] = []
    seen: dict[str, int] = {}
    for i, mc in enumerate(config.methods):
        check_method_name(mc.name)
        cls = METHODS.load(mc.name)
        try:
            method = cls(mc.params, method_context(config, prompt_set, mc, cls, provider))
        except ConfigError as exc:
            raise ConfigError(f"methods[{i}] ({mc.name}): {exc}") from None
        method.label = mc.display_name
        if method.method_id in seen:
            raise ConfigError(
                f"methods[{i}] has the same settings as methods[{seen[method.method_id]}] "
                f"({method.method_id}); remove one"
            )
        seen[method.method_id] = i
        methods.append(method)
    return methods


def base_model_notes(method: Method) -> list[str]:
    """A note when a method renders on another base model than the one it was released on."""
    released, used = method.released_base, method.context.model.pretrained
    if method.uses_pipeline and released and used != released:
        return [f"released on {released}; this run renders it on {used} (methods[].base sets another)"]
    return []


@dataclass
class OpenedRun:
    """A run directory with everything its config names resolved and loaded."""

    run: RunDir
    prompt_set: PromptSet
    faces: list[Face]
    methods: list[Method]
    #: per method id, what its preflight reported (empty where it was not run)
    preflight: dict[str, list[str]] = field(default_factory=dict)


def open_run(config: RunConfig, run_dir: str | Path, *, shard: Shard, pipeline=None,
             compile: bool = False, preflight: bool = True) -> OpenedRun:
    """Resolve prompts, faces, scorers, methods and the model, then create or open ``run_dir``.

    Everything is resolved before the run directory is created: a start that fails on a missing model,
    face set or a misspelled name leaves nothing behind that would block the corrected config. So does
    ``preflight`` (each method's :meth:`~Method.preflight`, which loads its weights: a corrupt checkpoint).
    ``compile`` is recorded in the run's environment record (it changes float rounding, not the method ids).
    """
    from f2d_bench.scorers import DEFAULT_SCORERS, check_scoring

    prompt_set = load_prompt_set(config.prompts)
    faces = resolve_face_set(config.faces)
    check_scoring(config.scoring.scorers or DEFAULT_SCORERS, config.scoring.settings)
    methods = build_methods(config, prompt_set, pipeline, compile=compile)
    rendering: dict[str, str] = {}
    for method in methods:
        if method.uses_pipeline:
            pipe = method.context.pipeline()  # loads each base model (once) before the run directory exists
            rendering = rendering or {"device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch.")}
    face_ids, prompt_ids = [f.face_id for f in faces], [p.id for p in prompt_set.all_prompts()]
    problems = {m.method_id: m.preflight(face_ids, prompt_ids, config.seeds) for m in methods} if preflight else {}
    check_input_faces([m for m in methods if preflight or m.tunes], faces)
    check_tuning_space([m for m in methods if m.tunes], faces, Path(run_dir))
    run = RunDir.create_or_open(run_dir, config, faces, prompt_set, methods)
    # Check and record as one step: two shards starting at once would each pass the check before
    # the other's record exists.
    with exclusive_lock(run.environment_lock):
        check_rendering(run, rendering)
        run.record_environment({"writer": shard.tag, **environment(compile=compile),
                                **({"rendering": rendering} if rendering else {})})
    for method in methods:
        method.shared_dir = run.method_shared_dir(method.method_id)
    return OpenedRun(run, prompt_set, faces, methods, problems)


def check_input_faces(methods: list[Method], faces: list[Face]) -> None:
    """Refuse a face set with photos that some method finds no face in, naming every one of them: found
    at its face instead, hours into a run, the fix (a corrected face set) would no longer fit the run."""
    lines, photos = [], set()
    for method in methods:
        for face in method.faceless(faces):
            lines.append(f"  {face.path} (face {face.face_id}): no face for {method.label} ({method.face_need})")
            photos.add(face.path)
    if lines:
        raise F2DBenchError("no face detected in {} photo(s) of the face set:\n{}\nReplace those images or "
                            "remove them from the face set (`f2d-bench faces prepare` keeps only photos with a "
                            "face), then run again; nothing was written".format(len(photos), "\n".join(lines)))


def check_tuning_space(methods: list[Method], faces: list[Face], run_dir: Path) -> None:
    """Refuse a run whose tuning weights would not fit on its disk: for each method with large artifacts
    (:meth:`~Method.artifact_bytes`), every face of the run still to tune (all shards write to one disk),
    or one face at a time for a method that deletes each face's weights after rendering it."""
    import shutil

    from f2d_bench.tuning.artifacts import TunedFaces

    need, lines = 0, []
    run = RunDir(run_dir)
    for method in methods:
        per_face = method.artifact_bytes()
        if not per_face:
            continue
        tuned = TunedFaces(run, method.method_id)
        todo = [f for f in faces if tuned.record(f.face_id) is None]  # tune.json only: no hashing of weights
        if not todo:
            continue
        kept = len(todo) if method.keeps_weights() else 1
        need += per_face * kept
        lines.append(f"{method.label}: {_size(per_face)} per face x {kept} face(s)"
                     + ("" if method.keeps_weights() else " (its weights are deleted after each face)"))
    if not lines:
        return
    existing = next(p for p in (run_dir, *run_dir.resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise F2DBenchError(
            f"the tuned weights of this run need {_size(need)} and {existing} has {_size(free)} free "
            f"({'; '.join(lines)}). Free space or use a larger disk for --out, or set keep_weights: false on "
            "the method (each face is rendered right after tuning and its weights deleted); nothing was written")


def _size(n: float) -> str:
    """Bytes as GB (or MB below 1 GB), for messages."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_rendering(run: RunDir, rendering: dict[str, str]) -> None:
    """Refuse to add images in another weight dtype than the run's earlier writers rendered in.

    ``model.dtype: auto`` is float16 on CUDA and float32 on the CPU, and the grid hash leaves the device
    out, so this is where a shard on a CPU node would otherwise mix float32 images into a float16 run.
    Another device with the same dtype only changes rounding and is fine. ``rendering``: this process's
    ``{"device", "dtype"}``, empty when no method renders with a pipeline.
    """
    if not rendering:
        return
    for earlier in run.environment():
        seen = earlier.get("rendering") or {}
        if seen.get("dtype") not in (None, rendering["dtype"]):
            raise F2DBenchError(
                f"{run.root} holds images rendered in {seen['dtype']} (by {earlier.get('writer')} on "
                f"{seen.get('device')}, {earlier.get('time')}); this process would render in "
                f"{rendering['dtype']} on {rendering['device']}, and the two would mix in one run. Continue the "
                f"run on a device where model.dtype resolves to {seen['dtype']} as before, or use another --out."
            )


def generate_run(
    config: RunConfig, run_dir: str | Path, *, shard: Shard = UNSHARDED, progress: bool = True,
    pipeline: Callable[[], Any] | None = None, compile: bool = False, score: bool = False,
) -> GenerationSummary:
    """Generate (or complete) the grid of ``config`` in ``run_dir``. Safe to re-run and to kill.

    Tuning methods tune each face (once per run) before its first image. ``pipeline`` replaces the
    loading of ``config.model`` by a callable returning a ready pipeline (benchmarks pass full-size
    random-weight components this way). ``compile``: torch.compile the UNet and VAE decoder, with every
    pipeline call padded to ``config.batch_size`` (images within float noise of eager ones). ``score``:
    score each image while the next ones render, with ``config.scoring`` (:mod:`f2d_bench.scoring.live`);
    the summary's ``score`` then holds what ``score`` would have printed.
    """
    start = time.perf_counter()
    opened = open_run(config, run_dir, shard=shard, pipeline=pipeline, compile=compile)
    live = _live_score(run_dir, config, shard, progress) if score else None
    try:
        results = _generate_methods(opened, config, shard, progress, compile, live)
    except BaseException:
        if live is not None:
            live.abort()
        raise
    scored = live.finish() if live is not None else None
    return GenerationSummary(Path(run_dir), shard, results, time.perf_counter() - start, compile=compile,
                             score=scored)


def _live_score(run_dir, config: RunConfig, shard: Shard, progress: bool):
    """The scoring side of ``generate --score``, its scorers loaded before the first image renders."""
    from f2d_bench.scoring.live import LiveScore
    from f2d_bench.scoring.score import ScoreSession

    session = ScoreSession(run_dir, scoring=config.scoring, progress=progress, require_images=False)
    return LiveScore(session, shard)


def _generate_methods(opened: OpenedRun, config: RunConfig, shard: Shard, progress: bool, compile: bool,
                      live) -> list[MethodProgress]:
    run, prompt_set, faces = opened.run, opened.prompt_set, opened.faces
    face_ids = [f.face_id for f in faces]
    prompt_ids = [p.id for p in prompt_set.all_prompts()]
    config_hash = run.read_grid()["config_hash"]  # a run made by an earlier version keeps its own
    results: list[MethodProgress] = []
    with run.store.writer_lock(shard.tag):
        run.store.check_layouts(shard.tag)
        for method in opened.methods:
            mid = method.method_id
            keys = [k for k in grid_keys([mid], face_ids, prompt_ids, config.seeds) if shard.owns(k)]
            repaired = run.store.reconcile(keys, writer=shard.tag, config_hash=config_hash)
            prog = MethodProgress(mid, method.label, expected=len(keys))
            prog.problems = base_model_notes(method) + opened.preflight.get(mid, [])
            if method.tunes and (note := non_square_note(faces, method.label)):
                prog.problems.append(note)
            if repaired["damaged_removed"]:
                prog.problems.append(f"{repaired['damaged_removed']} damaged image(s) removed and generated again")
            _run_method(method, keys, faces, prompt_set, run, config, shard, config_hash, prog, progress,
                        pad=compile and method.uses_pipeline, live=live)
            prog.done = sum(run.store.has_image(k) for k in keys)
            results.append(prog)
    return results


@dataclass
class TuneSummary:
    run_dir: Path
    shard: Shard
    #: per tuning method: (method_id, label, faces this shard owns, faces tuned now)
    methods: list[tuple[str, str, int, int]]
    notes: list[str]
    seconds: float

    def text(self) -> str:
        lines = [f"run {self.run_dir} (tune, shard {self.shard.index}/{self.shard.count}, split by face)"]
        for mid, label, owned, now in self.methods:
            lines.append(f"  {label} [{mid}]: {owned}/{owned} faces tuned, {now} now")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  {self.seconds:.1f} s")
        return "\n".join(lines)


def tune_run(
    config: RunConfig, run_dir: str | Path, *, shard: Shard = UNSHARDED, progress: bool = True,
    pipeline: Callable[[], Any] | None = None,
) -> TuneSummary:
    """Tune every face this shard owns (split by face id) for every tuning method of ``config``.

    Safe to re-run and to kill: finished faces are kept, an unfinished face starts again. Methods that
    drop their weights after rendering (``keeps_weights()`` false) are left to ``generate``.
    """
    from tqdm.auto import tqdm

    from f2d_bench.tuning.stage import ensure_tuned

    start = time.perf_counter()
    opened = open_run(config, run_dir, shard=shard, pipeline=pipeline, preflight=False)  # generate's checks
    owned = [f for f in opened.faces if shard.owns_face(f.face_id)]
    rows, notes = [], []
    for method in opened.methods:
        if not method.tunes:
            continue
        if not method.keeps_weights():
            notes.append(f"{method.label} renders each face right after tuning it and deletes the weights: "
                         "`generate` tunes it")
            continue
        if note := non_square_note(owned, method.label):
            notes.append(note)
        now = 0
        for face in tqdm(owned, unit="face", desc=f"tune {method.label}", disable=not progress, dynamic_ncols=True):
            _, tuned_now = ensure_tuned(method, face, opened.run, f"tune-{shard.tag}")
            now += tuned_now
        rows.append((method.method_id, method.label, len(owned), now))
    if not any(m.tunes for m in opened.methods):
        notes.append("no method of this config tunes per face; nothing to do")
    return TuneSummary(Path(run_dir), shard, rows, notes, time.perf_counter() - start)


def _run_method(
    method: Method, keys: list[ItemKey], faces: list[Face], prompt_set: PromptSet, run: "RunDir",
    config: RunConfig, shard: Shard, config_hash: str, prog: MethodProgress, progress: bool, *, pad: bool = False,
    live=None,
) -> None:
    """Render and write the missing images of ``keys``. ``pad``: fill every call up to the batch size with
    copies of its last request (same key, a fresh generator), whose images are discarded. ``live``: a
    LiveScore told of each key once its image is final (written, existing or skipped)."""
    import torch
    from tqdm.auto import tqdm

    store = run.store
    face_by_id = {f.face_id: f for f in faces}
    batches = [b for b in fixed_batches(keys, config.batch_size) if not all(map(store.has_image, b))]
    missing = sum(not store.has_image(k) for b in batches for k in b)
    prepared: dict[str, Any] = {}
    bar = tqdm(total=missing, unit="img", desc=method.label, disable=not progress or missing == 0,
               dynamic_ncols=True)
    writer = BackgroundWriter(store)  # PNGs are written while the next batch renders
    settle = live.settle if live is not None else lambda key, image=None: None
    for key in keys:
        if store.has_image(key):
            settle(key)
    try:
        for batch in batches:
            if live is not None:
                live.check()
            if method.tunes and not method.keeps_weights():
                # Such a method renders each face in a pipeline call of its own (see Method.keeps_weights):
                # leaving out the faces whose images all exist changes no pixel and spares re-tuning them.
                incomplete = {k.face_id for k in batch if not store.has_image(k)}
                batch = [k for k in batch if k.face_id in incomplete]
            # Batches are ordered by face: keep only the faces this batch needs.
            needed = {k.face_id for k in batch}
            for fid in sorted(set(prepared) - needed):
                _done_with_face(method, run, fid)
            prepared = {fid: v for fid, v in prepared.items() if fid in needed}
            for fid in sorted(needed - set(prepared)):
                if method.tunes:
                    prepared[fid] = tuned_prepared(method, face_by_id[fid], run, shard.tag)
                    continue
                t0 = time.perf_counter()
                prepared[fid] = method.prepare(face_by_id[fid])
                if method.encodes_faces:
                    run.record_prepare_time(
                        method.method_id,
                        {"face_id": fid, "seconds": time.perf_counter() - t0, "writer": shard.tag, "time": utc_now()},
                    )
            requests = [
                GenerationRequest(
                    key=k, prompt=prompt_set.by_id(k.prompt_id), face=face_by_id[k.face_id],
                    prepared=prepared[k.face_id],
                    # Seeded from the key's seed alone: every method and prompt starts from the same noise
                    # for the same seed (the protocol's seeds; the official scripts differ among themselves).
                    generator=torch.Generator("cpu").manual_seed(k.seed),
                )
                for k in batch
            ]
            if pad:  # static shapes for compiled modules: the last, smaller batch and filtered ones too
                last = requests[-1]
                requests += [dataclasses.replace(last, generator=torch.Generator("cpu").manual_seed(last.key.seed))
                             for _ in range(config.batch_size - len(requests))]
            images = method.generate(requests)
            if len(images) != len(requests):
                raise RuntimeError(f"method {method.name} returned {len(images)} images for {len(requests)} requests")
            images = images[: len(batch)]  # the padding's images are never written
            now = utc_now()
            for key, image in zip(batch, images):
                if store.has_image(key):  # a resumed, partly finished batch: keep what exists
                    continue
                if isinstance(image, Skipped):
                    prog.skipped.append((key.as_string(), image.reason))
                    settle(key)
                elif not isinstance(image, Image.Image):
                    raise RuntimeError(f"method {method.name} returned {type(image).__name__} for {key.as_string()}")
                else:
                    rgb = image.convert("RGB")

                    def done(key=key, rgb=rgb):
                        bar.update(1)
                        settle(key, rgb)

                    writer.submit(key, rgb, config_hash=config_hash, batch_size=len(batch),
                                  writer=shard.tag, written_at=now, on_done=done)
                    prog.written += 1
                    continue
                bar.update(1)
            if method.tunes and not method.keeps_weights():
                writer.flush()  # a face's weights go only once its images are on disk
        writer.flush()
        for fid in sorted(prepared):
            _done_with_face(method, run, fid)
    finally:
        writer.close()
        bar.close()


def _done_with_face(method: Method, run: RunDir, face_id: str) -> None:
    """A method that keeps no weights per face deletes them once every image of the face is on disk.

    Every image of the run, not only this shard's: the other shards of a ``--shard`` run render the same
    face's other images from the same weights (deleting them here would make each shard tune the face
    again, or pull them from under a shard that is rendering)."""
    if method.tunes and not method.keeps_weights():
        if all(run.store.has_image(k) for k in run.keys(method.method_id) if k.face_id == face_id):
            TunedFaces(run, method.method_id).drop_weights(face_id)
