"""Everything that runs ffmpeg: probing, streaming decoded frames, reading audio, encoding + muxing.

ffmpeg is used as a pipe (argument lists built with ffmpeg-python); its own message goes into every MediaError.
One known ffmpeg is used: the binary imageio-ffmpeg ships, or $TALKEDIT_FFMPEG. ffprobe is not needed: stream facts
come from `ffmpeg -i`, packet timing from a stream copy into the framecrc muxer (no decoding).

Frames are uint8 (H, W, 3) RGB for analysis, or the source's own 8-bit Y'CbCr 4:2:0 codes (YUVFrame) for the dub's
compositing; upright (rotation metadata applied), in display order.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import cache
from pathlib import Path

import ffmpeg
import numpy as np

from .audio import SAMPLE_RATE
from .colour import Colour
from .errors import MediaError

DEFAULT_CRF = 18  # x264 quality: visually lossless for talking heads at a moderate size


SDR_UNTAGGED = Colour()  # limited range, no colour tags
MIN_FFMPEG = (5, 1)  # `-fps_mode` and the timestamp handling the probes rely on


@cache
def ffmpeg_exe() -> str:
    """The one ffmpeg talkedit runs: $TALKEDIT_FFMPEG if set, else the binary imageio-ffmpeg ships (the system one only
    when that is missing). Results must not depend on whichever ffmpeg happens to be on PATH; the version is checked
    once."""
    if override := os.environ.get("TALKEDIT_FFMPEG"):
        exe = shutil.which(override) or override
        if not Path(exe).is_file():
            raise MediaError(f"TALKEDIT_FFMPEG={override}: no such program; point it at an ffmpeg binary or unset it.")
    else:
        try:
            import imageio_ffmpeg

            exe = imageio_ffmpeg.get_ffmpeg_exe()
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            exe = shutil.which("ffmpeg")
            if exe is None:
                raise MediaError(
                    f"no ffmpeg found ({exc}); `pip install imageio-ffmpeg` or set TALKEDIT_FFMPEG to an ffmpeg binary."
                ) from None
    _check_version(exe)
    return exe


def ffmpeg_path(path: str | os.PathLike) -> str:
    """A local path as ffmpeg must be given it: with the file: protocol, so that a name with a colon (`a:b.mp4`) is
    never read as another protocol."""
    return "file:" + os.fspath(path)


def _check_version(exe: str) -> None:
    try:
        text = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise MediaError(f"{exe}: cannot run ffmpeg ({exc}); set TALKEDIT_FFMPEG to a working ffmpeg binary.") from None
    match = re.search(r"ffmpeg version n?(\d+)\.(\d+)", text)
    if "ffmpeg version" not in text:
        raise MediaError(f"{exe}: does not answer like ffmpeg; set TALKEDIT_FFMPEG to an ffmpeg binary.")
    if match and (int(match[1]), int(match[2])) < MIN_FFMPEG:  # git builds ("N-1234-g...") are taken as recent
        raise MediaError(
            f"{exe}: ffmpeg {match[1]}.{match[2]} is too old (talkedit needs "
            f"{MIN_FFMPEG[0]}.{MIN_FFMPEG[1]} or newer); unset TALKEDIT_FFMPEG to use the one imageio-ffmpeg ships."
        )


def _run(args: list[str], path: Path | str, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", *args], capture_output=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: {what} failed ({_ffmpeg_message(proc.stderr, returncode=proc.returncode)}).")
    return proc


_SIGNAL_CAUSES = {
    "SIGKILL": "killed, e.g. for lack of memory",
    "SIGXFSZ": "a file it wrote outgrew the size limit (ulimit -f)",
}


def _ffmpeg_message(stderr: bytes, tail: bytes | None = None, returncode: int | None = None) -> str:
    """ffmpeg's first error line (the cause), and its last when that says something else (the consequence); when it
    said nothing, the signal that stopped it (`returncode` < 0). `tail`: the end of a longer stderr that starts with
    `stderr`."""

    def lines(data: bytes) -> list[str]:  # without the "[mov,mp4 @ 0x55d0c0a7e080] " of the part that spoke
        text = data.decode(errors="replace")
        return [re.sub(r"^\[[^\]]* @ 0x[0-9a-f]+\] *", "", line.strip()) for line in text.splitlines() if line.strip()]

    head, end = lines(stderr), lines(tail if tail is not None else stderr)
    if not head:
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            return f"ffmpeg was stopped by {name}" + (f": {_SIGNAL_CAUSES[name]}" if name in _SIGNAL_CAUSES else "")
        return "no message from ffmpeg"
    first = next(
        (line for line in head if not line.startswith(("Input #", "Output #", "Stream ", "Duration"))), head[0]
    )
    last = end[-1] if end else head[-1]
    return first if first == last else f"{first} ... {last}"


# ---------------------------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True)
class VideoInfo:
    """What talkedit needs to know about a video file."""

    path: Path
    width: int  # stored size, after rotation (pixels need not be square: see `sar`)
    height: int
    fps: Fraction  # exact rate; the average rate for variable-frame-rate files
    variable_frame_rate: bool  # timestamps off one grid, or with gaps: frames are normalised to `fps` when decoded
    rotation: int  # degrees of display rotation in the file's metadata (applied when decoding)
    duration: float  # seconds of video
    frame_count: int  # frames the decoder will produce, `lead_frames` included (estimated from packet timing)
    codec: str
    has_audio: bool
    pix_fmt: str = "yuv420p"  # the stream's own pixel format
    colour: Colour = SDR_UNTAGGED  # its Y'CbCr matrix, range and tags
    sar: Fraction = Fraction(1)  # sample (pixel) aspect ratio: a pixel is `sar` times as wide as tall
    start: float = 0.0  # seconds from the file's start to the first frame (a video that starts after its audio)
    container: str = ""  # ffmpeg's name of the file format, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpeg"

    @property
    def seekable(self) -> bool:
        """Formats with an index, where ffmpeg's accurate seek lands on the exact frame (MPEG-PS, raw streams: not)."""
        return self.container.startswith(("mov,", "matroska")) and not self.variable_frame_rate

    @property
    def lead_frames(self) -> int:
        """Copies of the first frame put before it so that frame i is shown at i / fps on the file's timeline."""
        return max(0, round(self.start * self.fps))

    @property
    def matrix(self) -> str:
        """The Y'CbCr matrix frames are converted with (the tagged one, else the usual one for the size)."""
        return self.colour.effective_matrix(self.height)

    @property
    def full_range(self) -> bool:
        return self.colour.range == "pc"


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    duration: float
    sample_rate: int
    channels: int
    codec: str


