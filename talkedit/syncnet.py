"""LSE-C and LSE-D: lip-sync scores with SyncNet (Chung & Zisserman 2016), as the field computes them.

The network, its inputs and the scoring follow joonson/syncnet_python (`SyncNetModel.S`, `SyncNetInstance.evaluate`)
and load its published weights `syncnet_v2.model` (weights.toml entry `syncnet`, installed by hand):

    video  25 fps; a 224x224 face crop per frame, BGR, 0-255, framed like its `crop_video` (box half-size s around
           the face centre, 0.4 crop scale, median-filtered over 13 frames, padding 110)
    audio  16 kHz int16; MFCC (python_speech_features defaults: 25 ms windows, 10 ms steps, 13 coefficients) -> 4
           MFCC frames per video frame
    windows of 5 video frames and 20 MFCC frames -> 1024-d embeddings; distances at offsets -15 ... 15
    mean distance over frames per offset: LSE-D = its minimum, LSE-C = its median minus its minimum

One difference, stated with every result: the face box comes from the MediaPipe landmarks `preprocess` computed,
not from the S3FD detector syncnet_python runs, so numbers may differ from a paper's by a little.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import WeightsError

FPS = 25
CROP = 224
CROP_SCALE = 0.4
SMOOTH_FRAMES = 13  # median filter over the face boxes (syncnet_python's `signal.medfilt(..., kernel_size=13)`)
PAD_VALUE = 110
VSHIFT = 15
WINDOW = 5  # video frames per SyncNet window
MFCC_PER_FRAME = 4
BATCH = 20


def _conv(cls, cin, cout, kernel, stride=1, padding=0, norm=None):
    return [cls(cin, cout, kernel_size=kernel, stride=stride, padding=padding), norm(cout), nn.ReLU(inplace=True)]


class SyncNet(nn.Module):
    """syncnet_python's `S` with the same module indices, so its state dict loads key for key.

    Audio (N, 1, 13, 20) MFCC -> (N, 1024); video (N, 3, 5, 224, 224) BGR -> (N, 1024).
    """

    def __init__(self, embedding: int = 1024) -> None:
        super().__init__()
        c2, b2, c3, b3 = nn.Conv2d, nn.BatchNorm2d, nn.Conv3d, nn.BatchNorm3d
        self.netcnnaud = nn.Sequential(
            *_conv(c2, 1, 64, 3, padding=1, norm=b2), nn.MaxPool2d(1, 1),
            *_conv(c2, 64, 192, 3, padding=1, norm=b2), nn.MaxPool2d(3, (1, 2)),
            *_conv(c2, 192, 384, 3, padding=1, norm=b2),
            *_conv(c2, 384, 256, 3, padding=1, norm=b2),
            *_conv(c2, 256, 256, 3, padding=1, norm=b2), nn.MaxPool2d(3, 2),
            *_conv(c2, 256, 512, (5, 4), norm=b2),
        )  # fmt: skip
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding))
        self.netcnnlip = nn.Sequential(
            *_conv(c3, 3, 96, (5, 7, 7), stride=(1, 2, 2), norm=b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv(c3, 96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1), norm=b3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            *_conv(c3, 256, 256, (1, 3, 3), padding=(0, 1, 1), norm=b3),
            *_conv(c3, 256, 256, (1, 3, 3), padding=(0, 1, 1), norm=b3),
            *_conv(c3, 256, 256, (1, 3, 3), padding=(0, 1, 1), norm=b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv(c3, 256, 512, (1, 6, 6), norm=b3),
        )  # fmt: skip

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))


def load_syncnet(path: str | os.PathLike) -> SyncNet:
    """The SyncNet of a syncnet_v2.model file (a state dict), loaded strictly: every tensor of the network must be in
    the file with its shape, and nothing else may be (BatchNorm's `num_batches_tracked`, absent from old files, is
    optional). Anything else raises WeightsError with one line naming the file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of anything else, a zip of something else, random bytes
        raise WeightsError(
            f"{path}: not a SyncNet weights file ({type(exc).__name__}); give syncnet_v2.model from "
            "joonson/syncnet_python."
        ) from None
    model = SyncNet()
    expected = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a SyncNet state dict; give syncnet_v2.model from joonson/syncnet_python.")
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        problem = (
            f"{len(missing)} SyncNet tensors missing (e.g. {missing[0]})" if missing
            else f"unknown tensor {unexpected[0]}" if unexpected
            else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, SyncNet's is {tuple(expected[wrong[0]].shape)}"
        )  # fmt: skip
        raise WeightsError(
            f"{path}: not SyncNet weights ({problem}); give syncnet_v2.model from joonson/syncnet_python."
        )
    model.load_state_dict(state, strict=False)  # strictness checked above, num_batches_tracked aside
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Audio features: python_speech_features.mfcc with its defaults


