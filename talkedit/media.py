"""Everything that runs ffmpeg: probing, streaming decoded frames, reading audio, encoding + muxing.

ffmpeg is used as a pipe (argument lists built with ffmpeg-python); its own message goes into every MediaError. The
system ffmpeg is used when on PATH, else the binary imageio-ffmpeg ships. ffprobe is not needed: stream facts come from
`ffmpeg -i`, packet timing from a stream copy into the framecrc muxer (no decoding).

Frames are uint8 (H, W, 3) RGB, upright (rotation metadata applied), in display order.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path

import ffmpeg
import numpy as np

from .audio import SAMPLE_RATE
from .errors import MediaError

DEFAULT_CRF = 18  # x264 quality: visually lossless for talking heads at a moderate size


@cache
def ffmpeg_exe() -> str:
    """The ffmpeg binary: the system one if on PATH, else imageio-ffmpeg's."""
    if found := shutil.which("ffmpeg"):
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise MediaError(f"no ffmpeg found ({exc}); install ffmpeg or `pip install imageio-ffmpeg`.") from None


def _run(args: list[str], path: Path | str, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", *args], capture_output=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: {what} failed ({_ffmpeg_message(proc.stderr)}).")
    return proc


def _ffmpeg_message(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message from ffmpeg"


# ---------------------------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True)
class VideoInfo:
    """What talkedit needs to know about a video file."""

    path: Path
    width: int  # displayed size, after rotation
    height: int
    fps: Fraction  # exact rate; the average rate for variable-frame-rate files
    variable_frame_rate: bool  # frames are normalised to `fps` when decoded
    rotation: int  # degrees of display rotation in the file's metadata (applied when decoding)
    duration: float  # seconds
    frame_count: int  # frames the decoder will produce (estimated from packet timing)
    codec: str
    has_audio: bool


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    duration: float
    sample_rate: int
    channels: int
    codec: str


_NTSC = {Fraction(n * 1000, 1001) for n in (24, 30, 48, 60, 120)}


def _parse_rate(text: str) -> Fraction:
    """ffmpeg prints rates rounded ('29.97'); snap to NTSC rationals, else the nearest simple fraction."""
    value = Fraction(text)
    for ntsc in _NTSC:
        if abs(value - ntsc) < Fraction(1, 100):
            return ntsc
    return value.limit_denominator(1001)


def _stream_lines(stderr: str) -> tuple[str | None, str | None, str]:
    video = audio = None
    for line in stderr.splitlines():
        if re.search(r"Stream #\d+:\d+.*: Video:", line) and video is None and "attached pic" not in line:
            video = line
        elif re.search(r"Stream #\d+:\d+.*: Audio:", line) and audio is None:
            audio = line
    return video, audio, stderr


def _header(path: Path) -> str:
    if not path.exists():
        raise MediaError(f"{path}: no such file.")
    if not path.is_file():
        raise MediaError(f"{path}: not a file.")
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)], capture_output=True)
    text = proc.stderr.decode(errors="replace")
    if "Input #0" not in text:
        raise MediaError(f"{path}: not a media file ffmpeg can read ({_ffmpeg_message(proc.stderr)}).")
    return text


def _duration(text: str) -> float | None:
    match = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", text)
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None