# The rates cameras, editors and broadcasters use; a measured rate this close to one is that one.
STANDARD_RATES = tuple(
    sorted(
        {Fraction(n * 1000, 1001) for n in (24, 30, 48, 60, 120)}
        | {Fraction(n) for n in (12, 15, 24, 25, 30, 48, 50, 60, 72, 90, 100, 120, 240)}
    )
)
_CHANNEL_LAYOUTS = {"mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "3.0(back)": 3, "quad": 4, "4.0": 4, "4.1": 5,
                    "5.0": 5, "5.0(side)": 5, "5.1": 6, "5.1(side)": 6, "6.0": 6, "6.1": 7, "7.0": 7, "7.1": 8,
                    "7.1(wide)": 8, "hexagonal": 6, "octagonal": 8, "downmix": 2}  # fmt: skip
_FIELD_ORDERS = (
    "progressive",
    "top first",
    "bottom first",
    "top coded first (swapped)",
    "bottom coded first (swapped)",
)


def _split_top_level(text: str) -> list[str]:
    """Split ffmpeg's stream description on the commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def _parse_pixel_format(field: str) -> tuple[str, Colour]:
    """'yuv420p(tv, bt709, progressive)' -> ('yuv420p', Colour('tv', 'bt709', 'bt709', 'bt709'))."""
    name, _, details = field.partition("(")
    values = {"range": "tv", "matrix": None, "primaries": None, "transfer": None}
    for item in (d.strip() for d in details.rstrip(")").split(",") if details):
        if item in ("tv", "pc"):
            values["range"] = item
        elif "/" in item:
            names = [None if n == "unknown" else n for n in item.split("/")]
            values["matrix"], values["primaries"], values["transfer"] = (names + [None, None])[:3]
        elif item and item not in _FIELD_ORDERS:
            values["matrix"] = values["primaries"] = values["transfer"] = item
    if name.startswith("yuvj"):  # the old JPEG formats mean full range
        values["range"] = "pc"
    return name.strip(), Colour(**values)


def _stream_lines(stderr: str) -> tuple[str | None, str | None, str]:
    video = audio = None
    for line in stderr.splitlines():
        if re.search(r"Stream #\d+:\d+.*: Video:", line) and video is None and "attached pic" not in line:
            video = line
        elif re.search(r"Stream #\d+:\d+.*: Audio:", line) and audio is None:
            audio = line
    return video, audio, stderr


def stat_or_none(path: str | os.PathLike) -> os.stat_result | None:
    """os.stat, or None when nothing is there. A path the file system cannot look up (a name too long for it, a
    symlink loop, a folder that may not be entered) is a MediaError that names it; pathlib's exists() raises then."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise MediaError(f"{path}: cannot use this path ({exc.strerror}); choose another.") from None


