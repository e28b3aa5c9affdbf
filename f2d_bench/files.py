"""Atomic file writes, file hashes and JSON-lines: the one implementation every module uses.

A reader of a path written here sees the old file or the whole new one, never a part: each write goes
to a temporary sibling ``.<name>.<token>.tmp`` that is flushed to disk and renamed into place. A process
killed at any moment leaves at most such a temporary file, which ``is_temporary`` recognises.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from f2d_bench.errors import F2DBenchError

TMP_SUFFIX = ".tmp"


def temporary_sibling(path: Path) -> Path:
    """A fresh temporary name in ``path``'s folder: ``.<name>.<8 hex>.tmp``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def final_name(tmp_name: str) -> str | None:
    """The file name a temporary file of :func:`temporary_sibling` was to become (None: not one)."""
    if not (tmp_name.startswith(".") and tmp_name.endswith(TMP_SUFFIX)):
        return None
    parts = tmp_name[1:].rsplit(".", 2)
    return parts[0] if len(parts) == 3 else None


def system_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the system's failure to read or write (an OSError with errno: EIO, EMFILE,
    ENOSPC), not a sign that the file is damaged. Decoders (Pillow, pyarrow) raise OSErrors without
    errno for bad bytes; a system failure says nothing of the file, so it must never be taken for damage."""
    return isinstance(exc, OSError) and exc.errno is not None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fh)`` on a temporary binary file, flush it to disk, rename it to ``path``.

    The fsync before the rename means a crash of the machine cannot leave a renamed-but-empty file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Indented JSON with sorted keys (values JSON cannot hold are written with ``str``)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: str | Path, frame) -> Path:
    """A pandas DataFrame as Parquet, without its index."""
    return atomic_write(path, lambda fh: frame.to_parquet(fh, index=False))


def atomic_link_or_copy(src: str | Path, dst: str | Path) -> Path:
    """Hard-link ``src`` to ``dst`` (a copy where links are not possible), atomically.

    Files written here are replaced, never rewritten in place, so a link shares nothing that can change.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:  # on disk before the rename, as atomic_write does
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_version(path: str | Path) -> tuple:
    """(device, inode, size, mtime, ctime) of ``path``: equal while the file stays as it was. The inode
    change time moves on every write and no tool sets it back, so a file rewritten in place, or replaced
    by a copy that keeps size and mtime (cp -p, rsync -a), gets another version."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: :func:`file_version` of a weights file -> its sha256, for this process.
_WEIGHTS_SHA256: dict[tuple, str] = {}


def weights_sha256(path: str | Path) -> str:
    """:func:`file_sha256` of a model file, hashed once per process while the file stays as it was.

    Methods identify their checkpoints by content each time they are built (once per shard under Ray,
    1-2 s per GB). A file rewritten in place is hashed again (:func:`file_version`). Not for run images:
    the store's damage checks read their bytes every time.
    """
    key = file_version(path)
    if key not in _WEIGHTS_SHA256:
        _WEIGHTS_SHA256[key] = file_sha256(path)
    return _WEIGHTS_SHA256[key]


def folder_sha256s(folder: str | Path, suffixes: tuple[str, ...] = (".json", ".safetensors", ".bin")) -> dict[str, str]:
    """File name -> sha256 of each file directly in ``folder`` ending in one of ``suffixes``: what identifies
    a model folder (its config and weights) by content rather than by path."""
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(suffixes))
    return {f.name: weights_sha256(f) for f in files}


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line with a single ``write`` on an O_APPEND descriptor.

    One write call keeps lines from different processes whole; a kill mid-call can at worst leave a
    partial last line, which :func:`read_jsonl` skips.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        # A killed writer's partial last line would swallow this record: start on a new line.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):  # a full disk takes part of a line and fails the rest: say so
            raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes of a line (disk full?)", str(path))
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, skipping lines that are not whole objects (a killed
    writer's tail); [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
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


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Put the folder ``new`` at ``target``, so that ``target`` is always either the old or the new folder.

    On Linux the two are exchanged in one ``renameat2(RENAME_EXCHANGE)`` call and the old one is then
    removed; elsewhere the old folder is renamed aside first, and :func:`recover_dir` puts it back if a
    kill falls between the two renames. ``new`` and ``target`` must be on one file system.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # it now holds the old folder
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(target: str | Path) -> None:
    """Undo a :func:`replace_dir` that was killed between its two renames (the old folder comes back)."""
    target = Path(target)
    if target.exists():
        return
    for aside in sorted(target.parent.glob(f".{target.name}.old-*")):
        os.rename(aside, target)
        return


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2; False where the call is not available."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def lock_is_held(path: str | Path, *, seconds: float = 0.0) -> bool:
    """Whether a process holds :func:`exclusive_lock` on ``path`` now and still after ``seconds`` (re-probed
    every 0.1 s; a lock released meanwhile is not held). False when the file is missing.

    Probes with a shared lock, so that two processes probing one file at once do not see each other as
    its holder."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            return False
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.1)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, busy: str | None = None, waiting: Callable[[], Any] | None = None
                   ) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created when missing) for the block.

    The operating system releases it when the process ends, however it ends, so a killed holder never
    leaves it held. ``busy``: when given, a held lock raises F2DBenchError(busy) instead of waiting;
    otherwise the call blocks until the holder is done, calling ``waiting()`` once first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                raise F2DBenchError(busy) from None
            if waiting is not None:
                waiting()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
