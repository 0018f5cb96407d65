"""Orchestration of `preprocess` and `dub`. Reports progress through a callback and never prints.

preprocess (cached by the video's content):
    pass 1  decode -> landmarks of every face + a thumbnail per frame -> choose and track one face -> alignments, masks
    pass 2  decode -> aligned 128x128 crops
dub:
    check inputs -> preprocess -> speech features -> sample the mouth of every output frame (autoregressive chains,
    several chains per UNet call) -> pass 3: decode -> paste -> encode + mux the speech
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from . import __version__
from .errors import MediaError, NoFaceError, TalkeditError
from .face import CROP_SIZE, FaceChoice, alignments, crop_face, crop_mask, find_cuts, paste_face, thumbnail, track_face
from .media import VideoInfo, VideoWriter, check_output_path, iter_frames, probe_video, read_audio

if TYPE_CHECKING:
    import torch

log = logging.getLogger("talkedit")

ANALYSIS_VERSION = 1  # bump when pass 1 or 2 changes what they compute, so old caches are not reused
Fit = Literal["pingpong", "loop", "hold", "trim"]
FITS: tuple[Fit, ...] = ("pingpong", "loop", "hold", "trim")

# progress(stage, done, total): stage is "download NAME", "analyse", "crop", "generate" or "write".
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# preprocess


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
    from .weights import file_sha256

    key = json.dumps({"content": file_sha256(path), "face": asdict(choice), "version": ANALYSIS_VERSION})
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def default_analysis_root() -> Path:
    from .weights import cache_dir

    return cache_dir() / "analysis"


def landmarker_path(offline: bool | None = None, progress: Progress = _no_progress) -> Path:
    """The verified FaceLandmarker model (weights.toml entry `face-landmarker`), fetched on first use."""
    from .download import ensure
    from .weights import read_manifest

    _, entries = read_manifest()
    return ensure(entries["face-landmarker"], offline=offline, progress=_download_stage(progress))


def _download_stage(progress: Progress):
    def report(name: str, done: int, total: int | None) -> None:
        progress(f"download {name}", done, total or done)

    return report


def preprocess(
    video: str | os.PathLike,
    *,
    face: FaceChoice | str | None = None,
    output_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: Progress = _no_progress,
) -> Analysis:
    """Analyse a video (faces, track, alignments, masks, crops) and cache the result by content.

    A second call with the same file (under any name) and face choice returns the cached analysis at once. The face
    landmarker model is fetched on first use unless `offline` (default: HF_HUB_OFFLINE).
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

    from .landmarks import MediaPipeDetector

    detections, thumbs = [], []
    with MediaPipeDetector(landmarker_path(offline, progress)) as detector:
        for i, frame in enumerate(iter_frames(info)):
            detections.append(detector.detect(frame, int(i * 1000 / info.fps)))
            thumbs.append(thumbnail(frame))
            progress("analyse", i + 1, info.frame_count)
    if not detections:
        raise MediaError(f"{info.path}: no frames could be decoded; the file may be damaged.")
    points, track = track_face(detections, find_cuts(np.stack(thumbs)), choice)
    if not (track >= 0).any():
        found = sum(bool(d) for d in detections)
        hint = f"--face {choice.rank} is not among the faces found" if found else "no face was found in any frame"
        raise NoFaceError(f"{info.path}: {hint}; give a video where the speaker's face is visible.")
    matrices = alignments(points, track)
    log.info("face tracked in %d of %d frames (%d tracks)", (track >= 0).sum(), len(track), track.max() + 1)

    total = len(track)
    crops = np.zeros((total, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    masks = np.zeros((total, CROP_SIZE, CROP_SIZE), np.uint8)
    for i, frame in enumerate(iter_frames(info)):
        if i >= total:
            break
        if track[i] >= 0:
            crops[i] = crop_face(frame, matrices[i])
            masks[i] = crop_mask(points[i], matrices[i])
        progress("crop", i + 1, total)

    analysis = Analysis(info, points, track, matrices, masks, crops, directory)
    _save_analysis(analysis)
    return analysis


def _parse_face(text: str | None) -> FaceChoice:
    try:
        return FaceChoice.parse(text)
    except ValueError as exc:
        raise TalkeditError(f"--face {text!r}: {exc}; use a rank (1 = largest face) or a point 'x,y'.") from None


def _save_analysis(analysis: Analysis) -> None:
    """Write the cache atomically: a temporary folder renamed into place."""
    directory = analysis.directory
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        np.savez(tmp / "track.npz", landmarks=analysis.landmarks, track=analysis.track, matrices=analysis.matrices)
        np.save(tmp / "masks.npy", analysis.masks)
        np.save(tmp / "crops.npy", analysis.crops)
        from .media import write_image

        write_image(tmp / "preview.png", contact_sheet(analysis))
        meta = {"talkedit": __version__, "version": ANALYSIS_VERSION, "source": str(analysis.video.path)}
        (tmp / "analysis.json").write_text(json.dumps(meta))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MediaError(
            f"{directory}: cannot write the analysis cache ({exc.strerror}); use another directory."
        ) from None


def _load_analysis(directory: Path, info: VideoInfo) -> Analysis | None:
    try:
        meta = json.loads((directory / "analysis.json").read_text())
        if meta.get("version") != ANALYSIS_VERSION:
            return None
        with np.load(directory / "track.npz") as data:
            landmarks, track, matrices = data["landmarks"], data["track"], data["matrices"]
        masks = np.load(directory / "masks.npy", mmap_mode="r")
        crops = np.load(directory / "crops.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError):
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


# ---------------------------------------------------------------------------------------------------------------
# dub


@dataclass
class DubOptions:
    """How `dub` runs. None means the model's or the machine's default."""

    model: str = "default"  # a name from weights.toml ("default" = its default model) or a weights file path
    sampler: str | None = None  # "ddim" or "ddpm" (default: the model's, DDIM)
    steps: int | None = None  # sampling steps per frame (default: the model's, 50)
    seed: int = 0  # the same seed gives the same video
    device: str | None = None  # "cuda", "cpu", ... (default: CUDA when available)
    fp16: bool | None = None  # fp16 autocast (default: on CUDA only)
    face: str | None = None  # which face: rank ("2") or point ("x,y"); default the largest
    fit: Fit | None = None  # speech longer than the video: pingpong (default), loop, hold; shorter: trim
    batch: int | None = None  # chains sampled per UNet call (default: 16 on CUDA, 1 on CPU)
    crf: int = 18  # x264 quality of the output
    analysis_dir: str | None = None  # where preprocess caches (default: the talkedit cache)
    offline: bool | None = None  # never download model files (default: the HF_HUB_OFFLINE environment variable)
    preview: str | None = None  # also write a before/after strip of crops (PNG) here


@dataclass
class DubResult:
    output: Path
    frames_written: int
    frames_generated: int
    frames_passed_through: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


def source_indices(num_output: int, num_source: int, fit: Fit) -> np.ndarray:
    """Which source frame each output frame shows. Speech shorter than the video cuts it (any policy); longer speech
    plays it forward then backward (pingpong), again from the start (loop), or freezes its last frame (hold)."""
    j = np.arange(num_output)
    if num_output <= num_source:
        return j
    if fit == "trim":
        raise TalkeditError(
            "the speech is longer than the video, so --fit trim cannot keep the output as long as the speech; "
            "use --fit pingpong, loop or hold."
        )
    if fit == "loop":
        return j % num_source
    if fit == "hold" or num_source == 1:
        return np.minimum(j, num_source - 1)
    period = 2 * num_source - 2
    phase = j % period
    return np.where(phase < num_source, phase, period - phase)


def chains(src: np.ndarray, track: np.ndarray, pieces: int) -> list[list[int]]:
    """Split output frames into autoregressive chains: runs where the face is tracked and the source advances by at
    most one frame within one track. With `pieces` > 1 long runs are cut into that many chains, so several chains
    can share each UNet call. Returns lists of output-frame indices."""
    runs: list[list[int]] = []
    for j, s in enumerate(src):
        if track[s] < 0:
            continue
        if runs and runs[-1][-1] == j - 1 and abs(int(src[j - 1]) - int(s)) <= 1 and track[src[j - 1]] == track[s]:
            runs[-1].append(j)
        else:
            runs.append([j])
    if pieces <= 1:
        return runs
    total = sum(len(r) for r in runs)
    target = max(1, -(-total // pieces))
    return [run[k : k + target] for run in runs for k in range(0, len(run), target)]


def dub(
    video: str | os.PathLike,
    speech: str | os.PathLike,
    output: str | os.PathLike,
    options: DubOptions | None = None,
    progress: Progress = _no_progress,
) -> DubResult:
    """Make the face in `video` speak `speech`; write the result to `output` (H.264 + AAC).

    Inputs are checked before any model is loaded: a missing file, a file without the needed stream, a silent or empty
    speech, an output equal to an input or in an unwritable place all raise a TalkeditError and write nothing.
    """
    from .audio import SAMPLE_RATE, check_speech, frame_windows, mel_spectrogram
    from .weights import build_model, read_weights, resolve_weights_path

    options = options or DubOptions()
    started = time.perf_counter()
    stages: dict[str, float] = {}
    video, speech = Path(video), Path(speech)

    # 1. Cheap checks first.
    for path, what in ((video, "video"), (speech, "speech")):
        if not path.exists():
            raise MediaError(f"{path}: no such file; check the {what} path.")
    output = check_output_path(output, video, speech)
    info = probe_video(video)
    wav = read_audio(speech)  # probes it first: a file without sound is refused there
    check_speech(wav, speech)
    fit_choice = options.fit
    if fit_choice is not None and fit_choice not in FITS:
        raise TalkeditError(f"--fit {fit_choice!r}: choose one of {', '.join(FITS)}.")
    if fit_choice == "trim":  # the probe's frame count is an estimate; the exact check follows the analysis
        source_indices(round(len(wav) / SAMPLE_RATE * info.fps), info.frame_count + 1, "trim")
    device = _check_device(options.device)
    weights_path = resolve_weights_path(options.model, offline=options.offline, progress=_download_stage(progress))
    weights = read_weights(weights_path)
    _check_model_fits(weights.unet_config, weights_path)
    stages["check"] = time.perf_counter() - started

    # 2. Analysis (cached).
    t = time.perf_counter()
    analysis = preprocess(
        video, face=options.face, output_dir=options.analysis_dir, offline=options.offline, progress=progress
    )
    stages["analyse"] = time.perf_counter() - t

    # 3. Timeline and audio windows.
    num_output = max(1, round(len(wav) / SAMPLE_RATE * info.fps))
    fit: Fit = fit_choice or ("trim" if num_output <= analysis.frame_count else "pingpong")
    src = source_indices(num_output, analysis.frame_count, fit)
    log.info("speech %.2f s -> %d output frames from %d source frames (fit: %s)",
             len(wav) / SAMPLE_RATE, num_output, analysis.frame_count, fit)  # fmt: skip
    windows = frame_windows(mel_spectrogram(wav), num_output, info.fps)

    # 4. Sample.
    t = time.perf_counter()
    model = build_model(weights).to(device)
    batch = options.batch or (16 if device.type == "cuda" else 1)
    chain_list = chains(src, analysis.track, batch)
    log.info("model %s on %s; %d chains, %d at a time", weights_path, device, len(chain_list), batch)
    generated = _generate(model, analysis, src, windows, chain_list, batch, options, progress)
    stages["generate"] = time.perf_counter() - t

    # 5. Paste and encode.
    t = time.perf_counter()
    done = 0
    with VideoWriter(output, info.width, info.height, info.fps, audio=speech, crf=options.crf) as writer:
        for j, frame in enumerate(_frames_in_order(info, src)):
            if generated[j] is not None:
                s = src[j]
                frame = paste_face(frame, generated[j], analysis.masks[s], analysis.matrices[s])
            writer.write(frame)
            done += 1
            progress("write", done, num_output)
        if done != num_output:
            raise MediaError(f"{video}: the decoder gave {done} of {num_output} frames; the file may be damaged.")
        writer.close()
    stages["write"] = time.perf_counter() - t

    if options.preview:
        from .media import write_image

        write_image(options.preview, before_after(analysis, src, generated))
    frames_generated = sum(g is not None for g in generated)
    return DubResult(
        output=output,
        frames_written=num_output,
        frames_generated=frames_generated,
        frames_passed_through=num_output - frames_generated,
        seconds=time.perf_counter() - started,
        stage_seconds=stages,
    )


def before_after(analysis: Analysis, src: np.ndarray, generated: list, columns: int = 8) -> np.ndarray:
    """A strip of aligned crops across the output: the source above, the dubbed result below. (256, 128 n, 3) uint8."""
    frames = [j for j, g in enumerate(generated) if g is not None]
    picks = [frames[k] for k in np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)]
    if not picks:
        return np.zeros((2 * CROP_SIZE, CROP_SIZE, 3), np.uint8)
    top = np.concatenate([analysis.crops[src[j]] for j in picks], axis=1)
    bottom = np.concatenate([generated[j] for j in picks], axis=1)
    return np.concatenate([top, bottom], axis=0)


def _check_model_fits(config, path: Path) -> None:
    """The pipeline feeds 128 px crops and 4 x 256 mel windows; a model built for other inputs cannot dub."""
    from .audio import N_MELS, WINDOW_FRAMES

    wanted = (CROP_SIZE, 9, WINDOW_FRAMES, N_MELS)
    if (config.image_size, config.in_channels, config.audio_frames, config.audio_bins) != wanted:
        raise TalkeditError(
            f"{path}: this model takes {config.image_size} px crops and {config.audio_frames}x{config.audio_bins} "
            f"audio windows; dubbing needs {CROP_SIZE} px and {WINDOW_FRAMES}x{N_MELS}. Use a model made for talkedit."
        )


def _check_device(name: str | None) -> torch.device:
    """The torch device to sample on; a device that is not there is a user error, not a crash."""
    import torch

    from .weights import default_device

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TalkeditError(f"--device {name!r}: not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise TalkeditError(f"--device {name}: no such CUDA device here; use --device cpu.")
    return device


def _generate(model, analysis, src, windows, chain_list, batch, options, progress) -> list[np.ndarray | None]:
    """Run the chains, `batch` at a time, one frame of each per UNet call. Returns per output frame a (128, 128, 3)
    uint8 crop, or None where the frame passes through unchanged."""
    import torch

    from .diffusion import sample_frames

    def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1

    generated: list[np.ndarray | None] = [None] * len(src)
    total = sum(len(c) for c in chain_list)
    generator = torch.Generator().manual_seed(options.seed)
    pending = list(chain_list)
    active: list[dict] = []
    done = 0
    while pending or active:
        while pending and len(active) < batch:
            active.append({"frames": pending.pop(0), "pos": 0, "identity": None, "previous": None})
        targets = [c["frames"][c["pos"]] for c in active]
        sources = [src[j] for j in targets]
        crops = [analysis.crops[s] for s in sources]
        # The chain's first frame conditions on its own original (spec §6); later frames on generated ones.
        previous = [c["previous"] if c["previous"] is not None else crops[k] for k, c in enumerate(active)]
        identity = [c["identity"] if c["identity"] is not None else crops[k] for k, c in enumerate(active)]
        out = sample_frames(
            model,
            to_tensor(crops),
            torch.from_numpy(np.stack([analysis.masks[s] for s in sources])).float()[:, None],
            to_tensor(previous),
            to_tensor(identity),
            torch.from_numpy(windows[targets]),
            sampler=options.sampler,
            steps=options.steps,
            generator=generator,
            fp16=options.fp16,
        )
        # Quantise to uint8 as the official code does by saving PNGs.
        images = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for k, c in enumerate(active):
            generated[targets[k]] = images[k]
            c["previous"] = images[k]
            if c["identity"] is None:
                c["identity"] = images[k]
            c["pos"] += 1
        done += len(active)
        progress("generate", done, total)
        active = [c for c in active if c["pos"] < len(c["frames"])]
    return generated


def _frames_in_order(info: VideoInfo, src: np.ndarray) -> Iterator[np.ndarray]:
    """Yield source frames in the order `src` lists them, decoding forward runs as a stream. Backward runs (pingpong)
    are decoded in chunks that fit in memory, each chunk yielded in reverse."""
    frame_bytes = info.width * info.height * 3
    chunk = max(8, (256 << 20) // frame_bytes)  # ~256 MB of frames at most
    j = 0
    while j < len(src):
        # The run of output frames that walk backwards from src[j].
        k = j
        while k + 1 < len(src) and src[k + 1] == src[k] - 1:
            k += 1
        if k > j:
            for start in range(j, k + 1, chunk):
                stop = min(start + chunk, k + 1)
                hi, lo = src[start], src[stop - 1]
                frames = []
                for n, frame in enumerate(iter_frames(info, start=lo)):
                    frames.append(frame.copy())
                    if n >= hi - lo:
                        break
                yield from reversed(frames)
            j = k + 1
            continue
        # A forward run (repeats allowed: hold), streamed.
        k = j
        while k + 1 < len(src) and 0 <= src[k + 1] - src[k] <= 1:
            k += 1
        decoder = iter_frames(info, start=src[j])
        frame = next(decoder, None)
        if frame is None:
            return
        current = src[j]
        for n in range(j, k + 1):
            while current < src[n]:
                frame = next(decoder, None)
                if frame is None:
                    return
                current += 1
            yield frame
        decoder.close()
        j = k + 1
