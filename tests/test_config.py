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


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="paper"):
        load_preset("papr")


def test_load_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_config_dict()))
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.seeds == (0, 1)
