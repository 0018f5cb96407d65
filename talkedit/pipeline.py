"""`dub`: the whole edit, from a user's files to a finished video. Reports progress through a callback, never prints.

check inputs (cheap first) -> fetch/verify the model -> preprocess (see analysis.py; cached) -> speech features
-> sample the mouth of every output frame (autoregressive chains, several chains per UNet call), on a thread of its own
-> beside it, in output order as the crops come: decode (the source's own Y'CbCr) -> paste the mouth -> encode + mux
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .analysis import Analysis, Progress, download_stage, no_progress, preprocess
from .errors import MediaError, TalkeditError
from .face import CROP_SIZE, paste_face_yuv
from .generate import generate_chains, plan_chains
from .media import (
    DEFAULT_CRF,
    VideoInfo,
    VideoWriter,
    YUVFrame,
    check_image_path,
    check_output_path,
    decode_speech,
    iter_yuv_frames,
    probe_video,
    read_audio,
    stat_or_none,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("talkedit")

Fit = Literal["pingpong", "loop", "hold", "trim"]
FITS: tuple[Fit, ...] = ("pingpong", "loop", "hold", "trim")
# Write the video while the mouths are generated (False: after). Even on a 2-core CPU, where torch and x264 share the
# cores, beside was faster: benchmarks/dub.py --seconds 20 (tiny model) took 258 s against 277 s one after the other.
WRITE_BESIDE_GENERATION = True
# On CUDA, replay the UNet's calls from CUDA graphs (talkedit.cudagraph), against the launch overhead of small batches.
# Off until a GPU run has measured it: benchmarks/dub.py --cuda-graphs yes|no and benchmarks/sampler.py --cuda-graphs.
CUDA_GRAPHS = False
# Chains sampled per UNet call by default. On a CPU, 2 chains per call cost less per frame than 1, 3 or 4 (2-core Xeon
# with AMX, reference UNet, bf16: 0.082 against 0.108 s per frame and step at 1; fp32: 0.213 against 0.222).
CUDA_BATCH, CPU_BATCH = 16, 2


@dataclass
class DubOptions:
    """How `dub` runs. None means the model's or the machine's default."""

    model: str = "default"  # a name from weights.toml ("default" = its default model) or a weights file path
    sampler: str | None = None  # "ddim" or "ddpm" (default: the model's, DDIM)
    steps: int | None = None  # sampling steps per frame (default: the model's, 50)
    seed: int = 0  # the same seed gives the same video
    device: str | None = None  # "cuda", "cpu", ... (default: CUDA when available)
    precision: str = "auto"  # the UNet's: auto (fp16 on CUDA, bf16 on a CPU with AMX, else fp32), fp16, bf16, fp32
    face: str | None = None  # which face: rank ("2") or point ("x,y"); default the largest
    fit: Fit | None = None  # speech longer than the video: pingpong (default), loop, hold; shorter: trim
    batch: int | None = None  # chains sampled per UNet call (default: CUDA_BATCH or CPU_BATCH)
    chain_seconds: float | None = None  # a shot longer than twice this is split into chains this long (default 5)
    overlap: int | None = None  # frames over which a chain after a split fades in (default: generate.CHAIN_OVERLAP)
    crf: int = DEFAULT_CRF  # x264 quality of the output
    analysis_dir: str | None = None  # where preprocess caches (default: the talkedit cache)
    offline: bool | None = None  # never download model files (default: the HF_HUB_OFFLINE environment variable)
    preview: str | None = None  # also write a before/after strip of crops (PNG) here
    guidance: float = 1.0  # classifier-free guidance on the audio (1 = off); needs a model trained with audio dropout
    allow_silence: bool = False  # accept a silent recording (eval's silence case: the mouth should stay closed)


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


def dub(
    video: str | os.PathLike,
    speech: str | os.PathLike,
    output: str | os.PathLike,
    options: DubOptions | None = None,
    progress: Progress = no_progress,
) -> DubResult:
    """Make the face in `video` speak `speech`; write the result to `output` (H.264 + AAC).

    Inputs are checked before any model is loaded: a missing file, a file without the needed stream, a silent or empty
    speech, an output equal to an input, in an unwritable place or of a container that cannot hold H.264 + AAC all
    raise a TalkeditError and write nothing.
    """
    with tempfile.TemporaryDirectory(prefix="talkedit-") as scratch:
        return _dub(Path(video), Path(speech), output, options or DubOptions(), progress, Path(scratch))


def _dub(video: Path, speech: Path, output, options: DubOptions, progress: Progress, scratch: Path) -> DubResult:
    from .audio import SAMPLE_RATE, check_speech, frame_windows, mel_spectrogram
    from .diffusion import PRECISIONS, sampling_model
    from .weights import build_model, read_weights, resolve_weights_path

    started = time.perf_counter()
    stages: dict[str, float] = {}

    # 1. Cheap checks first.
    for path, what in ((video, "video"), (speech, "speech")):
        if stat_or_none(path) is None:
            raise MediaError(f"{path}: no such file; check the {what} path.")
    output = check_output_path(output, video, speech)
    if options.preview:
        check_image_path(options.preview, output, video, speech)
    if options.steps is not None and options.steps < 1:
        raise TalkeditError(f"--steps {options.steps}: sampling needs at least 1 step per frame.")
    if options.sampler is not None and options.sampler not in ("ddim", "ddpm"):
        raise TalkeditError(f"--sampler {options.sampler!r}: choose ddim or ddpm.")
    if options.precision not in PRECISIONS:
        raise TalkeditError(f"--precision {options.precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if options.batch is not None and options.batch < 1:
        raise TalkeditError(f"--batch {options.batch}: at least 1 chain per call.")
    if options.chain_seconds is not None and not options.chain_seconds > 0:
        raise TalkeditError(f"--chain-seconds {options.chain_seconds}: give a length above 0 s.")
    if options.overlap is not None and options.overlap < 0:
        raise TalkeditError(f"--overlap {options.overlap}: give 0 frames or more.")
    info = probe_video(video)
    # The speech is decoded once, on its file's timeline: the features and the muxed sound are the same samples.
    speech_wav = decode_speech(speech, scratch / "speech.wav")
    wav = read_audio(speech_wav)
    check_speech(wav, speech, allow_silence=options.allow_silence)
    fit_choice = options.fit
    if fit_choice is not None and fit_choice not in FITS:
        raise TalkeditError(f"--fit {fit_choice!r}: choose one of {', '.join(FITS)}.")
    if fit_choice == "trim":  # the probe's frame count is an estimate; the exact check follows the analysis
        source_indices(round(len(wav) / SAMPLE_RATE * info.fps), info.frame_count + 1, "trim")
    device = _check_device(options.device)
    weights_path = resolve_weights_path(options.model, offline=options.offline, progress=download_stage(progress))
    weights = read_weights(weights_path)
    _check_model_fits(weights.unet_config, weights_path)
    if options.guidance != 1.0 and not weights.provenance.get("recipe", {}).get("audio_dropout"):
        raise TalkeditError(
            f"--guidance {options.guidance}: {weights_path} was not trained with audio dropout, so it has no "
            "prediction without audio to guide from; use --guidance 1, or a model made by `talkedit train`."
        )
    stages["check"] = time.perf_counter() - started

    # 2. Analysis (cached).
    t = time.perf_counter()
    analysis = preprocess(
        video, face=options.face, output_dir=options.analysis_dir, offline=options.offline, progress=progress
    )
    stages["analyse"] = time.perf_counter() - t
    if info.lead_frames:
        log.info("the video starts %.3f s into its file: its first frame is repeated %d times to keep its timeline",
                 info.start, info.lead_frames)  # fmt: skip

    # 3. Timeline and audio windows.
    t = time.perf_counter()
    num_output = max(1, round(len(wav) / SAMPLE_RATE * info.fps))
    fit: Fit = fit_choice or ("trim" if num_output <= analysis.frame_count else "pingpong")
    src = source_indices(num_output, analysis.frame_count, fit)
    log.info("speech %.2f s -> %d output frames from %d source frames (fit: %s)",
             len(wav) / SAMPLE_RATE, num_output, analysis.frame_count, fit)  # fmt: skip
    windows = frame_windows(mel_spectrogram(wav), num_output, info.fps)
    stages["speech"] = time.perf_counter() - t

    # 4. Sample the mouths on a second thread, while (5.) this one decodes the source, pastes each mouth as it comes in
    # the source's own Y'CbCr codes, and encodes, in output order: decoding and x264 run while the UNet samples. The
    # frames are the same as one stage after the other. Writing stays on the main thread, where a signal lands, so
    # an interruption removes the partial file; the generation stops at its next step.
    model = sampling_model(build_model(weights), device, options.precision)  # half on CUDA, channels-last on a CPU
    if CUDA_GRAPHS and device.type == "cuda":
        from .cudagraph import GraphedUNet

        model = GraphedUNet(model)
    batch = options.batch or (CUDA_BATCH if device.type == "cuda" else CPU_BATCH)
    chain_list = plan_chains(src, analysis.track, windows.mean(axis=(1, 2)), float(info.fps), options.chain_seconds,
                             options.overlap)  # fmt: skip
    log.info("model %s on %s; %d chains, up to %d at a time", weights_path, device, len(chain_list), batch)
    if not chain_list:
        log.warning("no frame has a tracked face: the video is written with its picture unchanged")
    generated = GeneratedCrops(scratch / "generated.npy", num_output, [j for c in chain_list for j in c.frames])
    generate = partial(generate_chains, model, analysis.crops, analysis.masks, src, windows, chain_list, batch,
                       generated, sampler=options.sampler, steps=options.steps, seed=options.seed,
                       precision=options.precision, guidance=options.guidance, progress=progress,
                       step_callback=generated.check)  # fmt: skip
    generation = _GenerateThread(generate, generated)
    generation.start()
    try:
        if not WRITE_BESIDE_GENERATION:
            generation.join()
            if generation.error is not None:
                raise generation.error
        t = time.perf_counter()
        _write(output, info, src, analysis, generated, speech_wav, options.crf, progress, generation)
    except GeneratedCrops.Stopped:
        generation.join()
        raise generation.error from None
    finally:
        generated.stop()  # on an error or an interruption here, the generation ends at its next step
        generation.join()
    stages["generate"] = generation.seconds
    stages["write"] = time.perf_counter() - t  # to the finished file (from the generation's start, when beside it)
    stages["write waiting"] = generated.waited  # of which the writer waited for crops: then the generation bounds it

    if options.preview:
        from .media import write_image

        write_image(options.preview, before_after(analysis, src, generated))
    return DubResult(
        output=output,
        frames_written=num_output,
        frames_generated=generated.count,
        frames_passed_through=num_output - generated.count,
        seconds=time.perf_counter() - started,
        stage_seconds=stages,
    )


def _write(output, info: VideoInfo, src: np.ndarray, analysis: Analysis, generated: GeneratedCrops, speech_wav: Path,
           crf: int, progress: Progress, generation: _GenerateThread) -> None:  # fmt: skip
    """Decode the source frames `src` lists, paste each one's generated mouth as it comes, encode and mux the speech."""
    writer = VideoWriter(
        output, info.width, info.height, info.fps, audio=speech_wav, crf=crf, colour=info.colour, sar=info.sar
    )
    done = 0
    with writer, closing(_frames_in_order(info, src)) as frames:
        for j, frame in enumerate(frames):
            if (crop := generated.wait(j)) is not None:
                s = src[j]
                frame = paste_face_yuv(
                    frame, crop, analysis.masks[s], analysis.matrices[s], info.matrix, info.full_range
                )
            writer.write(frame)
            done += 1
            progress("write", done, len(src))
        if done != len(src):
            raise MediaError(f"{info.path}: the decoder gave {done} of {len(src)} frames; the file may be damaged.")
        generation.join()  # every crop is in; the generation is only returning
        if generation.error is not None:
            raise generation.error
        writer.close()


