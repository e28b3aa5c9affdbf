"""``generate --score``: every image scored while the next ones render, from the pixels just written.

The generation loop *settles* each key of its shard as its image is on disk (or exists already, or the
method skipped it), handing over the RGB image it wrote. A scoring thread walks the shard's keys in
grid order, one method's face at a time: once every key of that face is settled, it hashes the files
and gives the images to the same :class:`~.walk.StageWalk` a ``score`` run uses, in the same order, so
the scorers see the same batches and fill the same caches with the same values. The caches stay the one
source of truth: when generation ends, the rest of ``score`` runs as usual (computing nothing that is
cached) and writes ``records.parquet``.

A prompt image's values are keyed by its reference image (dCLIP needs it). Unsharded, a face's reference
images are among its own keys. Sharded, most of them belong to other shards: an image whose reference
is not on disk yet is left to the end of this shard (by then the other shards usually have it), else
to the assembly, as in ``score --shard``.

Two things are process-wide, not per thread, and are settled before the scoring thread starts:
- CUDA's TF32 switches. They are held at the scoring's setting for the whole generate (``score`` runs
  the face stage and FID under the same setting), so no scorer's precision scope changes them under the
  generation's feet; scorers that disagree on TF32 are refused. The protocol's fp16 models do not use
  TF32; the float32 parts of a generation (an identity encoder, tuning inside generate) then compute as
  the scorers do (exact float32 by default), which on CUDA may differ from a plain generate within
  float noise.
- torch's global RNG, which seeded random-weight builds use: every model of the session is loaded
  first, so the scoring thread draws no random numbers while a method builds its own.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.grid import ItemKey, Shard
from f2d_bench.scoring.inputs import ImageEntry, image_entry, run_images
from f2d_bench.scoring.score import ScoreSession, ScoreSummary
from f2d_bench.scoring.walk import StageWalk

#: Written images held in memory for the scoring thread at most (about 0.8 MB each at 512x512); when it
#: falls further behind, it reads the later ones back from their files (the same pixels).
MAX_HELD = 512


class LiveScore:
    """The scoring side of one generate of ``shard`` of ``session``'s run (see the module docstring).

    Holds the shard's score lock from construction to :meth:`finish` or :meth:`abort`.
    """

    def __init__(self, session: ScoreSession, shard: Shard):
        self.session, self.shard = session, shard
        self.ref_id = session.prompt_set.reference.id
        keys = [k for k in session.run.keys() if shard.owns(k)]
        self.groups = [list(g) for _, g in itertools.groupby(keys, key=lambda k: (k.method_id, k.face_id))]
        self._cond = threading.Condition()
        self._settled: set[ItemKey] = set()
        self._pixels: dict[ItemKey, object] = {}
        self._stop = False  # generation is over: score the groups settled by now, then end
        self._abort = False  # generation failed: end before the next group
        self._error: BaseException | None = None
        self._start = time.perf_counter()
        self._held = contextlib.ExitStack()
        self._held.enter_context(session._lock(shard.tag, wait=False))
        try:
            self._held.enter_context(_tf32_held(session))
            session.load_models()
            session._remove_temporary(shard.tag)
            self.walk = StageWalk(session, shard.tag)
        except BaseException:
            self._held.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="f2d-live-score", daemon=True)
        self._thread.start()

    def settle(self, key: ItemKey, image=None) -> None:
        """``key`` will not change in this generate: its image is on disk (``image``: the RGB image just
        written there, if any), or it was skipped."""
        with self._cond:
            self._settled.add(key)
            if image is not None and len(self._pixels) < MAX_HELD:
                self._pixels[key] = image
            self._cond.notify()

    def check(self) -> None:
        """Raise the error that stopped the scoring thread, if any (the generation loop asks before each
        batch, so a broken scorer stops the run early)."""
        err = self._error
        if err is None:
            return
        detail = str(err) if isinstance(err, F2DBenchError) else f"{type(err).__name__}: {err}"
        raise F2DBenchError(f"scoring while generating stopped: {detail}. The images written so far are kept; "
                            f"fix the cause and run the same command again, or generate without --score "
                            f"and run f2d-bench score {self.session.run.root} afterwards") from err

    def _loop(self) -> None:
        try:
            for group in self.groups:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or self._settled.issuperset(group))
                    if self._abort or not self._settled.issuperset(group):
                        return  # stopped: the rest is left to the end pass (or a later score)
                    pixels = {k: self._pixels.pop(k) for k in group if k in self._pixels}
                self._score(group, pixels)
        except BaseException as exc:  # reported to the generation thread by check()
            self._error = exc

    def _waits(self, e: ImageEntry, known) -> bool:
        """Whether ``e``'s reference image belongs to another shard and is not on disk yet."""
        rk = e.reference_key
        return rk is not None and not self.shard.owns(rk) and rk not in known

    def _score(self, group: list[ItemKey], pixels: dict) -> None:
        run, walk = self.session.run, self.walk
        entries = [e for e in (image_entry(run, k, self.ref_id) for k in group) if e is not None]
        # Other shards' reference images that are on disk now; images waiting for the others are left to
        # the end of this shard, or to the assembly.
        others = {e.reference_key for e in entries if e.reference_key and not self.shard.owns(e.reference_key)}
        refs = [r for r in (image_entry(run, rk, self.ref_id) for rk in others) if r is not None]
        known = {r.key for r in refs}
        owned = [e for e in entries if not self._waits(e, known)]
        walk.know(owned + refs, owned)
        for e in owned:
            if e.key in pixels:
                walk.decoder.put(e.path, pixels[e.key])
        walk.step(owned)

    def _join(self, *, abort: bool = False) -> None:
        with self._cond:
            self._stop = True
            self._abort = abort
            self._cond.notify_all()
        self._thread.join()

    def finish(self) -> ScoreSummary | None:
        """Once generation is done: wait for the thread, score what is left and, unsharded (or when
        this shard completes the set of N), write records.parquet. Releases the lock. None when the run
        has no image at all (every one skipped): there is nothing to score."""
        session, shard = self.session, self.shard
        try:
            self._join()
            self.walk.close(finished=self._error is None)
            self.check()
            live = dict(self.walk.computed)
            if not any(session.run.store.has_image(k) for k in session.run.keys()):
                return None
            if shard.count == 1:
                summary = session._assemble(computed=live)
            else:
                entries = run_images(session.run, shard)
                known = {e.key for e in entries}
                owned = [e for e in entries if shard.owns(e.key) and not self._waits(e, known)]
                _, _, computed = session._compute(entries, owned, shard.tag)
                work = {"shard": shard.tag, "images": sum(shard.owns(e.key) for e in entries),
                        "computed": {n: live.get(n, 0) + computed.get(n, 0) for n in computed},
                        "seconds": time.perf_counter() - self._start}
        finally:
            self._held.close()
        if shard.count > 1:
            summary = session.finish_shard(shard, work)
        summary.seconds = time.perf_counter() - self._start
        return summary

    def abort(self) -> None:
        """Generation failed: stop the thread after the group it is scoring (the whole chunks it wrote stay
        cached; the groups not begun are left to a later score, so a Ctrl-C or an error ends the run
        promptly however far the scoring lags), release the lock."""
        try:
            self._join(abort=True)
            self.walk.close(finished=False)
        finally:
            self._held.close()


@contextlib.contextmanager
def _tf32_held(session: ScoreSession):
    """Hold CUDA's TF32 switches at the scorers' setting (see the module docstring); restored on exit."""
    from f2d_bench.scorers.base import tf32_scope

    active = [s for s in session.scorer_objs if s.name in session.names]
    wanted = {s.precision == "tf32" for s in active} | {session.scoring.precision == "tf32"}
    if len(wanted) > 1:
        raise ConfigError("generate --score: the scoring's precisions disagree on TF32 (scoring.precision: "
                          f"{session.scoring.precision}, "
                          + ", ".join(f"{s.name}: {s.precision}" for s in active)
                          + "), a process-wide switch that would flip under the generation; give them one "
                          "TF32 setting, or score after generating")
    with tf32_scope(wanted == {True}):
        yield
