from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from talkedit.cudagraph import GraphedUNet
from talkedit.diffusion import DiffusionConfig, sample_frames
from talkedit.generate import generate_chains, plan_chains

from .common import TINY, random_tiny_model
from .test_diffusion import frame_inputs


def sample(model, inputs, **kw) -> torch.Tensor:
    return sample_frames(model, *inputs, steps=6, generator=torch.Generator().manual_seed(0), **kw)


def test_off_cuda_the_graphed_unet_is_the_unet_with_its_diffusion_config():
    model = random_tiny_model()
    model.diffusion = DiffusionConfig(prediction="v")
    graphed = GraphedUNet(model)
    inputs = frame_inputs(batch=3)
    torch.testing.assert_close(sample(graphed, inputs), sample(model, inputs), atol=0, rtol=0)
    assert sample(graphed, inputs).sub(sample(random_tiny_model(), inputs)).abs().max() > 1e-3  # v, not ε, was used
    assert graphed.captured == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("half", [False, True], ids=["fp32 weights, autocast", "fp16 weights"])
def test_cuda_graphs_sample_what_the_eager_unet_samples(half):
    model = random_tiny_model().cuda()
    if half:
        model = model.half()
    graphed = GraphedUNet(model)
    three, two = frame_inputs(batch=3), frame_inputs(batch=2, seed=1)

    first = sample(graphed, three)
    torch.testing.assert_close(first, sample(model, three), atol=2e-3, rtol=0)
    torch.testing.assert_close(sample(graphed, two), sample(model, two), atol=2e-3, rtol=0)
    assert len(graphed.captured) == 2  # one graph per batch size
    torch.testing.assert_close(sample(graphed, three), first, atol=0, rtol=0)  # replayed, not captured again
    assert len(graphed.captured) == 2
    # Guidance doubles the batch and drops the audio in half of it: the dropped flags are a graph input too.
    torch.testing.assert_close(sample(graphed, three, guidance=2.0), sample(model, three, guidance=2.0), atol=2e-3,
                               rtol=0)  # fmt: skip
    assert len(graphed.captured) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_are_captured_on_dubs_generation_thread():
    """dub generates on a thread of its own while the main thread writes; capturing there must work and match eager."""
    model = random_tiny_model().cuda().half()
    frames, size = 40, TINY.image_size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (frames, size, size, 3), np.uint8)
    masks = np.zeros((frames, size, size), np.uint8)
    masks[:, size // 2 :, 8:24] = 1
    windows = rng.uniform(-80, 0, (frames, TINY.audio_frames, TINY.audio_bins)).astype(np.float32)
    src = np.arange(frames)
    chains = plan_chains(src, np.zeros(frames, int), windows.mean(axis=(1, 2)), 25.0, 0.5)  # chains of unequal length
    assert len(chains) > 2

    def generate(unet) -> np.ndarray:
        out = np.zeros_like(crops)
        generate_chains(unet, crops, masks, src, windows, chains, 3, out, steps=4)
        return out

    eager = generate(model)
    result: dict[str, np.ndarray] = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", generate(GraphedUNet(model))))
    thread.start()
    busy = np.zeros((256, 256))
    while thread.is_alive():  # the main thread keeps working meanwhile, as dub's writer does
        busy = np.sqrt(busy + 1.0)
    thread.join()
    assert np.abs(result["out"].astype(int) - eager.astype(int)).max() <= 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_graphs_of_every_batch_size_share_one_memory_pool():
    """A dub's chains end one by one, so it captures a graph for each batch size from B down. Together they must hold
    about the memory of the largest call, not the sum over all of them (4.5 times as much here), and still replay
    what the eager UNet computes, whichever was captured last."""
    model = random_tiny_model().cuda().half()
    graphed = GraphedUNet(model)
    size, audio_size = TINY.image_size, TINY.audio_frames * TINY.audio_bins

    def call(batch: int) -> None:
        g = torch.Generator("cuda").manual_seed(batch)
        x = torch.randn(batch, TINY.in_channels, size, size, generator=g, device="cuda").half()
        gamma = torch.rand(batch, generator=g, device="cuda")
        audio = torch.randn(batch, audio_size, generator=g, device="cuda").half() * 40
        with torch.inference_mode():
            torch.testing.assert_close(graphed(x, gamma, audio), model(x, gamma, audio), atol=2e-3, rtol=0)

    def reserved() -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # leaves what live graphs hold
        return torch.cuda.memory_reserved()

    base = reserved()
    call(256)
    largest = reserved() - base
    for batch in range(224, 0, -32):
        call(batch)
    assert len(graphed.captured) == 8
    assert largest > 0
    assert reserved() - base < 2 * largest
    call(256)  # replayed after the others were captured in the same pool
    assert len(graphed.captured) == 8
