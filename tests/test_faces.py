"""Tests of the face module on the real photos in f2d_bench/assets/faces (MTCNN runs on the CPU)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from f2d_bench.errors import F2DBenchError
from f2d_bench.faces.align import (
    ARCFACE_TEMPLATE_112,
    arcface_align,
    ffhq_align,
    ffhq_quad,
    similarity_transform,
)
from f2d_bench.faces.cli import register
from f2d_bench.faces.detect import Detection, FaceDetector
from f2d_bench.faces.faceset import PREPARING_NAME, Face, load_face_set, sanitize_face_id
from f2d_bench.faces.imageio import read_image, read_video_frame, to_rgb8
from f2d_bench.faces.prepare import prepare_faces

from conftest import TEST_PHOTOS, cli_parser, prepared_crops

ASSETS = TEST_PHOTOS
PHOTOS = [
    "astronaut.png",
    "biden.jpg",
    "camera.png",
    "franz-kafka.jpg",
    "grace_hopper.jpg",
    "obama.jpg",
    "obama2.jpg",
    "obama3.jpg",
]
SIZE = 512


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, detector):
    """prepare_faces once on copies of all photos plus a text file (about 8 s of MTCNN on two cores: the
    tests using it are marked slow)."""
    src = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(ASSETS / name, src / name)
    (src / "notes.txt").write_text("not a photo\n")
    dst = tmp_path_factory.mktemp("prepared") / "faces"
    report = prepare_faces(src, dst, detector=detector, progress=False)
    return report, dst


def _quad_to_output(points: np.ndarray, landmarks5: np.ndarray, size: int) -> np.ndarray:
    """Where FFHQ's quad (from landmarks5) sends ``points`` (source pixels) in a size x size crop."""
    quad, _ = ffhq_quad(landmarks5)
    axes = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)  # columns: output x and y directions
    return (np.asarray(points) - quad[0]) @ np.linalg.inv(axes).T * size


def _redetect_padded(detector: FaceDetector, crop: np.ndarray, pad: int) -> np.ndarray:
    """Landmarks of the best face in ``crop`` (MTCNN is unreliable on tight crops: pad with gray first)."""
    padded = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    found = detector.detect(Image.fromarray(padded))
    assert found, "no face found again in the aligned crop"
    return found[0].landmarks - pad


# --- detection ------------------------------------------------------------------------------------------


def test_detect_sorted_by_probability_with_float_landmarks(detector):
    found = detector.detect(read_image(ASSETS / "obama.jpg"))
    assert len(found) == 2  # the photo's face at ~0.9997 and a spurious box at ~0.815
    assert found[0].prob > 0.999 and 0.7 < found[1].prob < 0.9
    for det in found:
        assert isinstance(det, Detection)
        assert det.landmarks.dtype == np.float64 and det.landmarks.shape == (5, 2)
        assert all(isinstance(v, float) for v in det.box) and isinstance(det.prob, float)
        x1, y1, x2, y2 = det.box
        assert x1 < x2 and y1 < y2
    eyes = found[0].landmarks
    assert eyes[0, 0] < eyes[1, 0] and eyes[3, 0] < eyes[4, 0]  # image-left before image-right
    assert eyes[:2, 1].max() < eyes[2, 1] < eyes[3:, 1].min()  # eyes above nose above mouth
    with pytest.raises(ValueError):
        found[0].landmarks[0, 0] = 0.0  # read-only: the dataclass is frozen


def test_detect_flat_image_gives_empty_list(detector):
    assert detector.detect(Image.new("RGB", (200, 200), (128, 128, 128))) == []


# --- image input ----------------------------------------------------------------------------------------


