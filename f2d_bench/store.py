"""The run directory: atomic image writes, per-writer manifests, resume bookkeeping.

Layout of ``RUN/``::

    run.json                 resolved config, grid hash, creation date (written once)
    grid.json                the grid's face ids (with file hashes), prompt ids, seeds, method ids
    prompts.yaml             copy of the prompt set used
    environment.jsonl        one line per generate invocation: versions, hardware, shard
    methods/<method_id>/     method.json (settings, parameters), prepare_times.jsonl
    images/<method>/<face>/<prompt>/<seed>.png
    manifests/<writer>.jsonl one line per image written by that writer (``all`` or ``shard-i-of-N``)

An image is complete exactly when its final path exists: it is written to a temporary file in the same
directory and renamed. A process killed at any moment leaves at most a temporary file, which the next
writer owning that key removes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from f2d_bench.errors import F2DBenchError
from f2d_bench.grid import ItemKey

PNG_KEY_FIELD = "f2d_bench.key"
PNG_CONFIG_FIELD = "f2d_bench.config_hash"
_TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The file is flushed to disk before the rename so that a crash of the machine cannot leave a
    renamed-but-empty file either.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line with a single ``write`` on an O_APPEND descriptor.

    One write call keeps lines from different processes whole; a kill mid-call can at worst leave a
    partial last line, which readers skip and ``RunStore.reconcile`` repairs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        # A killed writer's partial last line would swallow this record: start on a new line.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file, skipping lines that are not whole JSON objects (a killed writer's tail)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


def png_bytes(image: Image.Image, text: dict[str, str]) -> bytes:
    """Encode ``image`` as PNG with ``text`` as tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_key(path: Path) -> tuple[ItemKey, str | None]:
    """The ItemKey and config hash stored in an image's PNG metadata."""
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    if PNG_KEY_FIELD not in text:
        raise F2DBenchError(f"{path}: no {PNG_KEY_FIELD} metadata; not written by f2d-bench generate")
    return ItemKey.from_dict(json.loads(text[PNG_KEY_FIELD])), text.get(PNG_CONFIG_FIELD)


