"""`eval`: how good is a dub? Lip sync, mouth fidelity and stability, as numbers and a picture.

    video (+ speech, default its own sound) -> preprocess (cached) -> mouth opening vs speech: offset, confidence
        (+ SyncNet weights) -> LSE-C / LSE-D
        (+ reference: the original shot) -> mouth PSNR/SSIM, LMD, jitter, colour drift, outside changes, chain jump
    -> flags (frozen mouth, no sync, offset, changes outside the mouth) -> table / JSON / report PNG

The reconstruction protocol with its baselines is `holdout.py`. Reports progress through a callback, never prints.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .analysis import Analysis, Progress, no_progress, preprocess
from .errors import MediaError, TalkeditError
from .metrics import ReferenceScores, score_against
from .sync import SyncResult, av_sync, mouth_opening, mouth_points, speech_bands

SYNC_WEAK = 2.0  # confidence below this: the mouth does not follow the speech better than unrelated speech does
OFFSET_FLAG = 3  # frames: a larger offset with a confident peak is reported as out of sync
FROZEN_MOTION = 0.3  # crop px: frame-to-frame opening change (high-passed std) below this is a frozen mouth
FROZEN_RATIO = 0.3  # ... or below this share of the reference's mouth motion
OUTSIDE_FLAG = 0.01  # share of frames changed away from the mouth
CLOSED_QUANTILE = 0.2  # the original's mouth this closed or more counts as closed ...
OPEN_IN_SILENCE = 1.0  # ... and a silent dub whose mean opening exceeds that by this many crop px is flagged


@dataclass
class Evaluation:
    video: Path
    speech: str  # the speech file, or "own audio"
    frames: int
    fps: float
    sync: SyncResult | None
    lse: dict | None  # {"lse_c", "lse_d", "offset"} with SyncNet weights
    lse_note: str | None  # why LSE was not computed
    reference: ReferenceScores | None
    mouth_motion: float  # std of the high-passed mouth opening, crop px
    mean_opening: float  # crop px (the silence case: near the original's closed mouth)
    silent: bool = False  # the speech is silence: there is nothing to follow, and the mouth should stay closed
    flags: list[str] = field(default_factory=list)
    # For the report: (T,) curves and a few crops.
    opening: np.ndarray | None = None
    reference_opening: np.ndarray | None = None
    envelope: np.ndarray | None = None
    strip: np.ndarray | None = None

    def to_json(self) -> dict:
        sync = None
        if self.sync is not None:
            sync = {"offset": self.sync.offset, "confidence": round(self.sync.confidence, 3),
                    "frames": self.sync.frames,
                    "curve": [round(float(c), 4) for c in self.sync.curve]}  # fmt: skip
        reference = None
        if self.reference is not None:
            reference = {k: (None if v is None else "inf" if v == math.inf else round(v, 4) if isinstance(v, float)
                             else v) for k, v in asdict(self.reference).items()}  # fmt: skip
        return {"video": str(self.video), "speech": self.speech, "frames": self.frames, "fps": self.fps,
                "sync": sync, "lse": self.lse, "lse_note": self.lse_note, "reference": reference,
                "mouth_motion": round(self.mouth_motion, 4),
                "mean_opening": round(self.mean_opening, 4), "silent": self.silent, "flags": self.flags}  # fmt: skip


def mouth_motion(opening: np.ndarray, fps: float) -> float:
    """How much a mouth moves: std of the mouth opening after removing its slow drift (crop px)."""
    from .sync import HIGHPASS_SECONDS, highpass

    tracked = np.isfinite(opening)
    if tracked.sum() < 3:
        return 0.0
    index = np.arange(len(opening))
    filled = np.interp(index, index[tracked], opening[tracked])
    return float(highpass(filled, max(1, round(HIGHPASS_SECONDS * fps)) | 1)[tracked].std())


def evaluate(
    video: str | os.PathLike,
    speech: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    *,
    syncnet: str | os.PathLike | None = None,
    chain_starts: list[int] | None = None,
    chain_seconds: float | None = None,
    overlap: int | None = None,
    face: str | None = None,
    analysis_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: Progress = no_progress,
    allow_silence: bool = False,
) -> Evaluation:
    """Score `video` against `speech` (default: the video's own sound) and, given one, against the original shot.

    `syncnet`: a syncnet_v2.model for LSE-C/D (default: the cached `syncnet` entry when installed). `chain_starts`:
    the dub's chain starts when known (default: planned again as `dub` plans them, from the speech, with the
    `chain_seconds` and `overlap` the dub was made with; None: dub's defaults).
    """
    from .audio import SILENCE_PEAK, check_speech
    from .media import decode_speech, probe_video, read_audio, stat_or_none

    video = Path(video)
    for path, what in ((video, "video"), (speech, "speech"), (reference, "reference video")):
        if path is not None and stat_or_none(path) is None:
            raise MediaError(f"{path}: no such file; check the {what} path.")
    info = probe_video(video)
    ref_info = probe_video(reference) if reference is not None else None
    syncnet_path, lse_note = syncnet_weights(syncnet)
    with tempfile.TemporaryDirectory(prefix="talkedit-eval-") as scratch:
        source = Path(speech) if speech is not None else video
        wav = read_audio(decode_speech(source, Path(scratch) / "speech.wav"))
    check_speech(wav, source, allow_silence=allow_silence)
    silent = float(np.abs(wav).max(initial=0.0)) < SILENCE_PEAK

    analysis = preprocess(video, face=face, output_dir=analysis_dir, offline=offline, progress=progress)
    fps = float(info.fps)
    frames = analysis.frame_count
    points = mouth_points(analysis.landmarks, analysis.matrices)
    opening = mouth_opening(points)
    bands = speech_bands(wav, frames, info.fps)
    sync = av_sync(opening, bands, info.fps)
    result = Evaluation(
        video=video, speech=str(speech) if speech is not None else "own audio", frames=frames, fps=fps, sync=sync,
        lse=None, lse_note=lse_note, reference=None, mouth_motion=mouth_motion(opening, fps),
        mean_opening=float(np.nanmean(opening)) if np.isfinite(opening).any() else 0.0, opening=opening,
        envelope=bands.mean(axis=1), silent=silent,
    )  # fmt: skip
    if syncnet_path is not None:
        result.lse = _lse(analysis, wav, syncnet_path, progress)

    crops = np.asarray(analysis.crops)
    if ref_info is not None:
        ref = preprocess(reference, face=face, output_dir=analysis_dir, offline=offline, progress=progress)
        same_picture = (ref_info.width, ref_info.height, ref_info.fps) == (info.width, info.height, info.fps)
        if ref.frame_count < frames or not same_picture:
            raise TalkeditError(
                f"{reference}: {ref.frame_count} frames of {ref_info.width}x{ref_info.height} at "
                f"{float(ref_info.fps):g} fps, but {video} has {frames} of {info.width}x{info.height} at {fps:g}; a "
                "reference must be the original of this very shot, at least as long (a dub longer than its video "
                "loops it: compare only the dub of a speech no longer than the video)."
            )
        if chain_starts is None:
            chain_starts = _planned_chain_starts(ref.track[:frames], wav, info.fps, chain_seconds, overlap)
        result.reference, crops = score_against(analysis, ref, chain_starts, progress)
        result.reference_opening = mouth_opening(mouth_points(ref.landmarks[:frames], ref.matrices[:frames]))
        result.strip = _strip(crops, np.asarray(ref.crops[:frames]), ref.tracked[:frames])
    else:
        result.strip = _strip(crops, None, analysis.tracked)
    result.flags = flags(result)
    return result


def syncnet_weights(given: str | os.PathLike | None) -> tuple[Path | None, str | None]:
    """The SyncNet file to use (`given`, or the verified cached `syncnet` entry), or None and why not."""
    if given is not None:
        if not Path(given).is_file():
            raise TalkeditError(f"{given}: no such file; give syncnet_v2.model, or leave out --syncnet.")
        return Path(given), None
    from .download import check_cached
    from .manifest import read_manifest

    _, entries = read_manifest()
    entry = entries.get("syncnet")
    if entry is None:
        return None, "no syncnet entry in weights.toml"
    status = check_cached(entry)
    if status.valid:
        return status.path, None
    return None, "SyncNet weights not installed: see `talkedit download-weights syncnet`"


def _lse(analysis: Analysis, wav: np.ndarray, path: Path, progress: Progress) -> dict:
    """LSE-C/D of the tracked face at 25 fps (nearest frames), with syncnet_python's framing."""
    from .media import iter_frames
    from .syncnet import CROP, FPS, face_boxes, face_crop, load_syncnet, lse

    model = load_syncnet(path)
    fps = float(analysis.video.fps)
    count = int(analysis.frame_count / fps * FPS)
    picks = np.minimum(np.round(np.arange(count) * fps / FPS).astype(int), analysis.frame_count - 1)
    tracked = analysis.tracked
    landmarks = analysis.landmarks.copy()
    index = np.arange(len(landmarks))
    if not tracked.all():  # bridge untracked frames (syncnet_python scores only tracked stretches; we score all)
        flat = landmarks.reshape(len(landmarks), -1)
        for c in range(flat.shape[1]):
            flat[:, c] = np.interp(index, index[tracked], flat[tracked, c])
    boxes = face_boxes(landmarks)
    crops = np.zeros((count, CROP, CROP, 3), np.uint8)
    wanted = {}
    for n, s in enumerate(picks):
        wanted.setdefault(int(s), []).append(n)
    for i, frame in enumerate(iter_frames(analysis.video)):
        for n in wanted.get(i, []):
            crops[n] = face_crop(frame, boxes[i])
        progress("syncnet", i + 1, analysis.frame_count)
    audio = np.clip(np.round(wav * 32768), -32768, 32767).astype(np.int16)
    try:
        scores = lse(model, crops, audio)
    except ValueError as exc:
        raise TalkeditError(f"{analysis.video.path}: {exc}.") from None
    return {"lse_c": round(scores.lse_c, 4), "lse_d": round(scores.lse_d, 4), "offset": scores.offset,
            "note": "face boxes from MediaPipe landmarks, not S3FD"}  # fmt: skip


def _planned_chain_starts(
    track: np.ndarray, wav: np.ndarray, fps, chain_seconds: float | None = None, overlap: int | None = None
) -> list[int]:
    """Where `dub` starts its chains for this shot's face track (T,) and speech (the plan depends on nothing else,
    and on dub's --chain-seconds and --overlap, default when None): each chain's first frame, and with an overlap
    every frame of its crossfade."""
    from .audio import frame_windows, mel_spectrogram
    from .generate import plan_chains

    frames = len(track)
    windows = frame_windows(mel_spectrogram(wav), frames, fps)
    chains = plan_chains(np.arange(frames), track, windows.mean(axis=(1, 2)), float(fps), chain_seconds, overlap)
    return [j for c in chains for j in c.frames[: c.lead + 1]]


def _strip(crops: np.ndarray, reference: np.ndarray | None, tracked: np.ndarray, count: int = 8) -> np.ndarray:
    """Lower halves of `count` crops across the clip, the reference's row under the dub's: (64 or 128, count*128, 3)."""
    frames = np.flatnonzero(tracked)
    if not len(frames):
        return np.zeros((64, 128, 3), np.uint8)
    picks = frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)]
    rows = [np.concatenate([np.asarray(crops[i])[64:] for i in picks], axis=1)]
    if reference is not None:
        rows.append(np.concatenate([np.asarray(reference[i])[64:] for i in picks], axis=1))
    return np.concatenate(rows, axis=0)


