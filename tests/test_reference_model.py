"""The reference model, models/grid-s1.safetensors: the paper's single-speaker experiment on GRID s1, reproduced with
`talkedit train` (benchmarks/grid_s1.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkedit.diffusion import NoiseSchedule, cpu_has_bf16_matrix_units, eps_from_output, sample_frames
from talkedit.unet import UNet
from talkedit.weights import build_model, read_weights

from .common import REPO, media

REFERENCE = REPO / "models" / "grid-s1.safetensors"
FP16_PSNR_DB = 35.0  # fp16 or bf16 autocast vs fp32 on the reference model: the stated tolerance (measured: README)


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.is_file():
        pytest.fail(f"missing {REFERENCE}: it is committed with the repository")
    return read_weights(REFERENCE)


def test_reference_model_is_the_fp16_grid_s1_run_with_50_held_out_clips(reference):
    assert all(t.dtype == torch.float16 for t in reference.state_dict.values() if t.is_floating_point())
    provenance = reference.provenance
    assert provenance["source"] == "talkedit train" and provenance["init"] == {"from": "scratch"}
    split = provenance["data"]["split"]
    held_out = (REPO / "benchmarks" / "grid_s1_held_out.txt").read_text().split()
    assert sorted(f"{name}.mpg" for name in held_out) == split["val_clips"]
    trained = {c["name"] for c in provenance["data"]["clips"]} - set(split["val_clips"])
    assert len(held_out) == 50 and len(trained) == 949 and "pbio7a.mpg" not in trained
    build_model(reference)  # loads strictly into its own config


def test_reference_model_denoises_a_real_mouth_far_better_than_random_weights(reference, talkedit_home):
    """One denoising step on 8 frames of a GRID clip of another speaker (s1's own clips are not in ../shared): the
    masked error of the predicted noise, at the noise levels validation uses, against the same UNet with random
    weights. A trained model is far better; a model that learned nothing is not."""
    from talkedit.analysis import preprocess
    from talkedit.audio import frame_windows, mel_spectrogram
    from talkedit.media import decode_speech, read_audio

    clip = media("grid_swiz3n_black_male_360x288_25fps.mpg")
    analysis = preprocess(clip)
    tracked = np.flatnonzero(analysis.tracked)
    frames = tracked[10:50:5]

    def images(index) -> torch.Tensor:
        return torch.from_numpy(np.stack([analysis.crops[i] for i in index])).permute(0, 3, 1, 2).float() / 127.5 - 1

    target, previous, identity = images(frames), images(frames - 1), images([tracked[0]] * len(frames))
    mask = torch.from_numpy(np.stack([analysis.masks[i] for i in frames])).float()[:, None]
    wav = read_audio(decode_speech(clip, talkedit_home[0] / "swiz3n.wav"))
    audio = torch.from_numpy(frame_windows(mel_spectrogram(wav), analysis.frame_count, analysis.video.fps)[frames])
    schedule = NoiseSchedule.cosine(1000)
    gamma = schedule.alpha_bar[torch.tensor([100, 300, 500, 700] * 2)].float()
    eps = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    a = gamma[:, None, None, None]
    noisy = a.sqrt() * target + (1 - a).sqrt() * eps
    x = torch.cat([noisy * mask + (1 - mask) * target, previous, identity], dim=1)

    def error(model) -> float:
        """The masked error of the model's ε (derived from its output for a v-model, as the samplers do)."""
        with torch.no_grad():
            output = model(x, gamma, audio.reshape(len(frames), -1))
        predicted = eps_from_output(output, x[:, :3], gamma, reference.diffusion_config.prediction)
        return float(((predicted - eps) ** 2 * mask).sum() / (mask.sum() * 3))

    torch.manual_seed(0)
    trained, random = error(build_model(reference)), error(UNet(reference.unet_config).eval())
    print(f"masked noise error: reference model {trained:.4f}, random weights {random:.4f}")
    assert trained < 0.2 * random


def official_inputs(sampler_reference, chains: int) -> list[torch.Tensor]:
    """The sampler fixture's inputs (one frame) repeated for `chains` chains."""
    return [sampler_reference[f"input.{k}"].repeat(chains, *[1] * (sampler_reference[f"input.{k}"].dim() - 1))
            for k in ("y0", "mask", "previous_frame", "id_frame", "audio")]  # fmt: skip


def sample_levels(model: torch.nn.Module, inputs: list[torch.Tensor], precision: str, **kwargs) -> np.ndarray:
    """The chains sampled from noise seeded 0, 1, ... in `precision`, in 8-bit levels."""
    generators = [torch.Generator().manual_seed(n) for n in range(len(inputs[0]))]
    out = sample_frames(model, *inputs, generator=generators, precision=precision, **kwargs)
    return ((out.clamp(-1, 1) + 1) * 127.5).round().cpu().numpy()


def psnr_against(full: np.ndarray, half: np.ndarray, name: str) -> float:
    error = np.abs(half - full)
    psnr = 10 * np.log10(255**2 / max(np.mean(error**2), 1e-12))
    print(f"{name} vs fp32: max {error.max():.0f} levels, mean {error.mean():.3f}, PSNR {psnr:.1f} dB")
    return psnr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_model_samples_the_same_frames_in_fp16_as_in_fp32(reference, sampler_reference):
    """fp16 (the CUDA default) against fp32, 50 DDIM steps from the same noise, 8 chains: fp16 autocast over fp32
    weights, and over fp16 weights as `dub` loads them."""
    model = build_model(reference).cuda()
    inputs = official_inputs(sampler_reference, 8)
    full = sample_levels(model, inputs, "fp32")
    for name, half in (("autocast", sample_levels(model, inputs, "fp16")),
                       ("fp16 weights", sample_levels(model.half(), inputs, "fp16"))):  # fmt: skip
        assert psnr_against(full, half, f"fp16 ({name})") > FP16_PSNR_DB, name


@pytest.mark.skipif(
    not cpu_has_bf16_matrix_units(), reason="bf16 is dub's default only on a CPU with AMX; emulated, it takes minutes"
)
def test_reference_model_samples_the_same_frames_in_bf16_on_the_cpu_as_in_fp32(
    reference, sampler_reference, monkeypatch
):
    """bf16 autocast (dub's default on a CPU with AMX) against fp32, 25 DDIM steps from the same noise, 2 chains."""
    from talkedit import diffusion

    monkeypatch.setattr(diffusion, "cpu_has_bf16_matrix_units", cpu_has_bf16_matrix_units)  # this machine's, as dub
    assert diffusion.resolve_precision(torch.device("cpu"), "auto") == torch.bfloat16
    model = build_model(reference)
    inputs = official_inputs(sampler_reference, 2)
    full = sample_levels(model, inputs, "fp32", steps=25)
    as_dub = diffusion.sampling_model(build_model(reference), torch.device("cpu"))  # channels-last
    assert psnr_against(full, sample_levels(as_dub, inputs, "auto", steps=25), "bf16 (autocast)") > FP16_PSNR_DB


def test_reference_model_samples_the_same_frames_in_channels_last_on_the_cpu(reference, sampler_reference):
    """fp32 weights in channels-last layout, as dub samples on a CPU, against the default layout: 5 DDIM steps from
    the same noise, 2 chains."""
    from talkedit.diffusion import sampling_model

    inputs = official_inputs(sampler_reference, 2)
    plain = sample_levels(build_model(reference), inputs, "fp32", steps=5)
    fast = sample_levels(sampling_model(build_model(reference), torch.device("cpu"), "fp32"), inputs, "fp32", steps=5)
    assert np.abs(fast - plain).max() <= 1
