"""Weight files: requiring one, reading it with torch on the CPU, and checking a state dict's keys and
shapes against a model before a strict load.

Each caller raises its own error type (`error=`): the identity models a `WeightsLayoutError`, F2D a
`CheckpointError`. Messages name the file and a few offending keys of each kind.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from f2d_bench.errors import ModelUnavailableError

#: How many offending keys an error message lists (the rest are counted).
KEYS_SHOWN = 5


class WeightsLayoutError(ModelUnavailableError):
    """A weight file exists but its layout (keys, shapes, container) is not the one the model needs."""


def require_file(path, *, what: str, published: str) -> Path:
    """``path`` as a Path when it is an existing file, else ModelUnavailableError.

    what: the model, as a user would name it ("AdaFace IR-101 checkpoint").
    published: where the official file can be downloaded, one or two sentences.
    """
    if path is None or str(path).strip() == "":
        raise ModelUnavailableError(
            f"no {what} file was given. {published} Download it and pass its local path."
        )
    file = Path(path).expanduser()
    if not file.is_file():
        where = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise ModelUnavailableError(
            f"{what} file {str(file)!r} {where}. {published} Download it and pass its local path."
        )
    return file


#: Metadata types that PyTorch Lightning checkpoints pickle beside their tensors (hyper-parameters,
#: checkpoint-callback paths). ``read_torch_file(..., metadata=LIGHTNING_METADATA)`` reads each of them
#: as an inert :class:`PickledMetadata` record, never as the class itself.
LIGHTNING_METADATA = (
    "argparse.Namespace",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
)


class PickledMetadata:
    """What a metadata object of a weight file is read as: its arguments and state, kept as data.

    Constructing it runs no code of the file's: whatever class the file names is never imported.
    """

    # Defaults: the unpickler may create an instance with ``__new__`` only and then set its state.
    args: tuple = ()
    kwargs: dict = {}
    state = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"PickledMetadata(args={self.args!r}, state={self.state!r})"


def read_torch_file(file: Path, *, metadata: Iterable[str] = (), error: type[Exception] = WeightsLayoutError):
    """The contents of a ``torch.save`` file, read onto the CPU by torch's tensors-only unpickler.

    No file is ever unpickled with arbitrary globals: tensors, containers and numbers load as usual,
    the classes named in ``metadata`` (full dotted names, e.g. ``LIGHTNING_METADATA``) load as inert
    :class:`PickledMetadata` records, and anything else a file asks for (a function to call, another
    class) makes it an ``error`` naming that global, before anything of the file has run.
    """
    stand_ins = [(PickledMetadata, name) for name in metadata]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        asked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if asked is None:  # an HTML error page saved as .pt, a damaged file, or a pickle of an old format
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            detail = f": {detail.group(1).strip()}" if detail else ""
            kind = _file_kind(file)
            if kind == "legacy":
                raise error(f"{str(file)!r} is a PyTorch file in an old pickle format that the tensors-only "
                            f"unpickler cannot read{detail}; load it once where you trust it and save its "
                            "state_dict with a current torch") from exc
            what = "text (a web page, an error message?)" if kind == "text" else "damaged or other binary data"
            raise error(f"{str(file)!r} is not a readable PyTorch file: it holds {what}, not a torch.save "
                        f"file{detail}; download it again, and check that the link gives the file itself") from exc
        raise error(
            f"{str(file)!r} asks the unpickler for the global {asked.group(1)}, which a weight file does not "
            "need; it was refused "
            "and nothing in the file was run. Use the official file (a plain state dict"
            + (", or a Lightning checkpoint of tensors and hyper-parameters" if stand_ins else "")
            + "); if you made this file yourself, save model.state_dict() instead"
        ) from exc
    except Exception as exc:  # a truncated download, an HTML error page saved as .pt, ...
        raise error(f"{str(file)!r} is not a readable PyTorch file: {exc}") from exc


#: How torch.save's legacy (pre-zip) format begins in pickle protocols 0 and 1: its magic number.
_LEGACY_MAGIC = b"L119547037146038801333356L\n"


def _file_kind(file: Path) -> str:
    """From its first 512 bytes: ``"legacy"`` (torch.save's old format in an old pickle protocol),
    ``"text"`` (printable text in UTF-8 or UTF-16: a web page, a JSON error, a git-lfs pointer) or
    ``"binary"`` (anything else: a damaged or foreign file)."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return "binary"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    codec = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    text = head.decode(codec, errors="replace").rstrip("\ufffd")  # a character cut at byte 512
    return "text" if text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text) else "binary"


def key_listing(keys: Iterable[str]) -> str:
    """``"<count>: 'a', 'b', ... and N more"``: the first ``KEYS_SHOWN`` keys (sorted) of a layout error."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:KEYS_SHOWN])
    more = f" and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else ""
    return f"{len(keys)}: {shown}{more}"


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    *,
    source: str,
    optional: Mapping[str, tuple[int | None, ...] | None] | None = None,
    error: type[Exception] = WeightsLayoutError,
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` that ``model`` takes, after checking that nothing is missing or extra.

    source: names the file (and the part of it) in error messages.
    optional: keys the file may carry that the model does not use (a classifier head), each with its
    expected shape (a None dimension matches any size; None: any shape). They are checked when present
    and dropped.
    Raises `error` listing missing keys, unexpected keys and shape mismatches (a few of each), with a
    hint when the keys carry a prefix the model lacks (``module.`` from DataParallel, ...).
    """
    optional = dict(optional or {})
    if not isinstance(state, Mapping):
        raise error(f"{source}: expected a state dict (key -> tensor), got {type(state).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in optional]
    wrong_shape = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            if key in expected or key in optional:
                wrong_shape.append(f"{key} (not a tensor)")
            continue
        if key in expected:
            want = tuple(expected[key].shape)
        elif key in optional and optional[key] is not None:
            want = tuple(optional[key])
        else:
            continue
        got = tuple(value.shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            wrong_shape.append(f"{key} {list(got)} (expected {list(want)})")
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {key_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {key_listing(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes {key_listing(wrong_shape)}")
        hint = _prefix_hint(missing, unexpected)
        raise error(
            f"{source} does not match the {type(model).__name__} architecture "
            f"({len(expected)} tensors expected): " + "; ".join(parts) + (f". {hint}" if hint else "")
        )
    return {k: v for k, v in state.items() if k in expected}


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """A sentence when every unexpected key is an expected key with one extra leading component."""
    if not missing or not unexpected:
        return ""
    heads = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
    if len(heads) == 1:
        prefix = heads.pop()
        stripped = {k[len(prefix) :] for k in unexpected}
        if set(missing) <= stripped:
            return (
                f"Every key carries an extra {prefix!r} prefix (a checkpoint saved from a wrapper such as "
                "DataParallel or a training module): this is not the official file layout"
            )
    return ""


def load_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor], **check) -> torch.nn.Module:
    """:func:`check_state_dict` (same keywords), then a strict ``load_state_dict``; returns ``model`` in
    eval mode."""
    tensors = check_state_dict(state, model, **check)
    model.load_state_dict(tensors, strict=True)
    return model.eval()
