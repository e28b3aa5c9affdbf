"""Identity models: architectures, strict loading of the official file layouts, crops and preprocessing.

Real AdaFace/SphereFace/FaceNet weights never load here, so each model is built, given random weights,
saved in its official file layout and loaded back through the real loader; wrong layouts must be refused
with a message naming the file and the keys. dlib's real weights do load (face-recognition-models), so
it is checked on the real photos.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from f2d_bench.errors import F2DBenchError, ModelUnavailableError
from f2d_bench.faces.align import ARCFACE_TEMPLATE_112
from f2d_bench.faces.detect import FaceDetector
from f2d_bench.scorers.identity import (
    WeightsLayoutError,
    adaface,
    dlib_face,
    facenet,
    parameter_count,
    sphereface,
)
from f2d_bench.scorers.identity.crops import l2_normalise

TEST_PHOTOS = Path(__file__).resolve().parents[1] / "f2d_bench" / "assets" / "faces"
OBAMAS = ["obama.jpg", "obama2.jpg", "obama3.jpg"]
OTHERS = ["biden.jpg", "grace_hopper.jpg", "astronaut.png", "franz-kafka.jpg"]


# --- helpers -------------------------------------------------------------------------------------------
def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics/affines and PReLU slopes on top of the default init, so that a loaded copy
    that missed any tensor would compute something else."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.dtype.is_floating_point:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(0.1 * noise)
            elif tensor.ndim == 1:  # BN scale, PReLU slope
                tensor.copy_(tensor + 0.1 * noise)
    return model.eval()


def _photo(name: str) -> Image.Image:
    return Image.open(TEST_PHOTOS / name)


@pytest.fixture(scope="module")
def detections():
    """The most probable MTCNN face of each real photo, with the photo."""
    detector = FaceDetector()
    out = {}
    for name in OBAMAS + OTHERS:
        image = _photo(name).convert("RGB")
        out[name] = (image, detector.detect(image)[0])
    return out


def _synthetic_face(template: np.ndarray, scale: float, angle_deg: float, offset, size=(400, 360)):
    """A black image with five coloured discs where a similarity transform puts the template points.

    Returns (image, landmarks5). The discs are the 'landmarks'; a crop that warps them back onto the
    template must show each disc centred on its template point.
    """
    theta = math.radians(angle_deg)
    rot = scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = template @ rot.T + np.asarray(offset, dtype=np.float64)
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.zeros((height, width, 3), dtype=np.float64)
    for (x, y), colour in zip(points, _COLOURS):
        # an antialiased disc of radius 2.5 crop pixels, centred at the (x, y) pixel-centre coordinate
        coverage = np.clip(2.5 * scale + 0.5 - np.hypot(xs - x, ys - y), 0.0, 1.0)
        pixels += coverage[..., None] * np.asarray(colour, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB"), points


_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _disc_centres(crop: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (x, y) of each coloured disc in an RGB crop."""
    pixels = crop.astype(np.float64)
    intensity = np.linalg.norm(pixels, axis=-1)
    ys, xs = np.mgrid[0 : crop.shape[0], 0 : crop.shape[1]]
    centres = []
    for colour in _COLOURS:
        direction = np.asarray(colour, dtype=np.float64) / np.linalg.norm(colour)
        cosine = (pixels @ direction) / np.maximum(intensity, 1e-9)
        weight = np.where((cosine > 0.98) & (intensity > 10), intensity, 0.0)
        assert weight.sum() > 0, f"disc {colour} is not in the crop"
        centres.append([(weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()])
    return np.array(centres)


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- crops: the landmarks land on each model's template ------------------------------------------------
CROPS = {
    "adaface (ArcFace 112)": (adaface.crop_adaface, ARCFACE_TEMPLATE_112, (112, 112)),
    "sphereface default (CelebBasis 112)": (
        lambda im, lm: sphereface.crop_sphereface(im, lm),
        sphereface.CELEBBASIS_TEMPLATE_112,
        (112, 112),
    ),
    "sphereface arcface": (
        lambda im, lm: sphereface.crop_sphereface(im, lm, "cosface-sphere20-112-arcface"),
        ARCFACE_TEMPLATE_112,
        (112, 112),
    ),
    "sphere20a (96x112)": (
        lambda im, lm: sphereface.crop_sphereface(im, lm, "sphere20a-112x96"),
        sphereface.SPHEREFACE_TEMPLATE_96x112,
        (112, 96),
    ),
}


@pytest.mark.parametrize("name", list(CROPS))
def test_crop_puts_landmarks_on_template(name):
    crop_fn, template, shape = CROPS[name]
    image, landmarks = _synthetic_face(np.asarray(template), scale=2.5, angle_deg=12.0, offset=(60, 40))
    crop = crop_fn(image, landmarks)
    assert crop.shape == shape + (3,) and crop.dtype == np.uint8
    np.testing.assert_allclose(_disc_centres(crop), template, atol=0.35)


def test_celebbasis_template_is_looser_than_arcface():
    """The default SphereFace crop is CelebBasis's: eyes about 25 px apart, not ArcFace's 35 px."""
    celeb = sphereface.CELEBBASIS_TEMPLATE_112
    eye_gap = np.hypot(*(celeb[1] - celeb[0]))
    assert 24.5 < eye_gap < 26.0
    assert np.hypot(*(ARCFACE_TEMPLATE_112[1] - ARCFACE_TEMPLATE_112[0])) > 35.0
    np.testing.assert_allclose(celeb[0], [42.974, 53.320], atol=1e-3)


# --- AdaFace -------------------------------------------------------------------------------------------
def test_adaface_parameter_and_tensor_counts():
    """Counts of the official net.py (build_model): parameters, and state-dict entries (with buffers)."""
    expected = {
        "ir_18": (24_020_352, 179),
        "ir_50": (43_585_600, 467),
        "ir_101": (65_150_912, 917),
    }
    for arch, (params, tensors) in expected.items():
        model = adaface.build_model(arch)
        assert (parameter_count(model), len(model.state_dict())) == (params, tensors), arch
    assert len(adaface.build_model("ir_101").body) == 3 + 13 + 30 + 3


def _lightning_ckpt(model, path, prefix="model.", extra=None, drop=None):
    """A PyTorch Lightning-style AdaFace checkpoint: pickled hyper-parameters, state_dict with the
    backbone under ``model.`` and the margin head under ``head.``."""
    state = {prefix + k: v for k, v in model.state_dict().items() if k != drop}
    state["head.kernel"] = torch.randn(512, 7)
    state.update(extra or {})
    torch.save(
        {
            "epoch": 3,
            "global_step": 1234,
            "pytorch-lightning_version": "1.8.6",
            "state_dict": state,
            "hyper_parameters": argparse.Namespace(arch="ir_101", head="adaface", m=0.4, h=0.333),
        },
        path,
    )
    return path


def test_adaface_ir101_lightning_checkpoint_roundtrip(tmp_path):
    source = _randomise(adaface.build_model("ir_101"))
    path = _lightning_ckpt(source, tmp_path / "adaface_ir101_webface12m.ckpt")
    loaded = adaface.load_adaface(path)  # the default arch is the paper's IR-101
    assert loaded.arch == "ir_101" and loaded.input_color == "bgr" and not loaded.training
    # every tensor arrived (same class, so equal tensors mean equal outputs; IR-101's forward pass is
    # left to the IR-18 tests to keep this one fast)
    loaded_state = loaded.state_dict()
    assert list(loaded_state) == list(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded_state[key]), key


@pytest.fixture(scope="module")
def ir18():
    return _randomise(adaface.build_model("ir_18"), seed=1)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "missing keys 1: 'body.3.res_layer.1.weight'"),
        ("extra", "unexpected keys 1: 'extra_layer.weight'"),
        ("module-prefix", "no keys starting with 'model.'"),
        ("bare", "no 'state_dict' entry"),
        ("wrong-arch", "looks like arch='ir_18'"),
        ("wrong-shape", "output_layer.3.weight [512, 100]"),
    ],
)
def test_adaface_wrong_layouts_are_refused(tmp_path, ir18, case, needle):
    path = tmp_path / f"{case}.ckpt"
    arch = "ir_18"
    if case == "missing":
        _lightning_ckpt(ir18, path, drop="body.3.res_layer.1.weight")
    elif case == "extra":
        _lightning_ckpt(ir18, path, extra={"model.extra_layer.weight": torch.zeros(3)})
    elif case == "module-prefix":
        _lightning_ckpt(ir18, path, prefix="module.")
    elif case == "bare":
        torch.save(ir18.state_dict(), path)
    elif case == "wrong-arch":
        _lightning_ckpt(ir18, path)
        arch = "ir_101"
    elif case == "wrong-shape":
        _lightning_ckpt(ir18, path, extra={"model.output_layer.3.weight": torch.zeros(512, 100)})
    with pytest.raises(WeightsLayoutError) as info:
        adaface.load_adaface(path, arch=arch)
    message = str(info.value)
    assert needle in message and path.name in message
    assert isinstance(info.value, ModelUnavailableError) and isinstance(info.value, F2DBenchError)


