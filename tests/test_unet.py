from __future__ import annotations

import pytest
import torch

from talkedit.unet import UNet, UNetConfig, noise_level_embedding

from .common import SHARED, TINY, random_tiny_model, strip_prefix


def model_inputs(reference: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [reference[k] for k in ("input.x", "input.noise_level", "input.audio")]


def official_keys() -> dict[str, list[int]]:
    keys = {}
    for line in (SHARED / "spec" / "dve-unet-keys.txt").read_text().splitlines():
        if line.startswith("denoise_fn."):
            name, shape, _ = line.split("\t")
            keys[name.removeprefix("denoise_fn.")] = eval(shape)
    return keys


def test_state_dict_matches_the_official_key_table():
    model = UNet()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys()
    assert sum(p.numel() for p in model.parameters()) == 13_698_691


def test_forward_reproduces_the_official_unet(unet_reference, reference_unet):
    with torch.no_grad():
        out = reference_unet(*model_inputs(unet_reference))
    torch.testing.assert_close(out, unet_reference["output"], atol=1e-4, rtol=1e-4)


def test_head_channels_is_a_real_setting(unet_reference):
    """Head width changes no shape, so a wrong value loads silently; it must change the output."""
    model = UNet(UNetConfig(head_channels=32))
    model.load_state_dict(strip_prefix(unet_reference), strict=True)
    with torch.no_grad():
        out = model.eval()(*model_inputs(unet_reference))
    assert (out - unet_reference["output"]).abs().max() > 1e-3


def test_noise_level_embedding_is_cos_then_sin_of_alpha_bar():
    emb = noise_level_embedding(torch.tensor([0.5]), 64)
    assert emb.shape == (1, 64)
    assert emb[0, 0] == pytest.approx(torch.cos(torch.tensor(0.5)).item())  # frequency 1 comes first
    assert emb[0, 32] == pytest.approx(torch.sin(torch.tensor(0.5)).item())


def test_samples_in_a_batch_do_not_interact():
    model = random_tiny_model()
    x = torch.randn(3, 9, 32, 32)
    gamma, audio = torch.tensor([0.9, 0.5, 0.01]), torch.rand(3, TINY.audio_dim) * -80
    with torch.no_grad():
        batched = model(x, gamma, audio)
        alone = model(x[1:2], gamma[1:2], audio[1:2])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


def test_output_depends_on_audio_and_noise_level():
    model = random_tiny_model()
    x = torch.randn(1, 9, 32, 32)
    audio = torch.rand(1, TINY.audio_dim) * -80
    with torch.no_grad():
        base = model(x, torch.tensor([0.95]), audio)
        other_audio = model(x, torch.tensor([0.95]), audio.flip(-1))
        other_level = model(x, torch.tensor([0.05]), audio)
    assert (base - other_audio).abs().max() > 1e-4
    assert (base - other_level).abs().max() > 1e-4


def test_config_round_trips_through_json():
    assert UNetConfig.from_json(TINY.to_json()) == TINY
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_json('{"width": 3}')


def test_config_rejects_widths_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=48)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_autocast_on_cuda_stays_close_to_fp32(unet_reference, reference_unet):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = reference_unet.to("cuda")
    inputs = [t.cuda() for t in model_inputs(unet_reference)]
    with torch.no_grad():
        fp32 = model(*inputs)
        with torch.autocast("cuda", dtype=torch.float16):
            fp16 = model(*inputs)
    model.to("cpu")
    torch.testing.assert_close(fp32.cpu(), unet_reference["output"], atol=1e-4, rtol=1e-4)
    assert fp16.dtype == torch.float32
    assert (fp16 - fp32).abs().max() < 2e-2
