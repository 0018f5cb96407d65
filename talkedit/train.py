"""`train`: the paper's training (spec §3.2), with what the field has learned since as options, from one CPU to
many GPUs under `torchrun`.

    pack (pack.py) -> per step: a global batch of samples (samples.py: target crop, previous frame, identity frame
    >= 1 s away, audio window, jaw mask) -> augment (augment.py) -> noise the masked region at a random level ᾱ
    -> v-prediction loss on the mask (the paper's ε: --prediction eps), min-SNR-γ weighted -> AdamW (warm-up,
    cosine decay, clipping) -> EMA
    every eval_every steps (validation.py): the error of one-step denoising with the true audio and with audio
    shifted by 1 s, and mouths sampled from pure noise; logged and plotted (monitor.py)

Imports only torch, numpy, safetensors and OpenCV (with a pack as input), so it runs on machines without ffmpeg.

Determinism. Every random draw of a step comes from generators seeded by (seed, step): which samples, their noise,
noise levels, augmentations and audio dropout are drawn for the whole global batch and each rank takes its slice;
dropout inside the UNet is seeded by (seed, step, rank). So a run resumed from a checkpoint repeats the uninterrupted
one exactly, and N processes with batch B/N each follow one process with batch B (up to the order of the gradient
sum). The seed and the step are the whole RNG state a checkpoint needs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .augment import JITTER_PARAMS, PREVIOUS_PARAMS, previous_frame, shared_jitter
from .diffusion import PREDICTIONS, DiffusionConfig, NoiseSchedule, v_target
from .errors import TalkeditError
from .files import write_atomic
from .pack import Pack, Split
from .samples import Batches, TrainingData, seeded_rng, torch_seed
from .unet import UNet, UNetConfig
from .validation import masked_error, sample_strip, validation_error

log = logging.getLogger("talkedit")

CHECKPOINT_FORMAT = "talkedit-train"
CHECKPOINT_VERSION = 1
# From scratch the UNet learns v, not the paper's ε: on GRID s1 (same data, recipe and steps) ε-models sampled noisy
# mouths from pure noise (35 of 96) and v-models none (README, "The reference model").
DEFAULT_PREDICTION = "v"

# Small 128 px architecture for trying the whole pipeline on a CPU (about 1/20 of the paper's compute).
SMALL = UNetConfig(base_channels=32, channel_mults=(1, 1, 1, 1), num_res_blocks=1, attention_resolutions=(),
                   head_channels=32)  # fmt: skip
ARCHITECTURES = {"dve": UNetConfig(), "small": SMALL}


class TrainError(TalkeditError):
    """Training cannot start or continue as asked."""


@dataclass(frozen=True)
class Recipe:
    """How a model is trained; saved in checkpoints and in the output's provenance. None = chosen from the run."""

    lr: float | None = None  # peak learning rate; None: 1e-4 from scratch, 3e-5 when fine-tuning (--init)
    warmup: int | None = None  # linear warm-up steps; None: 5 % of the run, at most 500
    final_lr: float = 0.1  # the cosine decay ends at this fraction of the peak
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    weight_decay: float = 0.01  # AdamW, on weights of dimension >= 2 only
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float | None = None  # None: 1 - 10/steps, within [0.99, 0.9999]; ramped up as min(d, (1+k)/(10+k))
    min_snr_gamma: float = 5.0  # loss weight min(SNR, γ)/SNR (Hang et al. 2023); 0 = the paper's plain loss
    audio_dropout: float = 0.1  # fraction of samples seen without audio (a zero audio embedding), for --guidance
    previous_aug: float = 0.5  # fraction of previous frames warped, blurred and noised (augment.previous_frame)
    jitter: float = 0.3  # fraction of samples moved and re-lit as a whole (augment.shared_jitter)
    identity_gap: float = 1.0  # seconds between the target and its identity frame, at least
    shuffle_audio: bool = False  # a control: each sample hears another sample's audio, so the speech tells nothing

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))

    def resolved(self, steps: int, fine_tune: bool) -> Recipe:
        """The recipe with every None replaced by the value this run uses."""
        lr = self.lr if self.lr is not None else (3e-5 if fine_tune else 1e-4)
        warmup = self.warmup if self.warmup is not None else min(500, max(1, steps // 20))
        ema = self.ema_decay if self.ema_decay is not None else min(0.9999, max(0.99, 1 - 10 / max(steps, 1)))
        return replace(self, lr=lr, warmup=warmup, ema_decay=ema)


def default_steps(train_frames: int, batch: int, fine_tune: bool) -> int:
    """Steps when --steps is not given: 30 passes over the data when fine-tuning (300 to 5,000 steps), 200 from
    scratch (2,000 to 500,000)."""
    epochs, low, high = (30, 300, 5_000) if fine_tune else (200, 2_000, 500_000)
    return int(min(high, max(low, math.ceil(epochs * train_frames / batch))))


@dataclass
class TrainOptions:
    """Everything `train` needs besides the data. None = the default for this data and machine."""

    steps: int | None = None  # optimiser steps in all (default: default_steps)
    batch: int = 32  # global batch: split over the processes of a data-parallel run
    recipe: Recipe = field(default_factory=Recipe)
    arch: UNetConfig | None = None  # from scratch: the UNet (default: the paper's); ignored with init
    init: str | None = None  # start from these weights: a model name or a talkedit weights file
    dropout: float | None = None  # dropout inside the UNet's residual blocks (default: the model's, 0.1)
    prediction: str | None = None  # what the UNet learns to output, "v" or "eps" (the paper); None: v from
    #                                scratch, the initial model's when fine-tuning, the checkpoint's when resuming
    seed: int = 0
    device: str | None = None  # default: CUDA when available (the local rank's GPU under torchrun)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA and on a CPU with AMX, else fp32), "bf16" or "fp32"
    compile: bool = False  # torch.compile the UNet
    channels_last: bool | None = None  # channels-last memory format; None: on a CPU in bf16 yes, else no (README)
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    eval_samples: int = 64  # validation frames scored at each evaluation
    strip_frames: int = 6  # validation frames sampled for the PNG strip and val_sampled_error (0: none)
    strip_steps: int = 25  # DDIM steps for the strip
    time_limit: float | None = None  # minutes; stop at a checkpoint before this
    ema: bool = True  # write the EMA weights (False: the raw weights)
    val_fraction: float | None = None  # see pack.split_pack
    workdir: str | None = None  # checkpoints, metrics, plots (default: OUTPUT without suffix + ".train")
    resume: bool = False  # continue from the checkpoint in workdir

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues."""
        return {"batch": self.batch, "recipe": asdict(self.recipe), "seed": self.seed, "init": self.init,
                "arch": asdict(self.arch) if self.arch else None, "val_fraction": self.val_fraction,
                "dropout": self.dropout, "prediction": self.prediction}  # fmt: skip


@dataclass
class TrainResult:
    output: Path | None  # None when stopped early (the checkpoint holds the run)
    steps_done: int
    steps: int
    stopped: str | None  # why the run stopped early: "signal" or "time limit"
    workdir: Path
    last_eval: dict | None
    seconds: float
    signal: int | None = None  # a Ctrl-C or SIGTERM that came (it stops the run, unless it came in the last step)


# progress(stage, done, total, note)
TrainProgress = Callable[..., None]


def _no_progress(*args, **kwargs) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group, so it leaves it (see `close`)

    @classmethod
    def from_env(cls) -> Processes:
        """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def close(self) -> None:
        """Leave the process group this run created, once every rank is done. A gloo group left to the interpreter's
        exit can abort the process there (SIGABRT, "terminate called without an active exception": seen once in CI
        after a torchrun run had finished). Not after an error: a rank still in a collective would hang."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def _device(name: str | None, processes: Processes) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda", processes.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r}: not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: no CUDA device here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name}: training runs on cpu or cuda.")
    return device


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the step's large buffers rather than hand each back to the kernel when it is freed.

    By default glibc maps every buffer over 32 MiB afresh and returns it on free, so each training step faults all
    its large activations in again page by page: at batch 32 on a CPU, a third of the time went to the kernel. With
    buffers up to 256 MiB served from the heap and up to 1 GiB of free memory kept there, the paper's UNet trained at
    2.55 samples/s against 1.61 (2-core Xeon, bf16, channels-last, batch 32), for 3.5 GB more memory at the peak
    (README "Keeping freed memory on a CPU"); the Trainer asks for it where room_to_keep_freed_memory says. It holds
    for the whole process. Returns whether malloc took the settings (False on other C libraries, or where the user set
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ themselves: theirs stand).
    """
    import ctypes

    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS; Windows has no CDLL(None))
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 256 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def available_memory(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """Bytes of memory the kernel says are available to a new allocation (MemAvailable); None where it does not say."""
    try:
        with open(meminfo) as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def room_to_keep_freed_memory(batch: int, available: int | None, need: int | None = None) -> bool:
    """Whether there is memory for what keep_freed_memory costs: a run that fits without it must not be pushed out of
    memory by it. `available`: bytes free when the trainer starts (the pack is loaded by then). `need`: the step's
    estimated peak with it (step_memory), where figures were measured for the architecture and precision; else the
    rule from the paper's UNet in bf16, which took 16.5 GB at the peak at batch 32 with it (13.0 without) and 2.7 GB
    at batch 4 (the same without) in benchmarks/train.py, and whose GRID s1 run peaked at 23.0 GB in all (18.6
    without), with about 4.7 GB in use when its trainer started: 0.6 GB per sample and 1.5 GB more."""
    if available is None:
        return False
    return available >= (need if need is not None else 0.6e9 * batch + 1.5e9)


# Peak memory of a training step on a CPU in MiB, from benchmarks/train.py's peak RSS (README "Memory and layout of
# training on a CPU"): (fixed, per sample with keep_freed_memory, per sample without), by architecture and how the CPU
# computes (cpu_precision). fp32 and emulated bf16 measured on the 2-core AMD EPYC, bf16 on the Xeon with AMX. Emulated
# bf16 takes more than AMX's: its own row.
CPU_STEP_MIB = {
    ("dve", "fp32"): (700, 690, 500),
    ("dve", "bf16"): (1200, 490, 370),
    ("dve", "bf16-emulated"): (1000, 660, 360),
    ("small", "fp32"): (400, 160, 125),
    ("small", "bf16-emulated"): (380, 250, 95),
}


def cpu_precision(autocast: torch.dtype | None) -> str:
    """How a training step computes on this CPU: "fp32", "bf16" (in hardware: AMX) or "bf16-emulated" (other CPUs,
    many times slower than fp32: on the 2-core AMD EPYC the paper's UNet trained at 0.040 to 0.045 samples/s in bf16
    against 0.58 to 0.59 in fp32, the small one at 0.46 to 0.60 against 3.9 to 6.0)."""
    from . import diffusion

    if autocast is None:
        return "fp32"
    return "bf16" if diffusion.cpu_has_bf16_matrix_units() else "bf16-emulated"


SLOW_CPU_BF16 = (
    "this CPU has no bf16 matrix units (AMX): training in bf16 runs, but many times slower than in fp32 (8 to 15 "
    "times on an AMD EPYC); leave out --precision (auto) or give --precision fp32."
)


def step_memory(config: UNetConfig, precision: str, batch: int, processes: int, kept: bool) -> int | None:
    """Estimated peak bytes of a CPU training step at this global `batch` over `processes` sharing the machine, with
    or without freed memory kept; `precision` as cpu_precision says. None where no figures were measured for the
    architecture in that precision (CPU_STEP_MIB)."""
    arch = next((name for name, c in ARCHITECTURES.items() if replace(c, dropout=config.dropout) == config), None)
    if (arch, precision) not in CPU_STEP_MIB:
        return None
    fixed, per_kept, per_freed = CPU_STEP_MIB[(arch, precision)]
    return (fixed * processes + (per_kept if kept else per_freed) * batch) * 2**20


def cpu_memory_warning(config: UNetConfig, precision: str, batch: int, processes: int, kept: bool,
                       available: int | None) -> str | None:  # fmt: skip
    """What to tell the user when a CPU run at this global `batch` will likely not fit in the `available` bytes:
    the system kills such a run for memory without a word (one of the GRID s1 control's processes, after hours).
    None where it fits, or where no figures were measured."""
    need = step_memory(config, precision, batch, processes, kept)
    if need is None or available is None or need <= available:
        return None
    one, two = step_memory(config, precision, 1, processes, kept), step_memory(config, precision, 2, processes, kept)
    fits = int((available - one) // (two - one) + 1) // processes * processes
    advice = f"--batch {fits} fits" if fits >= 1 else "even --batch 1 may not: close other programs or use a GPU"
    return (f"training at --batch {batch} on this CPU takes about {need / 1e9:.1f} GB at its peak and "
            f"{available / 1e9:.1f} GB is available: the system may stop it for memory. {advice}.")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Model, loss, EMA


def new_model(config: UNetConfig) -> UNet:
    """A UNet initialised as guided-diffusion does: PyTorch's default init, then zero output convolutions of every
    residual block, attention block and the network, so that each block starts as the identity (spec §2.8 notes
    that the official trainer overrides this with kaiming; we keep the zero init)."""
    model = UNet(config)
    for name, module in model.named_modules():
        if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model


def noise_levels(schedule: NoiseSchedule, u_step: torch.Tensor, u_level: torch.Tensor) -> torch.Tensor:
    """The paper's continuous noise level (spec §3.2): t ~ U{1 .. T-1}, then ᾱ ~ U(ᾱ_{t-1}, ᾱ_t).

    u_step, u_level: (B,) uniform in [0, 1). Returns ᾱ (B,) float32."""
    steps = schedule.steps
    alpha_bar = schedule.alpha_bar.to(u_step.device)
    t = 1 + (u_step * (steps - 1)).long().clamp(max=steps - 1)
    high, low = alpha_bar[t - 1], alpha_bar[t]
    return low + (high - low) * u_level


def masked_loss(output: torch.Tensor, goal: torch.Tensor, mask: torch.Tensor, alpha_bar: torch.Tensor,
                min_snr_gamma: float, prediction: str = "eps") -> torch.Tensor:  # fmt: skip
    """Loss on the masked region: per sample the mean squared error over the mask's pixels between the UNet's
    output and its goal (ε, or v for a v-model), averaged over the batch.

    min-SNR-γ (Hang et al. 2023; γ = 0 gives weight 1) weights each sample by min(SNR, γ)/SNR for ε and
    min(SNR, γ)/(SNR + 1) for v, SNR = ᾱ/(1-ᾱ): both are the same weight min(SNR, γ) on the error of x̂_0.

    output, goal: (B, 3, S, S); mask: (B, 1, S, S); alpha_bar: (B,). Returns a scalar."""
    per_sample = masked_error(output, goal, mask)
    if min_snr_gamma > 0:
        snr = alpha_bar / (1 - alpha_bar)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / (snr if prediction == "eps" else snr + 1)
    return per_sample.mean()


class EMA:
    """Exponential moving average of the parameters (and copies of the buffers), with a warm-up ramp:
    decay_k = min(decay, (1 + k)/(10 + k)) at update k, so that early updates are not dominated by the init."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        # shadow += (1 - d) (v - shadow), as one fused call over all tensors (a loop costs ~600 launches per step)
        torch._foreach_lerp_([self.shadow[k] for k in floats], [state[k].detach().float() for k in floats], 1 - d)
        for k, v in state.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}


def lr_factor(step: int, warmup: int, total: int, final: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to `final` at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run: built from a pack, driven by `run`. Construct it on every rank of a data-parallel run."""

    def __init__(self, pack: Pack, split: Split, output: Path, options: TrainOptions,
                 processes: Processes | None = None, progress: TrainProgress = _no_progress) -> None:  # fmt: skip
        self.pack, self.split, self.output, self.options = pack, split, Path(output), options
        self.processes = processes or Processes()
        self.progress = progress
        self.device = _device(options.device, self.processes)
        self.workdir = Path(options.workdir) if options.workdir else _default_workdir(self.output)
        if options.batch < 1 or options.batch % self.processes.world:
            raise TrainError(
                f"--batch {options.batch}: the global batch must be a positive multiple of the {self.processes.world} "
                "processes."
            )
        self.local_batch = options.batch // self.processes.world
        self.autocast = _autocast_dtype(options.precision, self.device)
        precision = cpu_precision(self.autocast) if self.device.type == "cpu" else None
        if precision == "bf16-emulated" and self.processes.rank == 0:
            log.warning("%s", SLOW_CPU_BF16)
        # Channels-last pays on a CPU in bf16 (oneDNN); in fp32 it was no faster on a Xeon, 10-22 % slower on an EPYC.
        default_layout = self.device.type == "cpu" and self.autocast is not None
        self.channels_last = default_layout if options.channels_last is None else options.channels_last
        available = available_memory() if self.device.type == "cpu" else None  # before the model takes its share

        # The model: from weights (fine-tuning) or new.
        self.init_provenance: dict = {"from": "scratch"}
        if options.init:
            self.model, self.diffusion, self.init_provenance = _initial_weights(options.init)
            if options.prediction not in (None, self.diffusion.prediction):
                raise TrainError(
                    f"--prediction {options.prediction}: {options.init} predicts {self.diffusion.prediction}; "
                    "fine-tune it as it is (leave out --prediction), or train a new model from scratch."
                )
        else:
            torch.manual_seed(torch_seed(options.seed, 0))  # the initial weights follow the seed
            prediction = options.prediction or DEFAULT_PREDICTION
            if prediction not in PREDICTIONS:
                raise TrainError(f"--prediction {prediction}: choose {' or '.join(PREDICTIONS)}.")
            self.model = new_model(options.arch or UNetConfig())
            self.diffusion = DiffusionConfig(prediction=prediction)
        if options.dropout is not None:
            self.model = _with_dropout(self.model, options.dropout)
        self.config = self.model.config
        _check_model_fits_pack(self.config, pack)
        if self.device.type == "cpu":
            # The global batch and all processes: torchrun's CPU processes usually share one machine's memory.
            world = self.processes.world
            need = step_memory(self.config, precision, options.batch, world, kept=True)
            kept = room_to_keep_freed_memory(options.batch, available, need) and keep_freed_memory()
            warning = cpu_memory_warning(self.config, precision, options.batch, world, kept, available)
            if warning and self.processes.rank == 0:
                log.warning("%s", warning)
        self.fine_tune = options.init is not None
        given = options.steps
        self._set_steps(given if given is not None else default_steps(len(split.train), options.batch, self.fine_tune))
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()

        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.recipe.weight_decay}, {"params": no_decay, "weight_decay": 0}]
        self.optimizer = torch.optim.AdamW(groups, lr=self.recipe.lr, betas=self.recipe.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.recipe.warmup, self.steps, self.recipe.final_lr)
        )
        self.ema = EMA(self.model, self.recipe.ema_decay) if options.ema else None
        self.network = self.model
        if self.processes.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=ids)
        if options.compile:
            self.network = torch.compile(self.network)

        self.schedule = self._schedule()
        self.data = TrainingData(pack, split, self.device, self.recipe.identity_gap)
        self.batches = Batches(split.train, options.batch, options.seed)
        self.step = 0
        self.elapsed = 0.0  # training seconds of earlier runs of this training (resumed)
        self._stop_signal: int | None = None
        self._val_note = ""

    def _set_steps(self, steps: int) -> None:
        """The run's length, and the recipe values that follow from it (warm-up, EMA decay)."""
        if steps < 1:
            raise TrainError(f"--steps {steps}: train at least one step.")
        self.steps = steps
        self.recipe = self.options.recipe.resolved(steps, self.fine_tune)
        for name in ("audio_dropout", "previous_aug", "jitter", "final_lr"):
            if not 0 <= getattr(self.recipe, name) <= 1:
                raise TrainError(
                    f"--{name.replace('_', '-')} {getattr(self.recipe, name)}: give a fraction from 0 to 1."
                )
        r = self.recipe
        for name, ok in (("lr", r.lr > 0), ("ema_decay", 0 < r.ema_decay < 1), ("warmup", r.warmup >= 0),
                         ("identity_gap", r.identity_gap >= 0)):  # fmt: skip
            if not ok:
                raise TrainError(f"--{name.replace('_', '-')} {getattr(r, name)}: out of range.")

    # -- one step -----------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> torch.Tensor:
        """One optimiser step on this rank's slice of the global batch. Returns this rank's loss, a 0-d tensor on the
        device (reading it waits for the GPU, so the loop reads it only when it logs)."""
        options, recipe, data = self.options, self.recipe, self.data
        batch, lo = options.batch, self.processes.rank * self.local_batch
        hi = lo + self.local_batch
        rng = seeded_rng(options.seed, 2, step)
        index = self.batches.indices(step)
        identity = data.identity(index, rng.random(batch), "train")
        # All random tensors of the global batch, in a fixed order, from one generator; this rank uses its slice.
        gen = torch.Generator(self.device).manual_seed(torch_seed(options.seed, 3, step))
        size = self.config.image_size

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=gen, device=self.device)[lo:hi]

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=self.device)[lo:hi]

        u_step, u_level, u_drop = uniform(batch), uniform(batch), uniform(batch)
        u_jitter, u_previous = uniform(batch, JITTER_PARAMS), uniform(batch, PREVIOUS_PARAMS)
        eps = normal(batch, 3, size, size)
        previous_noise = normal(batch, 3, size, size)

        mine = index[lo:hi]
        target, previous = data.images(mine), data.images(data.previous[mine])
        ident, mask = data.images(identity[lo:hi]), data.mask(mine)
        (target, previous, ident), mask = shared_jitter([target, previous, ident], mask, u_jitter, recipe.jitter)
        previous = previous_frame(previous, u_previous, previous_noise, recipe.previous_aug)
        alpha_bar = noise_levels(self.schedule, u_step, u_level)
        a = alpha_bar[:, None, None, None]
        noisy = a.sqrt() * target + (1 - a).sqrt() * eps
        x = torch.cat([noisy * mask + (1 - mask) * target, previous, ident], dim=1)
        dropped = u_drop < recipe.audio_dropout
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        torch.manual_seed(torch_seed(options.seed, 4, step, self.processes.rank))  # dropout inside the UNet
        # The shuffled-audio control hears the audio of a random sample of the same global batch instead of its own.
        heard = rng.permutation(index)[lo:hi] if recipe.shuffle_audio else mine
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            output = self.network(x, alpha_bar, data.audio(heard), dropped)
        prediction = self.diffusion.prediction
        goal = eps if prediction == "eps" else v_target(target, eps, alpha_bar)
        loss = masked_loss(output, goal, mask, alpha_bar, recipe.min_snr_gamma, prediction)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from .monitor import MetricsLog

        main = self.processes.main
        if main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.workdir) if main else None
        started = time.perf_counter()
        limit = self.options.time_limit * 60 if self.options.time_limit else None
        previous_handlers = self._catch_signals()
        stopped, last_eval = None, None
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        # The last step's, evaluation's and checkpoint's durations: what --time-limit must leave room for.
        step_seconds, eval_seconds, save_seconds = 0.0, 0.0, 0.0
        try:
            if self.step == 0 and self.options.eval_every > 0:
                last_eval = self._evaluate(metrics)
                eval_seconds = time.perf_counter() - window_start
                window_start += eval_seconds  # samples/s counts the training steps only
                if self.processes.any(self._stop_signal is not None, self.device):
                    stopped = "signal"  # before the first step, which can take a minute on a CPU
            while stopped is None and self.step < self.steps:
                t = time.perf_counter()
                loss = self.train_step(self.step)
                self.step += 1
                step_seconds = time.perf_counter() - t
                window_loss, window_steps = window_loss + loss, window_steps + 1
                if self.step % self.options.log_every == 0 or self.step == self.steps:
                    seconds = time.perf_counter() - window_start
                    rate = window_steps * self.options.batch / max(seconds, 1e-9)
                    record = {"step": self.step, "loss": float(window_loss) / window_steps,
                              "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate}  # fmt: skip
                    if metrics:
                        metrics.write(record)
                    note = f"loss {record['loss']:.4f}  {rate:.1f} samples/s  {self._val_note}"
                    self.progress("train", self.step, self.steps, note)
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                else:  # the count and the ETA move every step (a CPU step can take a minute); the note at log steps
                    self.progress("train", self.step, self.steps)
                if self._evaluates_after(self.step):
                    t = time.perf_counter()
                    last_eval = self._evaluate(metrics) or last_eval  # None when a signal cut it short
                    eval_seconds = time.perf_counter() - t
                    window_start += eval_seconds  # minutes on a CPU: not a slower step
                # Stop before the limit, with room for the next step (thrice the last one's time), its evaluation if one
                # is due (the last one's time: minutes on a CPU), and the checkpoint saved on stopping.
                ahead = 3 * step_seconds + (eval_seconds if self._evaluates_after(self.step + 1) else 0) + save_seconds
                out_of_time = limit is not None and time.perf_counter() - started + ahead + 5 >= limit
                stop = self.processes.any(self._stop_signal is not None or out_of_time, self.device)
                if stop and self.step < self.steps:
                    stopped = "time limit" if out_of_time and self._stop_signal is None else "signal"
                    break
                if self.options.checkpoint_every > 0 and self.step % self.options.checkpoint_every == 0:
                    t = time.perf_counter()
                    self.save_checkpoint(t - started)
                    save_seconds = time.perf_counter() - t
                    window_start += save_seconds
        finally:
            self._restore_signals(previous_handlers)
        seconds = time.perf_counter() - started
        self.save_checkpoint(seconds)
        output = None
        if stopped is None:
            output = self.output
            if main:
                self.write_weights(output)
        self.processes.barrier()
        return TrainResult(output, self.step, self.steps, stopped, self.workdir, last_eval, seconds, self._stop_signal)

    def _evaluates_after(self, step: int) -> bool:
        """Whether the run evaluates once `step` steps are done (every --eval-every steps, and at the end)."""
        every = self.options.eval_every
        return every > 0 and (step % every == 0 or step == self.steps)

    def _catch_signals(self) -> dict:
        """Ctrl-C and SIGTERM finish the current step (or cut a validation short), save a checkpoint, stop (exit 0)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame) -> None:
            self._stop_signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signals(handlers: dict) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)

    # -- output -------------------------------------------------------------------------------------------------

    def output_state(self) -> dict[str, torch.Tensor]:
        """The weights to write: the EMA (default) or the raw parameters, fp32 on the CPU."""
        if self.ema is not None:
            return {k: v.cpu() for k, v in self.ema.shadow.items()}
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}

    def provenance(self) -> dict:
        return {
            "source": "talkedit train",
            "talkedit": __version__,
            "init": self.init_provenance,
            "recipe": asdict(self.recipe),
            "steps": self.step,
            "batch": self.options.batch,
            "seed": self.options.seed,
            "weights": "ema" if self.ema is not None else "raw",
            "data": {
                "pack_sha256": self.pack.sha256,
                "clips": [{"name": c.name, "sha256": c.sha256, "frames": c.frames} for c in self.pack.clips],
                "split": self.split.describe(self.pack),
            },
        }

    def write_weights(self, path: Path) -> None:
        from .weights import save_weights

        save_weights(path, self.output_state(), self.config, self.diffusion, self.provenance())

    def output_model(self) -> UNet:
        """The model as it would be written (EMA or raw), for evaluation, in eval mode on the training device."""
        model = UNet(self.config).to(self.device)
        model.load_state_dict(self.output_state())
        model.diffusion = self.diffusion
        return model.eval()

    # -- checkpoints --------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.workdir / "checkpoint.pt"

    def save_checkpoint(self, seconds: float) -> None:
        """Everything needed to continue exactly (rank 0 writes; written to a temporary file, then renamed)."""
        if not self.processes.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "steps": self.steps,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "identity": self.options.identity(),
            "unet_config": self.config.to_json(),
            "diffusion_config": self.diffusion.to_json(),
            "init_provenance": self.init_provenance,
            "pack_sha256": self.pack.sha256,
            "rng": {"seed": self.options.seed, "step": self.step},  # every stream is a function of these
            "elapsed": self.elapsed + seconds,
        }
        buffer = io.BytesIO()  # written by Python, so that a full disk is an OSError (torch's writer hides errno)
        torch.save(state, buffer)
        try:
            write_atomic(self.checkpoint_path, buffer.getbuffer())
        except OSError as exc:
            raise TrainError(
                f"{self.checkpoint_path}: cannot save the checkpoint ({exc.strerror or exc}); free some space."
            ) from None

    def _schedule(self) -> NoiseSchedule:
        """The training noise schedule of self.diffusion, on the training device."""
        d = self.diffusion
        return NoiseSchedule.cosine(d.train_steps, d.cosine_s, d.max_beta).to(self.device)

    def load_checkpoint(self) -> None:
        """Continue from the workdir's checkpoint. Raises TrainError when it belongs to other data or settings."""
        path = self.checkpoint_path
        if not path.is_file():
            raise TrainError(f"{path}: no checkpoint to resume from; start without --resume.")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise TrainError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]}).") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainError(f"{path}: not a talkedit training checkpoint.")
        if state.get("version") != CHECKPOINT_VERSION:
            raise TrainError(f"{path}: a checkpoint of another talkedit version; start a new run in another folder.")
        if state["pack_sha256"] != self.pack.sha256:
            raise TrainError(f"{path}: this checkpoint was trained on other data; give the same videos or pack.")
        theirs, ours = state["identity"], self.options.identity()
        changed = ", ".join(k for k in ours if ours[k] != theirs.get(k))  # a setting newer than the run reads as None
        if changed:
            raise TrainError(f"{path}: this checkpoint was trained with other settings ({changed}); use the same ones.")
        if self.options.steps is None:  # the run's own length, not the default for its data
            self._set_steps(state["steps"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict({**state["ema"], "decay": self.recipe.ema_decay})
        # The checkpoint's own prediction: a run started before v became the default (--prediction unset) learned ε.
        diffusion = DiffusionConfig.from_json(state["diffusion_config"])
        if diffusion != self.diffusion:
            self.diffusion = diffusion
            self.schedule = self._schedule()
        self.step = state["step"]
        self.elapsed = state["elapsed"]
        self.init_provenance = state["init_provenance"]

    # -- evaluation ---------------------------------------------------------------------------------------------

    def _evaluate(self, metrics) -> dict | None:
        """Rank 0 scores the validation split; the others wait."""
        result = None
        if self.processes.main:
            from .monitor import plot_metrics

            # Said first: on a CPU, sampling the strip's mouths alone takes minutes, with no step moving.
            sampling = f", sampling {self.options.strip_frames} mouths" if self.options.strip_frames > 0 else ""
            self.progress("train", self.step, self.steps, f"validating{sampling}")
            model = self.output_model()
            try:
                result = {"step": self.step, **validation_error(model, self.data, self.options.eval_samples,
                                                                self._check_stop)}  # fmt: skip
                note = f"val {result['val_error']:.4f}  audio-shift ratio {result['audio_ratio']:.3f}"
                if self.options.strip_frames > 0:
                    errors = sample_strip(model, self.data, self.options.strip_frames, self.options.strip_steps,
                                          self.workdir / f"samples-{self.step:07d}.png", self._check_stop)  # fmt: skip
                    result["val_sampled_error"] = float(np.mean(errors))
                    result["val_sampled_error_by_frame"] = errors
                    note += f"  sampled {result['val_sampled_error']:.4f}"
            except _Stopping:  # a signal: the run saves a checkpoint and stops, without waiting minutes for this
                self.progress("train", self.step, self.steps, "validation cut short: stopping")
                result = None
            else:
                self._val_note = note
                if metrics is not None:
                    metrics.write(result)
                    plot_metrics(metrics.records, self.workdir / "train.png")
                self.progress("train", self.step, self.steps, self._val_note)
        self.processes.barrier()  # every process gets here, cut short or not, before the next collective call
        return result

    def _check_stop(self) -> None:
        """Called between the validation's UNet calls: raises _Stopping once Ctrl-C or SIGTERM has come."""
        if self._stop_signal is not None:
            raise _Stopping


class _Stopping(Exception):
    """A signal came during a validation, which is cut short so that the run stops within seconds."""


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _default_workdir(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(output.suffix) + ".train")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (None: fp32). "auto" is bf16 on CUDA and on a CPU with bf16 matrix units (AMX: 1.6x the fp32
    step's samples/s on a 2-core Xeon, 2.1x with channels-last; README "Benchmarks"), fp32 on other CPUs, where bf16
    is emulated and far slower."""
    from . import diffusion

    if precision not in ("auto", "bf16", "fp32"):
        raise TrainError(f"--precision {precision!r}: choose auto, bf16 or fp32.")
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and diffusion.cpu_has_bf16_matrix_units())
        return torch.bfloat16 if fast else None
    return torch.bfloat16 if precision == "bf16" else None


def _initial_weights(init: str) -> tuple[UNet, DiffusionConfig, dict]:
    """The model to fine-tune: a model name, a talkedit weights file, or an official checkpoint (.pth, imported)."""
    from .weights import build_model, read_weights, resolve_weights_path

    path = Path(init).expanduser()
    if path.suffix.lower() == ".pth" and path.is_file():
        import tempfile

        from .checkpoint import import_checkpoint

        with tempfile.TemporaryDirectory(prefix="talkedit-init-") as scratch:
            converted = Path(scratch) / "init.safetensors"
            import_checkpoint(path, converted)
            weights = read_weights(converted)
    else:
        weights = read_weights(resolve_weights_path(init))
    model = build_model(weights)
    provenance = {"from": str(init), "provenance": weights.provenance}
    return model, weights.diffusion_config, provenance


def _with_dropout(model: UNet, p: float) -> UNet:
    """The same model with dropout p in every residual block (the config records it)."""
    if not 0 <= p < 1:
        raise TrainError(f"--dropout {p}: give a fraction from 0 up to 1.")
    changed = UNet(replace(model.config, dropout=p))
    changed.load_state_dict(model.state_dict())
    for name in ("diffusion", "provenance"):
        if hasattr(model, name):
            setattr(changed, name, getattr(model, name))
    return changed


def _check_model_fits_pack(config: UNetConfig, pack: Pack) -> None:
    from .audio import N_MELS, WINDOW_FRAMES

    wanted = (pack.crops.shape[1], 9, WINDOW_FRAMES, N_MELS)
    if (config.image_size, config.in_channels, config.audio_frames, config.audio_bins) != wanted:
        raise TrainError(
            f"the model takes {config.image_size} px crops and {config.audio_frames}x{config.audio_bins} audio "
            f"windows; the data has {wanted[0]} px and {WINDOW_FRAMES}x{N_MELS}. Use a model made for talkedit."
        )


def train(
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    options: TrainOptions | None = None,
    *,
    progress: TrainProgress = _no_progress,
    build: dict | None = None,
) -> TrainResult:
    """Train (or fine-tune) a model on videos with their own speech, or on a pack, and write it to `output`.

    `inputs`: one pack file, or videos / folders / text lists (made into a pack in the workdir first: this needs
    the full talkedit install; `build` passes face, analysis_dir and offline to build_pack). Under torchrun, rank 0
    builds the pack and the other ranks wait for it. Returns when done, or when stopped by a signal or the time
    limit (then `output` is None and the checkpoint holds the run: call again with resume=True).
    """
    from .pack import PackError, build_pack, find_videos, read_pack, split_pack

    options = options or TrainOptions()
    output = Path(output)
    processes = Processes.from_env()
    workdir = Path(options.workdir) if options.workdir else _default_workdir(output)
    _check_output(output, workdir)
    given = [Path(p) for p in inputs]
    if len(given) == 1 and given[0].suffix == ".pack" and given[0].is_file():
        pack_path = given[0]
    else:
        find_videos(given)  # every rank checks the inputs exist: a one-line error rather than a hang
        pack_path = workdir / "data.pack"
        failure = None
        if processes.main and not _pack_holds(pack_path, find_videos(given), (build or {}).get("face")):
            created = not workdir.exists()
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                build_pack(given, pack_path, progress=progress, **(build or {}))
            except TalkeditError as exc:
                failure = exc
                if created:  # leave nothing behind
                    shutil.rmtree(workdir, ignore_errors=True)
        if processes.any(failure is not None, _device(options.device, processes)):
            raise failure or PackError("the data could not be packed; see the first process's error.")
    pack = read_pack(pack_path)
    split = split_pack(pack, options.val_fraction)
    trainer = Trainer(pack, split, output, replace(options, workdir=str(workdir)), processes, progress)
    if options.resume:
        trainer.load_checkpoint()
    elif trainer.checkpoint_path.exists():
        raise TrainError(
            f"{trainer.checkpoint_path}: a training run is already here; continue it with --resume, or choose "
            "another --workdir."
        )
    result = trainer.run()
    processes.close()
    return result


def _pack_holds(path: Path, videos: list[Path], face: str | None) -> bool:
    """Whether the pack at `path` was made from exactly these videos (by content) and face choice, in this format."""
    from safetensors import safe_open

    from .manifest import file_sha256
    from .pack import PACK_FORMAT, PACK_VERSION

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        clips = json.loads(meta["clips"])
    except Exception:
        return False
    if (meta.get("format"), meta.get("pack_version"), meta.get("face")) != (PACK_FORMAT, PACK_VERSION, face or ""):
        return False
    return [c["sha256"] for c in clips] == [file_sha256(v) for v in videos]


def _check_output(output: Path, workdir: Path) -> None:
    if output.suffix.lower() != ".safetensors":
        raise TrainError(f"{output}: the model is written as a .safetensors file; name it NAME.safetensors.")
    if output.is_dir():
        raise TrainError(f"{output}: is a folder; give a file name for the model.")
    if not output.parent.is_dir():
        raise TrainError(f"{output}: folder {output.parent} does not exist; create it or choose another path.")
    if not os.access(output.parent, os.W_OK):
        raise TrainError(f"{output.parent}: cannot write here; choose another folder for the model.")
    if workdir.exists() and not workdir.is_dir():
        raise TrainError(f"{workdir}: exists and is not a folder; choose another --workdir.")


# ---------------------------------------------------------------------------------------------------------------
# `python -m talkedit.train`: the same training where only torch, numpy, safetensors and OpenCV are installed


def main(argv: list[str] | None = None) -> int:
    """Train from a pack without typer or rich (e.g. on a GPU machine). Every TrainOptions and Recipe field is an
    option with dashes (`--eval-every 100`, `--no-ema`); see `talkedit train --help` for what each does."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m talkedit.train", description=main.__doc__)
    parser.add_argument("inputs", nargs="+", help="a .pack file (or videos, where talkedit is fully installed)")
    parser.add_argument("-o", "--output", required=True, help="the model to write (NAME.safetensors)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="dve")
    types = {"int": int, "float": float, "str": str}
    for cls, skip in ((TrainOptions, {"recipe", "arch"}), (Recipe, {"betas"})):
        for f in fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", "bool | None"):  # --flag / --no-flag (None: not given)
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            else:
                parser.add_argument(flag, type=types[f.type.split(" |")[0]], default=f.default)
    args = vars(parser.parse_args(argv))
    recipe = Recipe(**{f.name: args.pop(f.name) for f in fields(Recipe) if f.name in args})
    inputs, output, arch = args.pop("inputs"), args.pop("output"), ARCHITECTURES[args.pop("arch")]
    options = TrainOptions(**args, recipe=recipe, arch=arch)
    rank = int(os.environ.get("RANK", "0"))

    def progress(stage: str, done: int, total: int, note: str | None = None) -> None:
        if rank == 0 and note is not None:
            print(f"{stage} {done}/{total}  {note}", file=sys.stderr, flush=True)

    try:
        result = train(inputs, output, options, progress=progress)
    except TalkeditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if rank == 0 and result.stopped:
        print(f"stopped ({result.stopped}) at step {result.steps_done} of {result.steps}; continue with the same "
              "command and --resume", file=sys.stderr)  # fmt: skip
    elif rank == 0:
        print(f"done: {result.steps_done} steps, model {result.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