def test_adaface_missing_file_says_where_weights_are(tmp_path):
    with pytest.raises(ModelUnavailableError) as info:
        adaface.load_adaface(tmp_path / "adaface_ir101_webface12m.ckpt")
    message = str(info.value)
    assert "does not exist" in message and "adaface_ir101_webface12m.ckpt" in message
    assert "github.com/mk-minchul/AdaFace" in message and "local path" in message
    with pytest.raises(ModelUnavailableError, match="no AdaFace ir_101 checkpoint file was given"):
        adaface.load_adaface(None)


def test_adaface_cvlface_layout_is_rgb(tmp_path, ir18, detections):
    path = tmp_path / "model.pt"
    torch.save({"net." + k: v for k, v in ir18.state_dict().items()}, path)
    loaded = adaface.load_adaface(path, arch="ir_18", layout="cvlface")
    assert loaded.input_color == "rgb"
    image, det = detections["obama.jpg"]
    crop = adaface.crop_adaface(image, det)
    np.testing.assert_array_equal(
        adaface.embed_batch(loaded, [crop]), adaface.embed_batch(ir18, [crop], color="rgb")
    )
    with pytest.raises(WeightsLayoutError, match="A CVLface model.pt needs layout='cvlface'"):
        adaface.load_adaface(path, arch="ir_18")  # a CVLface file read as a Lightning one