def _header(path: Path) -> str:
    found = stat_or_none(path)
    if found is None:
        raise MediaError(f"{path}: no such file.")
    if not path.is_file():
        raise MediaError(f"{path}: not a file.")
    if found.st_size == 0:
        raise MediaError(f"{path}: the file is empty.")
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", ffmpeg_path(path)], capture_output=True)
    text = proc.stderr.decode(errors="replace")
    if "Input #0" not in text:
        raise MediaError(f"{path}: not a media file ffmpeg can read ({_ffmpeg_message(proc.stderr)}).")
    return text


def _duration(text: str) -> float | None:
    match = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", text)
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None


@dataclass(frozen=True)
class _PacketTiming:
    timebase: Fraction
    pts: list[int]  # presentation time of every packet, in display order, relative to the file's start
    durations: list[int]


def _packet_timing(path: Path) -> _PacketTiming | None:
    """Packet times of the first video stream, read without decoding (a stream copy into the framecrc muxer)."""
    args = ["-nostdin", "-v", "error", "-i", ffmpeg_path(path), "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"]
    proc = subprocess.run([ffmpeg_exe(), *args], capture_output=True)
    if proc.returncode != 0:
        return None
    timebase, pts, durations = None, [], []
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("#tb 0:"):
            timebase = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            dts, presentation = int(fields[1]), int(fields[2])
            pts.append(presentation if presentation > -(1 << 62) else dts)
            durations.append(int(fields[3]))
    if not timebase or not pts:
        return None
    return _PacketTiming(timebase, sorted(pts), durations)


def _snap(rate: Fraction) -> Fraction:
    """ffmpeg prints rates rounded ('29.97'): the standard rate within 0.05 % of one, else the nearest simple one."""
    return next((r for r in STANDARD_RATES if abs(rate / r - 1) < Fraction(1, 2000)), rate.limit_denominator(1001))


MAX_MISSING = 0.1  # a stream on a rate's grid with at most this share of its slots empty is that rate, gaps filled


