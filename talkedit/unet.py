"""The audio-conditioned denoising UNet of Bigioi et al. 2023 (spec §2).

A guided-diffusion UNet whose every residual block is modulated twice: FiLM from the noise level ᾱ and FiLM from a
window of mel-spectrogram frames. Module and parameter names follow the official multi-speaker checkpoint key for key
(after stripping its `denoise_fn.` prefix), so `load_state_dict(..., strict=True)` takes it as is.

Shapes for the official config (B = batch):
    x      (B, 9, 128, 128)  float  concat(noisy masked target y_t, previous frame, identity frame), each in [-1, 1]
    gamma  (B,) or (B, 1)    float  the noise level ᾱ itself (not a timestep)
    audio  (B, 1024)         float  4 mel frames x 256 bins in dB, frame-major
    output (B, 3, 128, 128)  float  predicted noise ε
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes the network's shape. Defaults are the official multi-speaker config."""

    image_size: int = 128  # side of the square crop the network sees
    in_channels: int = 9  # y_t, previous frame, identity frame: 3 RGB images
    out_channels: int = 3  # predicted ε for the RGB target
    base_channels: int = 64  # width at full resolution ("inner_channel")
    channel_mults: tuple[int, ...] = (1, 2, 3)  # width multiplier per resolution level
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder has one more)
    attention_resolutions: tuple[int, ...] = (32,)  # feature-map sides that get self-attention
    head_channels: int = 64  # channels per attention head (the released config; the paper's table says 32)
    audio_frames: int = 4  # mel frames in one audio window
    audio_bins: int = 256  # mel bins per frame
    dropout: float = 0.1  # inside residual blocks; inactive at inference
    norm_groups: int = 32  # GroupNorm groups everywhere

    def __post_init__(self) -> None:
        # JSON round-trips give lists; the dataclass is frozen and hashable only with tuples.
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        counts = ("image_size", "in_channels", "out_channels", "base_channels", "head_channels", "audio_frames",
                  "audio_bins", "norm_groups")  # fmt: skip
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if not self.channel_mults or any(not isinstance(m, int) or m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive integers, not {self.channel_mults!r}")
        if not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be a positive integer, not {self.num_res_blocks!r}")
        widths = [self.base_channels * m for m in self.channel_mults]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by norm_groups={self.norm_groups}")
        attn_widths = [
            self.base_channels * m
            for level, m in enumerate(self.channel_mults)
            if self.image_size >> level in self.attention_resolutions
        ]
        attn_widths.append(widths[-1])  # the middle block always attends
        if any(w % self.head_channels for w in attn_widths):
            raise ValueError(f"attention widths {attn_widths} must be divisible by head_channels={self.head_channels}")

    @property
    def emb_channels(self) -> int:
        """Width of the noise-level and audio embeddings (guided-diffusion's 4 x base)."""
        return 4 * self.base_channels

    @property
    def audio_dim(self) -> int:
        """Length of the flattened audio window."""
        return self.audio_frames * self.audio_bins

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UNetConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}")
        return cls(**data)


def noise_level_embedding(gamma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the noise level ᾱ (spec §2.1): cos half first, then sin.

    gamma: (B,) float. Returns (B, dim) float32. The highest frequency is 1, so ᾱ in (0, 1) is fed unscaled.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=gamma.device) / half)
    args = gamma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are float32 whatever the input dtype, so fp16 activations do not overflow them.

    CUDA's kernel already accumulates fp16 input in float32, so there fp16 stays fp16 (no copies in and out);
    elsewhere the input is cast to float32 and back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            if x.is_cuda and x.dtype == torch.float16:
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(
                x.dtype
            )


class ConditionedBlock(nn.Module):
    """A block that takes the noise-level and audio embeddings besides its input (guided-diffusion's TimestepBlock)."""

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, a_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ConditionedSequential(nn.Sequential):
    """A sequence that hands the embeddings to the blocks that take them (`EmbedSequential` in the checkpoint)."""

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, a_emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, t_emb, a_emb) if isinstance(layer, ConditionedBlock) else layer(x)
        return x