@dataclass
class ImageRecord:
    """One manifest line."""

    key: ItemKey
    path: str
    sha256: str
    config_hash: str
    batch_size: int
    written_at: str
    writer: str

    def to_dict(self) -> dict:
        return {
            "key": self.key.to_dict(),
            "path": self.path,
            "sha256": self.sha256,
            "config_hash": self.config_hash,
            "batch_size": self.batch_size,
            "written_at": self.written_at,
            "writer": self.writer,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRecord":
        return cls(
            key=ItemKey.from_dict(d["key"]),
            path=str(d["path"]),
            sha256=str(d["sha256"]),
            config_hash=str(d.get("config_hash", "")),
            batch_size=int(d.get("batch_size", 0)),
            written_at=str(d.get("written_at", "")),
            writer=str(d.get("writer", "")),
        )


class RunStore:
    """Files of one run directory. Paths follow from keys; writes are atomic."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def grid_json(self) -> Path:
        return self.root / "grid.json"

    def image_path(self, key: ItemKey) -> Path:
        return self.root / key.relpath

    def manifest_path(self, writer: str) -> Path:
        return self.root / "manifests" / f"{writer}.jsonl"

    def method_dir(self, method_id: str) -> Path:
        return self.root / "methods" / method_id

    # -- images -----------------------------------------------------------------------------------
    def has_image(self, key: ItemKey) -> bool:
        return self.image_path(key).is_file()

    def write_image(
        self, key: ItemKey, image: Image.Image, *, config_hash: str, batch_size: int, writer: str,
        written_at: str,
    ) -> ImageRecord:
        """Write one image atomically with its key in the PNG metadata, then its manifest line."""
        data = png_bytes(
            image,
            {PNG_KEY_FIELD: json.dumps(key.to_dict(), sort_keys=True), PNG_CONFIG_FIELD: config_hash},
        )
        atomic_write_bytes(self.image_path(key), data)
        record = ImageRecord(
            key=key, path=key.relpath.as_posix(), sha256=hashlib.sha256(data).hexdigest(),
            config_hash=config_hash, batch_size=batch_size, writer=writer, written_at=written_at,
        )
        append_jsonl(self.manifest_path(writer), record.to_dict())
        return record

    def manifest_records(self) -> dict[ItemKey, ImageRecord]:
        """Union of every writer's manifest; a later line for the same key wins."""
        records: dict[ItemKey, ImageRecord] = {}
        mdir = self.root / "manifests"
        for path in sorted(mdir.glob("*.jsonl")) if mdir.is_dir() else []:
            for d in read_jsonl(path):
                try:
                    rec = ImageRecord.from_dict(d)
                except (KeyError, ValueError, TypeError):
                    continue
                records[rec.key] = rec
        return records

    def reconcile(self, keys: Iterable[ItemKey], *, writer: str, config_hash: str) -> dict[str, int]:
        """Bring the files of ``keys`` (those this writer owns) into a consistent state before writing.

        Removes temporary files a killed process left for these keys, rewrites this writer's manifest
        without partial or duplicate lines or lines whose image is gone, and adds lines for images
        that were renamed into place just before a kill. Returns counts of what was repaired.
        """
        keys = set(keys)
        removed_tmp = 0
        by_dir: dict[Path, set[str]] = {}
        for key in keys:
            by_dir.setdefault(self.image_path(key).parent, set()).add(f"{key.seed}.png")
        for directory, names in by_dir.items():
            if not directory.is_dir():
                continue
            for tmp in directory.glob(f".*{_TMP_SUFFIX}"):
                # ".<final name>.<token>.tmp" -> final name
                final = tmp.name[1:].rsplit(".", 2)[0]
                if final in names:
                    tmp.unlink(missing_ok=True)
                    removed_tmp += 1

        path = self.manifest_path(writer)
        raw_lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
        mine: dict[ItemKey, ImageRecord] = {}
        for d in read_jsonl(path):
            try:
                rec = ImageRecord.from_dict(d)
            except (KeyError, ValueError, TypeError):
                continue
            if self.image_path(rec.key).is_file():
                mine[rec.key] = rec
        others = {k for k in self.manifest_records() if k not in mine}
        added = 0
        for key in sorted(keys):
            if key in mine or key in others or not self.has_image(key):
                continue
            img_path = self.image_path(key)
            try:
                stored_key, stored_hash = read_png_key(img_path)
            except (UnidentifiedImageError, SyntaxError, ValueError, EOFError, json.JSONDecodeError):
                # Undecodable: a corrupt file cannot come from our rename; regenerate it. An OSError
                # (a transient read failure) is raised instead, so no good image is ever deleted.
                img_path.unlink(missing_ok=True)
                continue
            if stored_key != key:
                raise F2DBenchError(f"{img_path}: PNG metadata names {stored_key}, not {key}")
            mine[key] = ImageRecord(
                key=key, path=key.relpath.as_posix(),
                sha256=hashlib.sha256(img_path.read_bytes()).hexdigest(),
                config_hash=stored_hash or config_hash, batch_size=0, writer=writer, written_at="",
            )
            added += 1
        if added or len(mine) != len(raw_lines):
            text = "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in mine.values())
            atomic_write_text(path, text)
        return {"removed_tmp": removed_tmp, "manifest_added": added,
                "manifest_dropped": max(0, len(raw_lines) - (len(mine) - added))}

    def temporary_files(self) -> list[Path]:
        """Temporary files left anywhere under images/ (by a killed writer of any shard)."""
        images = self.root / "images"
        return sorted(images.rglob(f".*{_TMP_SUFFIX}")) if images.is_dir() else []
