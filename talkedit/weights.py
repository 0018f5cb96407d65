"""Model files: the talkedit weights format, resolving model names to verified files, and `load_model`.

A talkedit weights file is a safetensors file of UNet parameters (our module names) whose string metadata holds
    format            "talkedit"
    format_version    "1"
    unet_config       UNetConfig as JSON
    diffusion_config  DiffusionConfig as JSON (the training schedule and the sampler defaults)
    provenance        JSON: where the parameters came from
so that one file rebuilds its model. Only safetensors are read at run time; an official `.pth` checkpoint is converted
once with `import_checkpoint`, which unpickles nothing but tensors (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from . import __version__
from .diffusion import DiffusionConfig
from .errors import WeightsError
from .files import write_atomic
from .manifest import WeightsEntry, cache_dir, file_sha256, first_line, manifest_path, read_manifest

__all__ = ["WeightsEntry", "cache_dir", "file_sha256", "first_line", "manifest_path", "read_manifest"]
from .unet import UNet, UNetConfig

FORMAT = "talkedit"
FORMAT_VERSION = "1"


# ---------------------------------------------------------------------------------------------------------------
# The manifest (see manifest.py)


def model_entry(name: str, manifest: str | os.PathLike | None = None) -> WeightsEntry:
    """The manifest entry of a model name ("default" = the manifest's default)."""
    default, entries = read_manifest(manifest)
    name = default if name == "default" and default else name
    if name not in entries or entries[name].format not in ("talkedit", "dve-palette"):
        known = ", ".join(sorted(n for n, e in entries.items() if e.format in ("talkedit", "dve-palette")))
        raise WeightsError(f"unknown model {name!r}; known models: {known}, or give the path of a weights file.")
    return entries[name]


def resolve_weights_path(
    name_or_path: str | os.PathLike, *, offline: bool | None = None, progress: Callable | None = None
) -> Path:
    """A weights file path as given, or the verified cached file of a model name, fetched on first use unless
    offline. Raises WeightsError when there is none."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    if path.suffix == ".safetensors" or os.sep in name:
        raise WeightsError(f"{name}: no such file; give the path of a talkedit weights file or a model name.")
    from .download import ensure

    return ensure(model_entry(name), offline=offline, **({"progress": progress} if progress else {}))


# ---------------------------------------------------------------------------------------------------------------
# The talkedit weights format


def save_weights(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    unet_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    provenance: Mapping[str, object],
) -> None:
    """Write a talkedit weights file atomically: a temporary file beside `path`, renamed when complete."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "unet_config": unet_config.to_json(),
        "diffusion_config": diffusion_config.to_json(),
        "provenance": json.dumps(dict(provenance), sort_keys=True),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    try:
        write_atomic(path, serialize(tensors, metadata=metadata))
    except OSError as exc:
        raise WeightsError(
            f"{path}: cannot write ({exc.strerror or exc}); check that its folder is writable and has room."
        ) from None


@dataclass(frozen=True)
class WeightsFile:
    """The contents of a talkedit weights file."""

    state_dict: dict[str, torch.Tensor]
    unet_config: UNetConfig
    diffusion_config: DiffusionConfig
    provenance: dict


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read and check a talkedit weights file. Raises WeightsError with what to do when it is not one."""
    path = Path(path)
    not_ours = f"{path}: not a talkedit weights file"
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise WeightsError(
                    f"{not_ours} (no talkedit metadata); convert an official checkpoint with "
                    "`talkedit import-weights CHECKPOINT -o OUT.safetensors`."
                )
            if metadata.get("format_version") != FORMAT_VERSION:
                raise WeightsError(
                    f"{path}: weights format version {metadata.get('format_version')!r} is not supported by "
                    f"talkedit {__version__}; upgrade talkedit."
                )
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except WeightsError:
        raise
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    except Exception as exc:  # safetensors' own error type moved between releases
        raise WeightsError(f"{not_ours} ({first_line(exc)}); re-create it with `talkedit import-weights`.") from None
    broken = next((k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:  # a flipped bit or a diverged training run: it would paint black mouths
        raise WeightsError(f"{path}: tensor {broken} holds NaN or infinite values; the file is damaged, re-create it.")
    try:
        unet_config = UNetConfig.from_json(metadata["unet_config"])
        diffusion_config = DiffusionConfig.from_json(metadata["diffusion_config"])
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: damaged talkedit metadata ({exc}); re-create the file.") from None
    return WeightsFile(state_dict, unet_config, diffusion_config, provenance)


def build_model(weights: WeightsFile) -> UNet:
    """A UNet with the file's config and parameters, loaded strictly; `model.diffusion` holds its schedule."""
    model = UNet(weights.unet_config)
    expected = model.state_dict()
    for key, tensor in weights.state_dict.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise WeightsError(
                f"weights do not fit their own config: {key} has shape {tuple(tensor.shape)}, the config makes "
                f"{tuple(expected[key].shape)}; re-create the file."
            )
    result = model.load_state_dict(weights.state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights do not fit their own config: {len(result.missing_keys)} missing "
            f"({', '.join(result.missing_keys[:2])}), {len(result.unexpected_keys)} unexpected "
            f"({', '.join(result.unexpected_keys[:2])}); re-create the file."
        )
    model.diffusion = weights.diffusion_config
    model.provenance = weights.provenance
    return model.eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    offline: bool | None = None,
) -> UNet:
    """Load a denoiser by model name (see weights.toml) or weights-file path, ready for sampling.

    A name is resolved to its cached file, which is verified (sha256) on every load and downloaded on first use
    unless `offline` (default: the HF_HUB_OFFLINE environment variable).

    Returns the UNet in eval mode on `device` (CUDA when available, else CPU), in `dtype` (default float32: the
    sampler autocasts to fp16 on CUDA). `model.config` is its UNetConfig, `model.diffusion` its DiffusionConfig,
    `model.provenance` where the weights came from.
    """
    model = build_model(read_weights(resolve_weights_path(name_or_path, offline=offline)))
    return model.to(device=torch.device(device) if device else default_device(), dtype=dtype)
