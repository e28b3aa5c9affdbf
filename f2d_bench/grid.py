"""The grid of a run: ItemKey(method, face, prompt, seed), sharding and deterministic batching.

An ItemKey is the only identity in the system: an image's path, its PNG metadata, its manifest line
and its scores all follow from the key alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Iterable, Iterator, Sequence

from f2d_bench.errors import ConfigError

# Ids become path components: one safe alphabet for all of them, checked at the key.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, order=True)
class ItemKey:
    """One image of the grid. Ordering is (method, face, prompt, seed)."""

    method_id: str
    face_id: str
    prompt_id: str
    seed: int

    def __post_init__(self) -> None:
        for name in ("method_id", "face_id", "prompt_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
                raise ValueError(f"ItemKey.{name}={value!r} is not a safe id ([A-Za-z0-9._-], no '..')")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ItemKey.seed={self.seed!r} must be an integer >= 0")

    @property
    def relpath(self) -> PurePosixPath:
        """The image's path inside the run directory."""
        return PurePosixPath("images", self.method_id, self.face_id, self.prompt_id, f"{self.seed}.png")

    def as_string(self) -> str:
        return f"{self.method_id}/{self.face_id}/{self.prompt_id}/{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ItemKey":
        return cls(str(data["method_id"]), str(data["face_id"]), str(data["prompt_id"]), int(data["seed"]))

    def stable_hash(self) -> int:
        """A 64-bit hash that is the same on every machine and Python process (unlike ``hash()``)."""
        digest = hashlib.sha256(self.as_string().encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``: the keys whose stable hash is ``index - 1`` mod ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ConfigError(f"--shard {self.index}/{self.count}: need 1 <= i <= N")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ConfigError(f"--shard {text!r}: expected i/N, for example 1/4")
        return cls(int(match.group(1)), int(match.group(2)))

    def owns(self, key: ItemKey) -> bool:
        return key.stable_hash() % self.count == self.index - 1

    def owns_face(self, face_id: str) -> bool:
        """Whether this shard tunes ``face_id`` (``tune --shard`` splits the faces, not the images)."""
        digest = hashlib.sha256(face_id.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1

    @property
    def tag(self) -> str:
        """A name for this shard's files (manifest, temporary files)."""
        return "all" if self.count == 1 else f"shard-{self.index}-of-{self.count}"

    @classmethod
    def from_tag(cls, tag: str) -> "Shard | None":
        """The shard whose :attr:`tag` is ``tag``; None for a name that is not a shard's."""
        if tag == "all":
            return UNSHARDED
        match = re.fullmatch(r"shard-(\d+)-of-(\d+)", tag)
        if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
            return None
        return cls(int(match.group(1)), int(match.group(2)))


UNSHARDED = Shard(1, 1)


def grid_keys(
    method_ids: Sequence[str], face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]
) -> list[ItemKey]:
    """Every key of the grid in canonical order: method, then face, prompt, seed as given."""
    return [
        ItemKey(m, f, p, s) for m in method_ids for f in face_ids for p in prompt_ids for s in seeds
    ]


def fixed_batches(keys: Iterable[ItemKey], batch_size: int) -> Iterator[list[ItemKey]]:
    """Consecutive batches of the given order.

    Batches are cut from the whole (shard's) grid, not from what is still missing, so a resumed run
    puts every image into the same batch as an uninterrupted run and gets the same pixels.
    """
    batch: list[ItemKey] = []
    for key in keys:
        batch.append(key)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
