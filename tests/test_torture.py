"""Abuse that once hurt (issue 10): every case is a reproduction that failed before its fix.

Each runs the installed command on a tiny random-weight model and checks: exit code, one error line naming the file,
no traceback, no partial or temporary file left, and the inputs unchanged.
"""

from __future__ import annotations

import hashlib
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .common import LANDMARKER, media, run_talkedit, talkedit_command

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


def test_a_seed_beyond_64_bits_is_used(talkedit_home, inputs, tmp_path):
    video, speech, _ = inputs
    output = tmp_path / "out.mp4"
    done = dub(talkedit_home, str(video), str(speech), "-o", str(output), "--seed", "1" + "0" * 30, "--steps", "2")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
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
    import time

    video, _, before = inputs
    output = tmp_path / "out.mp4"
    long_speech = media("en_female_ljspeech_LJ001-0001_22k05_mono.wav")  # 9.7 s: a few seconds of writing
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    args = [*talkedit_command(), "dub", str(video), str(long_speech), "-o", str(output), "--model",
            str(talkedit_home[1]), "--offline", "-q"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not any(".partial" in p.name for p in tmp_path.iterdir()):
            assert proc.poll() is None, "the dub ended before it began writing"
            assert time.monotonic() < deadline, "the dub did not begin writing within 240 s"
            time.sleep(0.01)
        signum = getattr(signal, signame)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failed test must not leave a dub running behind the others
            proc.kill()
            proc.communicate()
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


# 6 and 11. Full and read-only disks: one line naming the file and the OS's reason, nothing left behind.


def file_size_limit(limit: int):
    """For subprocess.run: writes past `limit` bytes fail with EFBIG, as writes to a full disk fail with ENOSPC,
    through the same calls (Python ignores SIGXFSZ, so the write raises instead of killing the process)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted on `folder` for the block (root with the right to mount), else pytest.skip."""
    import subprocess

    folder.mkdir(exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture()
def read_only_dir(tmp_path):
    """An empty folder no one may write to: a read-only tmpfs for root (which ignores permissions), else mode 0555."""
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=64k"):
        yield folder


def test_import_weights_to_a_full_disk(official_dir, tmp_path):
    out = tmp_path / "out.safetensors"
    done = run_talkedit("import-weights", str(official_dir / "735_Network.pth"), "-o", str(out),
                        preexec_fn=file_size_limit(1 << 20))  # fmt: skip
    assert done.returncode == 1
    one_error(done, str(out))
    assert os.strerror(27) in done.stderr  # EFBIG, "File too large"
    assert list(tmp_path.iterdir()) == []


def test_import_weights_to_a_read_only_folder(official_dir, read_only_dir):
    out = read_only_dir / "out.safetensors"
    done = run_talkedit("import-weights", str(official_dir / "735_Network.pth"), "-o", str(out))
    assert done.returncode == 1
    one_error(done, str(out))
    assert list(read_only_dir.iterdir()) == []


def test_a_full_disk_under_the_analysis_names_the_reason(talkedit_home, inputs, tmp_path):
    """numpy's own writer reported "1228800 requested and 1023872 written" (and once "(None)"). The limit lets
    track.npz through and stops masks.npy."""
    video = inputs[0]
    cache = tmp_path / "analysis"
    done = run_talkedit("preprocess", str(video), "-o", str(cache), "-q", preexec_fn=file_size_limit(1_000_000))
    assert done.returncode == 1
    one_error(done, str(cache))
    assert os.strerror(27) in done.stderr and "None" not in done.stderr and "requested" not in done.stderr
    assert [p for p in cache.rglob("*") if p.is_file()] == [] and not list(cache.rglob("*.tmp"))


# 9. Speech far beyond full scale is refused before the analysis (it overflowed the spectrogram, and the error then
# blamed the model).


@pytest.mark.parametrize("amplitude", [4.0, 1e20])
def test_speech_far_beyond_full_scale_is_refused_first(talkedit_home, inputs, tmp_path, amplitude):
    import numpy as np

    video = inputs[0]
    speech = float_wav(tmp_path / "loud.wav", amplitude * np.sin(np.arange(32000) * 0.05))
    done = dub(talkedit_home, str(video), str(speech), "-o", str(tmp_path / "out.mp4"))
    assert done.returncode == 1
    one_error(done, str(speech))
    assert "above full scale" in done.stderr and "Finding the face" not in done.stderr
    assert not (tmp_path / "out.mp4").exists()


# 11. A hand-fetched zip is named as the user gave it, never by the temporary folder it was unpacked to.


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("case", ["random-member", "escaping-member", "not-a-zip", "truncated-zip"])
def test_a_bad_zip_from_the_user_is_named(talkedit_home, tmp_path, case):
    import random

    noise = random.Random(0).randbytes(4096)
    evil = tmp_path / "evil.zip"
    if case == "random-member":
        _zip(evil, {"ckpt/735_Network.pth": noise})
    elif case == "escaping-member":
        _zip(evil, {"../../735_Network.pth": noise})
    elif case == "not-a-zip":
        evil.write_bytes(noise)
    else:
        whole = _zip(tmp_path / "whole.zip", {"735_Network.pth": noise * 64}).read_bytes()
        evil.write_bytes(whole[: len(whole) // 2])
    cache = tmp_path / "cache"
    done = run_talkedit("download-weights", "dve-multispeaker", "--from", str(evil), "--cache-dir", str(cache))
    assert done.returncode == 1
    one_error(done, str(evil))
    assert "/tmp" not in done.stderr.replace(str(tmp_path), "") and "pickled" not in done.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()] and not (tmp_path / "735_Network.pth").exists()


@pytest.mark.parametrize("source", ["hub", "url"])
def test_a_tampered_cached_file_with_the_network_down_names_both_hashes(tmp_path, source):
    """Before: only the download failure was reported, not that the cached copy is damaged."""
    from .test_download import REVISION, FakeServer

    cache = tmp_path / "cache"
    cache.mkdir()
    landmarker, good = cache / "face-landmarker.task", LANDMARKER
    data = bytearray(good.read_bytes())
    data[1000] ^= 0xFF
    landmarker.write_bytes(bytes(data))
    server = FakeServer()  # started and stopped: its port now refuses connections
    server.start()
    url = server.url
    server.stop()
    manifest = tmp_path / "weights.toml"
    entry = {"sha256": digest(good), "size": good.stat().st_size}
    if source == "hub":
        entry |= {"repo": "talkedit/models", "filename": "face_landmarker.task", "revision": REVISION}
    else:
        entry |= {"url": f"{url}/face_landmarker.task"}
    manifest.write_text("[weights.face-landmarker]\n" + "".join(f"{k} = {v!r}\n" for k, v in entry.items()))
    done = run_talkedit("download-weights", "face-landmarker", "--manifest", str(manifest), "--cache-dir", str(cache),
                        env={"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert done.returncode == 1
    one_error(done, str(landmarker))
    assert hashlib.sha256(data).hexdigest() in done.stderr and digest(good) in done.stderr
    assert "fetching it again failed" in done.stderr
    assert landmarker.read_bytes() == bytes(data)  # the damaged copy is left for the user to inspect


# 2. A decoder that dies part-way is an error, not the end of the video; nothing is cached.


def _ffmpeg_that_dies(tmp_path: Path, how: str) -> Path:
    """A stand-in for ffmpeg that passes everything through, except that the frame decoder stops after 3 MB: killed
    (exit by SIGKILL) or quietly (exit 0, as when the pipe's end is lost)."""
    import sys

    from talkedit.media import ffmpeg_exe

    script = tmp_path / "ffmpeg"
    script.write_text(f"""#!{sys.executable}
import os, signal, subprocess, sys
args = sys.argv[1:]
decoding = "rawvideo" in args and "pipe:" in args and args[args.index("-i") + 1] != "pipe:"
if not decoding:
    os.execv({str(ffmpeg_exe())!r}, [{str(ffmpeg_exe())!r}, *args])
proc = subprocess.Popen([{str(ffmpeg_exe())!r}, *args], stdout=subprocess.PIPE)
sys.stdout.buffer.write(proc.stdout.read(3_000_000))
sys.stdout.flush()
proc.kill()
if {how!r} == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
""")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("how", ["killed", "quietly"])
def test_a_decoder_that_dies_is_not_the_end_of_the_video(talkedit_home, inputs, tmp_path, how):
    video = inputs[0]
    cache = tmp_path / "analysis"
    done = run_talkedit("preprocess", str(video), "-o", str(cache), "-q",
                        env={"TALKEDIT_FFMPEG": str(_ffmpeg_that_dies(tmp_path, how))})  # fmt: skip
    assert done.returncode == 1
    one_error(done, str(video))
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    again = run_talkedit("preprocess", str(video), "-o", str(cache), "--json")
    assert again.returncode == 0, again.stderr


# 5. An interruption while the analysis is saved leaves no temporary folder.


def test_an_interruption_while_the_analysis_is_saved_leaves_nothing(talkedit_home, inputs, tmp_path, monkeypatch):
    from talkedit import analysis, media
    from talkedit.cli import Terminated

    def interrupted(*args, **kwargs):
        raise Terminated(15)

    monkeypatch.setattr(media, "write_image", interrupted)  # the contact sheet, written inside the temporary folder
    cache = tmp_path / "analysis"
    with pytest.raises(Terminated):
        analysis.preprocess(inputs[0], output_dir=cache, offline=True)
    assert cache.is_dir() and list(cache.rglob("*")) == []


# 6. A name longer than the file system allows: pathlib's exists() raises ENAMETOOLONG on it (Python 3.11).


@pytest.mark.parametrize("where", ["output", "video", "preview", "import-weights", "download-weights --from"])
def test_a_name_too_long_for_the_file_system_is_one_line(talkedit_home, inputs, tmp_path, where):
    video, speech, before = inputs
    long = tmp_path / ("o" * 296)
    output = tmp_path / "out.mp4"
    commands = {
        "output": ["-o", f"{long}.mp4"],
        "video": [],
        "preview": ["-o", str(output), "--preview", f"{long}.png"],
    }
    if where in commands:
        first = f"{long}.mp4" if where == "video" else str(video)
        done = dub(talkedit_home, first, str(speech), *(commands[where] or ["-o", str(output)]))
    elif where == "import-weights":
        done = run_talkedit("import-weights", f"{long}.pth", "-o", str(tmp_path / "w.safetensors"))
    else:
        done = run_talkedit("download-weights", "dve-multispeaker", "--from", f"{long}.zip", "--cache-dir",
                            str(tmp_path / "cache"))  # fmt: skip
    assert done.returncode == 1
    one_error(done, "o" * 296)
    assert "File name too long" in done.stderr
    assert leftovers(tmp_path) == [] and not output.exists()
    assert {p: digest(p) for p in before} == before


# Found by the sweep: scratch space. The generated crops are memory-mapped in TMPDIR; on a full disk a write to the
# map killed the dub with SIGBUS (exit 135), leaving its scratch folder behind.


@pytest.mark.parametrize("disk", ["full tmpfs", "file size limit"])
def test_no_room_for_the_generated_crops_is_one_line(talkedit_home, inputs, tmp_path, disk):
    video, speech, before = inputs
    analysis, output = tmp_path / "analysis", tmp_path / "out.mp4"
    assert run_talkedit("preprocess", str(video), "-o", str(analysis), "-q").returncode == 0
    args = ("dub", str(video), str(speech), "-o", str(output), "--model", str(talkedit_home[1]), "--offline",
            "--analysis-dir", str(analysis), "--steps", "2")  # fmt: skip
    if disk == "full tmpfs":  # room for the decoded speech (160 kB), not for the crops (2.2 MB)
        with tmpfs(tmp_path / "small", "size=1200k") as small:
            done = run_talkedit(*args, env={"TMPDIR": str(small)})
            left = list(small.iterdir())
    else:
        done = run_talkedit(*args, preexec_fn=file_size_limit(400_000))
        left = []
    assert done.returncode == 1
    one_error(done, "no room for the generated crops")
    assert left == [] and leftovers(tmp_path) == [] and not output.exists()
    assert {p: digest(p) for p in before} == before


def test_a_full_disk_under_the_output_is_one_line(talkedit_home, inputs, tmp_path):
    video, speech, before = inputs
    with tmpfs(tmp_path / "small", "size=300k") as small:  # room for a few frames of video, not for all
        output = small / "out.mp4"
        done = dub(talkedit_home, str(video), str(speech), "-o", str(output), "--steps", "2")
        left = list(small.iterdir())
    assert done.returncode == 1
    one_error(done, str(output))
    assert "No space left on device" in done.stderr
    assert left == [] and leftovers(tmp_path) == []
    assert {p: digest(p) for p in before} == before
