"""Mel-spectrogram features and per-frame audio windows, exactly as the official code computes them (spec §5).

The official code assumes 25 fps: video frame i takes mel frames 2i-2 ... 2i+1. Here the rule is stated in time, so
it holds at any frame rate: mel frame k is centred on t = k * HOP_LENGTH / SAMPLE_RATE (20 ms steps), and output
frame i at t_i = i / fps takes mel frames k-2 ... k+1 with k = round(t_i * MEL_FRAMES_PER_SECOND). At 25 fps k = 2i.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .errors import MediaError

SAMPLE_RATE = 16000  # Hz
N_FFT = 2048
WIN_LENGTH = 640  # 40 ms Hann window
HOP_LENGTH = 320  # 20 ms
N_MELS = 256
FMAX = 8000
TOP_DB = 80.0  # dB range kept below the clip's loudest bin
PAD_DB = -TOP_DB  # value of mel frames outside the recording
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 50
WINDOW_BEFORE, WINDOW_AFTER = 2, 1  # mel frames k-2 ... k+1: 2 frames of past context, 1 of future
WINDOW_FRAMES = WINDOW_BEFORE + 1 + WINDOW_AFTER  # 4

SILENCE_PEAK = 10 ** (-60 / 20)  # a recording whose peak stays below -60 dBFS carries no speech to follow
# Lossy decoders overshoot full scale by a few dB on loud masters; a float recording far beyond it would be muxed as
# distorted sound (and past ~1e19 overflows the spectrogram).
LOUDEST_PEAK = 10 ** (6 / 20)


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """Log-mel features of a 16 kHz mono recording, in dB relative to its loudest bin (spec §5.1).

    wav: (samples,) float. Returns (frames, N_MELS) float32 in [-80, 0], frames = 1 + samples // HOP_LENGTH.
    """
    import librosa  # heavy import, only needed here

    if not np.any(wav):  # relative to its own loudest bin, digital silence would read as 0 dB everywhere
        return np.full((1 + len(wav) // HOP_LENGTH, N_MELS), PAD_DB, np.float32)
    mel = librosa.feature.melspectrogram(
        y=np.asarray(wav, dtype=np.float32),
        sr=SAMPLE_RATE,
        n_fft=N_FFT,
        win_length=WIN_LENGTH,
        hop_length=HOP_LENGTH,
        n_mels=N_MELS,
        fmax=FMAX,
        center=True,
        pad_mode="constant",
    )
    return librosa.power_to_db(mel, ref=np.max, top_db=TOP_DB).T.astype(np.float32)


def frame_windows(mel: np.ndarray, num_frames: int, fps: Fraction | float) -> np.ndarray:
    """The audio window of each output frame (spec §5.2, generalised to any frame rate by time).

    mel: (mel_frames, N_MELS). Returns (num_frames, WINDOW_FRAMES, N_MELS) float32; rows outside the recording are -80.
    """
    fps = Fraction(fps)
    padded = np.concatenate(
        [
            np.full((WINDOW_BEFORE, N_MELS), PAD_DB, np.float32),
            mel.astype(np.float32),
            np.full((WINDOW_AFTER, N_MELS), PAD_DB, np.float32),
        ]
    )
    # k = round(i / fps * 50), computed exactly; ties (only possible at odd rates) round half up.
    centres = np.array([int(Fraction(i * MEL_FRAMES_PER_SECOND) / fps + Fraction(1, 2)) for i in range(num_frames)])
    windows = np.full((num_frames, WINDOW_FRAMES, N_MELS), PAD_DB, np.float32)
    for offset in range(WINDOW_FRAMES):
        rows = centres + offset  # index into `padded`, whose row WINDOW_BEFORE is mel frame 0
        inside = rows < len(padded)
        windows[inside, offset] = padded[rows[inside]]
    return windows


def check_speech(wav: np.ndarray, path: object, allow_silence: bool = False) -> None:
    """Refuse a recording that is empty, not finite, far beyond full scale or (unless allowed) silent, with a message
    that names it."""
    if wav.size < WIN_LENGTH:
        raise MediaError(f"{path}: the speech is empty (under {WIN_LENGTH / SAMPLE_RATE * 1000:.0f} ms of audio).")
    if not np.isfinite(wav).all():
        raise MediaError(
            f"{path}: the speech holds NaN or infinite samples; re-encode it (e.g. `ffmpeg -i IN -c:a pcm_s16le "
            "OUT.wav`) and try again."
        )
    peak = float(np.abs(wav).max())
    if peak > LOUDEST_PEAK:
        over = math.ceil(20 * math.log10(peak))  # dB above full scale
        raise MediaError(
            f"{path}: the speech peaks {over} dB above full scale, so the dub's sound would be distorted; lower its "
            f"volume (e.g. `ffmpeg -i IN -af volume=-{over}dB OUT.wav`) and try again."
        )
    if not allow_silence and peak < SILENCE_PEAK:
        raise MediaError(f"{path}: the speech is silent (peak below -60 dBFS); give a recording with speech in it.")