def test_adaface_embedding_is_bgr_unit_and_follows_the_crop(ir18, detections):
    image, det = detections["obama.jpg"]
    emb = adaface.embed_adaface(ir18, image, det)
    assert emb.shape == (512,) and emb.dtype == np.float32
    assert abs(np.linalg.norm(emb) - 1.0) < 1e-5
    # the same thing by hand: the template crop, channels reversed to BGR, ((x/255)-0.5)/0.5
    crop = adaface.crop_adaface(image, det.landmarks)
    bgr = torch.from_numpy(crop[..., ::-1].copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        manual, _ = ir18((bgr / 255.0 - 0.5) / 0.5)
    np.testing.assert_allclose(emb, manual[0].numpy(), atol=1e-5)
    # RGB input gives another embedding: the channel order matters to the network
    rgb = adaface.embed_batch(ir18, [crop], color="rgb")[0]
    assert _cosine(emb, rgb) < 0.999
    # a batch of two faces equals two single embeddings
    other = adaface.crop_adaface(*detections["biden.jpg"])
    batch = adaface.embed_batch(ir18, np.stack([crop, other]))
    np.testing.assert_allclose(batch[0], emb, atol=1e-5)
    # norms are returned on request, as the network's (N,) pre-normalisation lengths
    vectors, norms = adaface.embed_batch(ir18, [crop], return_norms=True)
    assert norms.shape == (1,) and norms[0] > 0


def test_adaface_preprocess_range_and_channel_order():
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[..., 0] = 255  # pure red
    bgr = adaface.preprocess([crop])
    assert bgr.shape == (1, 3, 112, 112) and bgr.dtype == torch.float32
    assert bgr[0, 2].eq(1.0).all() and bgr[0, 0].eq(-1.0).all()  # red went to the last channel
    assert adaface.preprocess([crop], color="rgb")[0, 0].eq(1.0).all()
    with pytest.raises(ValueError, match="112x112x3"):
        adaface.preprocess([np.zeros((100, 112, 3), np.uint8)])


# --- SphereFace ----------------------------------------------------------------------------------------
SPHERE_COUNTS = {
    # variant: (parameters, state-dict tensors); CosFace sphere20 at 112x112 has fc 512*7*7 -> 512
    "cosface-sphere20-112": (24_501_952, 46),
    "cosface-sphere20-112-arcface": (24_501_952, 46),
    "sphere20a-112x96": (22_670_656, 62),  # without the A-Softmax classifier fc6
    "sfnet20-112": (24_500_992, 42),  # opensphere SFNet-20: convs with bias, no PReLU (tests/test_sfnet20.py)
}


def test_sphereface_default_and_variant_table():
    assert sphereface.DEFAULT_VARIANT == "cosface-sphere20-112"
    assert set(sphereface.VARIANTS) == set(SPHERE_COUNTS)
    default = sphereface.get_variant()
    assert default.weights_file == "net_sphere20_data_vggface2_acc_9955.pth"
    assert (default.color, default.mean, default.std, default.width, default.height) == (
        "rgb",
        127.5,
        127.5,
        112,
        112,
    )
    s20a = sphereface.get_variant("sphere20a-112x96")
    assert (s20a.color, s20a.mean, s20a.std, s20a.width, s20a.height) == ("bgr", 127.5, 128.0, 96, 112)
    with pytest.raises(ValueError, match="unknown SphereFace variant"):
        sphereface.get_variant("sfnet20")


@pytest.mark.parametrize("variant", list(SPHERE_COUNTS))
def test_sphereface_counts(variant):
    model = sphereface.build_sphereface(variant)
    assert (parameter_count(model), len(model.state_dict())) == SPHERE_COUNTS[variant]
    assert model.variant == variant


def _official_sphere_file(model, path, variant):
    """The official files are plain state dicts (torch.save(model.state_dict())), no 'module.' prefix;
    clcarwin's also carries the A-Softmax classifier fc6.weight [512, 10574]."""
    state = dict(model.state_dict())
    if variant == "sphere20a-112x96":
        state["fc6.weight"] = torch.randn(512, 10574)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("variant", ["cosface-sphere20-112", "sphere20a-112x96"])
def test_sphereface_roundtrip_and_embedding(tmp_path, variant, detections):
    source = _randomise(sphereface.build_sphereface(variant))
    path = _official_sphere_file(source, tmp_path / sphereface.get_variant(variant).weights_file, variant)
    loaded = sphereface.load_sphereface(path, variant)
    assert loaded.variant == variant and not loaded.training
    image, det = detections["obama2.jpg"]
    emb = sphereface.embed_sphereface(loaded, image, det, crop="warp")  # the one-step template crop
    assert emb.shape == (512,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-5
    crop = sphereface.crop_sphereface(image, det, variant)
    with torch.no_grad():
        expected = source(sphereface.preprocess([crop], variant))[0].numpy()
    np.testing.assert_allclose(emb, l2_normalise(expected), atol=1e-5)


def test_sphereface_variants_sharing_a_network_share_the_model(tmp_path, detections):
    model = _randomise(sphereface.build_sphereface())
    image, det = detections["obama.jpg"]
    default = sphereface.embed_sphereface(model, image, det)
    arcface = sphereface.embed_sphereface(model, image, det, variant="cosface-sphere20-112-arcface")
    assert _cosine(default, arcface) < 0.9999  # another crop, another embedding
    with pytest.raises(ValueError, match="built for SphereFace variant"):
        sphereface.embed_sphereface(model, image, det, variant="sphere20a-112x96")


def test_sphereface_preprocessing_per_variant():
    crop112 = np.full((112, 112, 3), (255, 0, 128), np.uint8)
    default = sphereface.preprocess([crop112])[0]
    torch.testing.assert_close(default[:, 0, 0], torch.tensor([1.0, -1.0, 0.5 / 127.5]))  # RGB, /127.5
    crop96 = np.full((112, 96, 3), (255, 0, 128), np.uint8)
    s20a = sphereface.preprocess([crop96], "sphere20a-112x96")[0]
    assert s20a.shape == (3, 112, 96)
    torch.testing.assert_close(
        s20a[:, 0, 0], torch.tensor([0.5 / 128, -127.5 / 128, 127.5 / 128])
    )  # BGR, /128


@pytest.fixture(scope="module")
def sphere_default():
    return _randomise(sphereface.build_sphereface(), seed=2)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("module-prefix", "extra 'module.' prefix"),
        ("missing", "missing keys 1: 'layer3.4.prelu2.weight'"),
        ("extra", "unexpected keys 1: 'fc6.weight'"),
        ("fc-112x96", "fc.weight [512, 21504] (expected [512, 25088])"),
        ("whole-module", "asks the unpickler for the global"),
        ("web-page", "is not a readable PyTorch file: it holds text (a web page, an error message?)"),
        ("lfs-pointer", "is not a readable PyTorch file: it holds text"),
        ("truncated", "is not a readable PyTorch file"),
        ("old-pickle", "is a PyTorch file in an old pickle format"),
    ],
)
def test_sphereface_wrong_layouts_are_refused(tmp_path, sphere_default, case, needle):
    state = dict(sphere_default.state_dict())
    path = tmp_path / "net_sphere20_data_vggface2_acc_9955.pth"
    if case == "module-prefix":  # saved from the DataParallel wrapper instead of model.module
        state = {"module." + k: v for k, v in state.items()}
    elif case == "missing":
        del state["layer3.4.prelu2.weight"]
    elif case == "extra":  # a classifier this variant's file does not have
        state["fc6.weight"] = torch.zeros(512, 10)
    elif case == "fc-112x96":  # CosFace_pytorch's own 112x96 sphere20
        state["fc.weight"] = torch.zeros(512, 512 * 7 * 6)
    if case == "whole-module":
        torch.save(sphere_default, path)
    elif case == "web-page":  # a download link that answered with its sign-in page
        path.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    elif case == "lfs-pointer":  # a clone without git-lfs: the pointer file instead of the weights
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n")
    elif case == "old-pickle":  # a legacy torch.save in pickle protocol 1: real tensors, no web page
        torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=1)
    elif case == "truncated":  # an interrupted download
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:4096])
    else:
        torch.save(state, path)
    with pytest.raises(WeightsLayoutError) as info:
        sphereface.load_sphereface(path)
    assert needle in str(info.value) and path.name in str(info.value)