def frame_rate_from_timing(timing: _PacketTiming, header_rate: Fraction | None) -> tuple[Fraction, bool, int]:
    """(rate, normalise, frames) from packet times, checked over the whole span.

    The rate is the lowest of the standard rates (then the header's, then the typical packet duration's) whose frame
    grid every packet lies on, to within the time base's rounding: a 29.97 fps file with a 1 ms time base (33/34 ms
    steps) is 30000/1001, not 1000/33. A grid with a few empty slots (dropped frames) keeps its rate and the gaps are
    filled by repeating frames (`normalise`); a stream on no grid is variable and normalised to its average rate.
    `frames` is how many frames decoding produces.
    """
    tb = timing.timebase
    seconds = (np.array(timing.pts, dtype=np.float64) - timing.pts[0]) * float(tb)
    steps = [d for d in timing.durations if d > 0]
    typical = Fraction(1) / (max(set(steps), key=steps.count) * tb) if steps else None
    candidates = sorted(set(STANDARD_RATES) | {r for r in (header_rate, typical) if r and r > 0})
    fits = {}  # rate -> spread of the packet times around its grid, in seconds
    for rate in candidates:
        slots = seconds * float(rate)
        residual = slots - np.round(slots)
        spread = (residual.max() - residual.min()) / float(rate)
        if spread <= float(tb) + 1e-9:
            fits[rate] = spread
    if fits:
        # The lowest rate that fits (a multiple of it fits too); of rates within 1 % of it (a rounded header rate
        # and the exact one), the one the times sit on most tightly.
        lowest = min(fits)
        rate = min((r for r in fits if r <= lowest * Fraction(101, 100)), key=lambda r: (fits[r], r))
        frames = int(np.round(seconds[-1] * float(rate))) + 1
        if frames - len(seconds) <= MAX_MISSING * frames:
            return rate, frames != len(seconds), frames
    span = (timing.pts[-1] - timing.pts[0] + (timing.durations[-1] or 0)) * tb
    if span <= 0:
        return header_rate or Fraction(25), False, len(timing.pts)
    average = Fraction(len(timing.pts)) / span
    return _snap(average), True, len(timing.pts)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Probe a video file. Raises MediaError when it is not media, has no video stream, or is HDR."""
    path = Path(path)
    video, audio, text = _stream_lines(_header(path))
    if video is None:
        raise MediaError(f"{path}: has no video stream; give a video of the person talking.")
    fields = _split_top_level(video.split("Video:", 1)[1])
    codec = fields[0].split()[0]
    pix_fmt, colour = _parse_pixel_format(fields[1]) if len(fields) > 1 else ("yuv420p", SDR_UNTAGGED)
    if colour.is_hdr:
        raise MediaError(
            f"{path}: is HDR ({colour.transfer}); talkedit edits SDR video only. Convert it first, e.g. "
            "`ffmpeg -i IN -vf zscale=t=linear,tonemap=hable,zscale=t=bt709:m=bt709:p=bt709,format=yuv420p OUT.mp4`."
        )
    size = re.search(r", (\d{1,5})x(\d{1,5})", video)
    if size is None:
        raise MediaError(f"{path}: ffmpeg reports no frame size for its video stream.")
    width, height = int(size[1]), int(size[2])
    sar_match = re.search(r"\[SAR (\d+):(\d+)", video)
    sar = Fraction(int(sar_match[1]), int(sar_match[2])) if sar_match and int(sar_match[2]) else Fraction(1)
    rotation_match = re.search(r"rotation of (-?\d+(?:\.\d+)?) degrees", text)
    rotation = int(round(float(rotation_match[1]))) % 360 if rotation_match else 0
    if rotation in (90, 270):
        width, height, sar = height, width, 1 / sar
    fps_text = re.search(r"(\d+(?:\.\d+)?) fps", video)
    header_rate = _snap(Fraction(fps_text[1])) if fps_text else None

    rate, variable, start = header_rate, False, 0.0
    duration = _duration(text) or 0.0
    frames = None
    timing = _packet_timing(path)
    if timing is not None:
        rate, variable, frames = frame_rate_from_timing(timing, header_rate)
        start = max(0.0, float(timing.pts[0] * timing.timebase))
        duration = frames / float(rate)
    if rate is None or rate <= 0:
        raise MediaError(f"{path}: cannot tell the video's frame rate.")
    container = re.search(r"Input #0, (\S+?),? from", text)
    info = VideoInfo(
        path=path,
        width=width,
        height=height,
        fps=rate,
        variable_frame_rate=variable,
        rotation=rotation,
        duration=duration,
        frame_count=0,
        codec=codec,
        has_audio=audio is not None,
        pix_fmt=pix_fmt,
        colour=colour,
        sar=sar,
        start=start,
        container=container[1] if container else "",
    )
    frame_count = (frames or max(1, round(duration * rate))) + info.lead_frames
    return replace(info, frame_count=frame_count)


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """Probe the first audio stream of any media file (a video given as the speech works too)."""
    path = Path(path)
    _, audio, text = _stream_lines(_header(path))
    if audio is None:
        raise MediaError(f"{path}: has no audio stream; give a speech recording (wav, flac, mp3, m4a, ...).")
    fields = _split_top_level(audio.split("Audio:", 1)[1])
    rate = re.search(r"(\d+) Hz", audio)
    channels = 1
    for field in fields:
        if field in _CHANNEL_LAYOUTS:
            channels = _CHANNEL_LAYOUTS[field]
        elif match := re.fullmatch(r"(\d+) channels.*", field):
            channels = int(match[1])
    codec = fields[0].split()[0]
    return AudioInfo(path, _duration(text) or 0.0, int(rate[1]) if rate else 0, channels, codec)


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def decode_speech(path: str | os.PathLike, wav: str | os.PathLike) -> Path:
    """Decode the first audio stream of `path` once, on the file's timeline, into a float WAV at its own rate and
    channels: a stream that starts after the file's start is preceded by silence (and gaps are filled), so that the
    features computed from it and the sound muxed from it are the same samples. Returns `wav`."""
    path, wav = Path(path), Path(wav)
    probe_audio(path)  # a file without sound is refused here, by name
    args = ["-v", "error", "-i", ffmpeg_path(path), "-map", "0:a:0", "-af", "aresample=async=1:first_pts=0",
            "-c:a", "pcm_f32le", "-rf64", "auto", "-f", "wav", "-y", ffmpeg_path(wav)]  # fmt: skip
    _run(args, path, "decoding the speech")
    return wav


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream to mono float32 at `sample_rate`. Returns (samples,) in [-1, 1].

    Several channels are averaged (as librosa's to_mono does); ffmpeg's own mono downmix would scale by 1/√2 per
    channel instead. Layouts beyond stereo are first folded to stereo by ffmpeg.
    """
    path = Path(path)
    channels = 1 if probe_audio(path).channels == 1 else 2
    args = ffmpeg.input(ffmpeg_path(path)).output(
        "pipe:", format="f32le", acodec="pcm_f32le", ac=channels, ar=sample_rate
    )
    args = args.global_args("-map", "0:a:0", "-v", "error").get_args()
    proc = _run(args, path, "decoding the audio")
    return np.frombuffer(proc.stdout, dtype=np.float32).reshape(-1, channels).mean(axis=1, dtype=np.float32)


