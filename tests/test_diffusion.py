from __future__ import annotations

import pytest
import torch

from talkedit.diffusion import (
    DiffusionConfig,
    NoiseSchedule,
    StepInfo,
    ddim_step,
    ddpm_step,
    eps_from_output,
    predict_x0,
    sample_frames,
    v_target,
)

from .common import TINY, random_tiny_model

# Our name -> the official buffer name in the sampler fixture.
BUFFERS = {
    "alpha_bar": "gammas",
    "sqrt_recip_alpha_bar": "sqrt_recip_gammas",
    "sqrt_recipm1_alpha_bar": "sqrt_recipm1_gammas",
    "posterior_log_variance": "posterior_log_variance_clipped",
    "posterior_mean_coef1": "posterior_mean_coef1",
    "posterior_mean_coef2": "posterior_mean_coef2",
}


@pytest.mark.parametrize(("phase", "steps"), [("train", 1000), ("infer", 100)])
def test_cosine_schedule_reproduces_the_official_buffers(sampler_reference, phase, steps):
    schedule = NoiseSchedule.cosine(steps)
    torch.testing.assert_close(schedule.betas, sampler_reference[f"schedule.{phase}.betas_f64"], atol=1e-12, rtol=0)
    for ours, theirs in BUFFERS.items():
        torch.testing.assert_close(
            getattr(schedule, ours), sampler_reference[f"schedule.{phase}.{theirs}"], atol=1e-7, rtol=0
        )


def test_infer_schedule_is_the_train_curve_sampled_coarser():
    """ᾱ of the 100-step schedule at t is the 1000-step one at 10t+9, except at the clamped last step."""
    train, infer = NoiseSchedule.cosine(1000), NoiseSchedule.cosine(100)
    torch.testing.assert_close(infer.alpha_bar[:99], train.alpha_bar[9:990:10], rtol=1e-5, atol=0)


# The fixture's steps; tolerances from fixtures/README.md (step 99 amplifies ε errors ×2000 before the clamp).
@pytest.mark.parametrize(("t", "atol"), [(99, 1e-3), (50, 1e-5), (0, 1e-5)])
def test_ddpm_step_reproduces_the_official_sampler(sampler_reference, reference_unet, t, atol):
    ref = sampler_reference
    schedule = NoiseSchedule.cosine(100)
    y0, mask = ref["input.y0"], ref["input.mask"]
    y_t = ref[f"step{t}.input.y_t"]
    x = torch.cat([y_t, ref["input.previous_frame"], ref["input.id_frame"]], dim=1)
    with torch.no_grad():
        eps = reference_unet(x, schedule.alpha_bar[t].reshape(1, 1), ref["input.audio"])
    y_prev, _ = ddpm_step(schedule, y_t, eps, t, ref[f"step{t}.input.noise"])
    torch.testing.assert_close(y_prev, ref[f"step{t}.output.p_sample"], atol=atol, rtol=0)
    masked = y0 * (1 - mask) + mask * y_prev
    torch.testing.assert_close(masked, ref[f"step{t}.output.y_prev_masked"], atol=atol, rtol=0)


def test_ddim_with_eta_one_is_the_ddpm_step_at_every_step():
    schedule = NoiseSchedule.cosine(100)
    g = torch.Generator().manual_seed(0)
    for t in range(100):
        x_t, eps, noise = (torch.randn(2, 3, 16, 16, generator=g) * 1.5 for _ in range(3))
        ddpm, x0_ddpm = ddpm_step(schedule, x_t, eps, t, noise)
        ddim, x0_ddim = ddim_step(schedule, x_t, eps, t, noise, eta=1.0)
        torch.testing.assert_close(ddim, ddpm, atol=2e-6, rtol=0, msg=f"t={t}")
        assert torch.equal(x0_ddim, x0_ddpm)


def test_ddim_with_eta_zero_ignores_the_noise():
    schedule = NoiseSchedule.cosine(20)
    x_t, eps = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    a, _ = ddim_step(schedule, x_t, eps, 10, torch.randn(1, 3, 8, 8), eta=0.0)
    b, _ = ddim_step(schedule, x_t, eps, 10, torch.randn(1, 3, 8, 8), eta=0.0)
    assert torch.equal(a, b)