def test_to_rgb8_modes():
    gray = np.asarray(Image.open(ASSETS / "camera.png").convert("L"))
    sixteen = Image.fromarray((gray.astype(np.uint16) * 257))
    assert sixteen.mode == "I;16"
    out = to_rgb8(sixteen)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 1], gray)
    as_int32 = Image.fromarray(gray.astype(np.int32) * 257)  # mode "I", 16-bit range
    assert np.array_equal(np.asarray(to_rgb8(as_int32))[..., 0], gray)
    as_8bit_int32 = Image.fromarray(gray).convert("I")  # mode "I", 8-bit range
    assert np.array_equal(np.asarray(to_rgb8(as_8bit_int32))[..., 2], gray)
    # a dark 16-bit image (every value <= 255) is 16-bit all the same: near black, not the 8-bit image
    dark = Image.fromarray(gray.astype(np.uint16))
    assert dark.mode == "I;16" and np.asarray(to_rgb8(dark)).max() <= 1

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = np.asarray(to_rgb8(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 0].tolist() == [255, 255, 255]
    la = np.asarray(to_rgb8(Image.fromarray(rgba[..., [1, 3]], "LA")))
    assert la[0, 0].tolist() == [0, 0, 0] and la[3, 0].tolist() == [255, 255, 255]
    palette = Image.fromarray(np.full((4, 4, 3), 102, np.uint8)).convert("P")  # a web-palette colour
    assert palette.mode == "P" and np.asarray(to_rgb8(palette))[0, 0].tolist() == [102, 102, 102]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(to_rgb8(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_read_image_unreadable_names_file(tmp_path):
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"\x00not a jpeg at all" * 10)
    with pytest.raises(F2DBenchError, match="garbage.jpg"):
        read_image(bad)
    with pytest.raises(F2DBenchError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def _write_video(path: Path, frames: list[np.ndarray], fourcc: str) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5, (width, height))
    assert writer.isOpened(), f"cannot write {fourcc} video"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def video_frames():
    """Five 320x320 frames: 0, 1 and 4 flat gray, 2 and 3 the astronaut photo."""
    face = np.asarray(read_image(ASSETS / "astronaut.png").resize((320, 320), Image.Resampling.LANCZOS))
    flat = np.full_like(face, 128)
    return [flat, flat, face, face, flat]


def test_read_video_frame_index_and_range(tmp_path, video_frames):
    video = tmp_path / "clip.avi"
    _write_video(video, video_frames, "MJPG")
    frame = np.asarray(read_video_frame(video, 2), dtype=np.float64)
    assert frame.shape == (320, 320, 3)
    assert np.abs(frame - video_frames[2]).mean() < 8  # MJPG is lossy
    assert np.abs(np.asarray(read_video_frame(video, 0), dtype=np.float64) - 128).mean() < 3
    with pytest.raises(F2DBenchError, match=r"clip\.avi.*5 frames"):
        read_video_frame(video, 5)


def test_a_frame_beyond_the_count_the_container_reports_is_read(tmp_path, video_frames):
    import struct

    video = tmp_path / "clip.avi"
    _write_video(video, video_frames, "MJPG")
    data = bytearray(video.read_bytes())
    # An AVI whose headers under-count its frames: avih's total frames (4th field) and the video
    # stream's strh length (9th field) say 2 of the 5 frames it holds.
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, 2)
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, 2)
    video.write_bytes(bytes(data))
    assert cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT) == 2
    frame = np.asarray(read_video_frame(video, 3), dtype=np.float64)
    assert np.abs(frame - video_frames[3]).mean() < 8
    with pytest.raises(F2DBenchError, match=r"clip\.avi.*5 frames"):  # the count decoding found
        read_video_frame(video, 5)


@pytest.mark.parametrize(("suffix", "fourcc"), [(".mp4", "mp4v"), (".avi", "MJPG")])
def test_prepare_video_uses_frame_index(tmp_path, detector, video_frames, suffix, fourcc):
    src = tmp_path / "src"
    src.mkdir()
    _write_video(src / f"clip{suffix}", video_frames, fourcc)
    at_face = prepare_faces(src, tmp_path / "a", frame_index=3, detector=detector, progress=False)
    assert [f.face_id for f in at_face.faces] == ["clip"] and at_face.faces[0].frame_index == 3
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["faces"][0]["frame_index"] == 3 and manifest["settings"]["frame_index"] == 3
    assert Image.open(tmp_path / "a" / "clip.png").size == (SIZE, SIZE)

    blank = prepare_faces(src, tmp_path / "b", frame_index=0, detector=detector, progress=False)
    assert not blank.faces and "no face" in blank.skipped[0].reason

    beyond = prepare_faces(src, tmp_path / "c", frame_index=40, detector=detector, progress=False)
    assert not beyond.faces
    assert re.search(r"frame 40 is out of range.*5 frames", beyond.skipped[0].reason)


