"""Training data as a pack: one self-contained file of aligned crops, jaw masks, mel features and clip ids.

    build_pack   videos with their own speech -> preprocess (cached) -> crops, masks, mel -> NAME.pack
                 (runs where talkedit is installed: needs ffmpeg, mediapipe, librosa)
    read_pack    NAME.pack -> Pack: arrays in memory, audio windows made by `audio.frame_windows` as `dub` makes them
                 (needs only numpy, safetensors and OpenCV: what a GPU machine without ffmpeg offers)

A pack is a safetensors file. Its tensors:
    crops.mkv   (bytes,) uint8   every stored crop, in order, as one H.264 High 4:4:4 video (full range, BT.601)
    masks.zlib  (bytes,) uint8   zlib(np.packbits(masks)), masks (N, 128, 128) in {0, 1}
    mel.zlib    (bytes,) uint8   zlib of the mel spectrograms of all clips, (M, 256) codes c: dB = c * 80/255 - 80
    mel_start   (C + 1,) int64   clip c's mel rows are mel_start[c] : mel_start[c + 1]
    clip        (N,) int32       the clip of each stored frame
    frame       (N,) int32       its frame index in its clip (timeline t = frame / fps, as in `dub`)
    track       (N,) int32       the face track it belongs to (a shot cut starts a new track)
    crop_mean   (C, 3) float32   mean RGB of each clip's crops before encoding: a check on the reader's decoder
Its string metadata: format "talkedit-pack", pack_version, clips (JSON: name, sha256, fps, frames) and the encoder
settings. Only frames where the face is tracked are stored. 15 minutes of 25 fps footage takes about 35 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .audio import N_MELS, PAD_DB, frame_windows
from .errors import TalkeditError
from .files import write_atomic

PACK_FORMAT = "talkedit-pack"
PACK_VERSION = "1"
CROP = 128
PACK_CRF = 16  # x264 quality of the crops: about 39 dB PSNR at ~1 KB per frame on the shared clips
MEL_STEP = -PAD_DB / 255  # dB per mel code (0.31 dB: the quantisation error is at most 0.16 dB)
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
DECODER_TOLERANCE = 3.0  # levels of mean colour by which the reader's decode may differ from the original crops


class PackError(TalkeditError):
    """A pack that cannot be read or built."""


@dataclass
class ClipInfo:
    name: str  # the video's file name
    sha256: str  # of the video's bytes
    fps: Fraction
    frames: int  # frames in the clip's timeline (stored or not)

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "fps": str(self.fps), "frames": self.frames}

    @classmethod
    def from_json(cls, data: dict) -> ClipInfo:
        return cls(data["name"], data["sha256"], Fraction(data["fps"]), int(data["frames"]))


@dataclass
class Pack:
    """A pack in memory. N stored frames, C clips."""

    path: Path
    sha256: str  # of the pack file: the data's identity in a model's provenance
    clips: list[ClipInfo]
    crops: np.ndarray  # (N, 128, 128, 3) uint8 RGB
    masks: np.ndarray  # (N, 128, 128) uint8, 1 = regenerate
    windows: np.ndarray  # (N, 4, 256) float32 dB: each frame's audio window, as `dub` computes it
    clip: np.ndarray  # (N,) int32
    frame: np.ndarray  # (N,) int32
    track: np.ndarray  # (N,) int32
    mels: list[np.ndarray]  # per clip (mel frames, 256) float32 dB

    def __len__(self) -> int:
        return len(self.clip)

    def clip_windows(self, c: int) -> np.ndarray:
        """The audio window of every frame of clip c's timeline, stored or not: (frames, 4, 256) float32."""
        return frame_windows(self.mels[c], self.clips[c].frames, self.clips[c].fps)

    def predecessor(self) -> np.ndarray:
        """(N,) int64: the stored index of each frame's previous frame in the same shot, or -1 where there is none
        (a clip's first stored frame, or the first after a cut or a gap in tracking)."""
        prev = np.full(len(self), -1, np.int64)
        same = (self.clip[1:] == self.clip[:-1]) & (self.track[1:] == self.track[:-1])
        follows = self.frame[1:] == self.frame[:-1] + 1
        prev[1:][same & follows] = np.arange(len(self) - 1)[same & follows]
        return prev


