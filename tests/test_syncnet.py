"""SyncNet for LSE-C / LSE-D: the official architecture, its MFCCs, strict loading of official weights, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkedit.errors import WeightsError
from talkedit.syncnet import VSHIFT, SyncNet, face_boxes, face_crop, load_syncnet, lse, mfcc

# Transcribed from joonson/syncnet_python SyncNetModel.S (layer index -> weight shape): not produced by our code.
OFFICIAL_SHAPES = {
    "netcnnaud.0.weight": (64, 1, 3, 3),
    "netcnnaud.4.weight": (192, 64, 3, 3),
    "netcnnaud.8.weight": (384, 192, 3, 3),
    "netcnnaud.11.weight": (256, 384, 3, 3),
    "netcnnaud.14.weight": (256, 256, 3, 3),
    "netcnnaud.18.weight": (512, 256, 5, 4),
    "netcnnaud.19.running_var": (512,),
    "netfcaud.0.weight": (512, 512),
    "netfcaud.1.running_mean": (512,),
    "netfcaud.3.weight": (1024, 512),
    "netfclip.3.bias": (1024,),
    "netcnnlip.0.weight": (96, 3, 5, 7, 7),
    "netcnnlip.4.weight": (256, 96, 1, 5, 5),
    "netcnnlip.8.weight": (256, 256, 1, 3, 3),
    "netcnnlip.11.weight": (256, 256, 1, 3, 3),
    "netcnnlip.14.weight": (256, 256, 1, 3, 3),
    "netcnnlip.18.weight": (512, 256, 1, 6, 6),
}


def official_state(seed: int = 0, batches_tracked: bool = True) -> dict[str, torch.Tensor]:
    """Random weights as syncnet_v2.model holds them: a plain state dict of S."""
    torch.manual_seed(seed)
    model = SyncNet()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05 if "weight" in name else 0.01)
        for name, b in model.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 1.5)
    state = model.state_dict()
    return {k: v for k, v in state.items() if batches_tracked or not k.endswith("num_batches_tracked")}


def test_the_architecture_matches_the_official_layer_shapes():
    state = SyncNet().state_dict()
    for key, shape in OFFICIAL_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    weights = [k for k in state if k.endswith(".weight")]
    assert len(weights) == 12 * 2 + 3 * 2  # 6 conv+BN per tower, Linear-BN-Linear per head


def test_embeddings_have_the_official_sizes():
    model = SyncNet().eval()
    with torch.no_grad():
        assert model.forward_aud(torch.zeros(2, 1, 13, 20)).shape == (2, 1024)
        assert model.forward_lip(torch.zeros(2, 3, 5, 224, 224)).shape == (2, 1024)


def test_mfcc_matches_python_speech_features():
    reference = pytest.importorskip("python_speech_features")  # in the test extra: pip install '.[test]'
    rng = np.random.default_rng(0)
    audio = (np.sin(np.arange(24000) * 0.07) * 8000 + rng.normal(0, 900, 24000)).astype(np.int16)
    expected = reference.mfcc(audio, 16000)
    assert mfcc(audio).shape == expected.shape
    assert np.abs(mfcc(audio) - expected).max() < 1e-6


@pytest.mark.parametrize("batches_tracked", [True, False])
def test_official_format_weights_load_strictly(tmp_path, batches_tracked):
    state = official_state(batches_tracked=batches_tracked)
    path = tmp_path / "syncnet_v2.model"
    torch.save(state, path)
    model = load_syncnet(path)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


def foreign(kind: str, tmp_path):
    path = tmp_path / "foreign.model"
    state = official_state()
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "missing-tensor":
        del state["netcnnlip.18.weight"]
        torch.save(state, path)
    elif kind == "extra-tensor":
        torch.save({**state, "netfcspk.0.weight": torch.zeros(512, 512)}, path)
    elif kind == "wrong-shape":
        state["netfcaud.3.weight"] = torch.zeros(512, 512)
        torch.save(state, path)
    elif kind == "not-a-dict":
        torch.save([torch.zeros(3)], path)
    elif kind == "dve-checkpoint":
        torch.save({"denoise_fn.init_conv.weight": torch.zeros(64, 9, 3, 3)}, path)
    return path


@pytest.mark.parametrize(
    "kind", ["random-bytes", "missing-tensor", "extra-tensor", "wrong-shape", "not-a-dict", "dve-checkpoint"]
)
def test_foreign_files_are_refused_in_one_line(tmp_path, kind):
    path = foreign(kind, tmp_path)
    with pytest.raises(WeightsError) as info:
        load_syncnet(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "syncnet_v2.model" in message


def test_lse_follows_the_official_scoring():
    """Distances at each offset are the mean over frames of |lip_i - audio_(i+offset)|, zero-padded at the ends."""
    model = SyncNet().eval()
    model.load_state_dict(official_state(seed=1))
    rng = np.random.default_rng(0)
    frames = 12
    crops = rng.integers(0, 255, (frames, 224, 224, 3), dtype=np.uint8)
    audio = (rng.normal(0, 3000, frames * 640)).astype(np.int16)
    result = lse(model, crops, audio)
    assert result.distances.shape == (2 * VSHIFT + 1,)
    assert result.lse_d == pytest.approx(result.distances.min())
    assert result.lse_c == pytest.approx(np.median(result.distances) - result.distances.min())
    assert result.offset == VSHIFT - int(np.argmin(result.distances))
    # Recompute offset 0 by hand.
    cep = torch.from_numpy(mfcc(audio).T.copy()).float()[None, None]
    video = torch.from_numpy(crops).permute(3, 0, 1, 2)[None].float()
    with torch.no_grad():
        lips = torch.cat([model.forward_lip(video[:, :, i : i + 5]) for i in range(frames - 5)])
        sound = torch.cat([model.forward_aud(cep[..., 4 * i : 4 * i + 20]) for i in range(frames - 5)])
    by_hand = torch.nn.functional.pairwise_distance(lips, sound).mean()
    assert result.distances[VSHIFT] == pytest.approx(float(by_hand), rel=1e-4)


def test_too_short_is_refused():
    with pytest.raises(ValueError):
        lse(SyncNet().eval(), np.zeros((5, 224, 224, 3), np.uint8), np.zeros(5 * 640, np.int16))


def test_face_crops_frame_the_face_like_syncnet_python():
    landmarks = np.zeros((20, 478, 2), np.float32)
    landmarks[:, :, 0] = np.linspace(100, 200, 478)  # a 100 px box centred on (150, 250)
    landmarks[:, :, 1] = np.linspace(200, 300, 478)
    boxes = face_boxes(landmarks)
    assert np.allclose(boxes[6:14], [150, 250, 50])  # the zero-padded median filter only bends the ends
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[250:, :, 0] = 255  # red below the box centre
    crop = face_crop(frame, boxes[10])
    assert crop.shape == (224, 224, 3)
    # Framing: from bs above the centre to 1.8 bs below it, so the centre sits at 1/2.8 of the height; BGR order.
    centre_row = round(224 / 2.8)
    assert crop[centre_row + 3, 112, 2] == 255 and crop[centre_row - 3, 112, 2] == 0 and crop[:, :, 0].max() == 0
