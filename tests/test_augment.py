"""Training augmentations: what is moved together stays together, and p = 0 changes nothing."""

from __future__ import annotations

import torch

from talkedit.augment import JITTER_PARAMS, PREVIOUS_PARAMS, previous_frame, shared_jitter


def scene(batch: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose red channel is the mask (1 -> +1, 0 -> -1), so a shared warp keeps them in register."""
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, size // 2 :, size // 4 : 3 * size // 4] = 1
    image = torch.cat([mask * 2 - 1, torch.zeros(batch, 2, size, size)], dim=1)
    return image, mask


def test_shared_jitter_moves_the_mask_with_the_images():
    image, mask = scene()
    u = torch.rand(4, JITTER_PARAMS, generator=torch.Generator().manual_seed(0))
    u[:, 0] = 0  # every sample jittered
    u[:, 4:7] = 0.5  # no colour change: only the warp
    (a, b), warped_mask = shared_jitter([image, image.clone()], mask, u, p=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(warped_mask, mask)  # it moved
    assert set(warped_mask.unique().tolist()) <= {0.0, 1.0}
    agree = ((a[:, :1] > 0) == (warped_mask > 0.5)).float().mean()
    assert agree > 0.98, agree


def test_probability_zero_changes_nothing():
    image, mask = scene()
    u = torch.rand(4, max(JITTER_PARAMS, PREVIOUS_PARAMS))
    (same,), same_mask = shared_jitter([image], mask, u[:, :JITTER_PARAMS], p=0.0)
    assert torch.equal(same, image) and torch.equal(same_mask, mask)
    noise = torch.randn_like(image)
    assert torch.equal(previous_frame(image, u[:, :PREVIOUS_PARAMS], noise, p=0.0), image)


def test_previous_frame_degradation_is_small_and_stays_in_range():
    ramp = torch.linspace(-0.8, 0.8, 64)
    image = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), ramp[None, :] * ramp[:, None]])
    image = image.expand(8, 3, 64, 64).contiguous()
    u = torch.rand(8, PREVIOUS_PARAMS, generator=torch.Generator().manual_seed(1))
    u[:, 0] = 0
    out = previous_frame(image, u, torch.randn_like(image), p=1.0)
    assert out.abs().max() <= 1
    assert 0 < (out - image).abs().mean() < 0.06