def test_last_step_returns_the_clamped_prediction():
    schedule = NoiseSchedule.cosine(100)
    x_t, eps = torch.randn(1, 3, 8, 8) * 3, torch.randn(1, 3, 8, 8)
    for step in (ddpm_step, ddim_step):
        x_prev, x0 = step(schedule, x_t, eps, 0, torch.randn(1, 3, 8, 8))
        torch.testing.assert_close(x_prev, x0, atol=1e-6, rtol=0)
        assert x_prev.abs().max() <= 1


def frame_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = TINY.image_size
    y0 = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, size // 2 :, 8:24] = 1
    previous = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    identity = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    audio = torch.rand(batch, TINY.audio_frames, TINY.audio_bins, generator=g) * -80
    return y0, mask, previous, identity, audio


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_frame_sampler_keeps_known_pixels_and_fills_the_mask(sampler):
    model = random_tiny_model()
    y0, mask, previous, identity, audio = frame_inputs()
    out = sample_frames(model, y0, mask, previous, identity, audio, sampler=sampler, steps=10)
    assert out.shape == y0.shape and out.dtype == torch.float32
    keep = mask.expand_as(y0) == 0
    assert torch.equal(out[keep], y0[keep])
    assert (out[~keep] - y0[~keep]).abs().mean() > 0.05
    assert out.abs().max() <= 1


