"""Shared fixtures and helpers: a per-session cache (tiny model, prepared test faces), small run configs,
face-set and `external`-source builders on the shipped photos, synthetic records, reading a run's images,
and the `slow` marks of the fast tier (`make test-fast`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
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


def default_catalog():
    """The MetricCatalog of the default scorers, from their own declarations (as `score` records them)."""
    from dataclasses import asdict

    from f2d_bench.aggregate.metrics import MetricCatalog
    from f2d_bench.scorers import DEFAULT_SCORERS, SCORERS

    specs = []
    for name in DEFAULT_SCORERS:
        cls = SCORERS.load(name)
        specs += [asdict(m) | {"scorer": name, "identity": cls.uses_faces} for m in cls.metrics]
    return MetricCatalog(tuple(specs))


# --- the shipped test photos -------------------------------------------------------------------------

# input face -> the photo shown as its "generated" image: the same person, and another person
SAME = {"obama": "obama2", "obama2": "obama3", "biden": "biden", "grace_hopper": "grace_hopper"}
OTHER = {"obama": "biden", "obama2": "grace_hopper", "biden": "obama", "grace_hopper": "obama2"}


def offline_scoring(**more) -> dict:
    """A run config's `scoring` section that runs every scorer offline: identity models with random
    weights, tiny CLIP / SigLIP, on the CPU. ``more`` adds keys (e.g. ``scorers``)."""
    settings = {"adaface": {"weights": "random"}, "sphereface": {"weights": "random"},
                "facenet": {"weights": "random"}, "clip": {"model": "tiny"}, "siglip": {"model": "tiny"}}
    return {"device": "cpu", "settings": settings, **more}


def count_image_reads(monkeypatch) -> dict[Path, int]:
    """Count every decode through ``read_image`` (the function every scoring stage reads files with):
    resolved path -> times read, filled as the test goes on."""
    from collections import Counter

    import f2d_bench.faces.imageio as imageio

    reads: Counter = Counter()
    original = imageio.read_image

    def counting(path):
        reads[Path(path).resolve()] += 1
        return original(path)

    monkeypatch.setattr(imageio, "read_image", counting)
    return reads


def prepared_crops() -> dict[str, Path]:
    """face id -> the prepared (FFHQ-aligned, 512x512) crop of each shipped test photo."""
    from f2d_bench.faces.source import resolve_face_set

    return {f.face_id: f.path for f in resolve_face_set("builtin:test-faces")}


def face_dir(dst: Path, face_ids: Iterable[str]) -> Path:
    """A face-set directory ``dst`` holding copies of the prepared crops of ``face_ids``."""
    import shutil

    crops = prepared_crops()
    dst.mkdir(parents=True)
    for fid in face_ids:
        shutil.copy(crops[fid], dst / f"{fid}.png")
    return dst


def external_source(root: Path, face_ids: Iterable[str], plan: Callable[[str], dict], *, rng,
                    noise_size: int) -> Path:
    """An `external` method's source tree: ``root/<face>/<prompt>/0.png`` is the prepared crop of the
    photo ``plan(face)[prompt]`` names, or a noise image without a face (``noise_size`` square, drawn
    from ``rng``) where that is None."""
    import shutil

    import numpy as np
    from PIL import Image

    crops = prepared_crops()
    for fid in face_ids:
        for pid, photo in plan(fid).items():
            d = root / fid / pid
            d.mkdir(parents=True)
            if photo is None:
                noise = rng.integers(0, 256, (noise_size, noise_size, 3), dtype=np.uint8)
                Image.fromarray(noise).save(d / "0.png")
            else:
                shutil.copy(crops[photo], d / "0.png")
    return root


def cli_parser(register):
    """An `f2d-bench` argument parser with the subcommand(s) that ``register`` adds."""
    import argparse

    parser = argparse.ArgumentParser(prog="f2d-bench")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


# --- runs and records --------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_hashes(run_dir: Path) -> dict[str, str]:
    """``face/prompt/seed`` -> the sha256 that the run's manifests record for the image."""
    from f2d_bench.run_dir import RunDir

    return {r.key.as_string().split("/", 1)[1]: r.sha256 for r in RunDir(run_dir).store.manifest_records().values()}