class _StderrTail(threading.Thread):
    """Drains a process's stderr so it never blocks, keeping the start and the end for error messages."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.head, self.data = stream, b"", b""
        self.start()

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read(4096), b""):
            if len(self.head) < 4096:
                self.head += chunk[: 4096 - len(self.head)]
            self.data = (self.data + chunk)[-8192:]

    def message(self, returncode: int | None = None) -> str:
        return _ffmpeg_message(self.head, self.data, returncode)

    def finish(self) -> None:
        self.join(timeout=5)
        self.stream.close()


class _FrameReader(threading.Thread):
    """Reads raw frames of `frame_bytes` from a decoder's pipe ahead of their consumer, up to READ_AHEAD_BYTES, so
    that ffmpeg decodes the next frames while the consumer works on this one (a pipe holds 64 KB, a fraction of a
    frame: without this, decoding and the consumer's work would take turns)."""

    def __init__(self, stream, frame_bytes: int) -> None:
        import queue

        super().__init__(daemon=True)
        self.stream, self.frame_bytes = stream, frame_bytes
        self.frames: queue.Queue = queue.Queue(maxsize=max(2, READ_AHEAD_BYTES // frame_bytes))
        self.stop = threading.Event()  # the consumer is gone: read no more
        self.start()

    def run(self) -> None:
        import queue

        try:
            while not self.stop.is_set():
                frame = np.empty(self.frame_bytes, np.uint8)
                view, filled = memoryview(frame), 0
                while filled < self.frame_bytes and (n := self.stream.readinto(view[filled:])):
                    filled += n
                if filled < self.frame_bytes:
                    break
                while not self.stop.is_set():
                    try:
                        self.frames.put(frame, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except (OSError, ValueError):
            pass  # the pipe was closed under it: the consumer stopped
        finally:
            while not self.stop.is_set():  # the end of the stream (a consumer that stopped needs no word)
                try:
                    self.frames.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def get(self) -> np.ndarray | None:
        """The next frame, (frame_bytes,) uint8; None at the end of the stream."""
        return self.frames.get()


@dataclass
class YUVFrame:
    """One 8-bit Y'CbCr 4:2:0 frame: y (H, W), u and v (⌈H/2⌉, ⌈W/2⌉) uint8, views of one buffer."""

    buffer: np.ndarray
    height: int
    width: int

    @staticmethod
    def nbytes(height: int, width: int) -> int:
        return height * width + 2 * ((height + 1) // 2) * ((width + 1) // 2)

    def _plane(self, index: int) -> np.ndarray:
        h, w = self.height, self.width
        ch, cw = (h + 1) // 2, (w + 1) // 2
        offset = [0, h * w, h * w + ch * cw][index]
        shape = (h, w) if index == 0 else (ch, cw)
        return self.buffer[offset : offset + shape[0] * shape[1]].reshape(shape)

    @property
    def y(self) -> np.ndarray:
        return self._plane(0)

    @property
    def u(self) -> np.ndarray:
        return self._plane(1)

    @property
    def v(self) -> np.ndarray:
        return self._plane(2)

    def copy(self) -> YUVFrame:
        return YUVFrame(self.buffer.copy(), self.height, self.width)


READ_AHEAD_BYTES = 32 << 20  # decoded frames read ahead of their consumer (at least two)


def _decode_pix_fmt(info: VideoInfo) -> str:
    """The 4:2:0 format frames are composited in: the stream's own when it is 8-bit 4:2:0, else yuv420p (converted)."""
    return info.pix_fmt if info.pix_fmt in ("yuv420p", "yuvj420p") else "yuv420p"


def _decode(info: VideoInfo, pix_fmt: str, frame_bytes: int, start: int) -> Iterator[np.ndarray]:
    """Raw frames of `frame_bytes` from frame `start` on (lead frames included), at `info.fps`.

    A constant-rate stream in an indexed container is seeked to `start`; others are decoded from their first frame
    (a variable rate's normalised frame grid depends on where decoding begins). Raises MediaError when ffmpeg stops
    with an error part-way.
    """
    seek = max(0, start - info.lead_frames) if info.seekable else 0
    skip = start - seek if seek else start
    lead = 0 if seek else info.lead_frames
    input_opts = {}
    if seek:
        # Half a frame early: accurate seeking drops every frame before that time, so frame `seek` comes first.
        input_opts["ss"] = f"{info.start + (seek - 0.5) / float(info.fps):.6f}"
    video = ffmpeg.input(ffmpeg_path(info.path), **input_opts)["v:0"]
    out_opts = {"format": "rawvideo", "pix_fmt": pix_fmt}
    if pix_fmt == "rgb24":
        # One known conversion: the matrix and range the compositor inverts (colour.py), not swscale's default.
        video = video.filter("scale", in_color_matrix=_SWS_MATRIX.get(info.matrix, "bt601"),
                             in_range="full" if info.full_range else "limited")  # fmt: skip
    if info.variable_frame_rate:
        video = video.filter("fps", fps=f"{info.fps.numerator}/{info.fps.denominator}")
    else:
        out_opts["fps_mode"] = "passthrough"
    if lead:
        video = video.filter("tpad", start=lead, start_mode="clone")
    args = ffmpeg.output(video, "pipe:", **out_opts).global_args("-v", "error", "-nostdin").get_args()
    proc = subprocess.Popen([ffmpeg_exe(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tail = _StderrTail(proc.stderr)
    reader = _FrameReader(proc.stdout, frame_bytes)
    index, ended = 0, False
    try:
        while (frame := reader.get()) is not None:
            if index >= skip:
                yield frame
            index += 1
        ended = True
    finally:
        reader.stop.set()
        if not ended and proc.poll() is None:
            proc.kill()  # the consumer stopped early; a reader blocked on the pipe then reads its end
        reader.join()
        proc.stdout.close()
        proc.wait()
        tail.finish()
    # Only reached when the stream ended by itself (a consumer that stops early closes the generator above).
    if proc.returncode != 0:
        raise MediaError(
            f"{info.path}: decoding stopped after {index} frames ({tail.message(proc.returncode)}); the file may be "
            "damaged: re-encode it (e.g. `ffmpeg -i IN -c:v libx264 -crf 16 OUT.mp4`) and try again."
        )


_SWS_MATRIX = {"bt709": "bt709", "bt470bg": "bt601", "smpte170m": "smpte170m", "bt601": "bt601", "fcc": "fcc",
               "smpte240m": "smpte240m", "bt2020nc": "bt2020"}  # fmt: skip


def iter_frames(info: VideoInfo, start: int = 0) -> Iterator[np.ndarray]:
    """Stream decoded frames (H, W, 3) uint8 RGB from frame `start` on, at `info.fps` (VFR normalised, lead frames
    first), converted with the video's own matrix and range (`info.matrix`). One frame is in memory at a time."""
    for raw in _decode(info, "rgb24", info.width * info.height * 3, start):
        yield raw.reshape(info.height, info.width, 3)


def iter_yuv_frames(info: VideoInfo, start: int = 0) -> Iterator[YUVFrame]:
    """Like `iter_frames`, in the source's own Y'CbCr 4:2:0 codes (8-bit); nothing is converted to RGB."""
    for raw in _decode(info, _decode_pix_fmt(info), YUVFrame.nbytes(info.height, info.width), start):
        yield YUVFrame(raw, info.height, info.width)


# ---------------------------------------------------------------------------------------------------------------
# Encoding

CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", "": "mp4"}  # what holds H.264 + AAC


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output that is one of the inputs, cannot be written or cannot hold H.264 + AAC, before any work."""
    output = Path(output)
    stat_or_none(output)  # a name the file system cannot hold is refused here
    if any(output.resolve() == Path(item).resolve() for item in inputs):
        raise MediaError(f"{output}: the output would overwrite an input; choose another output path.")
    if output.is_dir():
        raise MediaError(f"{output}: is a directory; give a file name such as out.mp4.")
    if output.exists() and not output.is_file():  # a FIFO or a device (/dev/null) would be replaced by a file
        raise MediaError(f"{output}: exists and is not a regular file; give a new file name such as out.mp4.")
    if output.suffix.lower() not in CONTAINERS:
        raise MediaError(
            f"{output}: talkedit writes H.264 video with AAC sound, which a {output.suffix} file cannot hold; "
            "name the output .mp4, .mov, .m4v or .mkv."
        )
    parent = output.resolve().parent
    if not parent.is_dir():
        raise MediaError(f"{output}: directory {parent} does not exist; create it or choose another path.")
    if not os.access(parent, os.W_OK):
        raise MediaError(f"{output}: directory {parent} is not writable; choose another output path.")
    return output


class VideoWriter:
    """Encode 8-bit Y'CbCr 4:2:0 frames to H.264 and mux an audio file as AAC, in one ffmpeg pass.

    Frames go in as the source's own codes, tagged with its colour (matrix, primaries, transfer, range) and pixel
    aspect, so that a pixel talkedit did not touch goes through exactly what a plain x264 transcode does. An odd width
    or height grows by one repeated column or row, since 4:2:0 chroma needs even sides.

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
        colour: Colour = SDR_UNTAGGED,
        sar: Fraction = Fraction(1),
    ) -> None:
        self.output = Path(output)
        suffix = self.output.suffix.lower()
        # The stem is cut short: a legal long output name must not make an illegal temporary one.
        stem = self.output.stem[:100]
        self.tmp = self.output.with_name(f".{stem}.talkedit-{os.getpid()}.partial{suffix or '.mp4'}")
        self.width, self.height = width, height
        tags = {"color_range": colour.range}
        for option, value in (("colorspace", colour.matrix), ("color_primaries", colour.primaries),
                              ("color_trc", colour.transfer)):  # fmt: skip
            if value:
                tags[option] = value
        # The same tags on the raw input and the output: ffmpeg then has nothing to convert.
        # yuv420p needs even sides: an odd frame grows by one repeated luma column/row (its chroma already covers
        # it), the only change to the picture; done here, since ffmpeg's pad filter drops an odd 4:2:0 column.
        self.even_width, self.even_height = width + width % 2, height + height % 2
        video = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="yuv420p", s=f"{self.even_width}x{self.even_height}",
            framerate=str(fps), **tags,
        )  # fmt: skip
        if sar != 1:
            video = video.filter("setsar", f"{sar.numerator}/{sar.denominator}")
        streams = [video]
        opts = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": preset, "format": CONTAINERS[suffix],
                **tags}  # fmt: skip
        if CONTAINERS[suffix] in ("mp4", "mov"):
            opts["movflags"] = "+faststart"
        if audio is not None:
            streams.append(ffmpeg.input(ffmpeg_path(audio))["a:0"])
            opts.update(acodec="aac", audio_bitrate="192k")
        args = (
            ffmpeg.output(*streams, ffmpeg_path(self.tmp), **opts)
            .global_args("-v", "error", "-nostdin", "-y")
            .get_args()
        )
        self.proc = subprocess.Popen([ffmpeg_exe(), *args], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self.tail = _StderrTail(self.proc.stderr)
        self.frames = 0

    def write(self, frame: YUVFrame) -> None:
        """frame: a YUVFrame of the writer's size."""
        if (frame.height, frame.width) != (self.height, self.width):
            raise ValueError(f"frame {frame.height}x{frame.width} does not match {self.height}x{self.width}")
        data = frame.buffer
        if (self.even_height, self.even_width) != (self.height, self.width):
            y = np.pad(frame.y, ((0, self.even_height - self.height), (0, self.even_width - self.width)), mode="edge")
            data = np.concatenate([y.ravel(), frame.u.ravel(), frame.v.ravel()])
        try:
            self.proc.stdin.write(data.tobytes())
        except BrokenPipeError:
            self.abort()
            raise MediaError(f"{self.output}: encoding failed ({self.tail.message(self.proc.returncode)}).") from None
        self.frames += 1

    def close(self) -> Path:
        """Finish encoding and move the file into place. Returns the output path."""
        self.proc.stdin.close()
        self.proc.wait()
        self.tail.finish()
        if self.proc.returncode != 0:
            self.tmp.unlink(missing_ok=True)
            raise MediaError(f"{self.output}: encoding failed ({self.tail.message(self.proc.returncode)}).")
        os.replace(self.tmp, self.output)
        return self.output

    def abort(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.tail.finish()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def rgb_to_yuv420(image: np.ndarray, matrix: str = "bt601", full_range: bool = False) -> YUVFrame:
    """An (H, W, 3) uint8 RGB image as a YUVFrame (chroma averaged over 2x2 blocks). For tests and stills."""
    from .colour import rgb_to_yuv_matrix

    h, w = image.shape[:2]
    linear, offset = rgb_to_yuv_matrix(matrix, full_range)
    yuv = image.astype(np.float64) @ linear.T + offset
    padded = np.pad(yuv, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    chroma = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3).mean(axis=(1, 3))
    planes = [yuv[..., 0], chroma[..., 1], chroma[..., 2]]
    buffer = np.concatenate([np.clip(np.round(p), 0, 255).astype(np.uint8).ravel() for p in planes])
    return YUVFrame(buffer, h, w)


IMAGE_SUFFIXES = (".png",)


def check_image_path(path: str | os.PathLike, *others: str | os.PathLike) -> Path:
    """Refuse an image output (a preview, a report) that is not a .png, is one of `others` (inputs, the video
    output), is not a regular file, or lies in a folder that does not exist or cannot be written, before any work."""
    path = Path(path)
    stat_or_none(path)  # a name the file system cannot hold is refused here
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise MediaError(f"{path}: talkedit writes this image as PNG; name it .png.")
    if any(path.resolve() == Path(item).resolve() for item in others):
        raise MediaError(f"{path}: the image would overwrite another file of this run; choose another path.")
    if path.exists() and not path.is_file():
        raise MediaError(f"{path}: exists and is not a regular file; give a new file name such as preview.png.")
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MediaError(f"{path}: folder {parent} does not exist or is not writable; choose another path.")
    return path


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image atomically (a temporary file beside it, renamed); the format follows the
    suffix (PNG for .png)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem[:100]}.talkedit-{os.getpid()}.partial{path.suffix}")
    height, width = image.shape[:2]
    args = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}")
        .output(ffmpeg_path(tmp), vframes=1, update=1)
        .global_args("-v", "error", "-nostdin", "-y")
        .get_args()
    )
    proc = subprocess.run([ffmpeg_exe(), *args], input=np.ascontiguousarray(image).tobytes(), capture_output=True)
    if proc.returncode == 0:
        os.replace(tmp, path)
        return
    tmp.unlink(missing_ok=True)
    raise MediaError(f"{path}: cannot write the image ({_ffmpeg_message(proc.stderr, returncode=proc.returncode)}).")
