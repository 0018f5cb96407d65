"""Face geometry: mask parity with the official code, alignment, tracking, paste-back."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from talkedit.face import (
    CROP_SIZE,
    FaceChoice,
    crop_face,
    crop_mask,
    find_cuts,
    jaw_mask,
    paste_face,
    paste_face_yuv,
    similarity_transform,
    to_crop,
    track_face,
)

from .common import fixture_path


@pytest.fixture(scope="module")
def mask_reference():
    return load_file(fixture_path("dve_mask_reference.safetensors"))


@pytest.mark.parametrize("case", range(6))
def test_jaw_mask_reproduces_the_official_mask(mask_reference, case):
    points = mask_reference["output.landmarks68_px"][case]
    mask = jaw_mask(tuple(points[1]), tuple(points[15]))
    np.testing.assert_array_equal(mask, mask_reference["output.mask"][case])


def test_crop_mask_truncates_crop_coordinates_like_the_official_code(mask_reference):
    """Landmarks given in crop pixels with the identity alignment give the fixture's mask."""
    for case in range(5):
        landmarks = np.zeros((478, 2), np.float32)
        landmarks[:468] = mask_reference["input.landmarks_norm"][case, :, :2] * CROP_SIZE
        identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
        np.testing.assert_array_equal(crop_mask(landmarks, identity), mask_reference["output.mask"][case])


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (5, 2))
    angle, scale = 0.3, 0.4
    matrix = np.array(
        [[scale * np.cos(angle), -scale * np.sin(angle), 12], [scale * np.sin(angle), scale * np.cos(angle), -7]]
    )
    np.testing.assert_allclose(similarity_transform(src, to_crop(matrix, src)), matrix, atol=1e-9)


def face_at(x: float, y: float, size: float) -> np.ndarray:
    rng = np.random.default_rng(0)  # the same face shape everywhere; only its place and size change
    return (rng.uniform(-0.5, 0.5, (478, 2)) * size + [x, y]).astype(np.float32)


def test_track_follows_the_chosen_face_and_bridges_short_gaps():
    big, small = lambda t: face_at(100 + t, 100, 200), lambda t: face_at(600, 100, 100)  # noqa: E731
    detections = [[small(t), big(t)] for t in range(10)]
    detections[4] = [small(4)]  # the big face is missed for two frames
    detections[5] = [small(5)]
    points, track = track_face(detections, np.zeros(10, bool), FaceChoice())
    assert (track == 0).all()
    np.testing.assert_allclose(points[4].mean(axis=0), big(4).mean(axis=0), atol=1.0)  # interpolated
    points, track = track_face(detections, np.zeros(10, bool), FaceChoice(rank=2))
    assert (track == 0).all()
    np.testing.assert_allclose(np.nanmean(points[:, :, 0]), 600, atol=5)  # the small face, not the big one
    points, track = track_face(detections, np.zeros(10, bool), FaceChoice(point=(620.0, 90.0)))
    assert (track == 0).all()
    np.testing.assert_allclose(np.nanmean(points[:, :, 0]), 600, atol=5)


def test_long_gaps_and_cuts_end_the_track():
    detections = [[face_at(100, 100, 200)] for _ in range(20)]
    for t in range(5, 12):
        detections[t] = []
    cuts = np.zeros(20, bool)
    cuts[16] = True
    _, track = track_face(detections, cuts, FaceChoice())
    assert (track[:5] == 0).all() and (track[5:12] == -1).all()
    assert (track[12:16] == 1).all() and (track[16:] == 2).all()


def test_cut_detection():
    thumbs = np.zeros((6, 32, 32), np.uint8)
    thumbs[3:] = 200
    thumbs[1] = 5
    assert find_cuts(thumbs).tolist() == [False, False, False, True, False, False]


