"""talkedit: visual dubbing with the audio-conditioned diffusion model of Bigioi et al. 2023.

The public API is imported lazily, so that `talkedit --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "weights",
    "import_checkpoint": "checkpoint",
    "UNet": "unet",
    "UNetConfig": "unet",
    "DiffusionConfig": "diffusion",
    "NoiseSchedule": "diffusion",
    "sample_frames": "diffusion",
    "TalkeditError": "errors",
    "dub": "pipeline",
    "preprocess": "analysis",
    "DubOptions": "pipeline",
}

__all__ = [
    "DiffusionConfig",
    "DubOptions",
    "NoiseSchedule",
    "TalkeditError",
    "UNet",
    "UNetConfig",
    "__version__",
    "dub",
    "import_checkpoint",
    "load_model",
    "preprocess",
    "sample_frames",
]

if TYPE_CHECKING:
    from .analysis import preprocess
    from .checkpoint import import_checkpoint
    from .diffusion import DiffusionConfig, NoiseSchedule, sample_frames
    from .errors import TalkeditError
    from .pipeline import DubOptions, dub
    from .unet import UNet, UNetConfig
    from .weights import load_model


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
