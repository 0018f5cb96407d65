"""Session fixtures: the official-code reference tensors in ../shared/fixtures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from talkedit.unet import UNet

from .common import fixture_path, strip_prefix


@pytest.fixture(scope="session")
def unet_reference() -> dict[str, torch.Tensor]:
    return load_file(fixture_path("dve_unet_reference.safetensors"))


@pytest.fixture(scope="session")
def sampler_reference() -> dict[str, torch.Tensor]:
    return load_file(fixture_path("dve_sampler_reference.safetensors"))


@pytest.fixture(scope="session")
def reference_unet(unet_reference) -> UNet:
    """The full-size UNet carrying the fixture's random weights."""
    model = UNet()
    model.load_state_dict(strip_prefix(unet_reference), strict=True)
    return model.eval()
