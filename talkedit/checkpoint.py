"""Import of official DiffusionVideoEditing (Palette trainer) checkpoints into the talkedit weights format.

The checkpoint is read with `torch.load(weights_only=True)`, so nothing but tensors is ever unpickled; keys, shapes and
the stored noise schedule are checked strictly before anything is written, and the output is written atomically.
"""

from __future__ import annotations

import datetime
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from . import __version__
from .diffusion import DiffusionConfig, NoiseSchedule
from .errors import CheckpointError
from .unet import UNet, UNetConfig
from .weights import WeightsFile, build_model, file_sha256, save_weights

# The official Palette trainer saves the UNet under this prefix, plus the train schedule's buffers in *_Network.pth.
CHECKPOINT_PREFIX = "denoise_fn."
SCHEDULE_BUFFERS = {
    "gammas": "alpha_bar",
    "sqrt_recip_gammas": "sqrt_recip_alpha_bar",
    "sqrt_recipm1_gammas": "sqrt_recipm1_alpha_bar",
    "posterior_log_variance_clipped": "posterior_log_variance",
    "posterior_mean_coef1": "posterior_mean_coef1",
    "posterior_mean_coef2": "posterior_mean_coef2",
}


def _why_unreadable(path: Path, exc: Exception) -> str:
    """A short reason why torch.load(weights_only=True) refused a file."""
    if "GLOBAL" in str(exc):  # a real pickle that names a class or function ("Unsupported global: GLOBAL ...")
        return "it holds pickled Python objects besides tensors, which talkedit refuses to load"
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty (download it again)"
    if head == b"PK\x03\x04":  # a zip archive, the format torch.save writes
        return "the checkpoint archive is truncated or damaged (download it again)"
    if head == b"\x80\x02\x8a\x0a":  # a pickled magic number opens the format of torch.save before 1.6
        return "the checkpoint is truncated or damaged (download it again)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a pickle, no torch magic
        return "a plain Python pickle, not a PyTorch checkpoint (talkedit does not unpickle it)"
    return "not a PyTorch checkpoint"


def _ema_sibling(path: Path) -> Path | None:
    """`735_Network.pth` -> `735_Network_ema.pth` beside it, if the name follows the trainer's pattern."""
    match = re.fullmatch(r"(.*_Network)\.pth", path.name)
    return path.with_name(f"{match[1]}_ema.pth") if match else None


def _check_schedule_buffers(path: Path, buffers: Mapping[str, torch.Tensor], config: DiffusionConfig) -> None:
    """The train-schedule buffers saved in *_Network.pth must be the cosine schedule talkedit samples with."""
    ours = NoiseSchedule.from_config(config, config.train_steps)
    for name, field in SCHEDULE_BUFFERS.items():
        theirs, expected = buffers[name], getattr(ours, field)
        if theirs.shape != expected.shape or not torch.allclose(theirs.float(), expected, rtol=1e-4, atol=1e-6):
            raise CheckpointError(
                f"{path}: its noise schedule ({name}) is not the {config.train_steps}-step cosine schedule of the "
                "official model; talkedit cannot sample it correctly."
            )


def import_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    ema: bool = False,
    head_channels: int | None = None,
) -> WeightsFile:
    """Convert an official DiffusionVideoEditing checkpoint into a talkedit weights file.

    `checkpoint` is `<epoch>_Network.pth` (324 `denoise_fn.*` tensors + 6 train-schedule buffers) or, with
    ema=True, `<epoch>_Network_ema.pth` (the 324 tensors; found beside a given `_Network.pth`). The official
    inference samples with the raw, non-EMA weights (spec §3.3). `head_channels` overrides the attention head width
    (64 in the released config, 32 in the paper's table). Keys and shapes are checked strictly; the output is written
    atomically. Returns what was written.
    """
    src, dst = Path(checkpoint).expanduser(), Path(output).expanduser()
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file; give the path of an official *_Network.pth checkpoint.")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output would overwrite the checkpoint; choose another output path.")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst}: directory {dst.parent} does not exist; create it or choose another path.")
    is_ema_name = src.name.endswith("_ema.pth")
    if ema and not is_ema_name:
        sibling = _ema_sibling(src)
        if sibling is None or not sibling.is_file():
            raise CheckpointError(
                f"{src}: --ema asks for the EMA weights, but no {sibling.name if sibling else '*_Network_ema.pth'} "
                "was found beside it; give the *_Network_ema.pth file or drop --ema."
            )
        src = sibling
    elif not ema and is_ema_name:
        raise CheckpointError(
            f"{src}: this is the EMA checkpoint, but the official inference uses the raw weights "
            "(*_Network.pth); give that file, or convert this one with "
            "`talkedit import-weights FILE --ema -o OUT.safetensors` and dub with `--model OUT.safetensors`."
        )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing or loading
            loaded = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign, truncated or malicious files
        raise CheckpointError(f"{src}: {_why_unreadable(src, exc)}; give an official *_Network.pth file.") from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(f"{src}: not a state dict of tensors; give an official *_Network.pth file.")

    unet_config = UNetConfig() if head_channels is None else UNetConfig(head_channels=head_channels)
    diffusion_config = DiffusionConfig()
    expected = {k: tuple(v.shape) for k, v in UNet(unet_config).state_dict().items()}
    params = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in loaded.items() if k.startswith(CHECKPOINT_PREFIX)}
    extra = sorted(k for k in loaded if not k.startswith(CHECKPOINT_PREFIX) and k not in SCHEDULE_BUFFERS)
    extra += sorted(CHECKPOINT_PREFIX + k for k in params if k not in expected)
    missing = sorted(CHECKPOINT_PREFIX + k for k in expected if k not in params)
    if missing or extra:
        raise CheckpointError(
            f"{src}: not a DiffusionVideoEditing multi-speaker checkpoint: {len(missing)} expected keys missing"
            + (f" (e.g. {missing[0]})" if missing else "")
            + f", {len(extra)} unexpected"
            + (f" (e.g. {extra[0]})" if extra else "")
            + "."
        )
    for key, tensor in params.items():
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{src}: {CHECKPOINT_PREFIX}{key} has shape {list(tensor.shape)}, expected {list(expected[key])}; "
                "this is not the multi-speaker model."
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{src}: {CHECKPOINT_PREFIX}{key} holds non-finite or non-float values.")
    buffers = {k: v for k, v in loaded.items() if k in SCHEDULE_BUFFERS}
    if buffers:
        if len(buffers) != len(SCHEDULE_BUFFERS):
            raise CheckpointError(f"{src}: only some of the noise-schedule buffers are present; the file is damaged.")
        _check_schedule_buffers(src, buffers, diffusion_config)

    state_dict = {k: v.float() for k, v in params.items()}
    provenance = {
        "source": "DanBigioi/DiffusionVideoEditing official checkpoint",
        "source_file": src.name,
        "source_sha256": file_sha256(src),
        "ema": src.name.endswith("_ema.pth"),
        "converted_by": f"talkedit {__version__}",
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    weights = WeightsFile(state_dict, unet_config, diffusion_config, provenance)
    build_model(weights)  # proves the file will load before anything is written
    save_weights(dst, state_dict, unet_config, diffusion_config, provenance)
    return weights
