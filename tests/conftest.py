"""Shared fixtures: a per-session cache (tiny model, prepared test faces) and small run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models gain nothing from two threads, and OpenMP threads that spin-wait slow them down by an
# order of magnitude whenever another process shares the cores. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
TEST_PHOTOS = REPO / "f2d_bench" / "assets" / "faces"


@pytest.fixture(scope="session", autouse=True)
def _offline_session_cache(tmp_path_factory):
    """Every test (and subprocess it starts) uses a fresh cache and never reaches a model hub."""
    cache = tmp_path_factory.mktemp("f2d-cache")
    old = {k: os.environ.get(k) for k in ("F2D_BENCH_CACHE", "HF_HUB_OFFLINE")}
    os.environ["F2D_BENCH_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def small_config_dict(**overrides) -> dict:
    """A fast run on the tiny pipeline: 8 test faces, the smoke prompts (4 + reference), 2 seeds."""
    data = {
        "name": "test",
        "faces": "builtin:test-faces",
        "prompts": "smoke",
        "seeds": [0, 1],
        "model": {"pretrained": "f2d-bench/tiny-sd14", "dtype": "float32", "device": "cpu"},
        "sampling": {"num_inference_steps": 4, "guidance_scale": 7.0, "height": 64, "width": 64},
        "batch_size": 8,
        "methods": [{"name": "sd-class"}],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data