# ---------------------------------------------------------------------------------------------------------------
# Building (needs the full talkedit install)


def find_videos(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Video files from files, folders (searched recursively) and text lists (one path per line, relative to the
    list; blank lines and # comments skipped). Raises PackError naming what is missing or empty."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not videos:
                raise PackError(
                    f"{path}: no video files in this folder (looked for {', '.join(VIDEO_SUFFIXES)}); "
                    "give videos of the person speaking, with their own sound."
                )
            found += videos
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines()]
            listed = [path.parent / line for line in lines if line and not line.startswith("#")]
            if not listed:
                raise PackError(f"{path}: the list names no videos; put one video path per line.")
            found += find_videos(listed)
        elif path.is_file():
            found.append(path)
        else:
            raise PackError(f"{path}: no such file or folder; check the path.")
    return found


def build_pack(
    videos: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    face: str | None = None,
    analysis_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    crf: int = PACK_CRF,
    progress=None,
) -> Path:
    """Preprocess every video (cached) and write its crops, masks and speech features into one pack at `output`.

    Every video needs its own speech track and a face. Written atomically; raises a TalkeditError naming the file
    at fault before anything is written.
    """
    from . import __version__
    from .analysis import no_progress, preprocess
    from .audio import check_speech, mel_spectrogram
    from .manifest import file_sha256
    from .media import decode_speech, probe_audio, probe_video, read_audio

    progress = progress or no_progress
    paths = find_videos(videos)
    if not paths:
        raise PackError("no videos given; name video files, folders of videos or a text list of them.")
    for path in paths:  # cheap checks on every file before the slow work on any
        probe_video(path)
        probe_audio(path)

    output = Path(output)
    clips, mels, crop_means = [], [], []
    clip_ids, frame_ids, tracks, masks = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="talkedit-pack-") as scratch:
        video_file = Path(scratch) / "crops.mkv"
        encoder = _CropEncoder(video_file, crf)
        try:
            for c, path in enumerate(paths):
                analysis = preprocess(path, face=face, output_dir=analysis_dir, offline=offline, progress=progress)
                wav = read_audio(decode_speech(path, Path(scratch) / "speech.wav"))
                check_speech(wav, path)
                stored = np.flatnonzero(analysis.tracked)
                crops = np.asarray(analysis.crops)[stored]
                encoder.write(crops)
                crop_means.append(crops.reshape(-1, 3).mean(axis=0))
                clips.append(ClipInfo(path.name, file_sha256(path), analysis.video.fps, analysis.frame_count))
                mels.append(mel_spectrogram(wav))
                clip_ids.append(np.full(len(stored), c, np.int32))
                frame_ids.append(stored.astype(np.int32))
                tracks.append(analysis.track[stored].astype(np.int32))
                masks.append(np.asarray(analysis.masks)[stored])
                progress("pack", c + 1, len(paths))
            encoder.close()
        finally:
            encoder.abort()
        mel_codes = np.concatenate([_mel_codes(m) for m in mels])
        mask_bits = np.packbits(np.concatenate(masks).astype(bool))
        tensors = {
            "crops.mkv": np.frombuffer(video_file.read_bytes(), np.uint8),
            "masks.zlib": np.frombuffer(zlib.compress(mask_bits.tobytes(), 9), np.uint8),
            "mel.zlib": np.frombuffer(zlib.compress(mel_codes.tobytes(), 9), np.uint8),
            "mel_start": np.cumsum([0] + [len(m) for m in mels]).astype(np.int64),
            "clip": np.concatenate(clip_ids),
            "frame": np.concatenate(frame_ids),
            "track": np.concatenate(tracks),
            "crop_mean": np.stack(crop_means).astype(np.float32),
        }
        metadata = {
            "format": PACK_FORMAT,
            "pack_version": PACK_VERSION,
            "clips": json.dumps([c.to_json() for c in clips]),
            "crops": json.dumps({"codec": "libx264 yuv444p bt601 full range", "crf": crf}),
            "face": face or "",  # the face choice the clips were analysed with (default: the largest)
            "talkedit": __version__,
        }
        _save_atomic(output, tensors, metadata)
    return output