def test_frame_sampler_is_reproducible_from_its_generator():
    model = random_tiny_model()
    inputs = frame_inputs()

    def run(seed: int) -> torch.Tensor:
        return sample_frames(model, *inputs, steps=8, eta=0.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_frame_sampler_ddim_eta_one_matches_ddpm_over_the_full_schedule():
    model = random_tiny_model()
    inputs = frame_inputs()
    ddpm = sample_frames(model, *inputs, sampler="ddpm", steps=100, generator=torch.Generator().manual_seed(3))
    ddim = sample_frames(model, *inputs, sampler="ddim", steps=100, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=0)


def test_frame_sampler_chains_depend_on_their_own_conditioning():
    """Changing chain 0's audio changes chain 0 and leaves chain 1 alone."""
    model = random_tiny_model()
    y0, mask, previous, identity, audio = frame_inputs()
    other_audio = audio.clone()
    other_audio[0] = audio[0].flip(-1)
    a = sample_frames(model, y0, mask, previous, identity, audio, steps=6)
    b = sample_frames(model, y0, mask, previous, identity, other_audio, steps=6)
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


def test_frame_sampler_reports_every_step():
    model = random_tiny_model()
    seen: list[StepInfo] = []
    out = sample_frames(model, *frame_inputs(), steps=5, callback=seen.append)
    assert [s.step for s in seen] == [1, 2, 3, 4, 5]
    assert [s.t for s in seen] == [4, 3, 2, 1, 0]
    assert all(s.total == 5 for s in seen)
    assert torch.equal(seen[-1].x, out)


def test_frame_sampler_uses_the_models_defaults():
    model = random_tiny_model()
    model.diffusion = DiffusionConfig(sampler="ddpm", steps=7)
    seen: list[StepInfo] = []
    sample_frames(model, *frame_inputs(), callback=seen.append)
    assert len(seen) == 7


def test_fp16_on_cpu_is_said_once_in_the_log_and_runs_fp32(caplog, monkeypatch):
    from talkedit import diffusion

    monkeypatch.setattr(diffusion, "_NOTICES_GIVEN", set())
    model = random_tiny_model()
    inputs = frame_inputs()
    with caplog.at_level("WARNING", logger="talkedit"):
        for _ in range(3):  # a dub calls the sampler once per frame
            half = sample_frames(model, *inputs, steps=3, precision="fp16")
    assert len([r for r in caplog.records if "fp16" in r.getMessage()]) == 1
    full = sample_frames(model, *inputs, steps=3, precision="fp32")
    assert torch.equal(half, full)


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_on_a_cpu_the_sampler_gets_fp32_weights_in_channels_last_and_the_same_frames(precision):
    from talkedit.diffusion import sampling_model

    model = random_tiny_model()
    model.diffusion = DiffusionConfig()
    inputs = frame_inputs()
    plain = sample_frames(model, *inputs, steps=3, precision="fp32")
    fast = sampling_model(random_tiny_model(), torch.device("cpu"), precision)
    fast.diffusion = DiffusionConfig()
    weights = [p for p in fast.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    # fp32 sums in another order, the differences grown by 3 DDIM steps of a random model: 8e-5 measured
    torch.testing.assert_close(sample_frames(fast, *inputs, steps=3, precision="fp32"), plain, atol=1e-3, rtol=0)


class AutocastSpy(torch.nn.Module):
    """Wraps a UNet and records, per call, the CPU autocast dtype its forward ran under (None: autocast off)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.diffusion, self.seen = model, model.diffusion, []

    def forward(self, *args):
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return self.model(*args)


@pytest.mark.parametrize("amx", [True, False], ids=["cpu with AMX", "cpu without"])
def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_matrix_units(monkeypatch, amx):
    from talkedit import diffusion

    monkeypatch.setattr(diffusion, "cpu_has_bf16_matrix_units", lambda: amx)
    model = random_tiny_model()
    model.diffusion = DiffusionConfig()
    spy = AutocastSpy(model)
    out = sample_frames(spy, *frame_inputs(), steps=3)
    assert spy.seen == [torch.bfloat16 if amx else None] * 3
    assert out.dtype == torch.float32
    assert diffusion.resolve_precision(torch.device("cpu"), "fp32") is None
    assert diffusion.resolve_precision(torch.device("cpu"), "bf16") == torch.bfloat16
    assert diffusion.resolve_precision(torch.device("cuda"), "auto") == torch.float16
    assert diffusion.resolve_precision(torch.device("cuda"), "bf16") == torch.bfloat16


def test_bf16_on_a_cpu_without_matrix_units_runs_and_says_it_is_slow(caplog, monkeypatch):
    from talkedit import diffusion

    monkeypatch.setattr(diffusion, "cpu_has_bf16_matrix_units", lambda: False)
    monkeypatch.setattr(diffusion, "_NOTICES_GIVEN", set())
    model = random_tiny_model()
    model.diffusion = DiffusionConfig()
    spy = AutocastSpy(model)
    with caplog.at_level("WARNING", logger="talkedit"):
        sample_frames(spy, *frame_inputs(), steps=2, precision="bf16")
        sample_frames(spy, *frame_inputs(), steps=2, precision="bf16")
    assert spy.seen == [torch.bfloat16] * 4
    assert [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()] == [
        "this CPU has no bf16 matrix units (AMX): bf16 sampling runs, but slower than fp32"
    ]


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        sample_frames(random_tiny_model(), *frame_inputs(), steps=2, precision="half")


def test_ddpm_refuses_an_eta_it_would_ignore():
    model = random_tiny_model()
    with pytest.raises(ValueError, match="eta"):
        sample_frames(model, *frame_inputs(), sampler="ddpm", steps=2, eta=0.5)


def test_per_chain_generators_make_each_frame_independent_of_its_batch():
    model = random_tiny_model()
    y0, mask, previous, identity, audio = frame_inputs()
    together = sample_frames(
        model, y0, mask, previous, identity, audio, steps=4, eta=1.0,
        generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
    )  # fmt: skip
    alone = sample_frames(
        model, y0[1:], mask[1:], previous[1:], identity[1:], audio[1:], steps=4, eta=1.0,
        generator=[torch.Generator().manual_seed(6)],
    )  # fmt: skip
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=0)


def test_frame_sampler_rejects_mismatched_batches():
    model = random_tiny_model()
    y0, mask, previous, identity, audio = frame_inputs()
    with pytest.raises(ValueError, match="audio has batch 1"):
        sample_frames(model, y0, mask, previous, identity, audio[:1], steps=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_sampling_is_close_to_cpu_fp32():
    model = random_tiny_model()
    inputs = frame_inputs()
    cpu = sample_frames(model, *inputs, steps=10, generator=torch.Generator().manual_seed(0))
    gpu = sample_frames(model.cuda(), *inputs, steps=10, generator=torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 5e-2


def test_guidance_mixes_the_predictions_with_and_without_audio():
    """w = 1 is plain sampling; w = 0 is sampling with the audio dropped everywhere; other w extrapolate."""
    model = random_tiny_model()
    inputs = frame_inputs()

    class Dropped(torch.nn.Module):  # the same model, always without audio
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x, gamma, audio, audio_dropped=None):
            return self.inner(x, gamma, audio, torch.ones(len(x), dtype=torch.bool))

    def run(m, **kw) -> torch.Tensor:
        return sample_frames(m, *inputs, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0), **kw)

    plain = run(model)
    torch.testing.assert_close(run(model, guidance=1.0), plain, atol=0, rtol=0)
    torch.testing.assert_close(run(model, guidance=0.0), run(Dropped()), atol=1e-5, rtol=0)
    strong = run(model, guidance=3.0)
    assert (strong - plain).abs().max() > 1e-3


def test_dropped_audio_is_a_zero_audio_embedding():
    model = random_tiny_model()
    y0, mask, previous, identity, audio = frame_inputs()
    x = torch.cat([y0, previous, identity], dim=1)
    gamma = torch.full((2,), 0.5)
    with torch.no_grad():
        dropped = model(x, gamma, audio, torch.tensor([True, False]))
        other_audio = model(x, gamma, audio * 0 - 20, torch.tensor([True, False]))
        kept = model(x, gamma, audio)
    torch.testing.assert_close(dropped[0], other_audio[0])  # no audio at all: what it was does not matter
    torch.testing.assert_close(dropped[1], kept[1])
    assert not torch.allclose(dropped[0], kept[0])


def test_v_prediction_gives_back_the_noise_and_the_clean_image():
    """x_t = √ᾱ x_0 + √(1-ᾱ) ε and v = √ᾱ ε - √(1-ᾱ) x_0: from v and x_t come ε and then x_0, at every level the
    samplers visit (ᾱ from about 1e-6 to 0.99)."""
    schedule = NoiseSchedule.cosine(50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(50, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(50, 3, 8, 8, generator=g)
    a = schedule.alpha_bar
    x_t = a.sqrt()[:, None, None, None] * x0 + (1 - a).sqrt()[:, None, None, None] * eps
    v = v_target(x0, eps, a)
    torch.testing.assert_close(eps_from_output(v, x_t, a, "v"), eps, atol=1e-5, rtol=0)
    assert torch.equal(eps_from_output(v, x_t, a, "eps"), v)  # an ε-model's output is ε
    for t in (0, 25, 48):  # x̂_0 through the samplers' own formula; at t = 49 (ᾱ ~ 1e-7) x_0 is not recoverable
        torch.testing.assert_close(predict_x0(schedule, x_t[t : t + 1], eps[t : t + 1], t), x0[t : t + 1],
                                   atol=2e-3, rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="prediction"):
        eps_from_output(v, x_t, a, "x0")


class Oracle(torch.nn.Module):
    """A perfect denoiser for one known clean image: it outputs the exact ε, or v, of its input."""

    def __init__(self, y0: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.y0, self.weight = y0, torch.nn.Parameter(torch.zeros(1))
        self.diffusion = DiffusionConfig(prediction=prediction)

    def forward(self, x, gamma, audio, audio_dropped=None):
        a = gamma[:, None, None, None]
        eps = (x[:, :3] - a.sqrt() * self.y0) / (1 - a).sqrt()
        return eps if self.diffusion.prediction == "eps" else v_target(self.y0, eps, gamma)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_perfect_denoiser_samples_the_clean_image_whatever_it_predicts(prediction, sampler):
    y0, mask, previous, identity, audio = frame_inputs()
    model = Oracle(y0, prediction)
    out = sample_frames(model, y0 * 0, mask, previous, identity, audio, sampler=sampler, steps=25)
    inside = mask.expand_as(y0) == 1
    torch.testing.assert_close(out[inside], y0[inside], atol=1e-3, rtol=0)


def test_the_prediction_is_part_of_the_config_and_old_configs_read_as_eps():
    config = DiffusionConfig(prediction="v")
    assert DiffusionConfig.from_json(config.to_json()) == config
    assert DiffusionConfig.from_json('{"sampler": "ddim", "steps": 50}').prediction == "eps"
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="x0")
