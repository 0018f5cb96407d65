"""Training samples from a pack: the pack's arrays as tensors on the training device, which stored frames make up
each step's global batch, and the rules that give a target frame its previous frame, identity frame and audio window.

Every random choice is drawn from a generator seeded by the run's seed and the step (`seeded_rng`), so a step's samples
are a function of (seed, step) alone: what makes a resumed run repeat the uninterrupted one (train.py, "Determinism").

Imports only torch and numpy (with pack.py), so it runs on machines without ffmpeg, mediapipe or librosa.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .pack import Pack, Split

log = logging.getLogger("talkedit")

AUDIO_SHIFT_SECONDS = 1.0  # the wrong audio of validation: the window this far away in the same clip


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator of one stream of draws, keyed by the run's seed and e.g. (purpose, step)."""
    return np.random.default_rng([seed & (2**63 - 1), *keys])


def torch_seed(seed: int, *keys: int) -> int:
    """A torch seed keyed like `seeded_rng`."""
    return int(seeded_rng(seed, *keys).integers(2**63 - 1))


class TrainingData:
    """A pack's arrays as tensors on the training device (the whole pack, which is small: ~1 GB per hour of 25 fps
    footage once decoded), and the rules that turn stored frames into samples."""

    def __init__(self, pack: Pack, split: Split, device: torch.device, identity_gap: float) -> None:
        self.pack, self.split, self.device = pack, split, device
        size = pack.crops.nbytes + pack.masks.nbytes + pack.windows.nbytes
        self.storage = device if device.type != "cuda" or size < 0.5 * torch.cuda.mem_get_info(device)[0] else None
        if self.storage is None:  # too big for the GPU: batches are gathered on the CPU and copied over
            self.storage = torch.device("cpu")
            log.info("the pack (%.1f GiB) stays in CPU memory; batches are copied to %s", size / 2**30, device)
        self.crops = torch.from_numpy(pack.crops).to(self.storage).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
        self.masks = torch.from_numpy(pack.masks).to(self.storage)[:, None]  # (N, 1, S, S) uint8
        self.windows = torch.from_numpy(pack.windows.reshape(len(pack), -1)).to(self.storage)  # (N, F·M) float32
        self.previous = pack.predecessor()
        self.previous = np.where(self.previous >= 0, self.previous, np.arange(len(pack)))  # a shot's first: itself
        fps = np.array([float(c.fps) for c in pack.clips])
        self.gap = np.ceil(identity_gap * fps[pack.clip]).astype(np.int64)  # (N,) frames
        self.shift = np.round(AUDIO_SHIFT_SECONDS * fps).astype(np.int64)  # (C,) frames
        self._clip_windows: dict[int, np.ndarray] = {}
        # Identity candidates: for training frames, training frames of the same clip; for validation, any frame.
        self.members = {
            "train": _members_by_clip(pack, split.train),
            "val": _members_by_clip(pack, np.arange(len(pack))),
        }

    def identity(self, index: np.ndarray, u: np.ndarray, part: str) -> np.ndarray:
        """For stored frames `index`, a frame of the same clip at least `gap` frames away, chosen by u in [0, 1)
        (the farthest frame when the clip is too short). Returns stored indices like `index`."""
        out = np.empty_like(index)
        for n, (i, x) in enumerate(zip(index, u, strict=True)):
            members = self.members[part][self.pack.clip[i]]
            frames = self.pack.frame[members]
            f, gap = self.pack.frame[i], self.gap[i]
            before = np.searchsorted(frames, f - gap, side="right")  # members[:before] are far enough before
            after = np.searchsorted(frames, f + gap, side="left")  # members[after:] are far enough after
            choices = before + len(frames) - after
            if choices == 0:
                out[n] = members[int(np.argmax(np.abs(frames - f)))]
                continue
            k = min(int(x * choices), choices - 1)
            out[n] = members[k] if k < before else members[after + k - before]
        return out

    def _take(self, table: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        return table[torch.from_numpy(index).to(self.storage)].to(self.device, non_blocking=True)

    def images(self, index: np.ndarray) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1]."""
        return self._take(self.crops, index).float() / 127.5 - 1

    def mask(self, index: np.ndarray) -> torch.Tensor:
        """(B, 1, S, S) float in {0, 1}."""
        return self._take(self.masks, index).float()

    def audio(self, index: np.ndarray) -> torch.Tensor:
        """(B, F·M) float dB."""
        return self._take(self.windows, index)

    def shifted_audio(self, index: np.ndarray) -> torch.Tensor:
        """The audio window 1 s later in the same clip (1 s earlier near its end): speech that does not go with the
        frame, though it is the same voice and loudness. (B, F·M)."""
        out = []
        for i in index:
            c = self.pack.clip[i]
            frames, f, s = self.pack.clips[c].frames, self.pack.frame[i], self.shift[c]
            g = f + s if f + s < frames else f - s if f - s >= 0 else (f + frames // 2) % frames
            if c not in self._clip_windows:  # every frame of the clip, stored or not: computed once per clip
                self._clip_windows[c] = self.pack.clip_windows(c)
            out.append(self._clip_windows[c][g])
        return torch.from_numpy(np.stack(out).reshape(len(index), -1)).to(self.device)


def _members_by_clip(pack: Pack, allowed: np.ndarray) -> dict[int, np.ndarray]:
    """clip -> its allowed stored indices, sorted by frame (stored order is frame order within a clip)."""
    allowed = np.sort(allowed)
    return {int(c): allowed[pack.clip[allowed] == c] for c in np.unique(pack.clip[allowed])}


class Batches:
    """The samples of every step: step s takes positions s·B ... s·B + B - 1 of an endless sequence of passes over
    the training frames, each pass in its own random order seeded by (seed, pass)."""

    def __init__(self, train: np.ndarray, batch: int, seed: int) -> None:
        self.train, self.batch, self.seed = train, batch, seed
        self._order: tuple[int, np.ndarray] | None = None

    def _pass(self, number: int) -> np.ndarray:
        if self._order is None or self._order[0] != number:
            self._order = (number, seeded_rng(self.seed, 1, number).permutation(self.train))
        return self._order[1]

    def indices(self, step: int) -> np.ndarray:
        n = len(self.train)
        positions = np.arange(step * self.batch, (step + 1) * self.batch)
        return np.array([self._pass(int(p // n))[p % n] for p in positions], np.int64)
