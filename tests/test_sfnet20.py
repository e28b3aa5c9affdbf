"""opensphere's SFNet-20 as a SphereFace variant: architecture, checkpoint layout (loaded strictly), crop.

No trained SFNet-20 file loads offline, so one is made as opensphere's trainer writes it: the backbone's
state dict from its DistributedDataParallel wrapper (every key prefixed ``module.``), random weights.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from f2d_bench.faces.align import ARCFACE_TEMPLATE_112, arcface_align
from f2d_bench.faces.detect import FaceDetector
from f2d_bench.scorers.base import ScoringContext
from f2d_bench.scorers.identity import WeightsLayoutError, parameter_count, sphereface
from f2d_bench.scorers.identity.crops import l2_normalise
from f2d_bench.scorers.identity.scorer import SphereFaceScorer

from conftest import TEST_PHOTOS

VARIANT = "sfnet20-112"


def _trained_like(seed: int = 0) -> torch.nn.Module:
    """SFNet-20 with random weights whose biases are not zero (so a missed tensor shows)."""
    torch.manual_seed(seed)
    model = sphereface.build_sphereface(VARIANT)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("bias"):
                tensor.normal_(0.0, 0.05)
    return model


def _opensphere_file(model, path):
    """``backbone_<iter>.pth`` as opensphere's IterRunner.save_model writes it (DDP-wrapped keys)."""
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def face():
    image = Image.open(TEST_PHOTOS / "obama2.jpg").convert("RGB")
    return image, FaceDetector().detect(image)[0]


def test_architecture_matches_opensphere_keys_and_counts():
    model = sphereface.build_sphereface(VARIANT)
    keys = list(model.state_dict())
    # stage 1: ConvBlock then one BasicBlock; stage 3: ConvBlock then four; fc on 512 x 7 x 7
    assert keys[:6] == ["layer1.0.conv.weight", "layer1.0.conv.bias", "layer1.1.conv1.weight",
                        "layer1.1.conv1.bias", "layer1.1.conv2.weight", "layer1.1.conv2.bias"]
    assert "layer3.4.conv2.weight" in keys and "layer3.5.conv1.weight" not in keys
    assert model.state_dict()["fc.weight"].shape == (512, 512 * 7 * 7)
    assert (parameter_count(model), len(keys)) == (24_500_992, 42)
    assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 512)
    spec = sphereface.get_variant(VARIANT)
    assert (spec.color, spec.mean, spec.std, spec.width, spec.height, spec.crop) == (
        "rgb", 127.5, 127.5, 112, 112, "warp")
    np.testing.assert_array_equal(spec.template, ARCFACE_TEMPLATE_112)


def test_residual_unit_adds_after_the_relu():
    """opensphere's deprecated BasicBlock is x + ReLU(conv2(ReLU(conv1(x)))): with conv2's bias very
    negative the branch is 0 and the unit passes negative inputs through unchanged."""
    block = sphereface._SFBasicBlock(4)
    with torch.no_grad():
        block.conv2.bias.fill_(-1e3)
    x = -torch.rand(1, 4, 6, 6)
    torch.testing.assert_close(block(x), x)


def test_opensphere_checkpoint_loads_strictly_and_embeds_the_arcface_crop(tmp_path, face):
    source = _trained_like()
    path = _opensphere_file(source, tmp_path / "backbone_80000.pth")
    loaded = sphereface.load_sphereface(path, VARIANT)
    assert loaded.variant == VARIANT and not loaded.training
    image, det = face
    emb = sphereface.embed_sphereface(loaded, image, det)
    assert emb.shape == (512,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-5
    np.testing.assert_array_equal(emb, sphereface.embed_sphereface(loaded, image, det))  # deterministic
    # opensphere's input: the ArcFace 112 crop, RGB, (x - 127.5) / 127.5
    crop = arcface_align(image, det.landmarks, 112, interpolation=cv2.INTER_LINEAR)  # warpAffine's default
    x = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = l2_normalise(source((x - 127.5) / 127.5).numpy())[0]
    np.testing.assert_allclose(emb, expected, atol=1e-5)


@pytest.mark.parametrize("case, needle", [
    ("no-prefix", "must carry the prefix 'module.'"),
    ("missing", "layer4.1.conv2.weight"),
    ("wrong-fc", "fc.weight"),
])
def test_wrong_layouts_are_refused(tmp_path, case, needle):
    state = {f"module.{k}": v for k, v in _trained_like().state_dict().items()}
    if case == "no-prefix":
        state = {k[len("module."):]: v for k, v in state.items()}
    elif case == "missing":
        del state["module.layer4.1.conv2.weight"]
    else:
        state["module.fc.weight"] = torch.zeros(512, 512 * 7 * 6)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    with pytest.raises(WeightsLayoutError, match=needle.replace(".", r"\.")):
        sphereface.load_sphereface(path, VARIANT)


def test_scorer_runs_the_variant_through_its_loader(tmp_path, face):
    path = _opensphere_file(_trained_like(), tmp_path / "backbone_80000.pth")
    context = ScoringContext(prompt_set=None, device="cpu", input_detections={})
    scorer = SphereFaceScorer({"variant": VARIANT, "checkpoint": str(path)}, context)
    assert scorer.settings["crop"] == "warp"
    image, det = face
    got = scorer._embed([image], [det])[0]
    np.testing.assert_array_equal(got, sphereface.embed_sphereface(sphereface.load_sphereface(path, VARIANT),
                                                                   image, det))
