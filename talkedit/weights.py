"""Model files: the weights.toml manifest, the talkedit weights format, and import of official checkpoints.

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

import datetime
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .diffusion import DiffusionConfig, NoiseSchedule
from .errors import CheckpointError, WeightsError
from .unet import UNet, UNetConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMAT = "talkedit"
FORMAT_VERSION = "1"

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


# ---------------------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class WeightsEntry:
    """One file of weights.toml."""

    name: str
    format: str = "file"  # "talkedit" weights, "dve-palette" official checkpoint, or any other "file"
    url: str | None = None  # plain HTTPS source
    repo: str | None = None  # Hugging Face Hub source: repo, filename, pinned revision
    filename: str | None = None
    revision: str | None = None
    sha256: str | None = None
    size: int | None = None
    license: str = ""
    description: str = ""
    source: str | None = None  # where a human finds the original
    manual: str | None = None  # steps to fetch it by hand, when talkedit cannot; `{path}` is the cache path

    @property
    def cache_name(self) -> str:
        """File name inside the cache: models are stored as talkedit weights, other files keep their suffix."""
        if self.format in ("talkedit", "dve-palette"):
            return f"{self.name}.safetensors"
        suffix = Path(self.filename or self.url or "").suffix
        return f"{self.name}{suffix}"


def manifest_path() -> Path:
    """The weights.toml shipped in the package, or the repository's own in a source checkout."""
    packaged = Path(__file__).with_name("weights.toml")
    return packaged if packaged.exists() else Path(__file__).resolve().parent.parent / "weights.toml"


def read_manifest(path: str | os.PathLike | None = None) -> tuple[str | None, dict[str, WeightsEntry]]:
    """Parse a manifest. Returns (default model name, entries by name)."""
    path = Path(path) if path is not None else manifest_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the weights manifest ({exc.strerror}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise WeightsError(f"{path}: not valid TOML ({exc}); fix the manifest.") from None
    entries = {}
    for name, table in data.get("weights", {}).items():
        try:
            entries[name] = WeightsEntry(name=name, **table)
        except TypeError as exc:
            raise WeightsError(f"{path}: entry [weights.{name}] is malformed ({exc}).") from None
    return data.get("default"), entries


def cache_dir() -> Path:
    """Where weights live: $TALKEDIT_HOME, else $XDG_CACHE_HOME/talkedit, else ~/.cache/talkedit."""
    if home := os.environ.get("TALKEDIT_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "talkedit"


def resolve_weights_path(name_or_path: str | os.PathLike) -> Path:
    """A file path as given, or the cached file of a manifest entry. Raises WeightsError when there is none."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    _, entries = read_manifest()
    name = str(name_or_path)
    if name not in entries:
        if path.suffix or os.sep in name:
            raise WeightsError(f"{name}: no such file; give the path of a talkedit weights file or a model name.")
        known = ", ".join(sorted(n for n, e in entries.items() if e.format in ("talkedit", "dve-palette")))
        raise WeightsError(f"unknown model {name!r}; known models: {known}, or give the path of a weights file.")
    entry = entries[name]
    cached = cache_dir() / entry.cache_name
    if cached.is_file():
        return cached
    how = entry.manual.format(path=cached) if entry.manual else f"put the file at {cached}"
    raise WeightsError(f"model {name!r} is not in the cache ({cached}). To get it: {how}")


# ---------------------------------------------------------------------------------------------------------------
# The talkedit weights format


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


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
    tmp = _atomic_target(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot write ({exc.strerror}); check the directory is writable.") from None
    finally:
        tmp.unlink(missing_ok=True)


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
        raise WeightsError(f"{not_ours} ({_first_line(exc)}); re-create it with `talkedit import-weights`.") from None
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
) -> UNet:
    """Load a denoiser by model name (see weights.toml) or weights-file path, ready for sampling.

    Returns the UNet in eval mode on `device` (CUDA when available, else CPU), in `dtype` (default float32: the
    sampler autocasts to fp16 on CUDA). `model.config` is its UNetConfig, `model.diffusion` its DiffusionConfig,
    `model.provenance` where the weights came from.
    """
    model = build_model(read_weights(resolve_weights_path(name_or_path)))
    return model.to(device=torch.device(device) if device else default_device(), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Import of official DiffusionVideoEditing (Palette) checkpoints


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _why_unreadable(path: Path, exc: Exception) -> str:
    """A short reason why torch.load(weights_only=True) refused a file."""
    if "Weights only load failed" in str(exc):
        return "it holds pickled Python objects besides tensors, which talkedit refuses to load"
    with path.open("rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip archive, the format torch.save writes
            return "the checkpoint archive is truncated or damaged (download it again)"
    return "not a PyTorch checkpoint"


def _ema_sibling(path: Path) -> Path | None:
    """`735_Network.pth` -> `735_Network_ema.pth` beside it, if the name follows the trainer's pattern."""
    match = re.fullmatch(r"(.*_Network)\.pth", path.name)
    return path.with_name(f"{match[1]}_ema.pth") if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            "(*_Network.pth); give that file, or pass --ema to convert the EMA weights anyway."
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
        "source_sha256": _sha256(src),
        "ema": src.name.endswith("_ema.pth"),
        "converted_by": f"talkedit {__version__}",
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    weights = WeightsFile(state_dict, unet_config, diffusion_config, provenance)
    build_model(weights)  # proves the file will load before anything is written
    save_weights(dst, state_dict, unet_config, diffusion_config, provenance)
    return weights