def run_pixels(run_dir: Path) -> dict:
    """``face/prompt/seed`` -> the image's pixels (int16, so that differences do not wrap)."""
    import numpy as np
    from PIL import Image

    from f2d_bench.run_dir import RunDir

    run = RunDir(run_dir)
    return {k.as_string().split("/", 1)[1]: np.asarray(Image.open(run.store.image_path(k)), dtype=np.int16)
            for k in run.keys()}


def record_row(method, face, value, *, column="hmean", category="job", prompt="p", seed=0,
               is_reference=False, error=None, **more) -> dict:
    """One row of records.parquet as `score` writes it, with ``value`` in ``column``; ``more`` adds or
    overrides columns (e.g. ``method_label``, other metrics)."""
    row = {
        "method": method, "method_label": method.upper(), "face": face, "prompt": prompt,
        "category": category, "seed": seed, "path": f"{method}/{face}/{prompt}/{seed}.png", "sha256": "0",
        "face_detected": True, "face_prob": 0.99, "n_faces": 1, "error": error,
        "is_reference": is_reference, column: value,
    }
    row.update(more)
    return row


# --- the fast tier -----------------------------------------------------------------------------------

# Tests in files that are edited elsewhere, marked `slow` from here so that `make test-fast`
# (pytest -m "not slow") stays under 2 minutes on two CPU cores; tests in the other files carry
# @pytest.mark.slow themselves. Each entry is a node id (all parametrizations) or a module path, with the
# seconds it took in a full run on two cores (`pytest --durations=0`). Entries whose test no longer
# exists are reported as a warning, so that a rename does not silently move a slow test back.
SLOW_ELSEWHERE = {
    # 17 s fixture (random official checkpoints written and loaded) shared by these three
    "tests/test_f2d.py::test_official_files_load_strictly": "17 s setup + 2 s",
    "tests/test_f2d.py::test_bad_files_fail_at_load_naming_the_file": "4.5 s",
    "tests/test_f2d.py::test_moved_checkpoints_resume_the_same_run": "7 s",
    "tests/test_f2d.py::test_f2d_grid_end_to_end": "5.7 s: a whole generate run",
    "tests/test_pipelines.py::test_hub_id_loads_from_hf_cache_offline": "10 s",
    "tests/test_fid.py::test_pytorch_fid_backend_loads_official_layout_strictly": "5.7 s",
    "tests/test_fid.py::test_clean_fid_backend_accepts_a_user_torchscript_file_with_layers": "4.6 s",
}


def _stale_slow_entries(entries) -> list[str]:
    """Entries whose module is gone or no longer defines the test function."""
    stale = []
    for entry in entries:
        module, _, name = entry.partition("::")
        path = REPO / module
        if not path.is_file() or (name and f"def {name.split('[')[0]}(" not in path.read_text(encoding="utf-8")):
            stale.append(entry)
    return stale


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid
        if (nodeid in SLOW_ELSEWHERE or nodeid.split("[", 1)[0] in SLOW_ELSEWHERE
                or nodeid.split("::", 1)[0] in SLOW_ELSEWHERE):
            item.add_marker(pytest.mark.slow)
    for entry in _stale_slow_entries(SLOW_ELSEWHERE):
        import warnings

        warnings.warn(pytest.PytestWarning(f"conftest.SLOW_ELSEWHERE lists {entry!r}, which does not exist"))


#: The environments two processes see under a simulated launcher: a SLURM array of 2 tasks, and torchrun
#: with 2 ranks on one node (``--shard auto`` reads them).
TWO_PROCESS_LAUNCHERS = [
    ("SLURM array", [{"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
                      "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_PROCID": "0",
                      "SLURM_NTASKS": "1"} for i in range(2)]),
    ("torchrun", [{"RANK": str(i), "WORLD_SIZE": "2", "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": "2"}
                  for i in range(2)]),
]


def faceless_photo(path: Path, **save_options) -> Path:
    """A 512x512 photo of a plain grey wall (no face for MTCNN) at ``path``."""
    from PIL import Image

    Image.new("RGB", (512, 512), (120, 130, 140)).save(path, **save_options)
    return path


def a_real_and_a_faceless_face(tmp_path: Path):
    """(obama's prepared crop, the face "wall" of :func:`faceless_photo`) as Faces."""
    from f2d_bench.faces.faceset import Face

    return Face("obama", prepared_crops()["obama"]), Face("wall", faceless_photo(tmp_path / "wall.png"))