def test_paste_changes_only_the_mask_region():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    matrix = np.array([[0.5, 0.05, -40.0], [-0.05, 0.5, -20.0]])
    crop = crop_face(frame, matrix)
    mask = np.zeros((CROP_SIZE, CROP_SIZE), np.uint8)
    mask[70:, 30:100] = 1
    generated = np.full_like(crop, 255)
    out = paste_face(frame, generated, mask, matrix)
    changed = np.any(out != frame, axis=2)
    ys, xs = np.nonzero(changed)
    crop_xy = to_crop(matrix, np.stack([xs + 0.5, ys + 0.5], axis=1))
    # Every changed pixel maps into the mask grown by the dilation + feather margin.
    assert crop_xy[:, 0].min() > 30 - 6 and crop_xy[:, 0].max() < 100 + 6 and crop_xy[:, 1].min() > 70 - 6
    # Deep inside the mask the generated crop is pasted as is.
    inside = to_crop(np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2], np.array([[65.0, 100.0]]))[0].astype(int)
    assert (out[inside[1], inside[0]] >= 250).all()
    assert changed.sum() > 1000


def gradient_frame(height: int = 240, width: int = 320) -> np.ndarray:
    """A smooth frame: bilinear resampling reproduces it to within rounding, so a no-op round trip must too."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([40 + 0.5 * xx, 60 + 0.6 * yy, 200 - 0.25 * xx - 0.2 * yy], axis=-1).round().astype(np.uint8)


# A face low in the frame: the crop's bottom rows, where the jaw mask ends, lie well inside the picture.
ROUND_TRIP_MATRIX = np.array([[0.9, 0.08, -60.0], [-0.08, 0.9, -40.0]])


def test_no_op_paste_round_trip_changes_no_pixel_by_more_than_two_levels():
    frame = gradient_frame()
    crop = crop_face(frame, ROUND_TRIP_MATRIX)
    mask = np.zeros((CROP_SIZE, CROP_SIZE), np.uint8)
    mask[60:, 20:110] = 1  # reaches the crop's bottom row, as the jaw mask does
    out = paste_face(frame, crop, mask, ROUND_TRIP_MATRIX)
    assert np.abs(out.astype(int) - frame).max() <= 2


def test_no_op_paste_round_trip_in_yuv_keeps_every_code_within_two_levels():
    from talkedit.media import rgb_to_yuv420

    frame = gradient_frame()
    yuv = rgb_to_yuv420(frame, "bt709")
    from talkedit.colour import yuv_to_rgb

    # The crop the model sees is made from the RGB the codes stand for (here: converted back exactly).
    rgb = yuv_to_rgb(yuv.y, *(np.repeat(np.repeat(p, 2, 0), 2, 1) for p in (yuv.u, yuv.v)), "bt709", False)
    crop = crop_face(np.clip(rgb.round(), 0, 255).astype(np.uint8), ROUND_TRIP_MATRIX)
    mask = np.zeros((CROP_SIZE, CROP_SIZE), np.uint8)
    mask[60:, 20:110] = 1
    out = paste_face_yuv(yuv, crop, mask, ROUND_TRIP_MATRIX, "bt709", full_range=False)
    for before, after in zip((yuv.y, yuv.u, yuv.v), (out.y, out.u, out.v), strict=True):
        assert np.abs(after.astype(int) - before).max() <= 2


def test_yuv_paste_leaves_every_sample_outside_the_paste_weight_bit_exact():
    from talkedit.media import rgb_to_yuv420

    rng = np.random.default_rng(1)
    yuv = rgb_to_yuv420(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    mask = np.zeros((CROP_SIZE, CROP_SIZE), np.uint8)
    mask[70:, 30:100] = 1
    out = paste_face_yuv(
        yuv, np.full((CROP_SIZE, CROP_SIZE, 3), 255, np.uint8), mask, ROUND_TRIP_MATRIX, "bt601", False
    )
    changed = out.y != yuv.y
    ys, xs = np.nonzero(changed)
    crop_xy = to_crop(ROUND_TRIP_MATRIX, np.stack([xs + 0.5, ys + 0.5], axis=1))
    assert changed.sum() > 1000
    assert crop_xy[:, 0].min() > 30 - 6 and crop_xy[:, 0].max() < 100 + 6 and crop_xy[:, 1].min() > 70 - 6
    # Deep inside the mask, white: Y near 235 in limited range.
    inside = to_crop(np.linalg.inv(np.vstack([ROUND_TRIP_MATRIX, [0, 0, 1]]))[:2], np.array([[65.0, 110.0]]))[0]
    assert out.y[int(inside[1]), int(inside[0])] >= 230


def test_crop_beyond_the_picture_is_mirrored_not_streaked():
    """A face that fills the frame: the crop's lower part lies below the picture. Border replication would repeat the
    last row in every row below it (vertical streaks)."""
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 40.0]])  # frame row 0 lands on crop row 40
    crop = crop_face(frame, matrix)
    outside = crop[:40]  # crop rows 0-39 lie above the picture
    rows_equal = [np.array_equal(outside[i], outside[i + 1]) for i in range(len(outside) - 1)]
    assert not any(rows_equal), "rows beyond the picture repeat the edge row"
    np.testing.assert_array_equal(crop[40:], frame[: CROP_SIZE - 40])


@pytest.fixture(scope="module")
def anchor_and_guest():
    """Landmarks and descriptors of the two people of the split-screen interview, from 12 real frames."""
    from talkedit.face import face_descriptor
    from talkedit.landmarks import MediaPipeDetector
    from talkedit.media import iter_frames, probe_video

    from .common import LANDMARKER, media

    info = probe_video(media("two_faces_tv_interview_splitscreen_1280x720_25fps.mp4"))
    people = {"anchor": [], "guest": []}
    with MediaPipeDetector(LANDMARKER) as detector:
        for i, frame in enumerate(iter_frames(info)):
            if i % 20 or i >= 240:
                continue
            for face in detector.detect(frame, i * 40):
                who = "anchor" if face[:, 0].mean() < 640 else "guest"
                people[who].append((face, face_descriptor(frame, face)))
    assert len(people["anchor"]) >= 10 and len(people["guest"]) >= 10
    return people


def test_after_a_cut_only_the_same_person_gets_the_mouth(anchor_and_guest):
    """The anchor, a cut, then only the guest: the guest must not become the edited face (position means nothing
    across a cut). Then the anchor again: the edit continues on him."""
    anchor, guest = anchor_and_guest["anchor"], anchor_and_guest["guest"]
    frames = [anchor[k] for k in range(5)] + [guest[k] for k in range(5)] + [anchor[k] for k in range(5, 10)]
    detections = [[f] for f, _ in frames]
    descriptors = [[d] for _, d in frames]
    cuts = np.zeros(15, bool)
    cuts[[5, 10]] = True
    _, track = track_face(detections, cuts, FaceChoice(), descriptors)
    assert (track[:5] == 0).all()
    assert (track[5:10] == -1).all()
    assert (track[10:] == 1).all()


CHOICES = [
    (FaceChoice(rank=1), "larger"),
    (FaceChoice(rank=2), "smaller"),
    (FaceChoice(point=(1000.0, 300.0)), "guest"),
]


@pytest.mark.parametrize(("choice", "who"), CHOICES)
def test_face_choice_picks_that_person_and_keeps_them_across_cuts(anchor_and_guest, choice, who):
    from talkedit.face import face_size

    anchor, guest = anchor_and_guest["anchor"], anchor_and_guest["guest"]
    guest_larger = face_size(guest[0][0]) > face_size(anchor[0][0])
    who = {"larger": "guest" if guest_larger else "anchor", "smaller": "anchor" if guest_larger else "guest"}.get(
        who, who
    )
    both = [[anchor[k], guest[k]] for k in range(10)]
    detections = [[f for f, _ in pair] for pair in both]
    descriptors = [[d for _, d in pair] for pair in both]
    cuts = np.zeros(10, bool)
    cuts[5] = True
    points, track = track_face(detections, cuts, choice, descriptors)
    assert (track >= 0).all()
    x = np.nanmean(points[:, :, 0], axis=1)
    assert ((x > 640) if who == "guest" else (x < 640)).all(), x
