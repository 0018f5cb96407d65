"""Lip sync without a reference: does the mouth in a video follow a speech track?

No network is involved. The mouth signal is the inner-lip opening from the face landmarks `preprocess` already
computed, measured in the aligned 128 px crop (so it does not depend on the face's size or roll). The speech signal is
the log-mel spectrogram of the model's own features, pooled into SPEECH_BANDS bands at each video frame. At every
audio-visual offset d in -MAX_OFFSET ... MAX_OFFSET frames, a ridge regression from the bands at frame i + d to the
opening at frame i is fitted, and the correlation of its prediction with the opening is that offset's score. As in
SyncNet, the detected offset is the best-scoring one, and the confidence is the peak minus the median of the curve;
here it is also multiplied by sqrt(frames), so that a long clip's confidence does not vanish into a short clip's noise
(it then reads like a z-score: about 2 or less is what unrelated speech gets).

    offset > 0: the sound comes `offset` frames after the mouth (delay the video, or advance the audio, to fix it).

Both signals are high-passed over HIGHPASS_SECONDS first: slow drifts (head pitch, loudness) are not speech.
Validated on ../shared/media (tests/test_sync.py; README, "Judging a dub").
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .audio import PAD_DB, frame_windows, mel_spectrogram
from .face import to_crop

MAX_OFFSET = 15  # frames searched each way, as SyncNet's evaluation does
SPEECH_BANDS = 12  # mel bands the regression sees
HIGHPASS_SECONDS = 0.5  # moving-average window removed from both signals
RIDGE = 0.1  # ridge penalty, per frame, on standardised bands
MIN_FRAMES = 2 * MAX_OFFSET + 10  # below this the offset search has too little overlap to mean anything

# Inner-lip landmark pairs (upper, lower) of the MediaPipe face mesh: centre, left and right of the mouth.
INNER_LIP_PAIRS = ((13, 14), (82, 87), (312, 317))
# Every lip landmark of the mesh (outer and inner contours), for landmark distances.
LIP_POINTS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
              78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415)  # fmt: skip


@dataclass
class SyncResult:
    offset: int  # frames; > 0: the sound lags the mouth
    confidence: float  # (peak - median of the curve) x sqrt(frames)
    curve: np.ndarray  # (2 * MAX_OFFSET + 1,) correlation at offsets -MAX_OFFSET ... MAX_OFFSET
    frames: int  # frames with a tracked face that took part

    @property
    def offsets(self) -> np.ndarray:
        return np.arange(-MAX_OFFSET, MAX_OFFSET + 1)


def mouth_points(landmarks: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Landmarks (T, 478, 2) frame pixels mapped into the crop of `matrices` (T, 2, 3). Returns (T, 478, 2) float64,
    NaN where the matrix is NaN (no face)."""
    out = np.full(landmarks.shape, np.nan)
    for i in range(len(landmarks)):
        if np.isfinite(matrices[i]).all() and np.isfinite(landmarks[i]).all():
            out[i] = to_crop(matrices[i], landmarks[i].astype(np.float64))
    return out


def mouth_opening(points: np.ndarray) -> np.ndarray:
    """Inner-lip opening in crop pixels, averaged over INNER_LIP_PAIRS. points (T, 478, 2) in crop space.
    Returns (T,), NaN where there is no face."""
    return np.mean([points[:, lower, 1] - points[:, upper, 1] for upper, lower in INNER_LIP_PAIRS], axis=0)


def speech_bands(wav: np.ndarray, num_frames: int, fps: Fraction | float) -> np.ndarray:
    """The speech at each video frame: the model's log-mel features (mel frames k and k+1, the window's centre),
    pooled into SPEECH_BANDS bands. wav (samples,) 16 kHz. Returns (num_frames, SPEECH_BANDS) float64, dB."""
    windows = frame_windows(mel_spectrogram(wav), num_frames, fps)[:, 1:3].mean(axis=1)  # (T, 256)
    return np.stack([band.mean(axis=1) for band in np.array_split(windows, SPEECH_BANDS, axis=1)], axis=1)


def highpass(x: np.ndarray, width: int) -> np.ndarray:
    """x minus its moving average over `width` frames (edges padded by repetition). x (T,) or (T, C)."""
    if width <= 1:
        return x - x.mean(axis=0)
    flat = x.reshape(len(x), -1)
    padded = np.pad(flat, ((width // 2, width - 1 - width // 2), (0, 0)), mode="edge")
    csum = np.cumsum(np.vstack([np.zeros((1, flat.shape[1])), padded]), axis=0)
    mean = (csum[width:] - csum[:-width]) / width
    return (flat - mean).reshape(x.shape)


def _fit_score(mouth: np.ndarray, bands: np.ndarray) -> float:
    """Correlation between `mouth` (N,) and its ridge prediction from `bands` (N, C)."""
    mouth = mouth - mouth.mean()
    bands = bands - bands.mean(axis=0)
    bands = bands / (bands.std(axis=0) + 1e-6)
    gram = bands.T @ bands + RIDGE * len(bands) * np.eye(bands.shape[1])
    predicted = bands @ np.linalg.solve(gram, bands.T @ mouth)
    if predicted.std() < 1e-9 or mouth.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(predicted, mouth)[0, 1])


def av_sync(opening: np.ndarray, bands: np.ndarray, fps: Fraction | float) -> SyncResult | None:
    """Offset and confidence between a mouth-opening signal (T,) (NaN = no face) and speech bands (T, C).

    Returns None when fewer than MIN_FRAMES frames have a face, or when the mouth or the speech never changes.
    """
    opening = np.asarray(opening, np.float64)
    tracked = np.isfinite(opening)
    if tracked.sum() < MIN_FRAMES:
        return None
    # Bridge untracked frames for the filter; they are left out of every fit.
    index = np.arange(len(opening))
    filled = np.interp(index, index[tracked], opening[tracked])
    width = max(1, round(HIGHPASS_SECONDS * float(fps))) | 1
    mouth, speech = highpass(filled, width), highpass(np.asarray(bands, np.float64), width)
    if mouth[tracked].std() < 1e-6 or speech.std(axis=0).max() < 1e-6:
        return None
    curve = np.zeros(2 * MAX_OFFSET + 1)
    for n, d in enumerate(range(-MAX_OFFSET, MAX_OFFSET + 1)):
        # mouth frame i is paired with speech frame i + d
        lo, hi = max(0, -d), min(len(mouth), len(speech) - d)
        keep = tracked[lo:hi]
        curve[n] = _fit_score(mouth[lo:hi][keep], speech[lo + d : hi + d][keep])
    peak = int(np.argmax(curve))
    confidence = float((curve[peak] - np.median(curve)) * np.sqrt(tracked.sum()))
    return SyncResult(offset=peak - MAX_OFFSET, confidence=confidence, curve=curve, frames=int(tracked.sum()))


def shift_frames(bands: np.ndarray, frames: int) -> np.ndarray:
    """Speech bands delayed by `frames` (advanced when negative); frames shifted in from outside are silence."""
    out = np.full_like(bands, PAD_DB)
    if frames >= 0:
        out[frames:] = bands[: len(bands) - frames]
    else:
        out[:frames] = bands[-frames:]
    return out