# --- FFHQ alignment -------------------------------------------------------------------------------------


def test_ffhq_quad_frontal_geometry():
    # Eyes 40 px apart, mouth 40 px below: x = eye_to_eye + 90-degree-turned eye_to_mouth = (80, 0),
    # scaled to max(2 * 40, 1.8 * 40) = 80; centre 10% of the way to the mouth.
    landmarks = np.array([[100, 100], [140, 100], [120, 120], [105, 140], [135, 140]], float)
    quad, qsize = ffhq_quad(landmarks)
    assert qsize == pytest.approx(160.0)
    np.testing.assert_allclose(quad, [[40, 24], [40, 184], [200, 184], [200, 24]], atol=1e-9)
    # A long face: the eye-to-mouth distance (1.8 * 60 = 108 > 80) sets the size.
    long_face = landmarks.copy()
    long_face[3:, 1] += 20
    assert ffhq_quad(long_face)[1] == pytest.approx(2 * 1.8 * 60)
    # Rotating the face rotates the quad with it.
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rquad, rsize = ffhq_quad(landmarks @ rot.T)
    np.testing.assert_allclose(rquad, quad @ rot.T, atol=1e-9)
    assert rsize == pytest.approx(qsize)


def test_ffhq_align_synthetic_points_land_where_quad_says():
    # Dots drawn at known places must appear where the quad sends them (checks orientation and order).
    image = np.full((300, 300, 3), 255, np.uint8)
    landmarks = np.array([[120, 130], [175, 140], [150, 165], [125, 190], [165, 198]], float)
    dots = {(0, 0, 255): (150.0, 110.0), (255, 0, 0): (110.0, 200.0), (0, 200, 0): (190.0, 170.0)}
    for colour, (x, y) in dots.items():
        cv2.circle(image, (int(x), int(y)), 4, colour, -1)
    out = np.asarray(ffhq_align(Image.fromarray(image), landmarks, 256), dtype=np.float64)
    for colour, point in dots.items():
        distance = np.linalg.norm(out - np.array(colour, float), axis=2)
        ys, xs = np.nonzero(distance < 60)
        assert len(xs), f"dot {colour} missing from the aligned crop"
        expected = _quad_to_output([point], landmarks, 256)[0]
        assert np.hypot(xs.mean() - expected[0], ys.mean() - expected[1]) < 2.0