def flags(result: Evaluation) -> list[str]:
    """What a user should look at before publishing, one line each."""
    out = []
    ref = result.reference
    if result.silent:  # nothing to follow: only whether the mouth stays closed can be judged
        if result.reference_opening is not None and np.isfinite(result.reference_opening).any():
            closed = float(np.nanquantile(result.reference_opening, CLOSED_QUANTILE))
            if result.mean_opening > closed + OPEN_IN_SILENCE:
                out.append(f"open in silence: mean opening {result.mean_opening:.2f} crop px, the original's closed "
                           f"mouth {closed:.2f}")  # fmt: skip
        return out
    if result.mouth_motion < FROZEN_MOTION or (ref is not None and ref.motion_ratio is not None
                                               and ref.motion_ratio < FROZEN_RATIO):  # fmt: skip
        out.append(f"frozen mouth: the mouth barely moves (motion {result.mouth_motion:.2f} crop px)")
    if result.sync is None:
        out.append("no sync measure: too few frames with a face, or a mouth or speech that never changes")
    elif result.sync.confidence < SYNC_WEAK:
        out.append(f"weak sync: the mouth follows the speech no better than unrelated speech "
                   f"(confidence {result.sync.confidence:.2f} < {SYNC_WEAK})")  # fmt: skip
    elif abs(result.sync.offset) > OFFSET_FLAG:
        late = "after" if result.sync.offset > 0 else "before"
        out.append(f"offset: the sound comes {abs(result.sync.offset)} frames {late} the mouth")
    if ref is not None and ref.outside_changed > OUTSIDE_FLAG:
        out.append(f"changed outside the mouth in {ref.outside_changed:.1%} of frames")
    return out


