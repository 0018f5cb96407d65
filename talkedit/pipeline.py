"""`dub`: the whole edit, from a user's files to a finished video. Reports progress through a callback, never prints.

check inputs (cheap first) -> fetch/verify the model -> preprocess (see analysis.py; cached) -> speech features
-> sample the mouth of every output frame (autoregressive chains, several chains per UNet call)
-> pass 3: decode -> paste -> encode + mux the speech
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .analysis import Analysis, Progress, download_stage, no_progress, preprocess
from .errors import MediaError, TalkeditError
from .face import CROP_SIZE, paste_face
from .media import DEFAULT_CRF, VideoInfo, VideoWriter, check_output_path, iter_frames, probe_video, read_audio

if TYPE_CHECKING:
    import torch

log = logging.getLogger("talkedit")

Fit = Literal["pingpong", "loop", "hold", "trim"]
FITS: tuple[Fit, ...] = ("pingpong", "loop", "hold", "trim")


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
    crf: int = DEFAULT_CRF  # x264 quality of the output
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
    progress: Progress = no_progress,
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
    weights_path = resolve_weights_path(options.model, offline=options.offline, progress=download_stage(progress))
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
