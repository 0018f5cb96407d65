"""`preprocess`: find, track and crop the face of a video, and cache the result by the video's content.

    pass 1  decode -> landmarks of every face + a thumbnail per frame -> choose and track one face -> alignments, masks
    pass 2  decode -> aligned 128x128 crops
The cache holds the track, the per-frame alignments and masks, the crops and a contact sheet (preview.png).
Reports progress through a callback and never prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import __version__
from .errors import MediaError, NoFaceError, TalkeditError
from .face import (
    CROP_SIZE,
    FaceChoice,
    alignments,
    crop_face,
    crop_mask,
    face_descriptor,
    find_cuts,
    thumbnail,
    track_face,
)
from .files import save_npy
from .media import VideoInfo, iter_frames, probe_video

log = logging.getLogger("talkedit")

ANALYSIS_VERSION = 2
MISSING_FRAMES_ALLOWED = 3  # decoded frames may fall this far short of the probe's estimate (edit lists, last GOP)

# progress(stage, done, total): stage is "download NAME", "analyse", "crop", "generate", "write", ... (the labels
# the CLI shows for them: cli.StageProgress.LABELS).
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class Analysis:
    """What pass 1 and 2 learn about a video. T = frames the decoder produces."""

    video: VideoInfo
    landmarks: np.ndarray  # (T, 478, 2) float32 frame pixels, NaN where the face is not tracked
    track: np.ndarray  # (T,) int32 track id, -1 where the face is not tracked
    matrices: np.ndarray  # (T, 2, 3) float64 frame -> crop similarity, NaN where untracked
    masks: np.ndarray  # (T, 128, 128) uint8 jaw masks, 1 = regenerate
    crops: np.ndarray  # (T, 128, 128, 3) uint8 aligned crops
    directory: Path  # where it is cached, with preview.png

    @property
    def frame_count(self) -> int:
        return len(self.track)

    @property
    def tracked(self) -> np.ndarray:
        return self.track >= 0


def content_key(path: Path, choice: FaceChoice) -> str:
    """Cache key: the file's bytes, the face choice and the analysis version (not the file's name)."""
    from .manifest import file_sha256

    key = json.dumps({"content": file_sha256(path), "face": asdict(choice), "version": ANALYSIS_VERSION})
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def default_analysis_root() -> Path:
    from .manifest import cache_dir

    return cache_dir() / "analysis"


def landmarker_path(offline: bool | None = None, progress: Progress = no_progress) -> Path:
    """The verified FaceLandmarker model (weights.toml entry `face-landmarker`), fetched on first use."""
    from .download import ensure
    from .manifest import read_manifest

    _, entries = read_manifest()
    return ensure(entries["face-landmarker"], offline=offline, progress=download_stage(progress))


def download_stage(progress: Progress) -> Callable[[str, int, int | None], None]:
    """Adapt a stage-progress callback to the download callback: downloads show as stage "download NAME"."""

    def report(name: str, done: int, total: int | None) -> None:
        progress(f"download {name}", done, total or done)

    return report


def preprocess(
    video: str | os.PathLike,
    *,
    face: FaceChoice | str | None = None,
    output_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: Progress = no_progress,
    workers: int | None = None,
) -> Analysis:
    """Analyse a video (faces, track, alignments, masks, crops) and cache the result by content.

    A second call with the same file (under any name) and face choice returns the cached analysis at once. The face
    landmarker model is fetched on first use unless `offline` (default: HF_HUB_OFFLINE). Each pass runs in `workers`
    threads on consecutive parts of the video (default: one per core, see `analysis_parts`).
    """
    info = probe_video(video)
    choice = face if isinstance(face, FaceChoice) else _parse_face(face)
    root = Path(output_dir) if output_dir is not None else default_analysis_root()
    directory = root / content_key(info.path, choice)
    log.info("%s: %dx%d, %s fps%s, about %d frames", info.path, info.width, info.height, info.fps,
             " (variable, normalised)" if info.variable_frame_rate else "", info.frame_count)  # fmt: skip
    cached = _load_analysis(directory, info)
    if cached is not None:
        log.info("analysis found in the cache: %s", directory)
        return cached

    model = landmarker_path(offline, progress)

    def find_faces(parts: list[tuple[int, int | None]]) -> list[_Faces]:
        work = partial(_find_faces, info, model)  # (start, stop, tick) -> one part's faces
        return _run_parts(parts, work, lambda done: progress("analyse", done, info.frame_count))

    parts = analysis_parts(info, workers)
    found = find_faces(parts)
    if not _joined(parts, [len(part.detections) for part in found]):
        log.warning("%s: its parts did not join up when decoded separately; analysing it in one part", info.path)
        parts = [(0, None)]
        found = find_faces(parts)
    detections = [faces for part in found for faces in part.detections]
    descriptors = [d for part in found for d in part.descriptors]
    thumbs = [t for part in found for t in part.thumbs]
    if len(detections) + MISSING_FRAMES_ALLOWED < info.frame_count:
        raise MediaError(
            f"{info.path}: only {len(detections)} of about {info.frame_count} frames could be decoded; the file may be "
            "damaged or cut short: re-encode it (e.g. `ffmpeg -i IN -c:v libx264 -crf 16 OUT.mp4`) and try again."
        )
    points, track = track_face(detections, find_cuts(np.stack(thumbs)), choice, descriptors)
    if not (track >= 0).any():
        found_any = sum(bool(d) for d in detections)
        hint = f"--face {choice.rank} is not among the faces found" if found_any else "no face was found in any frame"
        raise NoFaceError(f"{info.path}: {hint}; give a video where the speaker's face is visible.")
    # Align in display geometry (non-square pixels stretched to their shape), then map stored pixels into it.
    sar = float(info.sar)
    matrices = alignments(points * np.array([sar, 1], np.float32), track)
    matrices[:, :, 0] *= sar
    log.info("face tracked in %d of %d frames (%d tracks)", (track >= 0).sum(), len(track), track.max() + 1)

    total = len(track)
    crops = np.zeros((total, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    masks = np.zeros((total, CROP_SIZE, CROP_SIZE), np.uint8)

    def crop(start: int, stop: int | None, tick: Callable[[], None]) -> None:
        for i, frame in _frames(info, start, total if stop is None else stop):
            if track[i] >= 0:
                crops[i] = crop_face(frame, matrices[i])
                masks[i] = crop_mask(points[i], matrices[i])
            tick()

    _run_parts([part for part in parts if part[0] < total], crop, lambda done: progress("crop", done, total))

    analysis = Analysis(info, points, track, matrices, masks, crops, directory)
    _save_analysis(analysis)
    return analysis


# ---------------------------------------------------------------------------------------------------------------
# The two passes, in parts: each thread decodes its own part (a seek) and runs its own landmarker. MediaPipe and
# ffmpeg work outside the GIL, so threads scale with the cores. A landmarker that starts at a part's first frame
# finds the same landmarks there as one that has run since frame 0 (it looks for faces in every frame: tests).

MAX_WORKERS = 8
MIN_PART_FRAMES = 100  # a part costs a landmarker (about 0.5 s to open) and a seek: not worth it for fewer frames


def analysis_parts(info: VideoInfo, workers: int | None = None) -> list[tuple[int, int | None]]:
    """The consecutive parts [start, stop) the analysis splits a video into, one per worker; the last has stop None
    (to the end: the frame count is the probe's estimate). workers: default one per core, at most MAX_WORKERS. A
    video that cannot be seeked (see `VideoInfo.seekable`) is one part: each part would be decoded from frame 0."""
    if workers is None:
        workers = min(_usable_cores(), MAX_WORKERS)
    count = max(1, min(workers, info.frame_count // MIN_PART_FRAMES)) if info.seekable else 1
    starts = [round(k * info.frame_count / count) for k in range(count)]
    return list(zip(starts, [*starts[1:], None], strict=True))


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset), not all the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _frames(info: VideoInfo, start: int, stop: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) for frames start..stop-1 (to the end when stop is None); ffmpeg stops when this does."""
    with closing(iter_frames(info, start)) as frames:
        indices = range(start, sys.maxsize if stop is None else stop)
        yield from zip(indices, frames, strict=False)  # indices first: no frame is decoded past stop


class _Faces(NamedTuple):
    """What pass 1 finds in one part of a video, one entry per frame decoded."""

    detections: list[list[np.ndarray]]  # each face's (478, 2) landmarks
    descriptors: list[list[np.ndarray]]  # each face's `face_descriptor`
    thumbs: list[np.ndarray]  # the frame's `thumbnail`


def _find_faces(info: VideoInfo, model: Path, start: int, stop: int | None, tick: Callable[[], None]) -> _Faces:
    """Pass 1 on one part of the video."""
    from .landmarks import MediaPipeDetector

    sar = float(info.sar)
    detections, descriptors, thumbs = [], [], []
    with MediaPipeDetector(model) as detector:
        for i, frame in _frames(info, start, stop):
            faces = _detect(detector, frame, int(i * 1000 / info.fps), sar)
            detections.append(faces)
            descriptors.append([face_descriptor(frame, f) for f in faces])
            thumbs.append(thumbnail(frame))
            tick()
    return _Faces(detections, descriptors, thumbs)


def _joined(parts: list[tuple[int, int | None]], decoded: list[int]) -> bool:
    """Whether parts decoded separately make one run of frames: a part that ended early (the stream is shorter than
    its estimate) may only be followed by parts that found nothing."""
    short = [stop is not None and n < stop - start for (start, stop), n in zip(parts, decoded, strict=True)]
    return not any(short[k] and any(decoded[k + 1 :]) for k in range(len(parts)))


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch on one thread while the analysis runs: its work here (a few small warps per frame) gains nothing from
    more, and its threads would compete with ffmpeg's and the landmarkers' for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Cancelled(Exception):
    pass


def _run_parts(parts: list[tuple[int, int | None]], work: Callable, report: Callable[[int], None]) -> list:
    """work(start, stop, tick) for each part in its own thread, tick() once per frame done. report(frames done) is
    called from the calling thread; the first error stops the other parts and is raised. Returns the results in part
    order."""
    done = [0] * len(parts)
    cancel = threading.Event()

    def run(k: int, start: int, stop: int | None):
        def tick() -> None:
            if cancel.is_set():
                raise _Cancelled
            done[k] += 1

        return work(start, stop, tick)

    with _one_torch_thread(), ThreadPoolExecutor(len(parts), thread_name_prefix="talkedit-analysis") as pool:
        futures = [pool.submit(run, k, start, stop) for k, (start, stop) in enumerate(parts)]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                for future in finished:
                    future.result()  # the first error, raised here
                report(sum(done))
        finally:
            cancel.set()  # on an error or an interrupt, the other parts stop at their next frame
    return [future.result() for future in futures]


def _detect(detector, frame: np.ndarray, timestamp_ms: int, sar: float) -> list[np.ndarray]:
    """Landmarks in stored-pixel coordinates, detected on the frame as it is displayed (non-square pixels resized)."""
    if abs(sar - 1) < 1e-3:
        return detector.detect(frame, timestamp_ms)
    import cv2

    height, width = frame.shape[:2]
    shown = cv2.resize(frame, (max(1, round(width * sar)), height), interpolation=cv2.INTER_AREA)
    return [face / np.array([sar, 1], np.float32) for face in detector.detect(shown, timestamp_ms)]


def _parse_face(text: str | None) -> FaceChoice:
    try:
        return FaceChoice.parse(text)
    except ValueError as exc:
        raise TalkeditError(f"--face {text!r}: {exc}; use a rank (1 = largest face) or a point 'x,y'.") from None


CACHE_FILES = ("track.npz", "masks.npy", "crops.npy")


def _sweep_stale(directory: Path) -> None:
    """Remove temporary cache folders of this key left by processes that are gone (killed mid-save)."""
    for stale in directory.parent.glob(f".{directory.name}.*.tmp"):
        try:
            pid = int(stale.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # raises if no such process
            if pid != os.getpid():
                continue
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:  # alive, someone else's
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _save_analysis(analysis: Analysis) -> None:
    """Write the cache atomically: a temporary folder renamed into place. analysis.json records the frame count and
    each file's sha256, which loading checks."""
    from .manifest import file_sha256

    directory = analysis.directory
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(directory)
        tmp.mkdir()
        np.savez(tmp / "track.npz", landmarks=analysis.landmarks, track=analysis.track, matrices=analysis.matrices)
        save_npy(tmp / "masks.npy", analysis.masks)
        save_npy(tmp / "crops.npy", analysis.crops)
        from .media import write_image

        write_image(tmp / "preview.png", contact_sheet(analysis))
        hashes = {name: file_sha256(tmp / name) for name in CACHE_FILES}
        meta = {"talkedit": __version__, "version": ANALYSIS_VERSION, "source": str(analysis.video.path),
                "frames": analysis.frame_count, "sha256": hashes}  # fmt: skip
        (tmp / "analysis.json").write_text(json.dumps(meta))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except OSError as exc:
        raise MediaError(
            f"{directory}: cannot write the analysis cache ({exc.strerror or exc}); free some space or "
            "cache it elsewhere (--analysis-dir, or preprocess -o)."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # on every exit path, KeyboardInterrupt included


def _load_analysis(directory: Path, info: VideoInfo) -> Analysis | None:
    """The cached analysis, or None (then it is computed again) when it is missing, of another version, or fails any
    check: every file's sha256, the shapes, and the frame count against the probe."""
    from .manifest import file_sha256

    try:
        meta = json.loads((directory / "analysis.json").read_text())
        if not isinstance(meta, dict) or meta.get("version") != ANALYSIS_VERSION:
            return None
        hashes = meta["sha256"]
        if any(file_sha256(directory / name) != hashes[name] for name in CACHE_FILES):
            log.warning("%s: the analysis cache is damaged; analysing again", directory)
            return None
        with np.load(directory / "track.npz") as data:
            landmarks, track, matrices = data["landmarks"], data["track"], data["matrices"]
        masks = np.load(directory / "masks.npy", mmap_mode="r")
        crops = np.load(directory / "crops.npy", mmap_mode="r")
        frames = int(meta["frames"])
        shapes_ok = (
            landmarks.shape[0] == track.shape[0] == matrices.shape[0] == masks.shape[0] == crops.shape[0] == frames
            and masks.shape[1:] == (CROP_SIZE, CROP_SIZE) and crops.shape[1:] == (CROP_SIZE, CROP_SIZE, 3)
            and matrices.shape[1:] == (2, 3) and track.ndim == 1
        )  # fmt: skip
        if not shapes_ok or frames + MISSING_FRAMES_ALLOWED < info.frame_count:
            log.warning("%s: the analysis cache does not fit the video; analysing again", directory)
            return None
    except Exception:  # noqa: BLE001 - a cache that cannot be read in any way is simply recomputed
        return None
    return Analysis(info, landmarks, track, matrices, masks, crops, directory)


def contact_sheet(analysis: Analysis, columns: int = 4, rows: int = 4) -> np.ndarray:
    """A grid of aligned crops across the clip, with the jaw mask tinted red and outlined. Returns (H, W, 3) uint8."""
    tracked = np.flatnonzero(analysis.tracked)
    picks = tracked[np.linspace(0, len(tracked) - 1, min(len(tracked), columns * rows)).round().astype(int)]
    sheet = np.full((rows * CROP_SIZE, columns * CROP_SIZE, 3), 32, np.uint8)
    for n, i in enumerate(picks):
        tile = analysis.crops[i].astype(np.float32)
        mask = analysis.masks[i].astype(bool)
        tile[mask] = 0.6 * tile[mask] + 0.4 * np.array([255, 0, 0])
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        tile[edge] = [255, 64, 64]
        r, c = divmod(n, columns)
        sheet[r * CROP_SIZE : (r + 1) * CROP_SIZE, c * CROP_SIZE : (c + 1) * CROP_SIZE] = tile.round().astype(np.uint8)
    return sheet
