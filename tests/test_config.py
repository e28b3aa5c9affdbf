import json

import pytest
import yaml

from f2d_bench.config import (RunConfig, config_from_dict, load_config, load_preset, preset_names)
from f2d_bench.errors import ConfigError

from conftest import small_config_dict


def test_presets_load_with_the_papers_settings():
    assert {"paper", "smoke"} <= set(preset_names())
    paper = load_preset("paper")
    assert paper.model.pretrained == "CompVis/stable-diffusion-v1-4"
    assert paper.sampling.scheduler == "EulerAncestralDiscreteScheduler"
    assert (paper.sampling.num_inference_steps, paper.sampling.guidance_scale) == (30, 7.0)
    assert (paper.sampling.height, paper.sampling.width) == (512, 512)
    assert paper.seeds == (0, 1, 2, 3) and paper.prompts == "human40"
    assert paper.faces is None  # the user names the faces
    smoke = load_preset("smoke")
    assert smoke.model.pretrained == "f2d-bench/tiny-sd14" and smoke.sampling.height == 64


def test_config_is_frozen_and_round_trips():
    cfg = config_from_dict(small_config_dict())
    with pytest.raises(Exception):
        cfg.batch_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.methods[0].params["x"] = 1  # type: ignore[index]
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.grid_hash() == cfg.grid_hash()


def test_grid_hash_ignores_batch_size_but_not_sampling():
    base = config_from_dict(small_config_dict())
    assert config_from_dict(small_config_dict(batch_size=1)).grid_hash() == base.grid_hash()
    for device in ("auto", "cuda", "cuda:3"):  # where a shard renders is not what it renders
        assert base.replace(model=base.model.replace(device=device)).grid_hash() == base.grid_hash()
    assert base.replace(model=base.model.replace(dtype="float16")).grid_hash() != base.grid_hash()
    assert config_from_dict(small_config_dict(sampling={"guidance_scale": 5.0})).grid_hash() != base.grid_hash()


@pytest.mark.parametrize("overrides, message", [
    ({"colour": "red"}, "unknown key colour"),
    ({"sampling": {"steps": 30}}, "unknown key sampling.steps"),
    ({"sampling": {"height": 65}}, "sampling.height"),
    ({"sampling": {"num_inference_steps": "30"}}, "sampling.num_inference_steps: expected an integer"),
    ({"seeds": [0, 0]}, "seeds: duplicates"),
    ({"seeds": 4}, "seeds: expected a list"),
    ({"model": {"dtype": "float8"}}, "model.dtype"),
    ({"model": {"device": "tpu"}}, "model.device"),
    ({"methods": []}, "methods"),
    ({"methods": [{"nam": "sd-class"}]}, "unknown key methods[0].nam"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(small_config_dict(**overrides), "my.yaml")
    assert message in str(info.value)
    assert "my.yaml" in str(info.value)


def test_missing_required_key_and_bad_yaml(tmp_path):
    data = small_config_dict()
    del data["methods"]
    with pytest.raises(ConfigError, match="missing required key methods"):
        config_from_dict(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethods: [\n  - a\n b: c\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    """Plain YAML keeps the last of two equal keys: a second seeds: would silently replace the first."""
    data = small_config_dict()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(data))
    assert list(load_config(good).seeds) == list(data["seeds"])  # the control: each key once
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump(data) + "seeds: [7]\n")
    first = 1 + next(i for i, line in enumerate(good.read_text().splitlines()) if line.startswith("seeds:"))
    last = len(twice.read_text().splitlines())
    with pytest.raises(ConfigError, match=rf"twice\.yaml: line {last}: the key 'seeds' is given twice "
                                          rf"\(first on line {first}\)"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "model"})
                      + "model:\n  pretrained: a\n  dtype: float32\n  pretrained: b\n")
    with pytest.raises(ConfigError, match=r"the key 'pretrained' is given twice"):
        load_config(nested)
    # Merge keys are not duplicates: a method entry built on an anchored one, with a key overridden.
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "methods"})
                      + "methods:\n  - &base {name: sd-class}\n  - <<: *base\n    label: second\n")
    assert [(m.name, m.label) for m in load_config(merged).methods] == [("sd-class", None), ("sd-class", "second")]
    nested = tmp_path / "nested-merge.yaml"  # a merged mapping that itself merges and overrides
    nested.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "methods"})
                      + "methods:\n  - {name: sd-class, label: a, params: {opts: &o {<<: {x: 1}, x: 2}}}\n"
                      + "  - {name: sd-class, label: b, params: {<<: *o}}\n")
    assert yaml.safe_load(nested.read_text())["methods"][0]["params"] == {"opts": {"x": 2}}  # valid YAML
    load_config(nested)  # overriding a merged key is no duplicate, however deep the merges


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="paper"):
        load_preset("papr")


