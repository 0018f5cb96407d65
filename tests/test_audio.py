"""Mel features and per-frame windows against the official-code fixture."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from safetensors.numpy import load_file

from talkedit.audio import check_speech, frame_windows, mel_spectrogram
from talkedit.errors import MediaError

from .common import fixture_path


@pytest.fixture(scope="module")
def reference():
    return load_file(fixture_path("dve_audio_reference.safetensors"))


def test_mel_matches_the_official_features(reference):
    # The official code cuts the recording to 50 frames x 640 - 1 samples before the STFT.
    mel = mel_spectrogram(reference["input.wav"][: 50 * 640 - 1])
    np.testing.assert_allclose(mel, reference["output.mel"].T, atol=1e-3, rtol=0)


@pytest.mark.parametrize("frame", [0, 1, 25, 49])
def test_windows_at_25_fps_match_the_official_ones(reference, frame):
    windows = frame_windows(mel_spectrogram(reference["input.wav"][: 50 * 640 - 1]), 50, 25)
    np.testing.assert_allclose(windows[frame].reshape(-1), reference[f"output.window.{frame}"], atol=1e-3, rtol=0)


def test_windows_past_the_end_are_padded_like_the_official_zero_padding(reference):
    """The official 55-frame case zero-pads the audio; past the recording the windows must be -80 dB as theirs."""
    ours = frame_windows(mel_spectrogram(reference["input.wav"]), 55, 25)
    theirs = np.concatenate([np.full((2, 256), -80.0), reference["extra.output.mel_55frames"].T])
    expected = np.stack([theirs[2 * i : 2 * i + 4] for i in range(55)])
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


def test_windows_follow_time_at_other_frame_rates():
    mel = np.arange(300, dtype=np.float32)[:, None].repeat(256, axis=1)  # mel frame k holds the value k
    windows = frame_windows(mel, 90, Fraction(30000, 1001))
    for i in (0, 1, 29, 30, 89):
        k = round(i * 1001 / 30000 * 50)
        expected = [k + o if 0 <= k + o < 300 else -80 for o in (-2, -1, 0, 1)]
        assert windows[i, :, 0].tolist() == expected


def test_silent_and_empty_speech_are_refused():
    with pytest.raises(MediaError, match="silent"):
        check_speech(np.zeros(16000, np.float32), "quiet.wav")
    with pytest.raises(MediaError, match="empty"):
        check_speech(np.zeros(10, np.float32), "empty.wav")
    check_speech(np.full(16000, 0.1, np.float32), "speech.wav")