def _hz_to_mel(hz):
    return 2595 * np.log10(1 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
    return 700 * (10 ** (np.asarray(mel) / 2595.0) - 1)


def mfcc(signal: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """python_speech_features.mfcc(signal, sample_rate) with its defaults: 25 ms frames every 10 ms, pre-emphasis 0.97,
    512-point FFT, 26 mel filters, 13 cepstra, lifter 22, c0 replaced by the log frame energy.

    signal (samples,) on its own scale (syncnet_python passes int16 values). Returns (frames, 13) float64.
    """
    signal = np.asarray(signal, np.float64)
    signal = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    frame_len, step, nfft = round(0.025 * sample_rate), round(0.01 * sample_rate), 512
    count = 1 if len(signal) <= frame_len else 1 + int(np.ceil((len(signal) - frame_len) / step))
    padded = np.concatenate([signal, np.zeros((count - 1) * step + frame_len - len(signal))])
    frames = padded[np.arange(frame_len)[None] + step * np.arange(count)[:, None]]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    energy = power.sum(axis=1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    mels = np.linspace(_hz_to_mel(0), _hz_to_mel(sample_rate / 2), 26 + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mels) / sample_rate)
    bank = np.zeros((26, nfft // 2 + 1))
    for j in range(26):
        for i in range(int(bins[j]), int(bins[j + 1])):
            bank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(int(bins[j + 1]), int(bins[j + 2])):
            bank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feat = power @ bank.T
    feat = np.log(np.where(feat == 0, np.finfo(float).eps, feat))
    # DCT-II, orthonormal (scipy.fftpack.dct(..., type=2, norm="ortho")), first 13 coefficients.
    n = np.arange(26)
    dct = np.cos(np.pi * np.arange(13)[:, None] * (2 * n[None] + 1) / 52) * np.sqrt(2 / 26)
    dct[0] /= np.sqrt(2)
    cep = feat @ dct.T
    cep *= 1 + 11 * np.sin(np.pi * np.arange(13) / 22)
    cep[:, 0] = np.log(energy)
    return cep


# ---------------------------------------------------------------------------------------------------------------
# Video: 224 px face crops framed like syncnet_python's crop_video


def _median_filter(x: np.ndarray, size: int) -> np.ndarray:
    """scipy.signal.medfilt: zero-padded running median of odd `size`."""
    half = size // 2
    padded = np.concatenate([np.zeros(half), x, np.zeros(half)])
    return np.median(padded[np.arange(size)[None] + np.arange(len(x))[:, None]], axis=1)


def face_boxes(landmarks: np.ndarray) -> np.ndarray:
    """Per frame (centre x, centre y, half-size) of the landmarks' bounding box, median-filtered like syncnet_python.
    landmarks (T, 478, 2), no NaN. Returns (T, 3)."""
    lo, hi = landmarks.min(axis=1), landmarks.max(axis=1)
    size = np.maximum(hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1]) / 2
    x, y = (lo[:, 0] + hi[:, 0]) / 2, (lo[:, 1] + hi[:, 1]) / 2
    return np.stack([_median_filter(v, SMOOTH_FRAMES) for v in (x, y, size)], axis=1)


def face_crop(frame_rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
    """One 224x224 BGR crop (syncnet_python's framing: more room below the box centre than above)."""
    import cv2

    mx, my, bs = box
    pad = int(bs * (1 + 2 * CROP_SCALE))
    frame = np.pad(frame_rgb[:, :, ::-1], ((pad, pad), (pad, pad), (0, 0)), constant_values=PAD_VALUE)
    my, mx = my + pad, mx + pad
    face = frame[
        int(my - bs) : int(my + bs * (1 + 2 * CROP_SCALE)),
        int(mx - bs * (1 + CROP_SCALE)) : int(mx + bs * (1 + CROP_SCALE)),
    ]
    return cv2.resize(np.ascontiguousarray(face), (CROP, CROP))


@dataclass
class LSEResult:
    lse_c: float  # confidence: median minus minimum of the mean distance over offsets (higher = better synced)
    lse_d: float  # minimum mean distance (lower = better synced)
    offset: int  # offset of the minimum, syncnet_python's sign (VSHIFT - argmin)
    distances: np.ndarray  # (2 * VSHIFT + 1,) mean distance per offset


@torch.no_grad()
def lse(model: SyncNet, crops: np.ndarray, audio_int16: np.ndarray, device: str | torch.device = "cpu") -> LSEResult:
    """Score 25 fps face crops (T, 224, 224, 3) BGR uint8 against 16 kHz audio (int16 values), as
    SyncNetInstance.evaluate does. Raises ValueError when shorter than one window."""
    model = model.to(device)
    video = torch.from_numpy(np.ascontiguousarray(crops)).permute(3, 0, 1, 2)[None].float()  # (1, 3, T, 224, 224)
    cepstra = torch.from_numpy(mfcc(audio_int16).T[None, None].copy()).float()  # (1, 1, 13, M)
    last = min(len(crops), len(audio_int16) // 640) - WINDOW
    if last < 1:
        raise ValueError("too short for one SyncNet window (6 frames at 25 fps)")
    lips, sounds = [], []
    for start in range(0, last, BATCH):
        frames = range(start, min(last, start + BATCH))
        lips.append(model.forward_lip(torch.cat([video[:, :, f : f + WINDOW] for f in frames]).to(device)).cpu())
        chunk = [cepstra[:, :, :, f * MFCC_PER_FRAME : f * MFCC_PER_FRAME + 20] for f in frames]
        sounds.append(model.forward_aud(torch.cat(chunk).to(device)).cpu())
    lip, sound = torch.cat(lips), torch.cat(sounds)
    window = 2 * VSHIFT + 1
    padded = torch.nn.functional.pad(sound, (0, 0, VSHIFT, VSHIFT))
    dists = torch.stack(
        [
            torch.nn.functional.pairwise_distance(lip[[i]].repeat(window, 1), padded[i : i + window])
            for i in range(len(lip))
        ],
        dim=1,
    )
    mean = dists.mean(dim=1)
    low, index = torch.min(mean, 0)
    return LSEResult(
        lse_c=float(torch.median(mean) - low), lse_d=float(low), offset=VSHIFT - int(index), distances=mean.numpy()
    )