REPORT_COLOURS = {"dub": (220, 60, 40), "reference": (40, 110, 220), "speech": (150, 150, 150),
                  "correlation": (30, 140, 60)}  # fmt: skip


def report_image(result: Evaluation) -> np.ndarray:
    """The report: mouth opening of the dub and the reference against the speech over time, the sync correlation at
    each offset, and the lower halves of crops across the clip (dub above, reference below). (H, 640, 3) RGB."""
    import cv2

    from .monitor import PLOT_W, line_panel

    seconds = np.arange(result.frames) / result.fps
    curves = {}
    if result.opening is not None:
        curves["dub"] = (seconds, result.opening)
    if result.reference_opening is not None:
        curves["reference"] = (seconds, result.reference_opening)
    if result.envelope is not None and curves:
        # The speech loudness (dB) drawn on the opening's scale.
        values = np.concatenate([v[np.isfinite(v)] for _, v in curves.values()] or [np.zeros(1)])
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 1.0)
        env = result.envelope
        scaled = lo + (env - env.min()) / max(np.ptp(env), 1e-6) * (hi - lo)
        curves["speech"] = (seconds, scaled)
    panels = [line_panel("mouth opening (crop px) and speech loudness (grey, rescaled)", curves, x_label="seconds",
                         colours=REPORT_COLOURS)]  # fmt: skip
    if result.sync is not None:
        title = (
            f"sync: fit at each audio offset; offset {result.sync.offset:+d}, confidence {result.sync.confidence:.2f}"
        )
        panels.append(line_panel(title, {"correlation": (result.sync.offsets.astype(float), result.sync.curve)},
                                 x_label="frames", colours=REPORT_COLOURS))  # fmt: skip
    if result.strip is not None:
        strip = result.strip
        width = PLOT_W
        height = max(1, round(strip.shape[0] * width / strip.shape[1]))
        panels.append(cv2.resize(strip, (width, height), interpolation=cv2.INTER_AREA))
    return np.concatenate(panels, axis=0)


def write_report(result: Evaluation, path: str | os.PathLike) -> None:
    from .monitor import write_png

    write_png(Path(path), report_image(result))
