"""Abuse that once hurt (issue 10): every case is a reproduction that failed before its fix.

Each runs the installed command on a tiny random-weight model and checks: exit code, one error line naming the file,
no traceback, no partial or temporary file left, and the inputs unchanged.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .common import media, run_talkedit

VIDEO = "grid_swiz3n_black_male_360x288_25fps.mpg"
SPEECH = "en_short_voice_recording_22k05_mono_1.8s.m4a"


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.endswith(".tmp"))


def one_error(done, named: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], done.stderr


@pytest.fixture()
def inputs(tmp_path):
    """Copies of a real video and speech, so that any change to them shows."""
    video, speech = tmp_path / "in.mpg", tmp_path / "speech.m4a"
    video.write_bytes(media(VIDEO).read_bytes())
    speech.write_bytes(media(SPEECH).read_bytes())
    return video, speech, {video: digest(video), speech: digest(speech)}


def dub(talkedit_home, *args: str):
    return run_talkedit("dub", *args, "--model", str(talkedit_home[1]), "--offline")


# 1. --preview is checked with every other output, before any work.


@pytest.mark.parametrize("case", ["preview-is-the-input", "preview-is-the-output", "preview-not-png",
                                  "preview-in-missing-folder"])  # fmt: skip
def test_preview_paths_are_checked_before_any_work(talkedit_home, inputs, tmp_path, case):
    video, speech, before = inputs
    output = tmp_path / "out.mp4"
    previews = {"preview-is-the-input": video, "preview-is-the-output": output, "preview-not-png": tmp_path / "p.jpg",
                "preview-in-missing-folder": tmp_path / "no" / "p.png"}  # fmt: skip
    preview = previews[case]
    done = dub(talkedit_home, str(video), str(speech), "-o", str(output), "--preview", str(preview))
    assert done.returncode == 1
    one_error(done, preview.name)
    assert not output.exists() and leftovers(tmp_path) == []
    assert {p: digest(p) for p in before} == before


def test_a_good_preview_is_written(talkedit_home, inputs, tmp_path):
    video, speech, _ = inputs
    output, preview = tmp_path / "out.mp4", tmp_path / "preview.png"
    done = dub(talkedit_home, str(video), str(speech), "-o", str(output), "--preview", str(preview), "-q")
    assert done.returncode == 0, done.stderr
    assert output.is_file() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and leftovers(tmp_path) == []


# 3. Weights with NaN tensors are refused on load.


def test_weights_with_nan_are_refused(talkedit_home, inputs, tmp_path):
    video, speech, _ = inputs
    from safetensors import safe_open

    with safe_open(talkedit_home[1], framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(talkedit_home[1])
    key = sorted(tensors)[3]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken, metadata=metadata)
    done = run_talkedit("dub", str(video), str(speech), "-o", str(tmp_path / "out.mp4"), "--model", str(broken),
                        "--offline")  # fmt: skip
    assert done.returncode == 1
    one_error(done, str(broken))
    assert key in done.stderr and not (tmp_path / "out.mp4").exists()


# 4. An output that exists and is not a regular file is refused.


def test_a_fifo_output_is_refused(talkedit_home, inputs, tmp_path):
    video, speech, _ = inputs
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    done = dub(talkedit_home, str(video), str(speech), "-o", str(fifo))
    assert done.returncode == 1
    one_error(done, str(fifo))
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_long_legal_output_name_works(talkedit_home, inputs, tmp_path):
    video, speech, _ = inputs
    output = tmp_path / ("x" * 240 + ".mp4")  # 244 characters: legal; the temporary name must be too
    done = dub(talkedit_home, str(video), str(speech), "-o", str(output), "-q")
    assert done.returncode == 0, done.stderr
    assert output.is_file() and leftovers(tmp_path) == []


def test_sampler_output_that_is_not_finite_stops_the_dub(talkedit_home, inputs, tmp_path, monkeypatch):
    """A model that diverges mid-run (finite weights, NaN out) fails instead of writing black mouths."""
    from talkedit import pipeline
    from talkedit.errors import TalkeditError

    video, speech, _ = inputs

    def nan_frames(model, crops, *args, **kwargs):
        return torch.full_like(crops, float("nan"))

    monkeypatch.setattr("talkedit.diffusion.sample_frames", nan_frames)
    options = pipeline.DubOptions(model=str(talkedit_home[1]), offline=True)
    with pytest.raises(TalkeditError, match="NaN or infinite"):
        pipeline.dub(video, speech, tmp_path / "out.mp4", options)
    assert not (tmp_path / "out.mp4").exists() and leftovers(tmp_path) == []


# 2 and 5. A damaged analysis cache is analysed again; temporary cache folders never stay.


def _cached(talkedit_home, video, tmp_path):
    from talkedit.analysis import preprocess

    return preprocess(video, output_dir=tmp_path / "analysis", offline=True)


@pytest.mark.parametrize("damage", ["random-crops", "short-track", "json-a-list", "masks-wrong-shape", "truncated-npz"])
def test_a_damaged_analysis_cache_is_recomputed(talkedit_home, inputs, tmp_path, damage):
    import json

    import numpy as np

    from talkedit.analysis import preprocess

    video = inputs[0]
    first = _cached(talkedit_home, video, tmp_path)
    folder, frames = first.directory, first.frame_count
    crops = np.array(first.crops)
    if damage == "random-crops":
        data = np.load(folder / "crops.npy")
        np.save(folder / "crops.npy", np.random.default_rng(0).integers(0, 255, data.shape, dtype=np.uint8))
    elif damage == "short-track":
        with np.load(folder / "track.npz") as d:
            np.savez(folder / "track.npz", landmarks=d["landmarks"][:15], track=d["track"][:15],
                     matrices=d["matrices"][:15])  # fmt: skip
    elif damage == "json-a-list":
        (folder / "analysis.json").write_text(json.dumps([1, 2, 3]))
    elif damage == "masks-wrong-shape":
        np.save(folder / "masks.npy", np.zeros((frames, 64, 64), np.uint8))
    elif damage == "truncated-npz":
        data = (folder / "track.npz").read_bytes()
        (folder / "track.npz").write_bytes(data[: len(data) // 2])
    again = preprocess(video, output_dir=tmp_path / "analysis", offline=True)
    assert again.frame_count == frames and np.array_equal(np.array(again.crops), crops)
    assert again.crops.shape[0] == len(again.track) == frames and again.masks.shape == (frames, 128, 128)


def test_stale_temporary_cache_folders_are_swept(talkedit_home, inputs, tmp_path):
    from talkedit.analysis import content_key, preprocess
    from talkedit.face import FaceChoice
    from talkedit.media import probe_video

    video = inputs[0]
    root = tmp_path / "analysis"
    key = content_key(probe_video(video).path, FaceChoice.parse(None))
    dead = root / f".{key}.999999999.tmp"  # a process that cannot exist
    dead.mkdir(parents=True)
    (dead / "crops.npy").write_bytes(b"half written")
    preprocess(video, output_dir=root, offline=True)
    assert sorted(p.name for p in root.iterdir()) == [key]


# 7. User paths are printed as given: no rich markup, no emoji codes.


@pytest.mark.parametrize("name", ["nowhere[/x].mp4", "Talk [dQw4w9WgXcQ].mp4", "x:smile:y.mp4"])
def test_user_paths_are_printed_as_given(talkedit_home, inputs, tmp_path, name):
    video, speech, _ = inputs
    missing = tmp_path / name
    done = dub(talkedit_home, str(missing), str(speech), "-o", str(tmp_path / "out.mp4"))
    assert done.returncode == 1
    one_error(done, str(missing))


def test_an_output_name_with_markup_is_written_and_named(talkedit_home, inputs, tmp_path):
    video, speech, _ = inputs
    output = tmp_path / "out [bold] [dQw4w9WgXcQ] :smile:.mp4"
    done = dub(talkedit_home, str(video), str(speech), "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert output.is_file() and str(output) in done.stderr.replace("\n", "")


# 8. A name with a colon is a file, not an ffmpeg protocol.


def test_paths_with_a_colon_are_files(talkedit_home, inputs, tmp_path, monkeypatch):
    video, speech, _ = inputs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a:b.mpg").write_bytes(video.read_bytes())
    (tmp_path / "s:p.m4a").write_bytes(speech.read_bytes())
    done = dub(talkedit_home, "a:b.mpg", "./s:p.m4a", "-o", "c:d.mp4", "-q")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c:d.mp4").is_file() and leftovers(tmp_path) == []


# 10. Values outside an option's choices are usage errors (exit 2), in words.


@pytest.mark.parametrize(
    "option", [("--fit", "sideways"), ("--sampler", "foo"), ("--face", "0"), ("--face", "abc"), ("--face", "1,2,3")]
)
def test_bad_choices_are_usage_errors(talkedit_home, inputs, tmp_path, option):
    video, speech, _ = inputs
    done = dub(talkedit_home, str(video), str(speech), "-o", str(tmp_path / "out.mp4"), *option)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert option[0] in done.stderr and "invalid literal" not in done.stderr
    assert not (tmp_path / "out.mp4").exists()


# 5. SIGTERM and SIGHUP clean up like Ctrl-C and exit 128 + n.


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_while_writing_leaves_no_partial_file(talkedit_home, inputs, tmp_path, signame):
    import signal
    import subprocess
    import sys
    import time

    video, _, before = inputs
    output = tmp_path / "out.mp4"
    exe = Path(sys.executable).with_name("talkedit")
    long_speech = media("en_female_ljspeech_LJ001-0001_22k05_mono.wav")  # 9.7 s: a few seconds of writing
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    args = [str(exe), "dub", str(video), str(long_speech), "-o", str(output), "--model", str(talkedit_home[1]),
            "--offline", "-q"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not any(".partial" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the dub ended before it began writing"
        time.sleep(0.01)
    signum = getattr(signal, signame)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and signame in err
    assert not output.exists() and leftovers(tmp_path) == []
    assert {p: digest(p) for p in before} == before


# 6 (in part). Inputs and options that once gave tracebacks.


def float_wav(path: Path, samples) -> Path:
    """A 32-bit float WAV, which may hold NaN and infinity."""
    import struct

    import numpy as np

    data = np.asarray(samples, "<f4").tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + fmt + b"data"
                     + struct.pack("<I", len(data)) + data)  # fmt: skip
    return path


def test_speech_with_nan_samples_is_refused_before_the_analysis(talkedit_home, inputs, tmp_path):
    import numpy as np

    video = inputs[0]
    samples = 0.5 * np.sin(np.arange(32000) * 0.05)
    samples[1000], samples[2000] = np.nan, np.inf
    speech = float_wav(tmp_path / "nan.wav", samples)
    done = dub(talkedit_home, str(video), str(speech), "-o", str(tmp_path / "out.mp4"))
    assert done.returncode == 1
    one_error(done, str(speech))
    assert "NaN" in done.stderr and "Finding the face" not in done.stderr


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_devices_talkedit_cannot_use_are_refused(talkedit_home, inputs, tmp_path, device):
    video, speech, _ = inputs
    done = dub(talkedit_home, str(video), str(speech), "-o", str(tmp_path / "out.mp4"), "--device", device)
    assert done.returncode == 1
    one_error(done, f"--device {device}")


def test_a_cache_dir_that_is_a_file_is_refused(talkedit_home, inputs, tmp_path):
    video, speech, _ = inputs
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    done = dub(talkedit_home, str(video), str(speech), "-o", str(tmp_path / "out.mp4"), "--cache-dir", str(blocker))
    assert done.returncode == 1
    one_error(done, str(blocker))


@pytest.mark.parametrize(
    "field, value",
    [("diffusion_config", {"steps": 0}), ("diffusion_config", {"eta": "fast"}), ("unet_config", {"head_channels": 0}),
     ("unet_config", {"head_channels": 1024})],  # 1024: the middle block would get zero attention heads
)  # fmt: skip
def test_crafted_weights_metadata_is_a_one_line_error(talkedit_home, inputs, tmp_path, field, value):
    import json

    from safetensors import safe_open

    video, speech, _ = inputs
    with safe_open(talkedit_home[1], framework="pt") as f:
        metadata = dict(f.metadata())
    metadata[field] = json.dumps({**json.loads(metadata[field]), **value})
    crafted = tmp_path / "crafted.safetensors"
    save_file(load_file(talkedit_home[1]), crafted, metadata=metadata)
    done = run_talkedit("dub", str(video), str(speech), "-o", str(tmp_path / "out.mp4"), "--model", str(crafted),
                        "--offline")  # fmt: skip
    assert done.returncode == 1
    one_error(done, str(crafted))
    assert not (tmp_path / "out.mp4").exists()
