"""The method registry, entry points, and the `external` import method."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from f2d_bench.cli import main
from f2d_bench.config import config_from_dict
from f2d_bench.engine import build_methods, generate_run
from f2d_bench.errors import ConfigError
from f2d_bench.faces.source import resolve_face_set
from f2d_bench.methods import METHODS
from f2d_bench.methods.sd_class import SDClassMethod
from f2d_bench.prompts import load_prompt_set
from f2d_bench.run_dir import RunDir

from conftest import small_config_dict


def test_builtins_are_listed_without_importing_them(capsys):
    import sys

    sys.modules.pop("f2d_bench.methods.external", None)
    assert {"sd-class", "external"} <= set(METHODS.names())
    assert "f2d_bench.methods.external" not in sys.modules
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "sd-class" in out and "external" in out
    assert METHODS.load("sd-class") is SDClassMethod


def test_unknown_method_suggests_close_names():
    with pytest.raises(ConfigError, match="Did you mean: sd-class"):
        METHODS.load("sd-clas")


def test_third_party_method_through_entry_point(monkeypatch):
    ep = metadata.EntryPoint(name="my-method", value="f2d_bench.methods.sd_class:SDClassMethod",
                             group="f2d_bench.methods")
    real = metadata.entry_points

    def fake(**kw):
        return [ep] if kw.get("group") == "f2d_bench.methods" else real(**kw)

    monkeypatch.setattr(metadata, "entry_points", fake)
    assert "my-method" in METHODS.names()
    assert METHODS.load("my-method") is SDClassMethod


def test_method_id_depends_on_settings():
    prompts = load_prompt_set("smoke")
    a = build_methods(config_from_dict(small_config_dict()), prompts)[0]
    b = build_methods(config_from_dict(small_config_dict(sampling={"num_inference_steps": 5})), prompts)[0]
    c = build_methods(config_from_dict(small_config_dict(batch_size=2)), prompts)[0]
    assert a.method_id != b.method_id and a.method_id == c.method_id


def test_duplicate_methods_and_unknown_params_are_errors():
    prompts = load_prompt_set("smoke")
    with pytest.raises(ConfigError, match="same settings"):
        build_methods(config_from_dict(small_config_dict(methods=[{"name": "sd-class"}] * 2)), prompts)
    with pytest.raises(ConfigError, match="unknown param 'foo'"):
        build_methods(config_from_dict(small_config_dict(methods=[{"name": "sd-class", "params": {"foo": 1}}])),
                      prompts)


def _external_tree(root: Path, face_ids, prompt_ids, seeds) -> None:
    for f in face_ids:
        for p in prompt_ids:
            for s in seeds:
                d = root / f / p
                d.mkdir(parents=True, exist_ok=True)
                value = (hash((f, p, s)) % 200) + 20
                Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(d / f"{s}.png")


def test_external_imports_by_key_and_reports_problems(tmp_path):
    faces = [f.face_id for f in resolve_face_set("builtin:test-faces")]
    prompts = load_prompt_set("smoke")
    pids = [p.id for p in prompts.all_prompts()]
    src = tmp_path / "made-elsewhere"
    _external_tree(src, faces, pids, [0])
    missing = src / faces[0] / pids[0] / "0.png"
    missing.unlink()
    (src / faces[1] / pids[0] / "0.png").write_bytes(b"not an image")
    (src / faces[2] / pids[1] / "0.jpg").write_bytes(b"")  # a second candidate: ambiguous
    (src / "stranger").mkdir()
    (src / faces[0] / "no-such-prompt").mkdir()
    cfg = config_from_dict(small_config_dict(seeds=[0], methods=[{"name": "external", "params": {"source": str(src)}}]))
    summary = generate_run(cfg, tmp_path / "run", progress=False)
    [m] = summary.methods
    assert m.expected == len(faces) * len(pids) and m.done == m.expected - 3
    reasons = dict(m.skipped)
    assert any("missing" in r for r in reasons.values())
    assert any("unreadable" in r for r in reasons.values())
    assert any("ambiguous" in r for r in reasons.values())
    assert any("stranger" in p for p in m.problems) and any("no-such-prompt" in p for p in m.problems)
    assert not summary.complete
    run = RunDir(tmp_path / "run")
    key = [k for k in run.keys() if k.face_id == faces[3] and k.prompt_id == pids[2]][0]
    got = np.asarray(Image.open(run.store.image_path(key)))
    want = np.asarray(Image.open(src / faces[3] / pids[2] / "0.png"))
    assert np.array_equal(got, want)
    # the user fixes the source; the same command completes the run
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(missing)
    assert generate_run(cfg, tmp_path / "run", progress=False).methods[0].done == m.done + 1


def test_external_needs_an_existing_source(tmp_path):
    cfg = config_from_dict(small_config_dict(methods=[{"name": "external", "params": {"source": str(tmp_path / "x")}}]))
    with pytest.raises(ConfigError, match="not a directory"):
        build_methods(cfg, load_prompt_set("smoke"))
