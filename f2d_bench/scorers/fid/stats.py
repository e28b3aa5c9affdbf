"""Gaussian statistics of Inception features, the Fréchet distance between them, and their `.npz` files.

Statistics and their files are numpy only. The Fréchet distance is pytorch-fid's own function, so it
imports pytorch-fid (and with it torch) on first use. Shapes: `d` is the feature dimension (2048 for
Inception pool3), `n` the number of images.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from f2d_bench.errors import ConfigError
from f2d_bench.files import atomic_write

#: Keys of a statistics file. `mu` and `sigma` alone are also what pytorch-fid's `--save-stats` writes,
#: so pytorch-fid can read our files; `count` and `backend` are what make a number reportable.
STATS_KEYS = ("mu", "sigma", "count", "backend")
METADATA_KEY = "metadata"

#: pytorch-fid's `calculate_frechet_distance` adds this to both covariance diagonals when the matrix
#: square root of their product is not finite.
SQRTM_EPS = 1e-6


@dataclass(frozen=True)
class FIDResult:
    """One FID value and what it depends on.

    value: Fréchet distance between the two feature Gaussians (>= 0 up to float error; lower is better).
    backend: name of the feature extractor (scores of different backends are not comparable).
    n_generated / n_reference: number of images behind each side (FID is biased by sample size).
    """

    value: float
    backend: str
    n_generated: int
    n_reference: int


@dataclass(frozen=True)
class FeatureStats:
    """Mean `mu` (d,) and covariance `sigma` (d, d), float64, of `count` images' features."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    backend: str
    metadata: dict = field(default_factory=dict)


def _as_features(features: np.ndarray) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-d array (n, d), got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinite values")
    return array


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of `features` (n, d), n >= 2, both float64.

    The covariance divides by n - 1, as pytorch-fid and clean-fid do (`np.cov(rowvar=False)`).
    """
    array = _as_features(features)
    return array.mean(axis=0), np.cov(array, rowvar=False)


class StatsAccumulator:
    """Running mean and covariance of feature batches in O(d^2) memory, for reference sets too large to
    hold as an (n, d) array (100k Inception features are 1.6 GB in float64).

    Sums are taken around a shift (the first batch's mean) so that the final subtraction does not lose
    precision when the mean is large compared with the spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        """Add a batch (k, d); k may be 0. The dimension d must stay the same across batches."""
        batch = np.asarray(features, dtype=np.float64)
        if batch.ndim != 2:
            raise ValueError(f"features must be a 2-d array (k, d), got shape {batch.shape}")
        if batch.shape[0] == 0:
            return
        if not np.isfinite(batch).all():
            raise ValueError("features contain NaN or infinite values")
        if self._shift is None:
            d = batch.shape[1]
            self._shift = batch.mean(axis=0)
            self._sum = np.zeros(d)
            self._outer = np.zeros((d, d))
        elif batch.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self._shift.shape[0]} to {batch.shape[1]}")
        centred = batch - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += batch.shape[0]

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (d,) and unbiased covariance (d, d) of everything added; the same as `feature_stats`."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean_centred = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        return self._shift + mean_centred, sigma


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be (d,) and sigma (d, d); got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: statistics contain NaN or infinite values")
    return mu, sigma


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = SQRTM_EPS
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

    mu: (d,), sigma: (d, d) symmetric positive semi-definite, float64. Returns a float in squared feature
    units, >= 0 up to float error (tiny negative values are returned as computed). Computed by
    pytorch-fid's `calculate_frechet_distance` after checking the inputs (ValueError for mismatched or
    non-finite ones): the square root is `scipy.linalg.sqrtm`, recomputed with `eps` added to both
    diagonals when it is not finite (a singular product, usual when n < d); an imaginary part on its
    diagonal larger than 1e-3 raises ValueError, smaller ones are numerical noise and dropped.
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first set")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second set")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}")
    # pytorch-fid prints a notice to stdout when it adds eps, and passes scipy's deprecated `disp`.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message="The `disp` argument", category=DeprecationWarning)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps))