class ResBlock(ConditionedBlock):
    """Residual block with noise-level FiLM then audio FiLM after the second norm (spec §2.3).

    x: (B, C_in, H, W) -> (B, C_out, H', W'), H' = 2H when `up`, H/2 when `down`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        groups: int,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        # Each projection yields (scale, shift), scale first.
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.audio_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, a_emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))
        x = self._resample(x)

        t_scale, t_shift = self.emb_layers(t_emb).float()[..., None, None].chunk(2, dim=1)
        a_scale, a_shift = self.audio_emb_layers(a_emb).float()[..., None, None].chunk(2, dim=1)
        # The two FiLMs, (h (1 + t_scale) + t_shift) (1 + a_scale) + a_shift, folded into one scale and shift on the
        # (B, C, 1, 1) embeddings, so the (B, C, H, W) activations are read and written once instead of four times.
        scale = (1 + t_scale) * (1 + a_scale)
        shift = t_shift * (1 + a_scale) + a_shift
        out_norm, *out_rest = self.out_layers
        h = torch.addcmul(shift.to(h.dtype), out_norm(h), scale.to(h.dtype))
        for layer in out_rest:
            h = layer(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, legacy q|k|v layout per head (spec §2.4).

    The qkv projection's output channel `head * 3d + j` is q for j < d, k for d <= j < 2d, v otherwise (d =
    head_channels). x: (B, C, H, W) -> same shape.
    """

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.num_heads = channels // head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x_flat))  # (B, 3C, T)
        d = c // self.num_heads
        q, k, v = qkv.reshape(b, self.num_heads, 3, d, -1).transpose(-1, -2).unbind(dim=2)  # each (B, H, T, d)
        # Contiguous so that CUDA takes the fused (flash / memory-efficient) kernels, which need the last dimension
        # dense and keep the softmax statistics in fp32 even for fp16 inputs; else it falls back to bmm + softmax.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d), scale 1/sqrt(d)
        h = h.transpose(-1, -2).reshape(b, c, -1)
        return (x_flat + self.proj_out(h)).reshape(b, c, *spatial)


class UNet(nn.Module):
    """The denoiser ε_θ(x, ᾱ, audio). See the module docstring for shapes."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig()
        base, emb, groups = cfg.base_channels, cfg.emb_channels, cfg.norm_groups

        def res(cin: int, cout: int, **updown: bool) -> ResBlock:
            return ResBlock(cin, cout, emb, cfg.dropout, groups, **updown)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.head_channels, groups)

        self.cond_embed = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.audio_cond_embed = nn.Sequential(nn.Linear(cfg.audio_dim, emb), nn.SiLU(), nn.Linear(emb, emb))

        ch = base
        size = cfg.image_size
        self.input_blocks = nn.ModuleList([ConditionedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, base * mult)]
                ch = base * mult
                if size in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(ConditionedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mults) - 1:
                self.input_blocks.append(ConditionedSequential(res(ch, ch, down=True)))
                skip_channels.append(ch)
                size //= 2

        self.middle_block = ConditionedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), base * mult)]
                ch = base * mult
                if size in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True))
                    size *= 2
                self.output_blocks.append(ConditionedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor, audio: torch.Tensor, audio_dropped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise ε in the masked target.

        x: (B, in_channels, S, S) float; gamma: (B,) or (B, 1) float ᾱ in (0, 1);
        audio: (B, audio_frames * audio_bins) float dB; audio_dropped: (B,) bool, True where the sample is to be
        denoised without audio: its audio embedding is zeroed (the "no audio" token of classifier-free guidance).
        Returns (B, out_channels, S, S) in x's dtype.
        """
        dtype = self.out[-1].weight.dtype  # run in the weights' dtype; autocast may lower it further per op
        gamma_features = noise_level_embedding(gamma.reshape(-1), self.config.base_channels).to(dtype)
        t_emb = self.cond_embed(gamma_features)
        a_emb = self.audio_cond_embed(audio.reshape(audio.shape[0], -1).to(dtype))
        if audio_dropped is not None:
            a_emb = a_emb * (~audio_dropped.to(a_emb.device, torch.bool))[:, None].to(a_emb.dtype)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb, a_emb)
            skips.append(h)
        h = self.middle_block(h, t_emb, a_emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), t_emb, a_emb)
        return self.out(h).to(x.dtype)