def _packet_timing(path: Path) -> tuple[Fraction, list[int]] | None:
    """(time base, packet durations) of the first video stream, read without decoding."""
    proc = subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-v",
            "error",
            "-i",
            str(path),
            "-map",
            "0:v:0",
            "-c",
            "copy",
            "-f",
            "framecrc",
            "-",
        ],
        capture_output=True,
    )
    if proc.returncode != 0:
        return None
    timebase, durations = None, []
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("#tb 0:"):
            timebase = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            durations.append(int(fields[3]))
    return (timebase, durations) if timebase and durations else None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Probe a video file. Raises MediaError when it is not media or has no video stream."""
    path = Path(path)
    video, audio, text = _stream_lines(_header(path))
    if video is None:
        raise MediaError(f"{path}: has no video stream; give a video of the person talking.")
    codec = re.search(r"Video: (\w+)", video)[1]
    size = re.search(r", (\d{2,5})x(\d{2,5})", video)
    if size is None:
        raise MediaError(f"{path}: ffmpeg reports no frame size for its video stream.")
    width, height = int(size[1]), int(size[2])
    rotation_match = re.search(r"rotation of (-?\d+(?:\.\d+)?) degrees", text)
    rotation = int(round(float(rotation_match[1]))) % 360 if rotation_match else 0
    if rotation in (90, 270):
        width, height = height, width
    fps_text = re.search(r"(\d+(?:\.\d+)?) fps", video)
    rate = _parse_rate(fps_text[1]) if fps_text else None

    duration = _duration(text) or 0.0
    variable = False
    timing = _packet_timing(path)
    if timing is not None:
        timebase, durations = timing
        steady = [d for d in durations[:-1] if d > 0] or [d for d in durations if d > 0]
        if steady and max(steady) - min(steady) > 1:
            variable = True
            rate = Fraction(len(durations)) / (sum(durations) * timebase)
            rate = rate.limit_denominator(1001)
        elif steady:
            rate = Fraction(1) / (steady[0] * timebase)
            rate = _parse_rate(str(float(rate))) if rate.denominator > 1001 else rate
        if sum(durations) > 0:
            duration = float(sum(durations) * timebase)
    if rate is None or rate <= 0:
        raise MediaError(f"{path}: cannot tell the video's frame rate.")
    frame_count = max(1, round(duration * rate))
    return VideoInfo(path, width, height, rate, variable, rotation, duration, frame_count, codec, audio is not None)


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """Probe the first audio stream of any media file (a video given as the speech works too)."""
    path = Path(path)
    _, audio, text = _stream_lines(_header(path))
    if audio is None:
        raise MediaError(f"{path}: has no audio stream; give a speech recording (wav, flac, mp3, m4a, ...).")
    rate = re.search(r"(\d+) Hz", audio)
    channels = (
        2 if "stereo" in audio else 1 if "mono" in audio else int((re.search(r"(\d+) channels", audio) or [0, 1])[1])
    )
    codec = re.search(r"Audio: (\w+)", audio)[1]
    return AudioInfo(path, _duration(text) or 0.0, int(rate[1]) if rate else 0, channels, codec)


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream to mono float32 at `sample_rate`. Returns (samples,) in [-1, 1].

    Several channels are averaged (as librosa's to_mono does); ffmpeg's own mono downmix would scale by 1/√2 per
    channel instead. Layouts beyond stereo are first folded to stereo by ffmpeg.
    """
    path = Path(path)
    channels = 1 if probe_audio(path).channels == 1 else 2
    args = ffmpeg.input(str(path)).output("pipe:", format="f32le", acodec="pcm_f32le", ac=channels, ar=sample_rate)
    args = args.global_args("-map", "0:a:0", "-v", "error").get_args()
    proc = _run(args, path, "decoding the audio")
    return np.frombuffer(proc.stdout, dtype=np.float32).reshape(-1, channels).mean(axis=1, dtype=np.float32)


class _StderrTail(threading.Thread):
    """Drains a process's stderr so it never blocks, keeping the end for error messages."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.data = stream, b""
        self.start()

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read(4096), b""):
            self.data = (self.data + chunk)[-8192:]


def iter_frames(info: VideoInfo, start: int = 0) -> Iterator[np.ndarray]:
    """Stream decoded frames (H, W, 3) uint8 RGB from frame `start` on, at `info.fps` (VFR normalised).

    Only one frame is in memory at a time; the clip is never held whole.
    """
    stream = ffmpeg.input(str(info.path))
    out_opts = {"format": "rawvideo", "pix_fmt": "rgb24"}
    video = stream["v:0"]
    if info.variable_frame_rate:
        video = video.filter("fps", fps=f"{info.fps.numerator}/{info.fps.denominator}")
    else:
        out_opts["fps_mode"] = "passthrough"
    args = ffmpeg.output(video, "pipe:", **out_opts).global_args("-v", "error", "-nostdin").get_args()
    proc = subprocess.Popen([ffmpeg_exe(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tail = _StderrTail(proc.stderr)
    frame_bytes = info.width * info.height * 3
    index = 0
    try:
        while True:
            frame = np.empty((info.height, info.width, 3), np.uint8)
            view, filled = memoryview(frame).cast("B"), 0
            while filled < frame_bytes and (n := proc.stdout.readinto(view[filled:])):
                filled += n
            if filled < frame_bytes:
                break
            if index >= start:
                yield frame
            index += 1
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        tail.join(timeout=5)
    if proc.returncode not in (0, -9) and index == 0:
        raise MediaError(f"{info.path}: decoding failed ({_ffmpeg_message(tail.data)}).")


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output that is one of the inputs or cannot be written, before any work is done."""
    output = Path(output)
    if any(output.resolve() == Path(item).resolve() for item in inputs):
        raise MediaError(f"{output}: the output would overwrite an input; choose another output path.")
    if output.is_dir():
        raise MediaError(f"{output}: is a directory; give a file name such as out.mp4.")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise MediaError(f"{output}: directory {parent} does not exist; create it or choose another path.")
    if not os.access(parent, os.W_OK):
        raise MediaError(f"{output}: directory {parent} is not writable; choose another output path.")
    return output


