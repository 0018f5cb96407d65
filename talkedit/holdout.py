"""`eval --holdout`: the reconstruction protocol. A clip with its own speech is split in time:

    head (the first part)  -> optionally fine-tune the model on it (`talkedit train`)
    tail (the last part)   -> dub it with its own speech, with unrelated speech and with silence; score against itself

Each dub is printed beside three baselines that need no model, so that a figure means something:
    original       the tail itself: perfect reference scores, and the sync an honest video gets
    frozen mouth   the tail with its first mouth pasted into every frame: no motion at all
    other moment   the tail with the real mouth of the head pasted in, in order: this person's own lips, moving,
                   but saying something else (sync should be weak; fidelity that of a plausible wrong mouth)

The tail is re-encoded nearly losslessly into the work folder and is the reference of every case.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .analysis import Progress, download_stage, no_progress, preprocess
from .errors import TalkeditError
from .evaluate import Evaluation, evaluate, syncnet_weights
from .train import TrainOptions

log = logging.getLogger("talkedit")

TAIL_SHARE = 0.4  # default tail: this share of the clip ...
MIN_TAIL_SECONDS = 2.0  # ... but at least this long
MIN_HEAD_SECONDS = 1.0
CUT_CRF = 8  # x264 quality of the cut head and tail (near lossless)
CASES = ("original", "frozen mouth", "other moment", "dub", "dub, unrelated speech", "dub, silence")


@dataclass
class HoldoutOptions:
    model: str = "default"  # what `dub` uses (a name or a weights file)
    tail_seconds: float | None = None  # default: TAIL_SHARE of the clip, at least MIN_TAIL_SECONDS
    train_steps: int | None = None  # fine-tune on the head first, this many steps
    train: TrainOptions | None = None  # the fine-tune's other settings (default: `talkedit train`'s)
    unrelated: str | None = None  # speech for the unrelated case (default: the tail's own speech, reversed)
    steps: int | None = None  # sampling steps per frame (default: the model's)
    sampler: str | None = None
    device: str | None = None
    batch: int | None = None
    seed: int = 0
    syncnet: str | None = None
    face: str | None = None
    analysis_dir: str | None = None
    offline: bool | None = None
    workdir: str | None = None  # keep the cut clips and the dubs here (default: a temporary folder)


@dataclass
class HoldoutResult:
    clip: Path
    head_frames: int
    tail_frames: int
    model: str
    cases: dict[str, Evaluation] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"clip": str(self.clip), "head_frames": self.head_frames, "tail_frames": self.tail_frames,
                "model": self.model, "cases": {k: v.to_json() for k, v in self.cases.items()}}  # fmt: skip


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """16-bit mono PCM."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes())
    return path


def holdout(clip: str | os.PathLike, options: HoldoutOptions | None = None, progress: Progress = no_progress):
    """Run the protocol on `clip` (a video with its own speech). Returns a HoldoutResult."""
    options = options or HoldoutOptions()
    clip = Path(clip)
    if not clip.exists():
        raise TalkeditError(f"{clip}: no such file; give a video of the person speaking, with its own sound.")
    if options.workdir:
        Path(options.workdir).mkdir(parents=True, exist_ok=True)
        return _holdout(clip, options, progress, Path(options.workdir))
    with tempfile.TemporaryDirectory(prefix="talkedit-holdout-") as scratch:
        return _holdout(clip, options, progress, Path(scratch))


def check_model(options: HoldoutOptions, progress: Progress = no_progress) -> None:
    """Raise a WeightsError now if the protocol's model cannot be had (it is fetched if need be) or is not a talkedit
    weights file. An official .pth checkpoint is fine when fine-tuning first: training imports it."""
    from .weights import read_weights, resolve_weights_path

    path = resolve_weights_path(options.model, offline=options.offline, progress=download_stage(progress))
    if not (options.train_steps and path.suffix.lower() == ".pth"):
        read_weights(path)


