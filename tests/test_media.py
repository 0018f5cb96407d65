"""ffmpeg probing, decoding and encoding on the real clips in ../shared/media."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import numpy as np
import pytest

from talkedit.colour import Colour
from talkedit.errors import MediaError
from talkedit.media import (
    VideoWriter,
    check_output_path,
    ffmpeg_exe,
    iter_frames,
    iter_yuv_frames,
    probe_audio,
    probe_video,
    read_audio,
    rgb_to_yuv420,
)

from .common import media


def test_ntsc_rate_stays_an_exact_rational():
    info = probe_video(media("hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4"))
    assert info.fps == Fraction(30000, 1001)
    assert (info.width, info.height) == (512, 512)
    # Its last frames are two slots apart (dropped frames): decoding fills the gaps to keep the timeline.
    assert info.variable_frame_rate


@pytest.mark.parametrize("container", ["mkv", "webm"])
def test_ntsc_rate_in_a_millisecond_time_base_is_not_30_30(tmp_path, container):
    """Matroska and WebM keep 1 ms timestamps: 29.97 fps arrives as 33/34 ms steps (1000/33 = 30.30 by one step)."""
    out = tmp_path / f"ntsc.{container}"
    codec = ["-c", "copy"] if container == "mkv" else ["-c:v", "libvpx", "-b:v", "200k", "-an", "-t", "1.5"]
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(media("hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4")), *codec,
         str(out)], check=True,
    )  # fmt: skip
    assert probe_video(out).fps == Fraction(30000, 1001)


def test_the_bundled_ffmpeg_is_used_unless_overridden(monkeypatch, tmp_path):
    import imageio_ffmpeg

    from talkedit import media as media_module

    media_module.ffmpeg_exe.cache_clear()
    monkeypatch.delenv("TALKEDIT_FFMPEG", raising=False)
    try:
        assert media_module.ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
        old = tmp_path / "ffmpeg"
        old.write_text("#!/bin/sh\necho 'ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021'\n")
        old.chmod(0o755)
        monkeypatch.setenv("TALKEDIT_FFMPEG", str(old))
        media_module.ffmpeg_exe.cache_clear()
        with pytest.raises(MediaError, match="4.4 is too old"):
            media_module.ffmpeg_exe()
    finally:
        monkeypatch.delenv("TALKEDIT_FFMPEG", raising=False)
        media_module.ffmpeg_exe.cache_clear()


def test_surround_audio_counts_its_channels(tmp_path):
    surround = tmp_path / "surround.wav"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(media("en_hdtf_RD_Radio31_16k_stereo.wav")), "-af",
         "pan=5.1|FL=c0|FR=c1|FC=c0|LFE=c1|BL=c0|BR=c1", "-t", "1", str(surround)], check=True,
    )  # fmt: skip
    assert probe_audio(surround).channels == 6


def test_speech_that_starts_late_keeps_its_offset(tmp_path):
    """A video's sound track that starts 0.44 s in: the decoded speech begins with that much silence, so features and
    the muxed sound agree (the muxer keeps the offset)."""
    from talkedit.media import decode_speech

    source = media("retalking_face5_older_female_glasses_524_25fps.mp4")
    late = tmp_path / "late.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(source), "-itsoffset", "0.44", "-i", str(source), "-map", "0:v",
         "-map", "1:a", "-c", "copy", str(late)], check=True,
    )  # fmt: skip
    on_time = read_audio(decode_speech(source, tmp_path / "a.wav"))
    shifted = read_audio(decode_speech(late, tmp_path / "b.wav"))
    # Where the speech sits in the decoded track: the lag that best aligns a second of it with the on-time decode.
    piece = on_time[8000:24000]
    lags = np.arange(6000, 8500)
    scores = [float(shifted[8000 + lag : 24000 + lag] @ piece) for lag in lags]
    lag = int(lags[int(np.argmax(scores))])
    assert abs(lag / 16000 - 0.44) < 0.002
    assert abs(len(shifted) - len(on_time) - lag) < 200
    assert np.abs(shifted[: lag - 320]).max() < 2e-3  # silence before it, but for the resampler's ringing


def test_a_decode_that_stops_part_way_is_an_error(tmp_path):
    damaged = tmp_path / "damaged.mpg"
    data = media("grid_lwbsza_female_360x288_25fps.mpg").read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    info = probe_video(damaged)
    assert info.frame_count < 60  # the probe sees the packets that are there; the analysis compares the decode
    truncated = tmp_path / "truncated.mp4"
    mp4 = media("retalking_face5_older_female_glasses_524_25fps.mp4").read_bytes()
    truncated.write_bytes(mp4[:-60000])
    with pytest.raises(MediaError):
        list(iter_frames(probe_video(truncated)))


def test_output_container_must_hold_h264_and_aac(tmp_path):
    video = media("grid_lwbsza_female_360x288_25fps.mpg")
    with pytest.raises(MediaError, match=r"\.webm file cannot hold"):
        check_output_path(tmp_path / "out.webm", video)
    for name in ("out.mp4", "out.mkv", "out.mov"):
        check_output_path(tmp_path / name, video)


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
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="the file is empty"):
        probe_video(empty)
    with pytest.raises(MediaError, match="has no video stream"):
        probe_video(media("zh_aishell_BAC009S0724W0121_16k_mono.wav"))
    with pytest.raises(MediaError, match="no such file"):
        probe_video(tmp_path / "missing.mp4")


def test_writer_encodes_h264_with_the_speech_and_renames_at_the_end(tmp_path):
    out = tmp_path / "out.mp4"
    frames = [rgb_to_yuv420(np.full((64, 96, 3), v, np.uint8)) for v in range(0, 250, 10)]
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


def test_writer_tags_the_sources_colour_and_pixel_aspect(tmp_path):
    """Pure red written as BT.709 codes plays back red on a BT.709 player: the tags travel with the codes."""
    out = tmp_path / "hd.mp4"
    red = np.zeros((64, 96, 3), np.uint8)
    red[:] = (255, 40, 40)
    colour = Colour("tv", "bt709", "bt709", "bt709")
    with VideoWriter(out, 96, 64, Fraction(25), colour=colour, sar=Fraction(16, 11)) as w:
        for _ in range(3):
            w.write(rgb_to_yuv420(red, "bt709"))
        w.close()
    info = probe_video(out)
    assert info.colour == colour and info.sar == Fraction(16, 11)
    decoded = next(iter_frames(info))  # ffmpeg converts with the tagged matrix
    assert np.abs(decoded[32, 48].astype(int) - (255, 40, 40)).max() <= 3


def test_failed_encode_leaves_no_file(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, 32, 32, Fraction(25)) as w:
            w.write(rgb_to_yuv420(np.zeros((32, 32, 3), np.uint8)))
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
            w.write(rgb_to_yuv420(frame))
        w.close()
    info = probe_video(out)
    assert (info.width, info.height) == (66, 34)
    decoded = next(iter_frames(info))
    assert decoded[:, -1].mean() > 150 and decoded[-1, :10].mean() < 30


@pytest.mark.parametrize(
    "name", ["lrs2_00009_male_headturn_160x160_25fps.mp4", "grid_swiz3n_black_male_360x288_25fps.mpg"]
)
def test_seeking_gives_exactly_the_frames_of_a_full_decode(name):
    info = probe_video(media(name))
    frames = [f.buffer.copy() for f in iter_yuv_frames(info)]
    for start in (1, 17, len(frames) - 5):
        seeked = [f.buffer for f in iter_yuv_frames(info, start=start)]
        assert len(seeked) == len(frames) - start
        assert all(np.array_equal(a, b) for a, b in zip(seeked, frames[start:], strict=True)), start


def test_a_video_that_starts_late_keeps_its_timeline(tmp_path):
    """Video 0.84 s after the audio: the first frame is shown from 0 s, so each later frame keeps its time."""
    source = media("grid_swiz3n_black_male_360x288_25fps.mpg")
    late = tmp_path / "late.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-itsoffset", "0.84", "-i", str(source), "-i", str(source), "-map", "0:v",
         "-map", "1:a", "-c:v", "libx264", "-crf", "10", "-c:a", "aac", str(late)], check=True,
    )  # fmt: skip
    info = probe_video(late)
    assert info.lead_frames == 21
    frames = list(iter_frames(info))
    assert len(frames) == info.frame_count == 75 + 21
    assert all(np.array_equal(frames[0], frames[k]) for k in range(21))
    assert not np.array_equal(frames[21], frames[22])


def test_hdr_video_is_refused_with_the_command_that_converts_it(tmp_path):
    hdr = tmp_path / "hdr.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=0.4", "-c:v",
         "libx264", "-pix_fmt", "yuv420p", "-bsf:v",  # BT.2020 primaries, PQ transfer, BT.2020 matrix in the VUI
         "h264_metadata=colour_primaries=9:transfer_characteristics=16:matrix_coefficients=9", str(hdr)], check=True,
    )  # fmt: skip
    with pytest.raises(MediaError, match=r"is HDR \(smpte2084\).*zscale"):
        probe_video(hdr)


def test_sdr_colour_tags_are_read():
    info = probe_video(media("GENERATED_dve_crema_1030_female_1920x1080_pillarbox_25fps.mp4"))
    assert info.colour == Colour("tv", "bt709", "bt709", "bt709") and info.matrix == "bt709"
    untagged = probe_video(media("grid_swiz3n_black_male_360x288_25fps.mpg"))
    assert untagged.colour.matrix is None and untagged.matrix == "bt601"  # SD: as players take it


def test_ffmpeg_stopped_by_a_signal_says_which():
    """Found by the torture sweep: a decoder killed by the file-size limit was reported as "no message"."""
    import signal

    from talkedit.media import _ffmpeg_message

    assert "SIGXFSZ" in _ffmpeg_message(b"", returncode=-signal.SIGXFSZ)
    assert "SIGKILL" in _ffmpeg_message(b"", returncode=-signal.SIGKILL)
    assert _ffmpeg_message(b"[mov,mp4 @ 0x55d0c0a7e080] moov atom not found\n") == "moov atom not found"


def test_frames_are_read_ahead_of_their_consumer_and_the_reader_stops_with_it(monkeypatch):
    """A pipe holds less than a frame: without reading ahead, ffmpeg would wait while the consumer works."""
    import io
    import time

    from talkedit import media as media_module

    monkeypatch.setattr(media_module, "READ_AHEAD_BYTES", 30)  # three frames of 10 bytes
    data = bytes(range(60)) + b"\xff" * 5  # six frames and a cut-off seventh
    reader = media_module._FrameReader(io.BytesIO(data), 10)
    deadline = time.monotonic() + 10
    while reader.frames.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader.frames.qsize() == 3  # read ahead as far as allowed, no further
    frames = [reader.get() for _ in range(6)]
    assert [f.tobytes() for f in frames] == [bytes(range(10 * k, 10 * k + 10)) for k in range(6)]
    assert reader.get() is None  # the partial frame is dropped; the end is signalled
    reader.join(10)
    assert not reader.is_alive()

    stopped = media_module._FrameReader(io.BytesIO(data), 10)  # a consumer that leaves after one frame
    assert stopped.get() is not None
    stopped.stop.set()
    stopped.join(10)
    assert not stopped.is_alive()  # no thread left blocked on its full queue


def test_a_consumer_that_stops_early_leaves_no_decoder_running(monkeypatch):
    import threading

    from talkedit import media as media_module

    monkeypatch.setattr(media_module, "READ_AHEAD_BYTES", 1)  # two frames ahead: the reader waits on a full queue
    info = probe_video(media("grid_swiz3n_black_male_360x288_25fps.mpg"))
    before = threading.active_count()
    frames = iter_frames(info)
    first = [next(frames) for _ in range(3)]
    frames.close()
    assert len(first) == 3 and threading.active_count() == before
