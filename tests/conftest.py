"""Session fixtures: the official-code reference tensors in ../shared/fixtures; the suite's CPU precision."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from talkedit.unet import UNet

from .common import fixture_path, strip_prefix


@pytest.fixture(autouse=True)
def cpu_without_bf16_matrix_units(monkeypatch):
    """Sampling's "auto" precision is bf16 on a CPU with AMX and fp32 on others: the suite runs every in-process
    sampler as on the latter, so that its results do not depend on the machine. The tests of the bf16 path say so."""
    from talkedit import diffusion

    monkeypatch.setattr(diffusion, "cpu_has_bf16_matrix_units", lambda: False)


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


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory, unet_reference, sampler_reference):
    """A checkpoint folder as the Palette trainer leaves it, made from the fixture tensors."""
    from talkedit.checkpoint import SCHEDULE_BUFFERS

    folder = tmp_path_factory.mktemp("checkpoint")
    params = {k: v for k, v in unet_reference.items() if k.startswith("denoise_fn.")}
    buffers = {name: sampler_reference[f"schedule.train.{name}"] for name in SCHEDULE_BUFFERS}
    torch.save({**params, **buffers}, folder / "735_Network.pth")
    torch.save(params, folder / "735_Network_ema.pth")
    return folder


@pytest.fixture(scope="session")
def talkedit_home(tmp_path_factory):
    """A talkedit cache holding the face landmarker (from ../shared/models) and a tiny 128 px model.

    Sets TALKEDIT_HOME for the session. Yields (home, tiny model path).
    """
    import shutil

    from talkedit.diffusion import DiffusionConfig
    from talkedit.weights import save_weights

    from .common import LANDMARKER, TINY_128

    home = tmp_path_factory.mktemp("talkedit-home")
    shutil.copy(LANDMARKER, home / "face-landmarker.task")
    torch.manual_seed(0)
    model = UNet(TINY_128)
    tiny = home / "tiny-random.safetensors"
    save_weights(tiny, model.state_dict(), TINY_128, DiffusionConfig(steps=2), {"source": "random weights, tests"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TALKEDIT_HOME", str(home))
        yield home, tiny