@pytest.mark.slow
def test_prepare_real_photos_one_face_each(prepared):
    report, dst = prepared
    assert sorted(f.face_id for f in report.faces) == sorted(Path(p).stem for p in PHOTOS)
    assert [s.source.name for s in report.skipped] == ["notes.txt"]
    assert "unsupported" in report.skipped[0].reason
    for face in report.faces:
        with Image.open(dst / f"{face.face_id}.png") as crop:
            assert crop.size == (SIZE, SIZE) and crop.mode == "RGB"
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["version"] == 1
    settings = manifest["settings"]
    assert settings["min_prob"] == 0.9 and settings["several"] == "skip" and settings["output_size"] == SIZE
    assert settings["frame_index"] == 0 and settings["detector"] == "facenet-pytorch MTCNN"
    entries = {entry["face_id"]: entry for entry in manifest["faces"]}
    assert set(entries) == {f.face_id for f in report.faces}
    for entry in entries.values():
        assert entry["file"] == f"{entry['face_id']}.png" and entry["frame_index"] is None
        assert entry["prob"] >= 0.999 and np.asarray(entry["landmarks"]).shape == (5, 2)
        assert len(entry["box"]) == 4
    assert entries["obama"]["n_detections_ignored"] == 1  # the 0.815 box
    assert entries["obama2"]["n_detections_ignored"] == 0
    assert manifest["skipped"] == [{"source": "notes.txt", "reason": report.skipped[0].reason}]
    assert "8 face(s) written" in report.summary() and "notes.txt" in report.summary()
    assert not [p.name for p in dst.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.slow
def test_ffhq_crops_put_eyes_where_ffhq_puts_them(prepared, detector):
    _, dst = prepared
    manifest = json.loads((dst / "manifest.json").read_text())
    tolerance = 0.03 * SIZE
    for entry in manifest["faces"]:
        source_landmarks = np.asarray(entry["landmarks"])
        expected = _quad_to_output(source_landmarks, source_landmarks, SIZE)
        found = detector.detect(Image.open(dst / entry["file"]))
        assert found and found[0].prob > 0.99, entry["face_id"]
        eyes = found[0].landmarks[:2]
        error = np.abs(eyes - expected[:2]).max()
        assert error < tolerance, f"{entry['face_id']}: eyes {error:.1f} px from the FFHQ geometry"
        # FFHQ's canonical frame: eye midpoint centred horizontally, eyes level, about 0.47 high.
        middle = eyes.mean(axis=0)
        assert abs(middle[0] - SIZE / 2) < tolerance, entry["face_id"]
        assert 0.42 * SIZE < middle[1] < 0.49 * SIZE, entry["face_id"]
        tilt = np.degrees(np.arctan2(*(eyes[1] - eyes[0])[::-1]))
        # Level within a few degrees: FFHQ's x axis also follows the mouth, so a turned head tilts a bit.
        assert abs(tilt) < 8, f"{entry['face_id']}: eye line tilted {tilt:.1f} degrees"


def test_ffhq_align_pads_and_shrinks(detector):
    photo = read_image(ASSETS / "obama2.jpg")
    landmarks = detector.detect(photo)[0].landmarks
    # Face at the top-left corner: the quad leaves the image and the padding path runs.
    x0, y0 = landmarks[:, 0].min() - 60, landmarks[:, 1].min() - 60
    corner = photo.crop((int(x0), int(y0), photo.width, photo.height))
    shifted = landmarks - [int(x0), int(y0)]
    quad, _ = ffhq_quad(shifted)
    assert quad.min() < 0
    padded = np.asarray(ffhq_align(corner, shifted, 256))
    assert padded.shape == (256, 256, 3)
    assert padded[:8, :8].mean() > 20  # faded toward the median colour, not left black
    full = np.asarray(ffhq_align(photo, landmarks, 256), dtype=np.float64)
    # Below the eyes and right of the cut (plus the blur's reach) the crops must agree.
    rows, cols = slice(130, 220), slice(100, 200)
    assert np.abs(padded[rows, cols] - full[rows, cols]).mean() < 3
    assert np.abs(padded[:100, :60] - full[:100, :60]).mean() > 20  # ... and the padded part differs
    # qsize ~550 px at output 128 pre-shrinks by 2; the result matches a large crop scaled down.
    small = np.asarray(ffhq_align(photo, landmarks, 128), dtype=np.float64)
    reference = ffhq_align(photo, landmarks, 512).resize((128, 128), Image.Resampling.LANCZOS)
    reference = np.asarray(reference, dtype=np.float64)
    assert np.abs(small - reference).mean() < 4


# --- ArcFace alignment ----------------------------------------------------------------------------------


def test_similarity_transform_recovers_known_similarity():
    angle, scale, shift = np.deg2rad(23.0), 1.7, np.array([12.5, -30.25])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE_112.copy()
    dst = src @ (scale * rotation).T + shift
    matrix = similarity_transform(src, dst)
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-10)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)
    # Least squares with noise: the symmetric, noise-free part is still recovered closely.
    noisy = dst + np.random.default_rng(0).normal(0, 0.01, dst.shape)
    np.testing.assert_allclose(similarity_transform(src, noisy), matrix, atol=0.05)
    # A mirrored target is fitted by a proper rotation, never a reflection.
    mirrored = similarity_transform(src, src * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), dst)