def test_sphere20a_classifier_is_optional_but_checked(tmp_path):
    model = sphereface.build_sphereface("sphere20a-112x96")
    path = tmp_path / "sphere20a_20171020.pth"
    torch.save(model.state_dict(), path)  # a features-only file loads too
    sphereface.load_sphereface(path, "sphere20a-112x96")
    torch.save({**model.state_dict(), "fc6.weight": torch.zeros(256, 10574)}, path)
    with pytest.raises(WeightsLayoutError, match=r"fc6.weight \[256, 10574\] \(expected \[512, None\]\)"):
        sphereface.load_sphereface(path, "sphere20a-112x96")


@pytest.mark.parametrize(
    "variant, needle", [(None, "CelebBasis"), ("sphere20a-112x96", "clcarwin/sphereface_pytorch")]
)
def test_sphereface_missing_file_says_where_weights_are(tmp_path, variant, needle):
    with pytest.raises(ModelUnavailableError) as info:
        sphereface.load_sphereface(tmp_path / "nothing.pth", variant)
    message = str(info.value)
    assert needle in message and "nothing.pth" in message and "local path" in message


# --- FaceNet -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def facenet_source():
    return _randomise(facenet.build_facenet(), seed=3)


def _facenet_file(model, path, classes=8631):
    """facenet-pytorch's file: the backbone's state dict plus the training classifier 'logits'."""
    state = dict(model.state_dict())
    state["logits.weight"] = torch.randn(classes, 512)
    state["logits.bias"] = torch.randn(classes)
    torch.save(state, path)
    return path


