"""One walk of a run's images through every scoring stage, block by block, each image decoded once.

A walk takes blocks of the images it owns, in grid order, and gives each image to the face stage, to
every scorer whose cache lacks it and to the FID features. Scorers queue their items across blocks and
score them ``batch_size`` at a time, so a scorer sees the same batches however the images are cut into
blocks (``score`` cuts the whole run into blocks of ``scoring.block_size``; ``generate --score`` hands
over one method's face at a time as it is written): the values are the same either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from f2d_bench.errors import F2DBenchError
from f2d_bench.faces.imageio import read_image
from f2d_bench.scoring.decode import ImageDecoder
from f2d_bench.scoring.faces import FaceStage, detection_from_row
from f2d_bench.scoring.fid import FidStage
from f2d_bench.scoring.inputs import ImageEntry


class StageWalk:
    """The stages of one ScoreSession, open for one writer (``writer``: the shard tag of new chunks).

    ``know`` adds images the walk may look up as references (and which of them it owns); ``step``
    scores one block of owned images; ``close`` writes what is queued and returns the face rows.
    """

    def __init__(self, session, writer: str, *, progress: bool = False, total: int = 0):
        self.session = s = session
        self.by_key: dict = {}
        self.owned_keys: set = set()
        self.faces = FaceStage(s.run, s.scoring, s.detector, writer=writer)
        self.decoder = ImageDecoder(s.scoring.resolved_workers())
        self.cached = {sc.name: s._cached(sc, self.reference, writer) for sc in s.scorer_objs if sc.name in s.names}
        self.have = {name: c.cache.keys() for name, c in self.cached.items()}  # kept scorers: cache only
        self.batchers = {name: c.batcher(s.scoring.batch_size, s.scoring.chunk_size)
                         for name, c in self.cached.items()}
        self.computed = dict.fromkeys(self.cached, 0)
        self.fid = FidStage(s.run, s.scoring, s._fid(), writer=writer) if s.scoring.fid_reference else None
        s.context.read_image = self.decoder.get  # dCLIP's reference images come from the same decodes
        self.ref_id = s.prompt_set.reference.id
        self.bar = s._bar([None] * total, "score") if progress else None

    def know(self, entries: Iterable[ImageEntry], owned: Iterable[ImageEntry] = ()) -> None:
        """Images the walk may meet as references; ``owned``: those whose values this walk computes."""
        self.by_key.update((e.key, e) for e in entries)
        self.owned_keys.update(e.key for e in owned)

    def readable(self, e: ImageEntry) -> bool:
        """The face stage's verdict, or (for a reference image whose row is not there yet) the same
        test, decoding the file (kept when the walk owns it: its own block will need it)."""
        import pandas as pd

        row = self.faces.row(e.sha256)
        if row is not None:
            return bool(pd.isna(row["error"]))
        can_read = self.session._can_read
        if e.sha256 not in can_read:
            try:
                self.decoder.get(e.path)
                can_read[e.sha256] = True
            except F2DBenchError:
                can_read[e.sha256] = False
            if e.key not in self.owned_keys:
                self.decoder.release([e.path])
        return can_read[e.sha256]

    def reference(self, e: ImageEntry) -> ImageEntry | None:
        """The same method's reference image for this face and seed, if it exists and is readable."""
        ref = self.by_key.get(e.reference_key) if e.reference_key else None
        return ref if ref is not None and self.readable(ref) else None

    def _item(self, e: ImageEntry):
        from f2d_bench.scorers.base import ScoreItem

        s, ref = self.session, self.reference(e)
        return ScoreItem(key=e.key, image=self.decoder.get(e.path), prompt=s.prompt_set.by_id(e.key.prompt_id),
                         face=s.faces[e.key.face_id], reference_path=ref.path if ref else None,
                         detection=detection_from_row(self.faces.row(e.sha256)))

    def wanted(self, block: Sequence[ImageEntry]) -> list[Path]:
        """The images of ``block`` that some stage still needs."""
        faces, fid = self.faces, self.fid
        return [e.path for e in block if faces.row(e.sha256) is None or (self.readable(e) and (
            (fid is not None and fid.wants(e))
            or any(c.cache_key(e) not in self.have[n] for n, c in self.cached.items())))]

    def prefetch(self, block: Sequence[ImageEntry]) -> None:
        """Start decoding the images of ``block`` that some stage needs (in the decoding threads)."""
        self.decoder.load(self.wanted(block))

    def step(self, block: Sequence[ImageEntry], following: Sequence[ImageEntry] = ()) -> None:
        """Score the owned images of ``block``; ``following``: the next block, decoded meanwhile."""
        faces, decoder, by_key = self.faces, self.decoder, self.by_key
        new_faces = faces.todo(block)
        # Reference images of later blocks (or other shards) whose verdict a cache key needs now.
        new_keys = {e.key for e in new_faces}
        refs = {e.reference_key: by_key[e.reference_key] for e in block if e.reference_key in by_key}
        unknown = [r for r in refs.values() if faces.row(r.sha256) is None
                   and r.sha256 not in self.session._can_read and r.key not in new_keys]
        decoder.load([e.path for e in new_faces] + [r.path for r in unknown])
        for e in new_faces:
            faces.add(e, decoder.get)
        ok = [e for e in block if self.readable(e)]
        todo = {name: [e for e in ok if c.cache_key(e) not in self.have[name]] for name, c in self.cached.items()}
        fid_todo = self.fid.todo(block) if self.fid else []
        if following:
            self.prefetch(following)  # decodes in the workers while the models run
        for name, t in todo.items():
            self.computed[name] += len(t)
            for e in t:
                self.batchers[name].add(e, self._item(e))
        for e in fid_todo:
            self.fid.add(e, decoder.get)
        if self.bar is not None:
            self.bar.update(len(block))
        # Held on: the next block's images (decoding now) and this block's reference images (dCLIP of
        # the next block's images reads them); with blocks of at least prompts x seeds images, that is
        # every image a later stage asks for, so each image is decoded once per walk.
        decoder.keep_only([e.path for e in block if e.key.prompt_id == self.ref_id] + [e.path for e in following])

    def close(self, *, finished: bool = True):
        """Score what is queued (``finished``; else drop it: whole chunks already written stay) and
        close every stage. Returns the face rows of the whole cache (DataFrame by image sha), or None
        when not ``finished``."""
        try:
            if finished:
                for b in self.batchers.values():
                    b.flush()
                if self.fid:
                    self.fid.flush()
        finally:
            for b in self.batchers.values():
                b.close()
            if self.bar is not None:
                self.bar.close()
            self.decoder.close()
            self.session.context.read_image = read_image
        if not finished:
            try:
                self.faces.close()  # the rows detected so far are kept
            except Exception:  # the error that stopped the walk is the one to report
                pass
            return None
        return self.faces.close()
