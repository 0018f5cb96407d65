"""What a training run measures on its validation frames: the masked error of one-step denoising with the true audio
and with audio from 1 s away (their ratio, the audio-shift ratio, says whether the model listens), and mouths sampled
from pure noise (their error, and a strip to look at).

Imports only torch, numpy and OpenCV (with samples.py), so it runs wherever training runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .diffusion import DiffusionConfig, NoiseSchedule, eps_from_output, sample_frames
from .monitor import write_png
from .samples import TrainingData
from .unet import UNet

EVAL_STEPS = (100, 300, 500, 700, 900)  # fixed noise levels of validation: these steps of the T = 1000 schedule


def masked_error(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean squared difference over the mask's pixels and channels. x, target: (B, C, S, S); mask:
    (B, 1, S, S) in {0, 1}. Returns (B,)."""
    return ((x.float() - target) ** 2 * mask).sum(dim=(1, 2, 3)) / (x.shape[1] * mask.sum(dim=(1, 2, 3))).clamp(min=1)


def evaluation_set(data: TrainingData, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` validation frames evenly spread, and an identity frame for each (fixed, not random)."""
    val = data.split.val
    index = val[np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int)]
    return index, data.identity(index, np.full(len(index), 0.5), "val")


@torch.no_grad()
def validation_error(model: UNet, data: TrainingData, count: int, check: Callable[[], None] = lambda: None) -> dict:
    """Masked-region error of one-step denoising on validation frames at fixed noise levels (EVAL_STEPS of the
    T = 1000 schedule), with each frame's own audio and with the audio 1 s away.

    The error is the mean squared difference, inside the mask, between the true crop and the x̂_0 the model
    implies from one noisy version of it (pixels in [-1, 1]). `audio_ratio` = error with shifted audio / error with
    the true audio: about 1.0 when the model ignores the audio, above 1 when it listens.

    `check` is called before every UNet call (minutes of them on a CPU); it may raise to cut the validation short.
    """
    device = next(model.parameters()).device
    prediction = getattr(model, "diffusion", DiffusionConfig()).prediction
    index, identity = evaluation_set(data, count)
    schedule = NoiseSchedule.cosine(1000)
    gen = torch.Generator().manual_seed(1234)
    target, mask = data.images(index), data.mask(index)
    previous, ident = data.images(data.previous[index]), data.images(identity)
    audios = {"true": data.audio(index), "shifted": data.shifted_audio(index)}
    errors: dict[str, dict[int, float]] = {"true": {}, "shifted": {}}
    for t in EVAL_STEPS:
        a = float(schedule.alpha_bar[t])
        eps = torch.randn(target.shape, generator=gen).to(device)
        noisy = math.sqrt(a) * target + math.sqrt(1 - a) * eps
        x = torch.cat([noisy * mask + (1 - mask) * target, previous, ident], dim=1)
        gamma = torch.full((len(index),), a, device=device)
        for name, audio in audios.items():
            chunks = []
            for i in range(0, len(index), 16):
                check()
                chunks.append(model(x[i : i + 16], gamma[i : i + 16], audio[i : i + 16]).float())
            output = torch.cat(chunks)
            eps_pred = eps_from_output(output, x[:, :3], a, prediction)
            x0 = ((x[:, :3] - math.sqrt(1 - a) * eps_pred) / math.sqrt(a)).clamp(-1, 1)
            errors[name][t] = float(masked_error(x0, target, mask).mean())
    true, shifted = np.mean(list(errors["true"].values())), np.mean(list(errors["shifted"].values()))
    return {
        "val_error": float(true),
        "val_error_shifted": float(shifted),
        "audio_ratio": float(shifted / max(true, 1e-12)),
        "val_error_by_step": {str(t): e for t, e in errors["true"].items()},
        "val_frames": len(index),
    }


def sample_strip(
    model: UNet, data: TrainingData, count: int, steps: int, path: Path, check: Callable[[], None] = lambda: None
) -> list[float]:
    """Sample the mouth of `count` validation frames (true previous and identity frames, DDIM) and write a strip:
    the originals above, the samples below. (256, 128·count, 3).

    Returns each sample's masked error against its original (mean squared difference inside the mask, pixels in
    [-1, 1], as `validation_error`). One-step denoising can score well while sampling from pure noise still
    leaves noisy mouths; this is the number that shows it. `check` is called before the first step and after
    each; it may raise to cut the sampling short (nothing is written then)."""
    check()
    index, identity = evaluation_set(data, count)
    target, mask = data.images(index), data.mask(index)
    out = sample_frames(
        model,
        target,
        mask,
        data.images(data.previous[index]),
        data.images(identity),
        data.audio(index),
        sampler="ddim",
        steps=steps,
        generator=torch.Generator().manual_seed(0),
        # A measurement: the same on every CPU (not bf16 where there is AMX); on CUDA, fp16 as in a dub.
        precision="auto" if next(model.parameters()).is_cuda else "fp32",
        callback=lambda _: check(),
    )

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return np.concatenate(list(images), axis=1)

    write_png(path, np.concatenate([to_uint8(target), to_uint8(out)], axis=0))
    return [float(e) for e in masked_error(out, target, mask)]
