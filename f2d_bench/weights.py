"""Weight files: requiring one, reading it with torch on the CPU, and checking a state dict's keys and
shapes against a model before a strict load.

Each caller raises its own error type (`error=`): the identity models a `WeightsLayoutError`, F2D a
`CheckpointError`. Messages name the file and a few offending keys of each kind.
"""

from __future__ import annotations

import pickle
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


def read_torch_file(file: Path, *, trusted_pickle: bool = False, error: type[Exception] = WeightsLayoutError):
    """``torch.load`` on CPU, tensors-only first; `error` for a file it cannot read.

    trusted_pickle: when the tensors-only loader refuses the file (Lightning checkpoints pickle their
    hyper-parameters), load it again with ``weights_only=False``, which runs the pickle's code. Callers
    pass True only for files the user named themselves, never for files found or downloaded.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted_pickle:
            raise error(
                f"{str(file)!r} holds pickled objects besides tensors (torch's tensors-only loader refused "
                "it); this model's official file is a plain state dict, so no pickled code is run for it"
            ) from exc
    except Exception as exc:  # a truncated download, an HTML error page saved as .pt, ...
        raise error(f"{str(file)!r} is not a readable PyTorch file: {exc}") from exc
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise error(f"{str(file)!r} is not a readable PyTorch checkpoint: {exc}") from exc


def _listing(keys: Iterable[str]) -> str:
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
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes {_listing(wrong_shape)}")
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