def _holdout(clip: Path, options: HoldoutOptions, progress: Progress, work: Path) -> HoldoutResult:
    from .audio import SAMPLE_RATE, check_speech
    from .media import decode_speech, probe_video, read_audio
    from .pipeline import DubOptions, dub

    info = probe_video(clip)
    wav = read_audio(decode_speech(clip, work / "clip-speech.wav"))
    check_speech(wav, clip)
    if options.unrelated is not None and not Path(options.unrelated).exists():
        raise TalkeditError(f"{options.unrelated}: no such file; give a speech recording for the unrelated case.")
    # The model and SyncNet are checked before minutes of analysis and dubbing, not after.
    check_model(options, progress)
    syncnet, _ = syncnet_weights(options.syncnet)  # found (and its hash checked) once for the six cases
    analysis = preprocess(clip, face=options.face, output_dir=options.analysis_dir, offline=options.offline,
                          progress=progress)  # fmt: skip
    fps, total = float(info.fps), analysis.frame_count
    tail_seconds = options.tail_seconds or max(MIN_TAIL_SECONDS, TAIL_SHARE * total / fps)
    tail = min(total, round(tail_seconds * fps))
    head = total - tail
    if head < MIN_HEAD_SECONDS * fps or tail < MIN_TAIL_SECONDS * fps:
        raise TalkeditError(
            f"{clip}: {total / fps:.1f} s is too short to split into a head of {MIN_HEAD_SECONDS:g} s and a tail of "
            f"at least {MIN_TAIL_SECONDS:g} s; give a longer clip (or a shorter --tail)."
        )
    # Cut at the frame boundary: the speech samples of frames head ... total.
    split = round(head / fps * SAMPLE_RATE)
    tail_samples = round(tail / fps * SAMPLE_RATE)  # the sound may end before the picture: pad it with silence
    samples = _pad(wav[split:], tail_samples)
    tail_wav = write_wav(work / "tail.wav", samples, SAMPLE_RATE)
    tail_video = _cut(info, head, total, tail_wav, work / "tail.mp4", progress)

    model = options.model
    if options.train_steps:
        from dataclasses import replace

        from .train import train

        head_wav = write_wav(work / "head.wav", wav[:split], SAMPLE_RATE)
        head_video = _cut(info, 0, head, head_wav, work / "head.mp4", progress)
        settings = replace(options.train or TrainOptions(), steps=options.train_steps, init=model, seed=options.seed,
                           device=options.device, workdir=str(work / "finetune.train"))  # fmt: skip
        build = {"face": options.face, "analysis_dir": options.analysis_dir, "offline": options.offline}

        def train_progress(stage: str, done: int, total: int, note: str | None = None) -> None:
            progress(stage, done, total)  # a Progress takes no note

        tuned = train([head_video], work / "finetuned.safetensors", settings, progress=train_progress, build=build)
        if tuned.signal is not None:  # Ctrl-C or SIGTERM came during the fine-tune: end as on one anywhere else
            signal.raise_signal(tuned.signal)
        if tuned.output is None:
            raise TalkeditError(f"fine-tuning on the head of {clip} stopped early ({tuned.stopped}).")
        model = str(tuned.output)

    if options.unrelated is not None:
        other = read_audio(decode_speech(options.unrelated, work / "unrelated-source.wav"))
        check_speech(other, options.unrelated)
        unrelated = np.resize(other, len(samples))  # looped or cut to the tail's length
    else:
        unrelated = samples[::-1].copy()
    speeches = {
        "dub": tail_wav,
        "dub, unrelated speech": write_wav(work / "unrelated.wav", unrelated, SAMPLE_RATE),
        "dub, silence": write_wav(work / "silence.wav", np.zeros_like(samples), SAMPLE_RATE),
    }
    dub_options = DubOptions(model=model, sampler=options.sampler, steps=options.steps, seed=options.seed,
                             device=options.device, face=options.face, batch=options.batch, fit="trim",
                             analysis_dir=options.analysis_dir, offline=options.offline)  # fmt: skip
    videos = {"original": tail_video}
    tail_analysis = preprocess(tail_video, face=options.face, output_dir=options.analysis_dir, offline=options.offline)
    crops = np.asarray(tail_analysis.crops)
    first = int(np.flatnonzero(tail_analysis.tracked)[0])
    head_tracked = np.flatnonzero(analysis.tracked[:head])
    if not len(head_tracked):
        raise TalkeditError(f"{clip}: no face in the head of the clip, so there is no other moment to borrow.")
    head_crops = np.asarray(analysis.crops)
    videos["frozen mouth"] = _paste_mouths(tail_analysis, lambda i: np.array(crops[first]), tail_wav,
                                           work / "frozen.mp4")  # fmt: skip
    videos["other moment"] = _paste_mouths(
        tail_analysis, lambda i: np.array(head_crops[head_tracked[i % len(head_tracked)]]), tail_wav,
        work / "other.mp4",
    )  # fmt: skip
    for name, speech in speeches.items():
        options_for = DubOptions(**{**dub_options.__dict__, "allow_silence": name == "dub, silence"})
        videos[name] = dub(tail_video, speech, work / f"{name.replace(', ', '-').replace(' ', '-')}.mp4",
                           options_for, progress=progress).output  # fmt: skip

    result = HoldoutResult(clip=clip, head_frames=head, tail_frames=tail, model=model)
    for name in CASES:
        speech = speeches.get(name, tail_wav)
        result.cases[name] = evaluate(
            videos[name], speech, tail_video, syncnet=syncnet, face=options.face,
            chain_starts=None if name.startswith("dub") else [], analysis_dir=options.analysis_dir,
            offline=options.offline, progress=progress, allow_silence=name == "dub, silence",
        )  # fmt: skip
    return result


def _pad(samples: np.ndarray, length: int) -> np.ndarray:
    return np.concatenate([samples[:length], np.zeros(max(0, length - len(samples)), samples.dtype)])


def _cut(info, start: int, stop: int, audio: Path, output: Path, progress: Progress) -> Path:
    """Frames start ... stop-1 of a video, with `audio`, re-encoded nearly losslessly in its own Y'CbCr codes."""
    from .media import VideoWriter, iter_yuv_frames

    with VideoWriter(output, info.width, info.height, info.fps, audio=audio, crf=CUT_CRF, colour=info.colour,
                     sar=info.sar) as writer:  # fmt: skip
        for i, frame in enumerate(iter_yuv_frames(info, start=start)):
            if start + i >= stop:
                break
            writer.write(frame)
            progress("cut", i + 1, stop - start)
        writer.close()
    return output


def _paste_mouths(analysis, crop_of, audio: Path, output: Path) -> Path:
    """The analysed video with crop_of(i) pasted into every tracked frame i (inside its own jaw mask)."""
    from .face import paste_face_yuv
    from .media import VideoWriter, iter_yuv_frames

    info = analysis.video
    with VideoWriter(output, info.width, info.height, info.fps, audio=audio, colour=info.colour,
                     sar=info.sar) as writer:  # fmt: skip
        for i, frame in enumerate(iter_yuv_frames(info)):
            if i >= analysis.frame_count:
                break
            if analysis.tracked[i]:
                frame = paste_face_yuv(frame, crop_of(i), analysis.masks[i], analysis.matrices[i], info.matrix,
                                       info.full_range)  # fmt: skip
            writer.write(frame)
        writer.close()
    return output