def test_facenet_counts(facenet_source):
    assert parameter_count(facenet_source) == 23_482_624
    assert len(facenet_source.state_dict()) == 714
    assert not facenet_source.classify


def test_facenet_roundtrip_crop_and_embedding(tmp_path, facenet_source, detections):
    from facenet_pytorch.models.mtcnn import fixed_image_standardization
    from facenet_pytorch.models.utils.detect_face import extract_face

    path = _facenet_file(facenet_source, tmp_path / "20180402-114759-vggface2.pt")
    loaded = facenet.load_facenet(path)
    image, det = detections["grace_hopper.jpg"]
    crop = facenet.crop_facenet(image, det)
    # the crop is facenet-pytorch's own extract_face (margin 0, 160x160), pixel for pixel
    reference = extract_face(image, np.asarray(det.box), 160, 0)
    np.testing.assert_array_equal(crop, reference.permute(1, 2, 0).numpy().astype(np.uint8))
    torch.testing.assert_close(facenet.preprocess([crop])[0], fixed_image_standardization(reference))
    emb = facenet.embed_facenet(loaded, image, det)
    assert emb.shape == (512,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-5
    with torch.no_grad():
        expected = facenet_source(fixed_image_standardization(reference)[None])[0].numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("module-prefix", "extra 'module.' prefix"),
        ("missing", "missing keys 1: 'last_bn.running_var'"),
        ("extra", "unexpected keys 1: 'classifier.weight'"),
    ],
)
def test_facenet_wrong_layouts_are_refused(tmp_path, facenet_source, case, needle):
    state = dict(facenet_source.state_dict())
    if case == "module-prefix":
        state = {"module." + k: v for k, v in state.items()}
    elif case == "missing":
        del state["last_bn.running_var"]
    elif case == "extra":
        state["classifier.weight"] = torch.zeros(2, 512)
    path = tmp_path / "facenet.pt"
    torch.save(state, path)
    with pytest.raises(WeightsLayoutError) as info:
        facenet.load_facenet(path)
    assert needle in str(info.value) and "facenet.pt" in str(info.value)