@pytest.mark.parametrize("name", ["obama.jpg", "biden.jpg", "grace_hopper.jpg", "franz-kafka.jpg"])
def test_arcface_align_puts_landmarks_on_template(detector, name):
    photo = read_image(ASSETS / name)
    landmarks = detector.detect(photo)[0].landmarks
    crop = arcface_align(photo, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    found = _redetect_padded(detector, crop, 56)
    # Re-detected points sit where the fitted similarity sends the source points ...
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE_112)
    warped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.linalg.norm(found - warped, axis=1).max() < 4.0
    # ... and the eyes sit on the template (the nose and mouth differ by the face's own proportions).
    assert np.linalg.norm(found[:2] - ARCFACE_TEMPLATE_112[:2], axis=1).max() < 6.0
    assert np.linalg.norm(found - ARCFACE_TEMPLATE_112, axis=1).mean() < 6.0


def test_arcface_align_scales_template_with_size(detector):
    photo = read_image(ASSETS / "obama2.jpg")
    landmarks = detector.detect(photo)[0].landmarks
    small = arcface_align(photo, landmarks).astype(np.float64)
    large = arcface_align(np.asarray(photo), landmarks, size=224)  # array input this time
    large = cv2.resize(large, (112, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(large - small).mean() < 6


# --- several faces, no face, unreadable, collisions -----------------------------------------------------


@pytest.fixture(scope="module")
def two_faces_dir(tmp_path_factory):
    """grace_hopper (large face, left) pasted beside a smaller franz-kafka (right)."""
    left = read_image(ASSETS / "grace_hopper.jpg")  # 512x600
    right = read_image(ASSETS / "franz-kafka.jpg")
    right = right.resize((right.width * 400 // right.height, 400), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (left.width + right.width, left.height), (120, 120, 120))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 100))
    src = tmp_path_factory.mktemp("two")
    canvas.save(src / "pair.png")
    return src, left.width


def test_several_faces_skipped_by_default(tmp_path, detector, two_faces_dir):
    src, _ = two_faces_dir
    report = prepare_faces(src, tmp_path / "out", detector=detector, progress=False)
    assert not report.faces and not (tmp_path / "out" / "pair.png").exists()
    assert report.skipped[0].source.name == "pair.png"
    assert report.skipped[0].reason.startswith("2 faces")


def test_several_faces_largest_keeps_the_biggest(tmp_path, detector, two_faces_dir):
    src, split = two_faces_dir
    report = prepare_faces(src, tmp_path / "out", several="largest", detector=detector, progress=False)
    assert [f.face_id for f in report.faces] == ["pair"] and not report.skipped
    face = report.faces[0]
    assert face.detection.box[2] < split  # the left, larger face
    assert face.n_other_faces == 1
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["faces"][0]
    assert entry["n_other_faces"] == 1 and entry["box"][2] < split
    assert Image.open(tmp_path / "out" / "pair.png").size == (SIZE, SIZE)


def test_no_face_and_unreadable_are_skipped_with_reasons(tmp_path, detector, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (256, 256), (90, 140, 60)).save(src / "flat.png")
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "noise.jpg")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage bytes, not a JPEG")
    shutil.copy(ASSETS / "franz-kafka.jpg", src / "kafka.jpg")
    report = prepare_faces(src, tmp_path / "out", detector=detector, progress=True)
    reasons = {s.source.name: s.reason for s in report.skipped}
    assert set(reasons) == {"flat.png", "noise.jpg", "broken.jpg"}
    assert "no face" in reasons["flat.png"] and "no face" in reasons["noise.jpg"]
    assert "cannot read" in reasons["broken.jpg"] and "broken.jpg" in reasons["broken.jpg"]
    assert [f.face_id for f in report.faces] == ["kafka"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["kafka.png", "manifest.json"]
    printed = capsys.readouterr().err
    assert "broken.jpg" in printed and "3 source(s) skipped" in printed


def test_colliding_ids_are_an_error_before_writing(tmp_path, detector):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ASSETS / "camera.png", src / "a b.png")
    shutil.copy(ASSETS / "camera.png", src / "a_b.jpg")
    dst = tmp_path / "out"
    with pytest.raises(F2DBenchError, match=r"a b\.png.*a_b\.jpg|a_b\.jpg.*a b\.png"):
        prepare_faces(src, dst, detector=detector, progress=False)
    assert not dst.exists()


def test_grayscale_rgba_and_16bit_photos(tmp_path, detector):
    src = tmp_path / "src"
    src.mkdir()
    photo = read_image(ASSETS / "grace_hopper.jpg")
    gray = np.asarray(photo.convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(src / "hopper16.png")
    assert Image.open(src / "hopper16.png").mode.startswith("I")
    rgba = photo.convert("RGBA")
    alpha = np.full(photo.size[::-1], 255, np.uint8)
    alpha[:40] = 0  # a transparent strip above the head
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(src / "hopper_rgba.png")
    shutil.copy(ASSETS / "camera.png", src / "camera.png")
    assert Image.open(src / "camera.png").mode == "L"
    report = prepare_faces(src, tmp_path / "out", detector=detector, progress=False)
    assert sorted(f.face_id for f in report.faces) == ["camera", "hopper16", "hopper_rgba"]
    for face in report.faces:
        assert Image.open(face.file).mode == "RGB"


# --- face ids and face sets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "..", ".", "", "/", "../../etc/passwd", "a/b", "a\\b", "..\\..\\x",
        "...hidden", "é", "C:\\x", "a..b", " ", "~",
    ],
)
def test_sanitize_face_id_is_safe(name):
    face_id = sanitize_face_id(name)
    assert face_id and face_id not in (".", "..")
    assert "/" not in face_id and "\\" not in face_id and not face_id.startswith(".")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", face_id)
    assert sanitize_face_id(face_id) == face_id == sanitize_face_id(name)  # idempotent and stable


def test_sanitize_face_id_examples():
    assert sanitize_face_id("obama2") == "obama2"
    assert sanitize_face_id("Jane Doe (2)") == "Jane_Doe__2_"
    assert sanitize_face_id("../x") == "x"
    assert sanitize_face_id("a..b") == "a_b"  # no ".." survives, so the id is always a valid key
    assert sanitize_face_id("") == "face"
    assert len(sanitize_face_id("x" * 1000)) == 200


@pytest.mark.slow
def test_load_face_set_from_manifest(prepared):
    report, dst = prepared
    faces = load_face_set(dst)
    assert [f.face_id for f in faces] == sorted(Path(p).stem for p in PHOTOS)
    assert all(isinstance(f, Face) and f.path == dst / f"{f.face_id}.png" for f in faces)


def test_load_face_set_from_files_and_errors(tmp_path):
    with pytest.raises(F2DBenchError, match="missing"):
        load_face_set(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(F2DBenchError, match="empty"):
        load_face_set(empty)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ["b.JPG", "a.png", "c d.webp"]:
        (plain / name).write_bytes(b"")
    assert [f.face_id for f in load_face_set(plain)] == ["a", "b", "c_d"]
    (plain / "c_d.jpeg").write_bytes(b"")
    with pytest.raises(F2DBenchError, match="c_d") as caught:
        load_face_set(plain)
    assert "c d.webp" in str(caught.value) and "c_d.jpeg" in str(caught.value)
    # A manifest that lists a missing file names it.
    manifest = {"version": 1, "faces": [{"face_id": "z", "file": "z.png"}]}
    (plain / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(F2DBenchError, match="z.png"):
        load_face_set(plain)


def _two_photos(src):
    """A source folder of two shipped photos (franz-kafka, astronaut)."""
    src.mkdir()
    for name in ["franz-kafka.jpg", "astronaut.png"]:
        shutil.copy(ASSETS / name, src / name)
    return src


def test_rerun_overwrites_consistently(tmp_path, detector):
    src = _two_photos(tmp_path / "src")
    dst = tmp_path / "out"
    prepare_faces(src, dst, detector=detector, progress=False)
    (dst / "mine.txt").write_text("a user's file")
    first = (dst / "astronaut.png").read_bytes()
    (src / "franz-kafka.jpg").unlink()
    report = prepare_faces(src, dst, detector=detector, progress=False)
    assert [f.face_id for f in report.faces] == ["astronaut"]
    assert sorted(p.name for p in dst.iterdir()) == ["astronaut.png", "manifest.json", "mine.txt"]
    assert (dst / "astronaut.png").read_bytes() == first  # deterministic output
    assert [f.face_id for f in load_face_set(dst)] == ["astronaut"]


def test_a_rerun_that_finds_no_face_keeps_the_face_set_and_a_foreign_folder_is_refused(tmp_path, detector):
    src = _two_photos(tmp_path / "src")
    dst = tmp_path / "out"
    prepare_faces(src, dst, detector=detector, progress=False)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    empty = tmp_path / "mistyped"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    with pytest.raises(F2DBenchError, match=r"no face came out of .* \(2 face\(s\)\) is kept as it was"):
        prepare_faces(empty, dst, detector=detector, progress=False)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # crops, manifest, no marker left
    assert [f.face_id for f in load_face_set(dst)] == ["astronaut", "franz-kafka"]
    # a folder of one's own crops, without a manifest: not overwritten
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "astronaut.png").write_bytes(b"my own crop")
    with pytest.raises(F2DBenchError, match=r"already holds files that faces prepare did not write \(astronaut.png\)"):
        prepare_faces(src, mine, detector=detector, progress=False)
    assert (mine / "astronaut.png").read_bytes() == b"my own crop" and len(list(mine.iterdir())) == 1


def test_a_source_that_cannot_be_opened_is_skipped_with_its_reason(tmp_path, detector):
    src = _two_photos(tmp_path / "src")
    (src / "loop.jpg").symlink_to(src / "loop.jpg")  # ELOOP, as a file without read permission (EACCES)
    report = prepare_faces(src, tmp_path / "out", detector=detector, progress=False)
    assert [f.face_id for f in report.faces] == ["astronaut", "franz-kafka"]
    [skipped] = [s for s in report.skipped if s.source.name == "loop.jpg"]
    assert "cannot open" in skipped.reason and "symbolic links" in skipped.reason
    assert not (tmp_path / "out" / PREPARING_NAME).exists()


@pytest.mark.parametrize("entries, match", [
    ([{"face_id": None, "file": "a.png"}], r"face_id None .* non-empty text"),
    ([{"face_id": 7, "file": "a.png"}], r"face_id 7 .* non-empty text"),
    ([{"face_id": "a", "file": "a.png"}, {"face_id": "b", "file": "a.png"}],
     r"lists a.png for face 'b' and for face 'a': one photo would be two identities"),
    ([{"face_id": "m", "file": "manifest.json"}], r"lists manifest.json for face 'm', the manifest itself"),
])
def test_a_hand_edited_manifest_is_not_misread(tmp_path, entries, match):
    (tmp_path / "a.png").write_bytes(prepared_crops()["obama"].read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps({"faces": entries}))
    with pytest.raises(F2DBenchError, match=match):
        load_face_set(tmp_path)


class _Dies:
    """A detector whose process 'dies' (raises) at its ``at``-th call, as a kill mid-prepare would stop it."""

    def __init__(self, detector, at: int):
        self.detector, self.at, self.calls = detector, at, 0
        self.min_face_size = detector.min_face_size

    def detect(self, image):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.detector.detect(image)


def test_a_prepare_that_did_not_finish_is_refused_until_run_again(tmp_path, detector):
    src = _two_photos(tmp_path / "src")
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # the first crop is written, then the process stops
        prepare_faces(src, dst, detector=_Dies(detector, at=3), progress=False)
    assert (dst / "astronaut.png").is_file() and not (dst / "manifest.json").exists()
    with pytest.raises(F2DBenchError, match=r"faces prepare` into it did not finish .* run the same"):
        load_face_set(dst)  # not a face set of one face without a word
    prepare_faces(src, dst, detector=detector, progress=False)
    assert [f.face_id for f in load_face_set(dst)] == ["astronaut", "franz-kafka"]
    assert sorted(p.name for p in dst.iterdir()) == ["astronaut.png", "franz-kafka.png", "manifest.json"]
    # killed while re-preparing a finished set: its old manifest does not vouch for the crops any more
    with pytest.raises(KeyboardInterrupt):
        prepare_faces(src, dst, detector=_Dies(detector, at=1), progress=False)
    with pytest.raises(F2DBenchError, match="did not finish"):
        load_face_set(dst)


# --- command line ---------------------------------------------------------------------------------------


def _parser():
    return cli_parser(register)


def test_cli_prepare(tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["faces", "prepare", "--help"])
    help_text = capsys.readouterr().out
    for option in ("SRC", "DST", "--frame", "--several", "--min-prob", "--size"):
        assert option in help_text
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ASSETS / "camera.png", src / "camera.png")
    args = parser.parse_args(["faces", "prepare", str(src), str(tmp_path / "out"), "--size", "128"])
    assert args.func(args) == 0
    assert Image.open(tmp_path / "out" / "camera.png").size == (128, 128)
    assert str(tmp_path / "out") in capsys.readouterr().out
    (src / "camera.png").unlink()
    Image.new("RGB", (64, 64)).save(src / "black.png")
    args = parser.parse_args(["faces", "prepare", str(src), str(tmp_path / "out2")])
    assert args.func(args) == 1
    for bad in (["--min-prob", "1.5"], ["--several", "all"], ["--frame", "-1"], ["--size", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["faces", "prepare", str(src), str(tmp_path / "x"), *bad])
    capsys.readouterr()


# --- class words ---------------------------------------------------------------------------------------


@pytest.mark.slow  # about 15 s of MTCNN
def test_class_words_through_prepare_and_the_manifest(tmp_path, detector):
    import json
    import shutil

    from f2d_bench.faces.faceset import load_face_set

    src = tmp_path / "src"
    src.mkdir()
    for name in ("biden.jpg", "grace_hopper.jpg", "obama2.jpg"):
        shutil.copy(TEST_PHOTOS / name, src / name)
    (src / "class_words.json").write_text(json.dumps({"grace_hopper": "woman", "obama2": "boy"}))
    report = prepare_faces(src, tmp_path / "dst", detector=detector, progress=False,
                           class_words={"obama2": "man"}, class_word="man")
    assert not any(s.source.name == "class_words.json" for s in report.skipped)
    words = {f.face_id: f.class_word for f in load_face_set(tmp_path / "dst")}
    # --class-word NAME=WORD > SRC/class_words.json > the default
    assert words == {"biden": "man", "grace_hopper": "woman", "obama2": "man"}
    manifest_path = tmp_path / "dst" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["faces"][0]["class_word"] = "woman"  # edited by hand
    del manifest["faces"][1]["class_word"]  # as a manifest written before class words existed
    manifest_path.write_text(json.dumps(manifest))
    words = {f.face_id: f.class_word for f in load_face_set(tmp_path / "dst")}
    assert words == {"biden": "woman", "grace_hopper": None, "obama2": "man"}
    manifest["faces"][0]["class_word"] = "m4n"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(F2DBenchError, match=r"'biden'.*'m4n'"):
        load_face_set(tmp_path / "dst")
    with pytest.raises(F2DBenchError, match="'nobody'"):
        prepare_faces(src, tmp_path / "dst2", detector=detector, progress=False, class_words={"nobody": "man"})
    with pytest.raises(F2DBenchError, match="'7'"):
        prepare_faces(src, tmp_path / "dst2", detector=detector, progress=False, class_word="7")


def test_class_word_cli_option(tmp_path):
    from f2d_bench.errors import ConfigError
    from f2d_bench.faces import cli as faces_cli

    from conftest import cli_parser

    args = cli_parser(faces_cli.register).parse_args(
        ["faces", "prepare", "a", "b", "--class-word", "obama=man", "--class-word", "woman"])
    assert faces_cli._class_words(args.class_word) == ({"obama": "man"}, "woman")
    with pytest.raises(ConfigError, match="'obama'"):
        faces_cli._class_words([("obama", "man"), ("obama", "woman")])
    with pytest.raises(SystemExit):
        cli_parser(faces_cli.register).parse_args(["faces", "prepare", "a", "b", "--class-word", "=man"])


@pytest.mark.slow  # about 14 s when the built-in set is not prepared yet
def test_builtin_test_faces_carry_class_words():
    from f2d_bench.faces.source import resolve_face_set

    prepared_crops()
    words = {f.face_id: f.class_word for f in resolve_face_set("builtin:test-faces")}
    assert words["grace_hopper"] == "woman" and words["obama"] == "man" and None not in words.values()