class _GenerateThread(threading.Thread):
    """Runs the generation beside the writer. An error is kept for the writer's thread to raise, and stops the writer
    (whose next `wait` then raises GeneratedCrops.Stopped)."""

    def __init__(self, generate, generated: GeneratedCrops) -> None:
        super().__init__(name="talkedit-generate", daemon=True)
        self.generate, self.generated = generate, generated
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        t = time.perf_counter()
        try:
            self.generate()
        except GeneratedCrops.Stopped:
            pass  # the writer stopped it, and reports why
        except BaseException as exc:  # handed to the writer's thread, which raises it
            self.error = exc
            self.generated.stop()
        self.seconds = time.perf_counter() - t


class GeneratedCrops:
    """The generated mouth crops of every output frame, kept on disk (a memory-mapped array in the scratch folder),
    so that memory stays bounded however long the speech is. Indexing gives a (128, 128, 3) uint8 crop or None.

    Written by the generation and read by the writer thread: `wait(j)` blocks until crop j is there, or returns None
    at once for a frame no chain covers (`expected`). `stop()` ends both sides: each then raises `Stopped`.
    """

    class Stopped(Exception):
        """The other side of a dub failed or was interrupted."""

    def __init__(self, path: Path, num_output: int, expected: list[int] | None = None) -> None:
        self.path, self.num_output = path, num_output
        self.crops: np.ndarray | None = None  # created on the first write: a dub without a face needs no file
        self.done = np.zeros(num_output, bool)
        self.expected = np.zeros(num_output, bool)
        self.expected[expected if expected is not None else slice(None)] = True
        self.stopped = False
        self.waited = 0.0  # seconds `wait` spent waiting
        self._changed = threading.Condition()

    def __setitem__(self, j: int, crop: np.ndarray) -> None:
        with self._changed:
            if self.stopped:
                raise self.Stopped
            if self.crops is None:
                self.crops = self._create()
            self.crops[j] = crop
            self.done[j] = True
            self._changed.notify_all()

    def __getitem__(self, j: int) -> np.ndarray | None:
        return np.asarray(self.crops[j]) if self.done[j] else None

    def wait(self, j: int) -> np.ndarray | None:
        """Crop j once it has been generated; None for a frame without a face."""
        with self._changed:
            if self.expected[j] and not self.done[j]:
                t = time.perf_counter()
                while not self.done[j] and not self.stopped:
                    self._changed.wait()
                self.waited += time.perf_counter() - t
            if self.stopped:
                raise self.Stopped
            return self[j]

    def check(self, *_) -> None:
        """Raise Stopped if the dub has been stopped (the generation calls this at every sampling step)."""
        if self.stopped:
            raise self.Stopped

    def stop(self) -> None:
        with self._changed:
            self.stopped = True
            self._changed.notify_all()

    def _create(self) -> np.ndarray:
        """The memory-mapped file, its blocks reserved at once: on a full disk a write to the map would otherwise kill
        the process (SIGBUS) half-way through the dub."""
        shape = (self.num_output, CROP_SIZE, CROP_SIZE, 3)
        try:
            crops = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8, shape=shape)
            if hasattr(os, "posix_fallocate"):
                with open(self.path, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            raise MediaError(
                f"{self.path.parent}: no room for the generated crops ({exc.strerror or exc}, "
                f"{np.prod(shape) / 1e6:.0f} MB); free some space there or point TMPDIR at a larger disk."
            ) from None
        return crops

    def __len__(self) -> int:
        return self.num_output

    @property
    def count(self) -> int:
        return int(self.done.sum())


def before_after(analysis: Analysis, src: np.ndarray, generated: list, columns: int = 8) -> np.ndarray:
    """A strip of aligned crops across the output: the source above, the dubbed result below. (256, 128 n, 3) uint8."""
    frames = [j for j in range(len(generated)) if generated[j] is not None]
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
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ...: the sampler and its autocast know CPU and CUDA
        raise TalkeditError(f"--device {name}: talkedit runs on cpu or cuda only; use one of those.")
    return device


def _frames_in_order(info: VideoInfo, src: np.ndarray) -> Iterator[YUVFrame]:
    """Yield source frames (in the source's Y'CbCr codes) in the order `src` lists them. Forward runs are streamed,
    each from a seek to its first frame; backward runs (pingpong) are decoded once each, in chunks that fit in
    memory, every chunk yielded in reverse."""
    frame_bytes = YUVFrame.nbytes(info.height, info.width)
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
                for n, frame in enumerate(iter_yuv_frames(info, start=lo)):
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
        decoder = iter_yuv_frames(info, start=src[j])
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
