"""`dub` and `preprocess` end to end on real clips, with a tiny random-weight model on the CPU."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from talkedit.analysis import preprocess
from talkedit.cli import app
from talkedit.face import blend_alpha, invert, to_crop
from talkedit.media import VideoWriter, ffmpeg_exe, iter_frames, probe_video, read_audio
from talkedit.pipeline import DubOptions, _frames_in_order, chains, dub, source_indices

from .common import media

runner = CliRunner()

DUBS = {
    # video, speech: the 29.97 fps clip with longer speech (pingpong), the variable-frame-rate clip, a portrait HEVC
    # clip, the two-face clip and an MPEG-1 clip, with speech in five formats.
    "ntsc-pingpong": ("hdtf_RD_Radio10_male_glasses_512_29.97fps.mp4", "retalking_audio1_44k1_stereo.wav"),
    "vfr": ("retalking_face1_asian_male_suit_700_vfr.mp4", "en_short_voice_recording_22k05_mono_1.8s.m4a"),
    "portrait-hevc": (
        "latentsync_demo1_vertical_female_outdoor_1080x1920_hevc_25fps.mp4",
        "en_female_aoc_44k1_stereo.mp3",
    ),
    "two-faces": ("two_faces_tv_interview_splitscreen_1280x720_25fps.mp4", "zh_aishell_BAC009S0724W0121_16k_mono.wav"),
    "mpeg1": ("grid_lwbsza_female_360x288_25fps.mpg", "fr_french_48k_stereo_24bit.wav"),
}


def streams(path: Path) -> list[str]:
    text = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return re.findall(r"Stream #\d+:\d+.*?: (Video|Audio): (\w+)", text)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def edit_region(analysis, frame_index: int, shape: tuple[int, int], margin: int = 16) -> np.ndarray:
    """Frame pixels the paste may touch (the feathered mask's box in the frame), grown by `margin` px for the
    encoder's block effects. Returns (H, W) bool."""
    alpha = blend_alpha(analysis.masks[frame_index])[0].numpy()
    ys, xs = np.nonzero(alpha)
    box = np.array(
        [[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]]
    )
    corners = to_crop(invert(analysis.matrices[frame_index]), box.astype(float))
    region = np.zeros(shape, bool)
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - margin, 0)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + margin
    region[y0:y1, x0:x1] = True
    return region


@pytest.fixture(scope="module")
def dubbed(talkedit_home, tmp_path_factory):
    """Every clip of DUBS dubbed once through the CLI, with a plain transcode of the same frames beside it."""
    home, tiny = talkedit_home
    folder = tmp_path_factory.mktemp("dubs")
    results = {}
    for name, (video, speech) in DUBS.items():
        out = folder / f"{name}.mp4"
        result = runner.invoke(
            app, ["dub", str(media(video)), str(media(speech)), "-o", str(out), "--model", str(tiny)]
        )
        assert result.exit_code == 0, result.output
        info = probe_video(media(video))
        analysis = preprocess(media(video))  # cached by the dub: returns at once
        num_output = probe_video(out).frame_count
        src = source_indices(num_output, analysis.frame_count, "pingpong")
        plain = folder / f"{name}.plain.mp4"
        with VideoWriter(plain, info.width, info.height, info.fps, audio=media(speech)) as writer:
            for frame in _frames_in_order(info, src):
                writer.write(frame)
            writer.close()
        results[name] = (out, plain, analysis, src, result.output)
    return results


@pytest.mark.parametrize("name", sorted(DUBS))
def test_dub_writes_a_finished_video(dubbed, name):
    video, speech = DUBS[name]
    out, plain, analysis, src, _ = dubbed[name]
    source = probe_video(media(video))
    result = probe_video(out)
    assert streams(out) == [("Video", "h264"), ("Audio", "aac")]
    assert (result.width, result.height) == (source.width, source.height)
    assert result.fps == source.fps
    speech_seconds = len(read_audio(media(speech))) / 16000
    assert abs(result.frame_count / float(result.fps) - speech_seconds) <= 1 / float(result.fps)
    assert abs(result.duration - speech_seconds) <= 1 / float(result.fps) + 0.05  # + AAC priming