def _mel_codes(mel: np.ndarray) -> np.ndarray:
    """(frames, N_MELS) dB in [-80, 0] -> uint8 codes."""
    return np.clip(np.round((mel - PAD_DB) / MEL_STEP), 0, 255).astype(np.uint8)


class _CropEncoder:
    """Streams RGB crops into one lossy but visually lossless H.264 4:4:4 file (ffmpeg's libx264)."""

    def __init__(self, path: Path, crf: int) -> None:
        from .media import ffmpeg_exe, ffmpeg_path

        self.path = path
        args = [ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{CROP}x{CROP}",
                "-r", "25", "-i", "-", "-vf", "scale=out_color_matrix=bt601:out_range=pc:flags=accurate_rnd",
                "-c:v", "libx264", "-pix_fmt", "yuv444p", "-crf", str(crf), "-preset", "slow",
                "-color_range", "pc", "-colorspace", "smpte170m", "-color_primaries", "smpte170m",
                "-color_trc", "smpte170m", ffmpeg_path(path)]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, crops: np.ndarray) -> None:
        try:
            self.proc.stdin.write(np.ascontiguousarray(crops).tobytes())
        except BrokenPipeError:
            self.close()

    def close(self) -> None:
        _, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise PackError(f"{self.path}: encoding the crops failed: {err.decode(errors='replace').strip()}")

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _save_atomic(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save as serialize

    try:
        write_atomic(path, serialize(tensors, metadata=metadata))
    except OSError as exc:
        raise PackError(
            f"{path}: cannot write the pack ({exc.strerror or exc}); check that its folder is writable and has room."
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Reading (numpy, safetensors and OpenCV only)


def read_pack(path: str | os.PathLike) -> Pack:
    """Read a pack into memory and check it. Raises PackError saying what to do when it is not a usable pack."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PACK_FORMAT:
                raise PackError(f"{path}: not a talkedit pack; make one with `talkedit pack VIDEOS -o DATA.pack`.")
            if meta.get("pack_version") != PACK_VERSION:
                raise PackError(
                    f"{path}: a pack of format version {meta.get('pack_version')!r}, made by talkedit "
                    f"{meta.get('talkedit', '?')}; this talkedit reads version {PACK_VERSION}: make the pack again "
                    "from the videos with `talkedit pack`."
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except PackError:
        raise
    except OSError as exc:
        raise PackError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    except Exception as exc:  # safetensors' own error types
        raise PackError(f"{path}: not a talkedit pack ({str(exc).splitlines()[0]}); make it again.") from None
    try:
        clips = [ClipInfo.from_json(c) for c in json.loads(meta["clips"])]
        n = len(tensors["clip"])
        masks = np.unpackbits(np.frombuffer(zlib.decompress(tensors["masks.zlib"].tobytes()), np.uint8))
        masks = masks[: n * CROP * CROP].reshape(n, CROP, CROP)
        codes = np.frombuffer(zlib.decompress(tensors["mel.zlib"].tobytes()), np.uint8).reshape(-1, N_MELS)
    except (KeyError, ValueError, zlib.error) as exc:
        raise PackError(f"{path}: damaged pack ({exc}); make it again.") from None
    clip, frame, track = tensors["clip"], tensors["frame"], tensors["track"]
    crops = _decode_crops(path, tensors["crops.mkv"], n)
    for c in range(len(clips)):  # the decoder here must convert colour as ffmpeg's did
        mean = crops[clip == c].reshape(-1, 3).mean(axis=0) if (clip == c).any() else tensors["crop_mean"][c]
        if np.abs(mean - tensors["crop_mean"][c]).max() > DECODER_TOLERANCE:
            raise PackError(
                f"{path}: OpenCV here decodes the crops with other colours (clip {clips[c].name}: mean RGB "
                f"{mean.round(1).tolist()}, packed {tensors['crop_mean'][c].round(1).tolist()}); use another "
                "opencv-python build."
            )
    starts = tensors["mel_start"]
    mels = [codes[starts[c] : starts[c + 1]].astype(np.float32) * MEL_STEP + PAD_DB for c in range(len(clips))]
    from .manifest import file_sha256

    pack = Pack(path, file_sha256(path), clips, crops, masks, np.empty((n, 4, N_MELS), np.float32), clip, frame,
                track, mels)  # fmt: skip
    for c in range(len(clips)):
        rows = clip == c
        pack.windows[rows] = pack.clip_windows(c)[frame[rows]]
    return pack


def _decode_crops(path: Path, video: np.ndarray, count: int) -> np.ndarray:
    import cv2

    crops = np.empty((count, CROP, CROP, 3), np.uint8)
    with tempfile.TemporaryDirectory(prefix="talkedit-pack-") as scratch:
        file = Path(scratch) / "crops.mkv"
        file.write_bytes(video.tobytes())
        capture = cv2.VideoCapture(str(file))
        n = 0
        while n < count:
            ok, bgr = capture.read()
            if not ok:
                break
            crops[n] = bgr[:, :, ::-1]
            n += 1
        capture.release()
    if n != count:
        raise PackError(
            f"{path}: OpenCV decoded {n} of {count} crops; the pack is damaged, or this OpenCV has no H.264 "
            "decoder (install opencv-python-headless from PyPI)."
        )
    return crops


@dataclass(frozen=True)
class Split:
    """Which stored frames train and which validate. `rule` says how, for the provenance."""

    train: np.ndarray  # (N_train,) int64 stored-frame indices
    val: np.ndarray  # (N_val,) int64
    rule: dict

    def describe(self, pack: Pack) -> dict:
        """The split as recorded in a model's provenance."""
        val_clips = sorted({pack.clips[c].name for c in np.unique(pack.clip[self.val])})
        return {**self.rule, "train_frames": len(self.train), "val_frames": len(self.val), "val_clips": val_clips}


def split_pack(pack: Pack, val_fraction: float | None = None) -> Split:
    """Validation by clip: the last round(C * fraction) clips (at least one), default fraction 0.1. A single clip
    is split in time instead: its last `fraction` (default 0.2) of frames validate, the first part trains."""
    if len(pack.clips) == 1:
        fraction = 0.2 if val_fraction is None else val_fraction
        cut = int(round(len(pack) * (1 - fraction)))
        if not 0 < cut < len(pack):
            raise PackError(f"--val-fraction {fraction}: leaves no frames to train on or none to validate on.")
        frames = np.arange(len(pack))
        rule = {"by": "time", "clip": pack.clips[0].name, "val_from_frame": int(pack.frame[cut])}
        return Split(frames[:cut], frames[cut:], rule)
    fraction = 0.1 if val_fraction is None else val_fraction
    num_val = max(1, int(round(len(pack.clips) * fraction)))
    if num_val >= len(pack.clips):
        raise PackError(f"--val-fraction {fraction}: leaves no clip to train on.")
    val_clips = np.arange(len(pack.clips) - num_val, len(pack.clips))
    is_val = np.isin(pack.clip, val_clips)
    return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), {"by": "clip", "fraction": fraction})
