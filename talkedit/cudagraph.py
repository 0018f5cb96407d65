"""The UNet replayed from CUDA graphs, for sampling.

Sampling calls the UNet with the same shapes 25 to 100 times per frame. At the batch sizes dub makes (one frame of
each of B chains), the GPU runs a call's several hundred small kernels faster than Python launches them, so it waits
for the CPU (README, "Benchmarks"). A CUDA graph records the kernels of one call once and replays them all with one
launch.

A graph fixes its shapes and the memory its inputs and outputs live in. `GraphedUNet` therefore keeps one graph per
input shape (in practice per batch size: a schedule of B chains makes B, then fewer as chains end), captured the first
time that shape comes, with static inputs that every call copies into. Capturing costs a few eager calls.

A graph keeps the activation memory it was captured with. The graphs of one `GraphedUNet` share one memory pool, so
where the largest batch comes first, as in dub, they hold about what its call needs, not the sum over every batch
size that a dub's ending chains make (up to 16 graphs at the default batch of 16). Sharing is safe here because
replays never overlap (one stream, one call at a time) and each replay's output is copied out before the next call,
whatever graph that call replays.

It is for sampling only: no gradients, and the weights must not change after a graph is captured. Where the input
is not on CUDA it calls the UNet as is.
"""

from __future__ import annotations

import torch
from torch import nn

WARMUP_CALLS = 2  # eager calls on a side stream before capturing, as torch.cuda.graphs' docs ask


def _autocast_state() -> tuple[bool, torch.dtype]:
    """Whether CUDA autocast is on, and its dtype (torch >= 2.4 takes the device; older versions had GPU-only calls)."""
    try:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except (TypeError, AttributeError):
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class _Graph:
    """One captured UNet call: its static inputs (x, gamma, audio, audio_dropped) and its static output."""

    def __init__(self, unet: nn.Module, x: torch.Tensor, gamma: torch.Tensor, audio: torch.Tensor, pool) -> None:
        self.inputs = (
            torch.zeros_like(x),
            torch.zeros_like(gamma),
            torch.zeros_like(audio),
            torch.zeros(x.shape[0], dtype=torch.bool, device=x.device),
        )
        # Autocast's cache of cast weights is emptied when its context exits; a graph that read from it would replay
        # reading freed memory. Without the cache, the casts are recorded in the graph itself.
        cache_enabled = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    unet(*self.inputs)
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: dub samples on a thread of its own while the main thread writes the video.
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = unet(*self.inputs)
        finally:
            torch.set_autocast_cache_enabled(cache_enabled)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, args, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the static output


class GraphedUNet(nn.Module):
    """`unet` with its CUDA calls replayed from graphs. Call it as the UNet: (x, gamma, audio, audio_dropped=None).

    x: (B, C, S, S), gamma: (B,) or (B, 1), audio: (B, F·M), audio_dropped: (B,) bool or None -> (B, 3, S, S).
    The model's `diffusion` config goes with it, so `sample_frames` takes either.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.diffusion = getattr(unet, "diffusion", None)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None  # the memory pool all graphs share, made at the first capture

    @property
    def captured(self) -> list[tuple]:
        """The keys (input shapes, dtypes and autocast state) of the graphs captured so far."""
        return list(self._graphs)

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor, audio: torch.Tensor, audio_dropped: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not x.is_cuda or torch.is_grad_enabled():
            return self.unet(x, gamma, audio, audio_dropped)
        with torch.inference_mode():  # static inputs made in inference mode may only be written to in it
            gamma = gamma.reshape(-1)
            # Dropping no audio is the same as not asking: the UNet then multiplies the audio embedding by 1, exactly.
            if audio_dropped is None:
                audio_dropped = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            key = (tuple(x.shape), x.dtype, tuple(audio.shape), audio.dtype, gamma.dtype, _autocast_state())
            graph = self._graphs.get(key)
            if graph is None:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = self._graphs[key] = _Graph(self.unet, x, gamma, audio, self._pool)
            return graph(x, gamma, audio, audio_dropped.to(x.device, torch.bool))