def test_facenet_file_of_the_other_training_set_is_refused_under_this_ones_name(tmp_path, facenet_source):
    casia = _facenet_file(facenet_source, tmp_path / "20180408-102900-casia-webface.pt", classes=10575)
    with pytest.raises(WeightsLayoutError, match=r"has 10575 classes, the vggface2 weights 8631 .*pretrained"):
        facenet.load_facenet(casia)  # the default, pretrained: vggface2
    loaded = facenet.load_facenet(casia, pretrained="casia-webface")
    assert torch.equal(loaded.last_bn.running_mean, facenet_source.last_bn.running_mean)
    own = tmp_path / "own.pt"  # weights of one's own, saved without the classifier
    torch.save(dict(facenet_source.state_dict()), own)
    assert facenet.load_facenet(own) is not None


def test_facenet_cache_and_missing_file(tmp_path, monkeypatch, facenet_source):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = facenet.cached_weights_path("vggface2")
    assert cached == tmp_path / "torch" / "checkpoints" / "20180402-114759-vggface2.pt"
    with pytest.raises(ModelUnavailableError) as info:
        facenet.load_facenet(allow_download=False)
    message = str(info.value)
    assert "releases/download/v2.2.9/20180402-114759-vggface2.pt" in message and "local path" in message
    # a copy placed in facenet-pytorch's cache is used without any network
    cached.parent.mkdir(parents=True)
    _facenet_file(facenet_source, cached)
    loaded = facenet.load_facenet(allow_download=False)
    assert torch.equal(loaded.last_bn.running_mean, facenet_source.last_bn.running_mean)


# --- dlib (real weights) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dlib_descriptors(detections):
    model = dlib_face.load_dlib()
    return {name: dlib_face.descriptor_dlib(model, image, det) for name, (image, det) in detections.items()}


def test_dlib_weights_come_from_face_recognition_models():
    folder = dlib_face.packaged_model_dir()
    assert folder is not None
    assert (folder / dlib_face.RECOGNITION_FILE).is_file() and (
        folder / dlib_face.SHAPE_PREDICTOR_FILE
    ).is_file()


def test_dlib_same_person_under_threshold_others_over(dlib_descriptors):
    d = dlib_descriptors
    same = [dlib_face.euclidean_distance(d[a], d[b]) for i, a in enumerate(OBAMAS) for b in OBAMAS[i + 1 :]]
    cross = [dlib_face.euclidean_distance(d[a], d[b]) for a in OBAMAS for b in OTHERS]
    assert max(same) < dlib_face.SAME_PERSON_DISTANCE < min(cross), (same, cross)
    # the same ordering holds for the cosine of the normalised descriptors
    unit = {k: l2_normalise(v) for k, v in d.items()}
    same_cos = [float(unit[a] @ unit[b]) for i, a in enumerate(OBAMAS) for b in OBAMAS[i + 1 :]]
    cross_cos = [float(unit[a] @ unit[b]) for a in OBAMAS for b in OTHERS]
    assert min(same_cos) > max(cross_cos)


def test_dlib_embedding_shape_and_norm(detections):
    model = dlib_face.load_dlib()
    image, det = detections["biden.jpg"]
    emb = dlib_face.embed_dlib(model, image, det)
    raw = dlib_face.descriptor_dlib(model, image, det.box)
    assert emb.shape == (128,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-5
    assert np.linalg.norm(raw) > 1.1  # raw descriptors are not unit length: the 0.6 rule is on them
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw), atol=1e-6)
    points = dlib_face.dlib_landmarks(model, image, det)
    x1, y1, x2, y2 = det.box
    assert points.shape == (5, 2) and np.all((points >= [x1, y1]) & (points <= [x2, y2]))


def test_dlib_missing_file_says_where_weights_are(tmp_path):
    with pytest.raises(ModelUnavailableError) as info:
        dlib_face.load_dlib(recognition_path=tmp_path / "dlib_face_recognition_resnet_model_v1.dat")
    message = str(info.value)
    assert "dlib.net/files/dlib_face_recognition_resnet_model_v1.dat.bz2" in message
    assert "face-recognition-models" in message and "local path" in message