def test_load_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_config_dict()))
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.seeds == (0, 1)


# --- pinned forms: run directories resume by these hashes, so a refactor must never change them ---------

SMOKE_PLAIN = {
    "name": "smoke",
    "methods": [{"name": "sd-class", "params": {}, "label": None},
                {"name": "f2d", "params": {"weights": "random"}, "label": None}],
    "faces": "builtin:test-faces", "prompts": "smoke", "seeds": [0, 1],
    "model": {"pretrained": "f2d-bench/tiny-sd14", "revision": None, "dtype": "float32", "device": "cpu"},
    "sampling": {"scheduler": "EulerAncestralDiscreteScheduler", "num_inference_steps": 30,
                 "guidance_scale": 7.0, "height": 64, "width": 64},
    "batch_size": 16,
    "scoring": {"scorers": [], "settings": {"adaface": {"weights": "random"}, "sphereface": {"weights": "random"},
                                            "facenet": {"weights": "random"},
                                            "clip": {"model": "ViT-B-32-quickgelu", "weights": "random"},
                                            "siglip": {"model": "tiny"}},
                "device": "cpu", "batch_size": 16, "face_policy": "largest", "min_face_prob": 0.0,
                "chunk_size": 256, "identity_clamp": False, "no_face": "zero", "fid_reference": None, "fid_backend": "pytorch-fid", "fid_weights": None},
}
PAPER_PLAIN = {
    "name": "paper",
    "methods": [{"name": "sd-class", "params": {}, "label": None}],
    "faces": None, "prompts": "human40", "seeds": [0, 1, 2, 3],
    "model": {"pretrained": "CompVis/stable-diffusion-v1-4", "revision": None, "dtype": "auto", "device": "auto"},
    "sampling": {"scheduler": "EulerAncestralDiscreteScheduler", "num_inference_steps": 30,
                 "guidance_scale": 7.0, "height": 512, "width": 512},
    "batch_size": 16,
    "scoring": {"scorers": [], "settings": {}, "device": "auto", "batch_size": 16, "face_policy": "largest",
                "min_face_prob": 0.0, "chunk_size": 256, "identity_clamp": False, "no_face": "zero",
                "fid_reference": None, "fid_backend": "pytorch-fid",
                "fid_weights": None},
}


@pytest.mark.parametrize("name, plain, grid_hash, earlier", [
    # smoke pins model.device: cpu, whose hash changed when the device came to be hashed as auto
    ("smoke", SMOKE_PLAIN, "8e10bfd6de57", "0cd62b8b74e2"),
    ("paper", PAPER_PLAIN, "02274b2d87e6", "02274b2d87e6"),
])
def test_plain_form_and_grid_hash_of_the_presets_are_pinned(name, plain, grid_hash, earlier):
    cfg = load_preset(name)
    # json.dumps keeps key order and tells 7.0 from 7, which == on dicts would not.
    assert json.dumps(cfg.to_dict()) == json.dumps(plain)
    assert cfg.grid_hash() == grid_hash
    assert cfg.earlier_grid_hashes() == (earlier,)
    assert json.dumps(cfg.model.to_dict()) == json.dumps(plain["model"])
    assert json.dumps(cfg.sampling.to_dict()) == json.dumps(plain["sampling"])