@pytest.mark.parametrize("name", sorted(DUBS))
def test_dub_changes_the_mouth_and_nothing_else(dubbed, name):
    out, plain, analysis, src, _ = dubbed[name]
    squared_error, pixels, worst_frame, inside_change = 0.0, 0, np.inf, []
    for j, (ours, theirs) in enumerate(
        zip(iter_frames(probe_video(out)), iter_frames(probe_video(plain)), strict=True)
    ):
        away = np.ones(ours.shape[:2], bool)
        if analysis.track[src[j]] >= 0:
            region = edit_region(analysis, src[j], ours.shape[:2])
            away = ~region
            inside_change.append(np.abs(ours[region].astype(int) - theirs[region]).mean())
        diff = ours[away].astype(np.float64) - theirs[away]
        squared_error, pixels = squared_error + (diff**2).sum(), pixels + diff.size
        worst_frame = min(worst_frame, psnr(ours[away], theirs[away]))
    clip_psnr = 10 * np.log10(255**2 / (squared_error / pixels))
    # The clip as a whole matches; no single frame is far off (a misplaced paste would be).
    assert clip_psnr >= 40, f"PSNR away from the lower face {clip_psnr:.1f} dB"
    assert worst_frame >= 35, f"worst frame {worst_frame:.1f} dB"
    assert np.mean(inside_change) > 5, "the mouth region did not change"


def test_two_face_clip_edits_only_the_largest_face(dubbed):
    out, plain, analysis, src, _ = dubbed["two-faces"]
    # The largest face is the anchor on the left half of the split screen.
    assert np.nanmean(analysis.landmarks[analysis.track >= 0, :, 0]) < 640


def test_dub_prints_a_summary(dubbed):
    *_, output = dubbed["vfr"]
    assert re.search(r"\d+ frames written, \d+ with a generated mouth, \d+ passed through", output)
    assert "vfr.mp4" in output


def test_preprocess_caches_by_content_and_writes_a_preview(talkedit_home, tmp_path):
    clip = media("retalking_face5_older_female_glasses_524_25fps.mp4")
    result = runner.invoke(app, ["preprocess", str(clip), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    preview = re.search(r"Preview: (\S+preview\.png)", result.output.replace("\n", ""))[1]
    assert Path(preview).is_file() and Path(preview).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    renamed = tmp_path / "renamed.mp4"
    renamed.write_bytes(clip.read_bytes())
    again = preprocess(renamed, output_dir=tmp_path)
    assert str(again.directory) in preview  # same content, same analysis: found under another name
    assert again.crops.shape == (again.frame_count, 128, 128, 3)


def test_source_indices_fit_policies():
    assert source_indices(3, 5, "pingpong").tolist() == [0, 1, 2]
    assert source_indices(9, 4, "pingpong").tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert source_indices(6, 4, "loop").tolist() == [0, 1, 2, 3, 0, 1]
    assert source_indices(6, 4, "hold").tolist() == [0, 1, 2, 3, 3, 3]
    with pytest.raises(Exception, match="--fit trim"):
        source_indices(6, 4, "trim")


def test_chains_restart_at_track_breaks_and_jumps():
    track = np.array([0, 0, 0, -1, 1, 1])
    assert chains(np.arange(6), track, 1) == [[0, 1, 2], [4, 5]]
    src = source_indices(10, 6, "loop")  # 0..5, 0..3: the jump back to 0 starts a new chain
    assert chains(src, np.zeros(6, int), 1) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert chains(np.arange(8), np.zeros(8, int), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_frames_in_order_plays_backwards_exactly():
    info = probe_video(media("lrs2_00009_male_headturn_160x160_25fps.mp4"))
    forward = [f.copy() for f in iter_frames(info)]
    src = source_indices(2 * len(forward), len(forward), "pingpong")
    for k, frame in enumerate(_frames_in_order(info, src)):
        assert np.array_equal(frame, forward[src[k]]), k


def test_same_seed_same_video(talkedit_home, tmp_path):
    _, tiny = talkedit_home
    clip, speech = (
        media("grid_swiz3n_black_male_360x288_25fps.mpg"),
        media("en_short_voice_recording_22k05_mono_1.8s.m4a"),
    )
    outs = [tmp_path / f"{n}.mp4" for n in ("a", "b", "c")]
    for out, seed in zip(outs, (1, 1, 2), strict=True):
        dub(clip, speech, out, DubOptions(model=str(tiny), seed=seed, steps=1))
    frames = [np.stack(list(iter_frames(probe_video(o)))) for o in outs]
    assert np.array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])