def check_reference_weights(reference: FeatureStats, backend_info: dict) -> None:
    """Refuse a reference built with other Inception weights than ``backend_info`` (a backend's
    ``describe()``) names: the same backend name on other weights gives features of another network.

    Only where both sides know the weights' SHA-256 (a reference built by an older version may not).
    """
    built = reference.metadata.get("backend_info") or {}
    if built.get("weights_sha256") and backend_info.get("weights_sha256") \
            and built["weights_sha256"] != backend_info["weights_sha256"]:
        raise ConfigError(
            f"the reference statistics were built with Inception weights {built.get('weights')!r} "
            f"(sha256 {built['weights_sha256'][:12]}...), the generated features come from "
            f"{backend_info.get('weights')!r} (sha256 {backend_info['weights_sha256'][:12]}...); score with "
            "the weights the reference was built with (scoring.fid_weights), or rebuild the reference"
        )


def fid_from_features(generated: np.ndarray, reference: FeatureStats, backend: str) -> FIDResult:
    """FID between generated features (n, d) from `backend` and reference statistics.

    Raises ConfigError when the reference was built with another backend: the two libraries'
    preprocessing differs, so such a number would not be an FID of either kind.
    """
    if reference.backend != backend:
        raise ConfigError(
            f"the reference statistics were built with backend {reference.backend!r}, the generated "
            f"features with {backend!r}; rebuild the reference with `f2d-bench fid-ref build "
            f"--backend {backend}` or score with --backend {reference.backend}"
        )
    mu, sigma = feature_stats(generated)
    value = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    return FIDResult(value=value, backend=backend, n_generated=int(np.shape(generated)[0]),
                     n_reference=reference.count)


def save_stats(
    path: str | Path,
    mu: np.ndarray,
    sigma: np.ndarray,
    count: int,
    backend: str,
    extra: dict | None = None,
) -> Path:
    """Write statistics to `path` (must end in .npz) atomically; returns the path.

    Keys: `mu` (d,) float64, `sigma` (d, d) float64, `count` int64 scalar, `backend` unicode scalar, and
    `metadata`: `extra` as JSON text (must be JSON-serialisable). No object arrays, so the file loads
    with `allow_pickle=False`.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"statistics file {str(path)!r} must end in .npz")
    mu, sigma = _check_gaussian(mu, sigma, str(path))
    if int(count) < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    try:
        metadata = json.dumps(extra or {}, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"extra metadata must be JSON-serialisable: {exc}") from exc
    arrays = {"mu": mu, "sigma": sigma, "count": np.int64(count), "backend": np.str_(backend),
              METADATA_KEY: np.str_(metadata)}
    # Into the file object atomic_write passes, so numpy appends no ".npz" to the temporary name.
    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_stats(path: str | Path) -> FeatureStats:
    """Read a file written by `save_stats` (never unpickles). Raises ConfigError naming the file when it
    is missing, unreadable, lacks a key, or holds inconsistent shapes."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in STATS_KEYS if key not in data.files]
            if missing:
                raise ConfigError(
                    f"statistics file {str(path)!r} lacks {', '.join(missing)} (it has "
                    f"{', '.join(data.files) or 'no arrays'}); files from pytorch-fid's --save-stats hold only "
                    "mu and sigma: rebuild with `f2d-bench fid-ref build` so that N and the backend are known"
                )
            mu = data["mu"]
            sigma = data["sigma"]
            count = int(data["count"])
            backend = str(data["backend"])
            metadata = json.loads(str(data[METADATA_KEY])) if METADATA_KEY in data.files else {}
    except FileNotFoundError as exc:
        raise ConfigError(f"statistics file {str(path)!r} does not exist") from exc
    except (ValueError, TypeError, zipfile.BadZipFile) as exc:  # pickled data, bad JSON, non-scalar count
        raise ConfigError(f"statistics file {str(path)!r} is not a valid f2d-bench stats file: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read statistics file {str(path)!r}: {exc}") from exc
    try:
        mu, sigma = _check_gaussian(mu, sigma, str(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if count < 1:
        raise ConfigError(f"statistics file {str(path)!r} has count {count}; expected the number of images (>= 1)")
    return FeatureStats(mu=mu, sigma=sigma, count=count, backend=backend, metadata=metadata)
