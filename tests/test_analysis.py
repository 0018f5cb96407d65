"""`preprocess` in parts: threads that each decode and analyse consecutive parts of a video give the analysis of one
pass over the whole video."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import numpy as np
import pytest
import torch

from talkedit import analysis
from talkedit.errors import MediaError
from talkedit.media import probe_video

from .common import media


@pytest.fixture
def torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def same_analysis(a: analysis.Analysis, b: analysis.Analysis) -> None:
    np.testing.assert_array_equal(a.track, b.track)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)  # NaN where untracked, in both
    np.testing.assert_array_equal(a.matrices, b.matrices)
    np.testing.assert_array_equal(a.crops, b.crops)
    np.testing.assert_array_equal(a.masks, b.masks)


@pytest.mark.parametrize(
    "clip",
    [
        "lrs2_00009_male_headturn_160x160_25fps.mp4",  # H.264, the face turns away
        "hdtf_WDA_AOC_female_512_25fps_mpeg4.mp4",  # MPEG-4 part 2
    ],
)
def test_parts_give_the_analysis_of_one_pass(talkedit_home, tmp_path, monkeypatch, caplog, clip):
    """A wrong seek or an off-by-one where parts meet would shift landmarks, crops and masks against the frames."""
    info = probe_video(media(clip))
    monkeypatch.setattr(analysis, "MIN_PART_FRAMES", 20)
    parts = analysis.analysis_parts(info, workers=4)
    assert len(parts) == 4 and parts[0][0] == 0 and parts[-1][1] is None
    whole = analysis.preprocess(media(clip), output_dir=tmp_path / "one", workers=1)
    with caplog.at_level(logging.WARNING, logger="talkedit"):
        split = analysis.preprocess(media(clip), output_dir=tmp_path / "four", workers=4)
    assert "did not join up" not in caplog.text  # the parts were used, not one pass again
    assert whole.tracked.sum() > 0.8 * whole.frame_count
    same_analysis(whole, split)


def test_which_videos_are_split_and_where():
    info = probe_video(media("latentsync_demo3_vertical_young_male_1080x1920_hevc_30fps.mp4"))
    assert info.frame_count == 600
    parts = analysis.analysis_parts(info, workers=4)
    assert parts == [(0, 150), (150, 300), (300, 450), (450, None)]
    assert analysis.analysis_parts(info, workers=1) == [(0, None)]
    assert len(analysis.analysis_parts(info, workers=64)) == 600 // analysis.MIN_PART_FRAMES  # parts of >= 100
    assert len(analysis.analysis_parts(info)) == min(len(os.sched_getaffinity(0)), analysis.MAX_WORKERS, 6)
    short = dataclasses.replace(info, frame_count=analysis.MIN_PART_FRAMES + 50)
    assert analysis.analysis_parts(short, workers=8) == [(0, None)]
    # Each part would be decoded from frame 0: an MPEG program stream, a variable frame rate.
    for clip in ("grid_swiz3n_black_male_360x288_25fps.mpg", "retalking_face1_asian_male_suit_700_vfr.mp4"):
        unseekable = dataclasses.replace(probe_video(media(clip)), frame_count=1000)
        assert analysis.analysis_parts(unseekable, workers=8) == [(0, None)]


def test_parts_that_do_not_join_up_are_analysed_again_in_one(talkedit_home, tmp_path, monkeypatch, caplog):
    """A first part whose decoding ends early while the next found frames: one pass over the whole video instead."""
    clip = media("lrs2_00009_male_headturn_160x160_25fps.mp4")
    whole = analysis.preprocess(clip, output_dir=tmp_path / "one", workers=1)
    real_iter_frames = analysis.iter_frames
    calls = []

    def first_part_ends_early(info, start=0):
        calls.append(start)
        frames = real_iter_frames(info, start)
        # The parts' threads call in either order: the first part's first call is the one cut short.
        first = start == 0 and calls.count(0) == 1
        return (frame for _, frame in zip(range(5), frames, strict=False)) if first else frames

    monkeypatch.setattr(analysis, "iter_frames", first_part_ends_early)
    monkeypatch.setattr(analysis, "MIN_PART_FRAMES", 20)
    with caplog.at_level(logging.WARNING, logger="talkedit"):
        again = analysis.preprocess(clip, output_dir=tmp_path / "two", workers=2)
    assert "did not join up" in caplog.text
    assert sorted(calls[:2]) == [0, 43] and calls[2] == 0  # two parts, then pass 1 again in one
    same_analysis(whole, again)


def test_an_error_in_one_part_stops_the_others_and_is_raised(talkedit_home, tmp_path, monkeypatch, torch_threads):
    clip = media("latentsync_demo3_vertical_young_male_1080x1920_hevc_30fps.mp4")
    real_iter_frames = analysis.iter_frames
    frames_read = []

    def last_part_fails(info, start=0):
        for i, frame in enumerate(real_iter_frames(info, start), start):
            if start == 450 and i == 455:
                raise MediaError(f"{info.path}: decoding stopped after 5 frames")
            frames_read.append(i)
            yield frame

    monkeypatch.setattr(analysis, "iter_frames", last_part_fails)
    torch.set_num_threads(2)  # the analysis runs torch on one thread, and gives back what it found
    with pytest.raises(MediaError, match="decoding stopped"):
        analysis.preprocess(clip, output_dir=tmp_path, workers=4)
    assert torch.get_num_threads() == 2
    assert len(frames_read) < 400, "the other parts went on to their ends"  # 455: the first three parts to their ends
    assert not [t for t in threading.enumerate() if t.name.startswith("talkedit-analysis")]
    assert not list(tmp_path.iterdir()), "no cache is written"


def test_threads_silencing_stderr_at_once_leave_it_as_it_was():
    """Two landmarkers opened at once each silence fd 2 while TFLite talks; interleaved, the second one once saved
    the silenced fd 2 and restored it last, so every later error message of the process went nowhere."""
    from talkedit.landmarks import _quiet_stderr

    original = os.dup(2)
    before = os.fstat(2)
    try:

        def quiet(delay: float, hold: float) -> None:
            time.sleep(delay)
            with _quiet_stderr():
                time.sleep(hold)

        first = threading.Thread(target=quiet, args=(0.0, 0.2))  # enters first, leaves first
        second = threading.Thread(target=quiet, args=(0.05, 0.4))
        first.start(), second.start()
        first.join(), second.join()
        after = os.fstat(2)
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    finally:
        os.dup2(original, 2)
        os.close(original)
