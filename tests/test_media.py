"""ffmpeg probing, decoding and encoding on the real clips in ../shared/media."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import numpy as np
import pytest

from talkedit.errors import MediaError
from talkedit.media import (
    VideoWriter,
    check_output_path,
    ffmpeg_exe,
    iter_frames,
    probe_audio,
    probe_video,
    read_audio,
)

from .common import media


def test_ntsc_rate_stays_an_exact_rational():
    info = probe_video(media("hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4"))
    assert info.fps == Fraction(30000, 1001)
    assert not info.variable_frame_rate
    assert (info.width, info.height) == (512, 512)


def test_variable_frame_rate_is_detected_and_normalised_to_its_average():
    info = probe_video(media("retalking_face1_asian_male_suit_700_vfr.mp4"))
    assert info.variable_frame_rate
    assert abs(float(info.fps) - 22.13) < 0.01  # SOURCES.md: average 22.13 fps (1350/61)
    frames = sum(1 for _ in iter_frames(info))
    assert abs(frames - info.duration * float(info.fps)) <= 2


@pytest.mark.parametrize(
    ("name", "size", "fps"),
    [
        ("latentsync_demo1_vertical_female_outdoor_1080x1920_hevc_25fps.mp4", (1080, 1920), 25),
        ("grid_lwbsza_female_360x288_25fps.mpg", (360, 288), 25),
        ("latentsync_demo3_vertical_young_male_1080x1920_hevc_30fps.mp4", (1080, 1920), 30),
    ],
)
def test_probe_reads_size_and_rate(name, size, fps):
    info = probe_video(media(name))
    assert (info.width, info.height) == size and info.fps == fps and info.has_audio


def test_rotated_phone_video_comes_out_upright(tmp_path):
    src = media("male_restaurant_noisy_headmotion_1280x720_25fps.mp4")
    rotated = tmp_path / "rotated.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(src), "-t", "1", "-c", "copy", str(rotated)],
        check=True,
    )
    info = probe_video(rotated)
    assert info.rotation in (90, 270) and (info.width, info.height) == (720, 1280)
    upright = next(iter_frames(info))
    original = next(iter_frames(probe_video(src)))
    assert upright.shape == (1280, 720, 3)
    assert any(np.array_equal(upright, np.rot90(original, k)) for k in (1, -1))


def test_audio_is_mixed_to_mono_16k():
    path = media("two_speakers_split_LR_16k_stereo.wav")
    wav = read_audio(path)
    raw = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "2", "-"], capture_output=True, check=True
    ).stdout
    stereo = np.frombuffer(raw, np.float32).reshape(-1, 2)
    assert wav.dtype == np.float32 and len(wav) == len(stereo)
    np.testing.assert_allclose(wav, stereo.mean(axis=1), atol=1e-4)  # both speakers, not the left channel


@pytest.mark.parametrize(
    "name",
    ["en_female_aoc_44k1_stereo.mp3", "en_male_jfk_speech_44k1_stereo_24bit.flac", "de_german_48k_stereo_24bit.wav"],
)
def test_audio_decodes_any_format_at_16k(name):
    info = probe_audio(media(name))
    wav = read_audio(media(name))
    assert abs(len(wav) / 16000 - info.duration) < 0.05


def test_speech_may_be_a_video():
    wav = read_audio(media("retalking_face5_older_female_glasses_524_25fps.mp4"))
    assert abs(len(wav) / 16000 - 4.9) < 0.1


def test_not_media_and_missing_streams_are_clear_errors(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("hello")
    with pytest.raises(MediaError, match="not a media file"):
        probe_video(text)
    with pytest.raises(MediaError, match="has no video stream"):
        probe_video(media("zh_aishell_BAC009S0724W0121_16k_mono.wav"))
    with pytest.raises(MediaError, match="no such file"):
        probe_video(tmp_path / "missing.mp4")


def test_writer_encodes_h264_with_the_speech_and_renames_at_the_end(tmp_path):
    out = tmp_path / "out.mp4"
    frames = [np.full((64, 96, 3), v, np.uint8) for v in range(0, 250, 10)]
    with VideoWriter(
        out, 96, 64, Fraction(30000, 1001), audio=media("en_short_voice_recording_22k05_mono_1.8s.m4a")
    ) as w:
        for f in frames:
            w.write(f)
        assert not out.exists()  # only the temporary file exists while encoding
        w.close()
    info = probe_video(out)
    assert info.codec == "h264" and info.fps == Fraction(30000, 1001) and (info.width, info.height) == (96, 64)
    assert probe_audio(out).codec == "aac"
    decoded = list(iter_frames(info))
    assert len(decoded) == len(frames)
    assert abs(int(decoded[10].mean()) - 100) <= 2


def test_failed_encode_leaves_no_file(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, 32, 32, Fraction(25)) as w:
            w.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_output_checks(tmp_path):
    video = media("grid_lwbsza_female_360x288_25fps.mpg")
    with pytest.raises(MediaError, match="overwrite an input"):
        check_output_path(video, video)
    with pytest.raises(MediaError, match="does not exist"):
        check_output_path(tmp_path / "nodir" / "out.mp4", video)
    with pytest.raises(MediaError, match="is a directory"):
        check_output_path(tmp_path, video)


def test_odd_sizes_grow_by_one_repeated_row_and_column(tmp_path):
    out = tmp_path / "odd.mp4"
    frame = np.zeros((33, 65, 3), np.uint8)
    frame[:, -1] = 200  # the last column, which must be repeated, not padded with black
    with VideoWriter(out, 65, 33, Fraction(25)) as w:
        for _ in range(3):
            w.write(frame)
        w.close()
    info = probe_video(out)
    assert (info.width, info.height) == (66, 34)
    decoded = next(iter_frames(info))
    assert decoded[:, -1].mean() > 150 and decoded[-1, :10].mean() < 30