class VideoWriter:
    """Encode RGB frames to H.264 (yuv420p) and mux an audio file as AAC, in one ffmpeg pass.

    An odd width or height grows by one repeated column or row, since 4:2:0 chroma needs even sides.

    Writes to a temporary file beside `output` and renames it on `close()`; `abort()` (or an exception inside a
    `with` block) removes it, so a failed or interrupted run leaves no partial output.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        width: int,
        height: int,
        fps: Fraction,
        audio: str | os.PathLike | None = None,
        crf: int = DEFAULT_CRF,
        preset: str = "medium",
    ) -> None:
        self.output = Path(output)
        suffix = self.output.suffix or ".mp4"
        self.tmp = self.output.with_name(f".{self.output.stem}.talkedit-{os.getpid()}.partial{suffix}")
        self.width, self.height = width, height
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=str(fps))
        if width % 2 or height % 2:
            # yuv420p needs even sides: repeat the last column/row rather than fail (the only change to the picture).
            video = video.filter("pad", width + width % 2, height + height % 2).filter(
                "fillborders", right=width % 2, bottom=height % 2, mode="smear"
            )
        streams = [video]
        opts = {
            "vcodec": "libx264",
            "pix_fmt": "yuv420p",
            "crf": crf,
            "preset": preset,
            "movflags": "+faststart",
        }
        if audio is not None:
            streams.append(ffmpeg.input(str(audio))["a:0"])
            opts.update(acodec="aac", audio_bitrate="192k")
        if suffix.lower() not in (".mp4", ".mov", ".m4v"):
            opts.pop("movflags")
        args = ffmpeg.output(*streams, str(self.tmp), **opts).global_args("-v", "error", "-nostdin", "-y").get_args()
        self.proc = subprocess.Popen([ffmpeg_exe(), *args], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self.tail = _StderrTail(self.proc.stderr)
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """frame: (H, W, 3) uint8 RGB."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.shape} {frame.dtype} does not match {self.height}x{self.width} uint8")
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            self.abort()
            raise MediaError(f"{self.output}: encoding failed ({_ffmpeg_message(self.tail.data)}).") from None
        self.frames += 1

    def close(self) -> Path:
        """Finish encoding and move the file into place. Returns the output path."""
        self.proc.stdin.close()
        self.proc.wait()
        self.tail.join(timeout=5)
        if self.proc.returncode != 0:
            self.tmp.unlink(missing_ok=True)
            raise MediaError(f"{self.output}: encoding failed ({_ffmpeg_message(self.tail.data)}).")
        os.replace(self.tmp, self.output)
        return self.output

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image; the format follows the suffix (PNG for .png)."""
    path = Path(path)
    height, width = image.shape[:2]
    args = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}")
        .output(str(path), vframes=1, update=1)
        .global_args("-v", "error", "-nostdin", "-y")
        .get_args()
    )
    proc = subprocess.run([ffmpeg_exe(), *args], input=np.ascontiguousarray(image).tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: cannot write the image ({_ffmpeg_message(proc.stderr)}).")
