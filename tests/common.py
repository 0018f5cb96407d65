"""Helpers shared by the tests: where ../shared is, a tiny model config, small tensor utilities."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from talkedit.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"

# Small enough to sample 100 steps in a second on a CPU, yet with every kind of block (attention, up/down).
TINY = UNetConfig(
    image_size=32,
    base_channels=32,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(16,),
    head_channels=32,
    audio_frames=4,
    audio_bins=8,
)


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"missing {path}: the tests need ../shared beside the repository")
    return path


def strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("denoise_fn."): v for k, v in tensors.items() if k.startswith("denoise_fn.")}


def random_tiny_model(seed: int = 0) -> UNet:
    """A tiny UNet whose output layers are not zero, so that its output depends on every input."""
    torch.manual_seed(seed)
    model = UNet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


MEDIA = SHARED / "media"
VIDEO = MEDIA / "video"
AUDIO = MEDIA / "audio"
LANDMARKER = SHARED / "models" / "face_landmarker.task"

# A 128 px model small enough to dub a clip in seconds on a CPU (random weights: it draws noise in the mouth).
TINY_128 = UNetConfig(
    base_channels=32, channel_mults=(1, 1, 1, 1), num_res_blocks=1, attention_resolutions=(), head_channels=32
)


def media(name: str) -> Path:
    path = VIDEO / name if (VIDEO / name).exists() else AUDIO / name
    if not path.is_file():
        pytest.fail(f"missing {path}: the tests need ../shared/media beside the repository")
    return path


def talkedit_command() -> list[str]:
    """The installed console script, as a user runs it; `python -m talkedit` where none is installed beside this
    Python (a checkout on PYTHONPATH, as on the GPU machines of benchmarks/gpu/run.sh)."""
    exe = Path(sys.executable).with_name("talkedit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "talkedit"]


def run_talkedit(*args: str, env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (HF_HUB_OFFLINE from the caller's shell is dropped); `popen`
    goes to subprocess.run."""
    cmd = talkedit_command()
    inherited = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    full_env = {**inherited, "COLUMNS": "300", **(env or {})}
    popen.setdefault("timeout", 300)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env, **popen)
