"""Bad input to `dub` and `preprocess`: one line naming the file, exit 1, no traceback, no output, inputs untouched."""

from __future__ import annotations

import hashlib
import subprocess
import wave
from pathlib import Path

import pytest
from typer.testing import CliRunner

from talkedit.cli import app
from talkedit.media import ffmpeg_exe

from .common import media

runner = CliRunner()
GOOD_VIDEO = "grid_swiz3n_black_male_360x288_25fps.mpg"
GOOD_SPEECH = "en_short_voice_recording_22k05_mono_1.8s.m4a"


def lavfi(path: Path, *source: str) -> Path:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *source, str(path)], check=True)
    return path


def make_case(kind: str, tmp: Path) -> tuple[Path, Path, Path, str]:
    """Returns (video, speech, output, the file the error must name)."""
    video, speech, output = media(GOOD_VIDEO), media(GOOD_SPEECH), tmp / "out.mp4"
    if kind == "video-not-media":
        video = tmp / "clip.mp4"
        video.write_text("not a video at all")
        return video, speech, output, str(video)
    if kind == "video-without-video-stream":
        return media("zh_aishell_BAC009S0724W0121_16k_mono.wav"), speech, output, "zh_aishell"
    if kind == "speech-without-audio-stream":
        speech = lavfi(tmp / "silent-film.mp4", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=1")
        return video, speech, output, str(speech)
    if kind == "no-face":
        video = lavfi(tmp / "pattern.mp4", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=1")
        return video, speech, output, str(video)
    if kind == "silent-speech":
        speech = lavfi(tmp / "silence.wav", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "2")
        return video, speech, output, str(speech)
    if kind == "zero-length-speech":
        speech = tmp / "empty.wav"
        with wave.open(str(speech), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
        return video, speech, output, str(speech)
    if kind == "missing-video":
        return tmp / "nowhere.mp4", speech, output, "nowhere.mp4"
    if kind == "missing-speech":
        return video, tmp / "nowhere.wav", output, "nowhere.wav"
    if kind == "unwritable-output":
        blocker = tmp / "a-file"
        blocker.write_text("x")
        return video, speech, blocker / "out.mp4", str(blocker / "out.mp4")
    if kind == "output-container-without-h264":
        return video, speech, tmp / "out.webm", str(tmp / "out.webm")
    if kind == "output-is-input":
        copy = tmp / "clip.mpg"
        copy.write_bytes(video.read_bytes())
        return copy, speech, copy, str(copy)
    raise AssertionError(kind)


KINDS = [
    "video-not-media",
    "video-without-video-stream",
    "speech-without-audio-stream",
    "no-face",
    "silent-speech",
    "zero-length-speech",
    "missing-video",
    "missing-speech",
    "unwritable-output",
    "output-is-input",
    "output-container-without-h264",
]


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@pytest.mark.parametrize("kind", KINDS)
def test_dub_refuses_bad_input(kind, talkedit_home, tmp_path):
    _, tiny = talkedit_home
    video, speech, output, named = make_case(kind, tmp_path)
    before = {p: digest(p) for p in (video, speech)}
    existed = output.exists()
    result = runner.invoke(app, ["dub", str(video), str(speech), "-o", str(output), "--model", str(tiny)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a handled error, not a crash
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], result.output
    assert "Traceback" not in result.output
    assert {p: digest(p) for p in (video, speech)} == before
    assert output.exists() == existed
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_inputs_are_checked_before_the_model(talkedit_home, tmp_path):
    """A bad speech file is reported even when the model does not exist: no model is looked for first."""
    video, speech, output, named = make_case("silent-speech", tmp_path)
    result = runner.invoke(app, ["dub", str(video), str(speech), "-o", str(output), "--model", "no-such-model"])
    assert result.exit_code == 1 and "silent" in result.output


def test_missing_model_is_reported_before_any_analysis(talkedit_home, tmp_path):
    result = runner.invoke(
        app, ["dub", str(media(GOOD_VIDEO)), str(media(GOOD_SPEECH)), "-o", str(tmp_path / "o.mp4"), "--model", "nope"]
    )
    assert result.exit_code == 1 and "unknown model 'nope'" in result.output
    assert "Finding the face" not in result.output


@pytest.mark.parametrize("kind", ["video-not-media", "video-without-video-stream", "no-face", "missing-video"])
def test_preprocess_refuses_bad_input(kind, talkedit_home, tmp_path):
    video, _, _, named = make_case(kind, tmp_path)
    result = runner.invoke(app, ["preprocess", str(video), "-o", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert named in result.output and "Traceback" not in result.output


def test_bad_options_are_one_line_errors(talkedit_home, tmp_path):
    _, tiny = talkedit_home
    args = ["dub", str(media(GOOD_VIDEO)), str(media(GOOD_SPEECH)), "-o", str(tmp_path / "o.mp4"), "--model", str(tiny)]
    # A value outside an option's choices is a usage error: exit 2 (issue 10).
    result = runner.invoke(app, [*args, "--fit", "sideways"])
    assert result.exit_code == 2 and "'sideways'" in result.output
    result = runner.invoke(app, [*args, "--face", "0"])
    assert result.exit_code == 2 and "--face" in result.output
    result = runner.invoke(app, [*args, "--sampler", "euler"])
    assert result.exit_code == 2 and "--sampler" in result.output
    result = runner.invoke(app, [*args, "--precision", "fp8"])
    assert result.exit_code == 2 and "'fp8'" in result.output
    result = runner.invoke(app, [*args, "--device", "cuda:7"])
    assert result.exit_code == 1 and "--device cuda:7" in result.output
    result = runner.invoke(app, [*args, "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output and "Finding the face" not in result.output
    for option, value in (("--chain-seconds", "0"), ("--overlap", "-1")):
        result = runner.invoke(app, [*args, option, value])
        assert result.exit_code == 2 and option in result.output and "Finding the face" not in result.output
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "o.webm")])
    assert result.exit_code == 1 and ".webm" in result.output and "Finding the face" not in result.output
    result = runner.invoke(app, [*args, "--device", "toaster"])
    assert result.exit_code == 1 and "--device 'toaster'" in result.output
    long_speech = str(media("en_male_jfk_speech_44k1_stereo_24bit.flac"))  # 11 s against a 3 s video
    result = runner.invoke(app, ["dub", str(media(GOOD_VIDEO)), long_speech, "-o", str(tmp_path / "o.mp4"),
                                 "--model", str(tiny), "--fit", "trim"])  # fmt: skip
    assert result.exit_code == 1 and "--fit trim" in result.output and "Finding the face" not in result.output


def test_a_model_for_other_inputs_is_refused_before_the_analysis(tmp_path):
    from talkedit.diffusion import DiffusionConfig
    from talkedit.unet import UNet
    from talkedit.weights import save_weights

    from .common import TINY

    small = tmp_path / "small.safetensors"
    save_weights(small, UNet(TINY).state_dict(), TINY, DiffusionConfig(), {})
    args = [
        "dub",
        str(media(GOOD_VIDEO)),
        str(media(GOOD_SPEECH)),
        "-o",
        str(tmp_path / "o.mp4"),
        "--model",
        str(small),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "takes 32 px crops" in result.output
    assert "Finding the face" not in result.output
