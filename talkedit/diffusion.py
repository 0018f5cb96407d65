"""Noise schedule, DDPM and DDIM steps, and the masked frame sampler (spec §3).

Glossary (code name -> paper notation; the official code's name in brackets):
    betas            β_t                       [betas]
    alpha_bar        ᾱ_t = Π_{s<=t} (1 - β_s)  [gammas]   also the UNet's noise-level input
    alpha_bar_prev   ᾱ_{t-1}, with ᾱ_{-1} = 1  [gammas_prev]
    x_t              the noisy masked target at step t (y_t in the official code)
    eps              ε, the noise the UNet predicts (or derived from its v, see below)
    v                v = √ᾱ ε - √(1-ᾱ) x_0, what a v-prediction UNet predicts (Salimans & Ho 2022)
    x0_pred          x̂_0, the clean target implied by x_t and ε, clamped to [-1, 1]

Steps are indexed t = T-1 ... 0 over a schedule of T steps. Because the UNet is conditioned on the continuous ᾱ and
not on t, a schedule of any length T is the same cosine curve sampled more or less finely: T = 1000 is what the model
was trained on, T = 100 is the paper's DDPM sampler, and DDIM with N steps walks the T = N schedule.

The paper's UNet predicts ε. Where ᾱ is near 0 (the first steps from pure noise) x̂_0 = (x_t - √(1-ᾱ) ε)/√ᾱ
multiplies any error in ε by 1/√ᾱ (about 500 at the first of 25 steps), so an ε-model must be very precise there.
A model trained with `prediction = "v"` avoids this: x̂_0 = √ᾱ x_t - √(1-ᾱ) v. The samplers take ε either way
(`eps_from_output`), so every step below is the same for both.

Images are (B, 3, S, S) float in [-1, 1]; masks (B, 1, S, S) float, 1 = regenerate, 0 = keep.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch

log = logging.getLogger("talkedit")

Sampler = Literal["ddpm", "ddim"]
SAMPLERS: tuple[Sampler, ...] = ("ddpm", "ddim")
Prediction = Literal["eps", "v"]
PREDICTIONS: tuple[Prediction, ...] = ("eps", "v")


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule a model was trained with and the sampler defaults that go with it (saved with weights)."""

    schedule: str = "cosine"  # the only schedule the official code trains with
    cosine_s: float = 0.008  # offset s of Nichol & Dhariwal's cosine schedule
    max_beta: float = 0.999  # clamp on β_t, which only the last step reaches
    train_steps: int = 1000  # T used in training
    sampler: Sampler = "ddim"  # default sampler; the paper samples with "ddpm" over 100 steps
    steps: int = 50  # default number of sampling steps
    eta: float = 0.0  # default DDIM stochasticity: 0 deterministic, 1 = DDPM's ancestral variance
    prediction: Prediction = "eps"  # what the UNet outputs: ε (the paper) or v = √ᾱ ε - √(1-ᾱ) x_0

    def __post_init__(self) -> None:
        for name in ("train_steps", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name, lo, hi in (("eta", 0.0, 1.0), ("cosine_s", 0.0, 1.0), ("max_beta", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], not {value!r}")
        if self.schedule != "cosine":
            raise ValueError(f"unknown noise schedule {self.schedule!r}; only 'cosine' is implemented")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DiffusionConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DiffusionConfig fields {sorted(unknown)}")
        return cls(**data)


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_t of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), in float64. Returns (steps,).

    f(u) = cos²((u + s)/(1 + s) · π/2), ᾱ_j = f(j/T)/f(0), β_t = min(1 - ᾱ_{t+1}/ᾱ_t, max_beta).
    """
    u = torch.arange(steps + 1, dtype=torch.float64) / steps + s
    f = torch.cos(u / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-step constants of one schedule of T steps: each field (T,) float32 except `betas` (float64).

    Computed in float64 and stored in float32, exactly as the official `set_new_noise_schedule` registers them.
    `betas` and `alpha_bar_f64` stay float64 on the CPU for the DDIM step's scalar arithmetic.
    """

    betas: torch.Tensor
    alpha_bar_f64: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_recip_alpha_bar: torch.Tensor  # √(1/ᾱ_t)
    sqrt_recipm1_alpha_bar: torch.Tensor  # √(1/ᾱ_t - 1)
    posterior_log_variance: torch.Tensor  # log max(β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t), 1e-20)
    posterior_mean_coef1: torch.Tensor  # β_t √ᾱ_{t-1} / (1 - ᾱ_t), multiplies x̂_0
    posterior_mean_coef2: torch.Tensor  # (1 - ᾱ_{t-1}) √(1 - β_t) / (1 - ᾱ_t), multiplies x_t

    @classmethod
    def cosine(cls, steps: int, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        return cls.from_betas(cosine_betas(steps, s, max_beta))

    @classmethod
    def from_config(cls, config: DiffusionConfig, steps: int) -> NoiseSchedule:
        return cls.cosine(steps, config.cosine_s, config.max_beta)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        betas = betas.double()
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        f32 = torch.float32
        return cls(
            betas=betas,
            alpha_bar_f64=alpha_bar,
            alpha_bar=alpha_bar.to(f32),
            alpha_bar_prev=alpha_bar_prev.to(f32),
            sqrt_recip_alpha_bar=torch.sqrt(1 / alpha_bar).to(f32),
            sqrt_recipm1_alpha_bar=torch.sqrt(1 / alpha_bar - 1).to(f32),
            posterior_log_variance=torch.log(posterior_variance.clamp(min=1e-20)).to(f32),
            posterior_mean_coef1=(betas * torch.sqrt(alpha_bar_prev) / (1 - alpha_bar)).to(f32),
            posterior_mean_coef2=((1 - alpha_bar_prev) * torch.sqrt(alphas) / (1 - alpha_bar)).to(f32),
        )

    @property
    def steps(self) -> int:
        return len(self.betas)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with its float32 tensors on `device` (the float64 ones stay on the CPU)."""
        cpu = ("betas", "alpha_bar_f64")
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name not in cpu}
        return NoiseSchedule(betas=self.betas, alpha_bar_f64=self.alpha_bar_f64, **moved)


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ ε - √(1-ᾱ) x_0, the training target of a v-prediction model. alpha_bar: (B,); x0, eps: (B, C, H, W)."""
    a = alpha_bar.reshape(-1, *[1] * (x0.dim() - 1))
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def eps_from_output(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, prediction: Prediction
) -> torch.Tensor:
    """ε from what the UNet outputs: itself for an ε-model, √ᾱ v + √(1-ᾱ) x_t for a v-model.

    output, x_t: (B, C, H, W); alpha_bar: a float or (B,)."""
    if prediction == "eps":
        return output
    if prediction != "v":
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    a = torch.as_tensor(alpha_bar, dtype=output.dtype, device=output.device)
    a = a.reshape(-1, *[1] * (output.dim() - 1)) if a.dim() else a
    return a.sqrt() * output + (1 - a).sqrt() * x_t


def predict_x0(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """x̂_0 = √(1/ᾱ_t) x_t - √(1/ᾱ_t - 1) ε (DDPM eq. 15 solved for x_0), clamped to the image range [-1, 1]."""
    return (schedule.sqrt_recip_alpha_bar[t] * x_t - schedule.sqrt_recipm1_alpha_bar[t] * eps).clamp(-1, 1)


def ddpm_step(
    schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, noise: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} (Ho et al. 2020, eqs. 6-7), as the official `p_sample`.

    `noise` is z ~ N(0, I) shaped like x_t; no noise is added at t = 0. The ancestral step is DDIM with eta = 1; any
    other `eta` is refused rather than ignored (use `ddim_step`). Returns (x_{t-1}, x̂_0).
    """
    if eta != 1.0:
        raise ValueError(f"the DDPM step has eta = 1 by definition, got eta={eta}; use the DDIM sampler for other eta")
    # 1. x̂_0 from the predicted noise, clamped.
    x0_pred = predict_x0(schedule, x_t, eps, t)
    # 2. Mean of the posterior q(x_{t-1} | x_t, x̂_0) (eq. 7).
    mean = schedule.posterior_mean_coef1[t] * x0_pred + schedule.posterior_mean_coef2[t] * x_t
    # 3. Add the posterior's (fixed, "small") variance, except at the last step.
    if t == 0:
        return mean, x0_pred
    return mean + torch.exp(0.5 * schedule.posterior_log_variance[t]) * noise, x0_pred


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    noise: torch.Tensor | None,
    eta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12). Returns (x_{t-1}, x̂_0). `noise` may be None when
    eta = 0 (the step is deterministic).

    ε is re-derived from the clamped x̂_0, so that with eta = 1 this is exactly `ddpm_step` on the same schedule.
    """
    # Scalars in float64 (Python floats, no device sync): 1 - ᾱ_{t-1} and 1 - ᾱ_{t-1} - σ² cancel badly in float32.
    a_t = float(schedule.alpha_bar_f64[t])
    a_prev = float(schedule.alpha_bar_f64[t - 1]) if t > 0 else 1.0
    # 1. x̂_0 from the predicted noise, clamped; then the ε consistent with it.
    x0_pred = predict_x0(schedule, x_t, eps, t)
    eps = (x_t - math.sqrt(a_t) * x0_pred) / math.sqrt(1 - a_t)
    # 2. σ_t(η) (eq. 16): η = 1 gives the DDPM posterior variance, η = 0 a deterministic step.
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    # 3. Point back along ε to ᾱ_{t-1}, then add fresh noise of variance σ².
    x_prev = math.sqrt(a_prev) * x0_pred + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0_pred


STEP_FUNCTIONS: dict[Sampler, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "ddpm": ddpm_step,
    "ddim": ddim_step,
}


@dataclass(frozen=True)
class StepInfo:
    """What the frame sampler reports after each step."""

    step: int  # steps done so far, 1..total
    total: int  # steps in this run
    t: int  # schedule index just computed
    x: torch.Tensor  # (B, 3, S, S) state after the step, known pixels reset
    x0_pred: torch.Tensor  # (B, 3, S, S) the step's clamped x̂_0


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX), where bf16 sampling is about 1.8 times as
    fast as fp32. Elsewhere bf16 is emulated and far slower (README "Benchmarks")."""
    try:  # a private torch helper (torch >= 2.1); without it, assume no
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for sampling on `device` (None: fp32, no autocast).

    precision: "auto" (fp16 on CUDA; bf16 on a CPU with bf16 matrix units, fp32 on other CPUs), "fp16", "bf16" or
    "fp32". fp16 on a CPU falls back to fp32, and bf16 on a CPU without matrix units runs but is slow: each is said
    once per process in the log.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "auto":
        return torch.bfloat16 if cpu_has_bf16_matrix_units() else None
    if device.type == "cpu" and precision == "bf16":
        if not cpu_has_bf16_matrix_units():
            _notice_once("bf16", "this CPU has no bf16 matrix units (AMX): bf16 sampling runs, but slower than fp32")
        return torch.bfloat16
    if precision != "auto":
        _notice_once(precision + device.type, f"{precision} is not supported on {device.type}; using fp32 instead")
    return None


def sampling_model(model: torch.nn.Module, device: torch.device, precision: str = "auto") -> torch.nn.Module:
    """The model moved to `device` in the form the sampler runs fastest there (the same frames, within precision).

    On CUDA, half weights when sampling in half precision: autocast would otherwise cast every weight at every step.
    On a CPU, fp32 weights in channels-last layout: oneDNN's convolutions ran the full UNet 1.5x faster under bf16
    autocast on an AMX Xeon and 8 % faster in fp32 (README "Benchmarks"); bf16 weights were no faster than autocast.
    (On CUDA channels-last was slower: GroupNorm.)
    """
    if device.type == "cuda":
        return model.to(device, resolve_precision(device, precision) or torch.float32)
    model = model.to(device, torch.float32)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def _notice_once(key: str, message: str) -> None:
    if key not in _NOTICES_GIVEN:
        _NOTICES_GIVEN.add(key)
        log.warning("%s", message)


PRECISIONS = ("auto", "fp16", "bf16", "fp32")
_NOTICES_GIVEN: set[str] = set()


@torch.inference_mode()
def sample_frames(
    model: torch.nn.Module,
    y0: torch.Tensor,
    mask: torch.Tensor,
    previous: torch.Tensor,
    identity: torch.Tensor,
    audio: torch.Tensor,
    *,
    sampler: Sampler | None = None,
    steps: int | None = None,
    eta: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    precision: str = "auto",
    guidance: float = 1.0,
    callback: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Inpaint the masked region of B frames at once, each an independent chain (spec §3.4).

    y0:       (B, 3, S, S) float in [-1, 1]  the original target crops; only pixels outside the mask are used
    mask:     (B, 1, S, S) float in {0, 1}   1 = regenerate
    previous: (B, 3, S, S) float in [-1, 1]  the frame before each target (generated, except at a chain's start)
    identity: (B, 3, S, S) float in [-1, 1]  the identity frame of each chain
    audio:    (B, F·M) or (B, F, M) float    mel window in dB for each target (F frames x M bins)
    Returns   (B, 3, S, S) float32 in [-1, 1] on the model's device; pixels outside the mask equal y0 exactly.

    `sampler`, `steps` and `eta` default to the model's `diffusion` config (DDIM, 50 steps). Noise comes only from
    `generator` (a fresh one seeded 0 when None), or from one generator per frame (a sequence of B), so that each
    chain's noise does not depend on what it is batched with; a CPU generator gives the same noise on every device.
    `precision` (see `resolve_precision`) is the UNet's autocast: by default fp16 on CUDA, bf16 on a CPU with bf16
    matrix units (AMX), fp32 on other CPUs. Everything between UNet calls runs in fp32.

    `guidance` w != 1 is classifier-free guidance on the audio (Ho & Salimans 2022): ε = ε_∅ + w (ε_audio - ε_∅),
    where ε_∅ is the prediction without audio (UNet's `audio_dropped`). It needs a model trained with audio dropout
    and costs a second UNet evaluation per step.
    """
    config: DiffusionConfig = getattr(model, "diffusion", None) or DiffusionConfig()
    sampler = sampler or config.sampler
    steps = steps or config.steps
    if sampler == "ddpm":  # ancestral sampling is eta = 1; the config's eta is DDIM's
        eta = 1.0 if eta is None else eta
    eta = config.eta if eta is None else eta
    if sampler not in STEP_FUNCTIONS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    batch = y0.shape[0]
    for name, tensor in (("mask", mask), ("previous", previous), ("identity", identity), ("audio", audio)):
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} has batch {tensor.shape[0]}, y0 has {batch}")

    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(device, precision)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    generators = list(generator) if isinstance(generator, Sequence) else None
    if generators is not None and len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for a batch of {batch}")
    schedule = NoiseSchedule.from_config(config, steps).to(device)
    step_fn = STEP_FUNCTIONS[sampler]

    def randn() -> torch.Tensor:
        if generators is not None:
            return torch.stack([torch.randn(y0.shape[1:], generator=g, device=g.device) for g in generators]).to(device)
        return torch.randn(y0.shape, generator=generator, device=generator.device).to(device)

    y0, mask = y0.to(device, torch.float32), mask.to(device, torch.float32)
    context = torch.cat([previous, identity], dim=1).to(device, torch.float32)
    audio = audio.reshape(batch, -1).to(device, torch.float32)
    keep = y0 * (1 - mask)

    # y_T: the known pixels are clean, the masked region is pure noise.
    x_t = keep + mask * randn()
    for done, t in enumerate(reversed(range(steps)), start=1):
        gamma = schedule.alpha_bar[t].expand(batch)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            x = torch.cat([x_t, context], dim=1)
            if guidance == 1.0:
                out = model(x, gamma, audio).float()
            else:
                dropped = torch.arange(2 * batch, device=device) >= batch
                both = model(torch.cat([x, x]), gamma.repeat(2), audio.repeat(2, 1), dropped).float()
                out_audio, out_none = both.chunk(2)
                out = out_none + guidance * (out_audio - out_none)  # linear, so the same for ε and v
        eps = eps_from_output(out, x_t, float(schedule.alpha_bar_f64[t]), config.prediction)
        # Deterministic DDIM (eta = 0) uses no noise: drawing it for B frames every step costs CPU time for nothing.
        noise = randn() if sampler == "ddpm" or eta > 0 else None
        x_prev, x0_pred = step_fn(schedule, x_t, eps, t, noise, eta=eta)
        # Known pixels go back to the clean original after every step, as in training (no re-noising).
        x_t = keep + mask * x_prev
        if callback is not None:
            callback(StepInfo(step=done, total=steps, t=t, x=x_t, x0_pred=x0_pred))
    return x_t
