"""The reference-free sync measure (talkedit/sync.py): synthetic signals, then the real clips of ../shared/media."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from talkedit.sync import MAX_OFFSET, MIN_FRAMES, SPEECH_BANDS, av_sync, shift_frames

from .common import REPO, VIDEO


def synthetic(frames: int = 250, lag: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Speech bands of random syllables, and a mouth that opens with the loudness `lag` frames before the sound."""
    rng = np.random.default_rng(seed)
    loud = np.convolve(rng.random(frames + 40) > 0.6, np.ones(4) / 4, mode="same")[20 : 20 + frames]
    bands = -60 + 50 * loud[:, None] * rng.uniform(0.5, 1.0, SPEECH_BANDS) + rng.normal(0, 2, (frames, SPEECH_BANDS))
    opening = 4 * np.roll(loud, -lag) + rng.normal(0, 0.2, frames)
    return opening, bands


@pytest.mark.parametrize("lag", [0, 4, -7, 12])
def test_the_offset_of_a_known_lag_is_found(lag):
    opening, bands = synthetic(lag=lag)
    result = av_sync(opening, bands, 25)
    assert result.offset == lag
    assert result.confidence > 5


def test_unrelated_speech_gets_a_lower_confidence():
    opening, bands = synthetic(seed=1)
    _, other = synthetic(seed=2)
    assert av_sync(opening, other, 25).confidence < av_sync(opening, bands, 25).confidence / 2


def test_frames_without_a_face_are_left_out():
    opening, bands = synthetic(lag=3)
    opening[50:90] = np.nan
    result = av_sync(opening, bands, 25)
    assert result.offset == 3 and result.frames == len(opening) - 40


def test_too_short_or_motionless_gives_no_result():
    opening, bands = synthetic()
    assert av_sync(opening[: MIN_FRAMES - 1], bands[: MIN_FRAMES - 1], 25) is None
    assert av_sync(np.full(len(opening), 3.0), bands, 25) is None
    assert av_sync(opening, np.full_like(bands, -80.0), 25) is None


def test_shift_frames_delays_and_advances():
    bands = np.arange(20, dtype=float)[:, None].repeat(2, 1)
    assert shift_frames(bands, 3)[3, 0] == 0 and shift_frames(bands, 3)[0, 0] == -80
    assert shift_frames(bands, -2)[0, 0] == 2 and shift_frames(bands, -2)[-1, 0] == -80
    assert len(shift_frames(bands, MAX_OFFSET)) == 20


# ---------------------------------------------------------------------------------------------------------------
# Real clips: the validation the README reports (python benchmarks/sync.py prints the same figures).


def _benchmark():
    spec = importlib.util.spec_from_file_location("sync_benchmark", REPO / "benchmarks" / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def validation(talkedit_home, tmp_path_factory):
    bench = _benchmark()
    videos = sorted(p for p in VIDEO.iterdir() if p.is_file())
    assert len(videos) >= 10, "../shared/media/video should hold the shared clips"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TALKEDIT_HOME", str(talkedit_home[0]))
        return bench.validate(bench.clip_signals(videos))


def test_own_audio_comes_out_near_zero(validation):
    offsets = np.array([row["offset"] for row in validation["clips"].values()])
    assert np.median(np.abs(offsets)) <= 3
    assert (np.abs(offsets) <= 3).mean() >= 0.6


def test_shifted_audio_is_followed_within_one_frame_for_most_shifts(validation):
    assert validation["recovered"] / validation["tried"] >= 0.75


def test_someone_elses_speech_lowers_the_confidence(validation):
    assert validation["auc"] >= 0.8
