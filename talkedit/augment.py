"""Training augmentations, on batches of images in [-1, 1] (torch only, so they run on the GPU machines).

shared_jitter     one small random similarity warp and colour change per sample, applied alike to the target, the
                  previous frame, the identity frame and the mask: the same scene slightly moved and re-lit
previous_frame    a small warp, blur and noise on the previous frame only: at inference the previous frame is a
                  generated one, never the exact truth (the paper's own remedy for identity drift, §4.4)

Every random number comes in as a tensor drawn by the caller for the whole global batch, so that a sample is
augmented the same way whichever rank of a data-parallel run handles it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

JITTER_PARAMS = 7  # random numbers per sample for shared_jitter
PREVIOUS_PARAMS = 7  # random numbers per sample for previous_frame


def similarity_grid(u: torch.Tensor, size: int, rotate_deg: float, scale: float, shift_px: float) -> torch.Tensor:
    """Sampling grids of random similarity warps. u: (B, 4) uniform in [0, 1): rotation, scale, x and y shift.
    Returns (B, size, size, 2) for grid_sample (align_corners=False)."""
    v = 2 * u - 1  # in [-1, 1)
    angle = v[:, 0] * math.radians(rotate_deg)
    zoom = 1 + v[:, 1] * scale
    shift = v[:, 2:4] * (2 * shift_px / size)  # pixels -> normalised coordinates
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return F.affine_grid(theta, [len(u), 1, size, size], align_corners=False)


def _warp(images: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="reflection", align_corners=False)


def shared_jitter(
    images: list[torch.Tensor], mask: torch.Tensor, u: torch.Tensor, p: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Warp and re-colour each sample's images and mask alike, with probability p per sample.

    images: each (B, 3, S, S) in [-1, 1]; mask: (B, 1, S, S) in {0, 1}; u: (B, JITTER_PARAMS) uniform.
    Rotation up to 3°, scale 4 %, shift 3 px; brightness 0.05, contrast 6 %, saturation 8 %.
    """
    apply = (u[:, 0] < p).to(images[0].dtype)[:, None, None, None]
    if not apply.any():
        return images, mask
    size = mask.shape[-1]
    grid = similarity_grid(u[:, 1:5], size, rotate_deg=3, scale=0.04, shift_px=3)
    v = 2 * u[:, 4:7] - 1
    brightness, contrast, saturation = (x[:, None, None, None] for x in (0.05 * v[:, 0], 1 + 0.06 * v[:, 1],
                                                                      1 + 0.08 * v[:, 2]))  # fmt: skip

    def change(x: torch.Tensor) -> torch.Tensor:
        x = _warp(x, grid)
        grey = x.mean(dim=1, keepdim=True)
        x = grey + (x - grey) * saturation
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True) + brightness
        return x.clamp(-1, 1)

    out = [apply * change(x) + (1 - apply) * x for x in images]
    warped_mask = _warp(mask, grid, mode="nearest")
    return out, apply * warped_mask + (1 - apply) * mask


def previous_frame(previous: torch.Tensor, u: torch.Tensor, noise: torch.Tensor, p: float) -> torch.Tensor:
    """Degrade the previous frame with probability p per sample: a warp (rotation 2°, scale 3 %, shift 2 px),
    a blur of up to about 1 px and Gaussian noise of up to 0.04 (in [-1, 1] units).

    previous: (B, 3, S, S); u: (B, PREVIOUS_PARAMS) uniform; noise: (B, 3, S, S) standard normal. Same shape out.
    """
    apply = (u[:, 0] < p).to(previous.dtype)[:, None, None, None]
    if not apply.any():
        return previous
    grid = similarity_grid(u[:, 1:5], previous.shape[-1], rotate_deg=2, scale=0.03, shift_px=2)
    x = _warp(previous, grid)
    # Blur: blend towards a 3x3 binomial blur by u[:, 5].
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + u[:, 5, None, None, None].to(x.dtype) * (blurred - x)
    x = (x + 0.04 * u[:, 6, None, None, None].to(x.dtype) * noise).clamp(-1, 1)
    return apply * x + (1 - apply) * previous