def test_int_for_a_float_becomes_a_float():
    cfg = config_from_dict(small_config_dict(sampling={"guidance_scale": 5}, scoring={"min_face_prob": 1}))
    assert type(cfg.sampling.guidance_scale) is float and type(cfg.scoring.min_face_prob) is float
    assert cfg.grid_hash() == config_from_dict(small_config_dict(sampling={"guidance_scale": 5.0})).grid_hash()


# --- pydantic's errors, translated: exact messages --------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    # unknown keys at a nested path, the alphabetically first one
    ({"methods": [{"name": "a", "nam": "b"}]}, "unknown key methods[0].nam; allowed keys here: base, base_revision, label, name, params, sampling"),
    ({"scoring": {"zz": 1, "bogus": 2}}, "unknown key scoring.bogus; allowed keys here: batch_size, block_size, "
     "chunk_size, device, face_policy, fid_backend, fid_reference, fid_weights, identity_clamp, min_face_prob, "
     "no_face, precision, scorers, settings, workers"),
    # wrong types, with list indices in the path
    ({"methods": [{"name": "a"}, {"name": 3}]}, "methods[1].name: expected a string, got 3"),
    ({"seeds": [0, "x"]}, "seeds[1]: expected an integer, got 'x'"),
    ({"scoring": {"scorers": ["clip", 3]}}, "scoring.scorers[1]: expected a string, got 3"),
    ({"methods": ["sd-class"]}, "methods[0]: expected a mapping, got str"),
    ({"methods": [{"name": "a", "params": None}]}, "methods[0].params: expected a mapping, got None"),
    # a bool is not an int, nor a number; a string is not a number either
    ({"sampling": {"height": True}}, "sampling.height: expected an integer, got True"),
    ({"seeds": [0, False]}, "seeds[1]: expected an integer, got False"),
    ({"sampling": {"guidance_scale": True}}, "sampling.guidance_scale: expected a number, got True"),
    ({"sampling": {"num_inference_steps": 8.0}}, "sampling.num_inference_steps: expected an integer, got 8.0"),
    ({"batch_size": "8"}, "batch_size: expected an integer, got '8'"),
    ({"model": {"revision": 3}}, "model.revision: expected a string, got 3"),
    # the validators' own messages
    ({"sampling": {"height": 7}}, "sampling.height must be a positive multiple of 8, got 7"),
    ({"scoring": {"min_face_prob": 2}}, "scoring.min_face_prob must be in [0, 1], got 2.0"),
    ({"scoring": {"settings": {"clip": 3}}}, "scoring.settings.clip: expected a mapping of settings, got 3"),
    ({"seeds": [3, -1]}, "seeds: must be in 0..18446744073709551615 (2**64 - 1), got [3, -1]"),
    ({"seeds": [2**64]}, "seeds: must be in 0..18446744073709551615 (2**64 - 1), got [18446744073709551616]"),
    ({"sampling": {"guidance_scale": float("nan")}}, "sampling.guidance_scale: Input should be a finite number"),
    ({"scoring": {"min_face_prob": float("inf")}}, "scoring.min_face_prob: Input should be a finite number"),
    # the first error in reading order: unknown keys of a mapping first, then values in field order,
    # and a section's own checks only once every value is valid
    ({"name": 3, "colour": "red"}, "unknown key colour; allowed keys here: batch_size, faces, methods, model, "
     "name, prompts, sampling, scoring, seeds"),
    ({"name": 3, "sampling": {"foo": 1}}, "name: expected a string, got 3"),
    ({"methods": [{"name": 3}], "sampling": {"height": 7}}, "methods[0].name: expected a string, got 3"),
    ({"seeds": [0, 0], "sampling": {"height": 7}}, "sampling.height must be a positive multiple of 8, got 7"),
])
def test_translated_messages(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(small_config_dict(**overrides), "bad.yaml")
    assert str(info.value) == f"bad.yaml: {message}"


def test_not_a_mapping():
    with pytest.raises(ConfigError) as info:
        config_from_dict(None, "empty.yaml")
    assert str(info.value) == "empty.yaml: config: expected a mapping, got NoneType"
    with pytest.raises(ConfigError) as info:
        config_from_dict(small_config_dict(model=5), "bad.yaml")
    assert str(info.value) == "bad.yaml: model: expected a mapping, got int"


def test_every_section_has_a_validated_replace_and_to_dict():
    cfg = load_preset("smoke")
    scoring = cfg.scoring.replace(device="cuda:1", batch_size=4)
    assert (scoring.device, scoring.batch_size, scoring.settings) == ("cuda:1", 4, cfg.scoring.settings)
    assert cfg.scoring.device == "cpu"  # the original is untouched
    assert cfg.replace(seeds=[5]).seeds == (5,) and cfg.replace(batch_size=1).grid_hash() == cfg.grid_hash()
    assert cfg.methods[1].replace(label="F2D").display_name == "F2D"
    assert cfg.methods[1].to_dict() == {"name": "f2d", "params": {"weights": "random"}, "label": None}
    for section, changes, message in [
        (cfg.scoring, {"batch_size": 0}, "scoring.batch_size and scoring.chunk_size must be >= 1, got 0 and 256"),
        (cfg.model, {"device": "tpu"}, "model.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        (cfg.sampling, {"width": "64"}, "width: expected an integer, got '64'"),
        (cfg, {"seeds": [0, 0]}, "seeds: duplicates in [0, 0]"),
        (cfg, {"colour": 1}, "unknown key colour; allowed keys here: batch_size, faces, methods, model, name, "
         "prompts, sampling, scoring, seeds"),
    ]:
        with pytest.raises(ConfigError) as info:
            section.replace(**changes)
        assert str(info.value) == message


def test_params_settings_and_lists_stay_immutable():
    cfg = load_preset("smoke")
    assert isinstance(cfg.seeds, tuple) and isinstance(cfg.methods, tuple) and isinstance(cfg.scoring.scorers, tuple)
    with pytest.raises(TypeError):
        cfg.scoring.settings["clip"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.scoring.replace(settings={"clip": {}}).settings["siglip"] = {}  # type: ignore[index]
    with pytest.raises(Exception):
        cfg.sampling.height = 128  # type: ignore[misc]


def test_keys_added_later_are_written_only_when_set():
    """Sections keep the plain form runs were made with: a later key appears only once it is set."""
    plain = config_from_dict(small_config_dict()).to_dict()
    assert not {"precision", "workers", "block_size"} & set(plain["scoring"])
    assert not {"base", "base_revision", "sampling"} & set(plain["methods"][0])
    changed = config_from_dict(small_config_dict(scoring={"precision": "bf16", "workers": 0},
                                                 methods=[{"name": "sd-class", "sampling": "protocol",
                                                           "base": "f2d-bench/tiny-sd14"}])).to_dict()
    assert changed["scoring"]["precision"] == "bf16" and changed["scoring"]["workers"] == 0
    assert "block_size" not in changed["scoring"] and "sampling" not in changed["methods"][0]
    assert changed["methods"][0]["base"] == "f2d-bench/tiny-sd14"
    assert config_from_dict(changed) == config_from_dict(small_config_dict(
        scoring={"precision": "bf16", "workers": 0}, methods=[{"name": "sd-class", "base": "f2d-bench/tiny-sd14"}]))


def test_an_unknown_scorer_setting_lists_every_allowed_one_precision_included():
    from f2d_bench.scorers import check_scoring

    with pytest.raises(ConfigError, match=r"scoring\.settings\.clip\.modle: scorer clip has no such setting; "
                                          r"allowed: model, precision, pretrained, weights$"):
        check_scoring(["clip"], {"clip": {"modle": "ViT-B-32"}})
    check_scoring(["clip"], {"clip": {"model": "ViT-B-32", "precision": "bf16"}})  # both are settings
