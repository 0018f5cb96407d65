"""The `talkedit` command line: thin commands over the library.

Exit codes: 0 done, 1 a problem with the user's input, files or model files (one red line on stderr), 2 bad usage.
Library modules (and torch) are imported inside the commands, so `talkedit --help` stays instant. Progress and messages
go to stderr; `--json` puts a machine-readable summary on stdout.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from . import __version__
from .errors import TalkeditError

app = typer.Typer(
    name="talkedit",
    help="Visual dubbing: make a talking-head video follow new speech.\n\n"
    "Exit codes: 0 done, 1 a problem with an input, output or model file, 2 a usage error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
stderr = Console(stderr=True, emoji=False)  # user paths print as given: no :emoji: codes

F = TypeVar("F", bound=Callable)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that every `with` and `finally` cleans up as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


def reports_errors(command: F) -> F:
    """Turn a TalkeditError (or an OSError no check foresaw) into one red line on stderr and its exit code, with no
    traceback; an interruption (Ctrl-C, SIGTERM, SIGHUP) into exit 128 + the signal's number, after the cleanup on the
    way out."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TalkeditError as exc:
            stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # the file system refused a path no check foresaw (a name too long for it, ...)
            where = f"{exc.filename}: " if exc.filename else ""
            reason = exc.strerror or str(exc)
            stderr.print(
                f"[bold red]error:[/] {escape(where + reason)}; check the path.", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            import signal

            signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            stderr.print(f"[bold red]interrupted[/] ({signal.Signals(signum).name})")
            raise typer.Exit(128 + signum) from None

    return wrapper  # type: ignore[return-value]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"talkedit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Visual dubbing: make a talking-head video follow new speech."""


# ---------------------------------------------------------------------------------------------------------------
# Options shared by several commands, declared once.


def _face_choice(value: str | None) -> str | None:
    """--face is checked while the command line is parsed: a bad one is a usage error (exit 2)."""
    if value is not None:
        from .face import FaceChoice

        try:
            FaceChoice.parse(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} is not above 0")
    return value


def _one_of(*choices: str) -> Callable[[str | None], str | None]:
    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


FaceOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Which face to edit: its size rank (1 = largest, the default) or a point 'x,y' in pixels.",
        callback=_face_choice,
    ),
]
AnalysisDirOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--analysis-dir", help="Where the face analysis is cached (default: in the talkedit cache)."),
]
CacheDirOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--cache-dir", help="Keep model files (and analyses) here (default: $TALKEDIT_HOME or ~/.cache/talkedit)."
    ),
]
OfflineOption = Annotated[
    bool, typer.Option("--offline", help="Never download: use only verified files already in the cache.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary; errors only.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]


def _setup(cache_dir: Path | None, quiet: bool, verbose: bool) -> None:
    """Apply the options every command shares."""
    if cache_dir is not None:
        if cache_dir.expanduser().exists() and not cache_dir.expanduser().is_dir():
            raise TalkeditError(f"--cache-dir {cache_dir}: is a file, not a folder; give a folder for the cache.")
        os.environ["TALKEDIT_HOME"] = str(cache_dir.expanduser().resolve())
    if verbose and not quiet:
        from rich.logging import RichHandler

        handler = RichHandler(console=stderr, show_path=False, show_time=False)
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)


class _NoteColumn(ProgressColumn):
    """A stage's note (training's loss and validation) on one line, cut short with … where the terminal is narrow,
    rather than squeezing the bar, the count and the ETA out of the row."""

    def render(self, task) -> Text:
        return Text(task.fields.get("note", ""), no_wrap=True, overflow="ellipsis")


class _CountColumn(ProgressColumn):
    """Done of total: frames or steps as "7/250", a download in bytes as "52.4/104.9 MB"."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.size = MofNCompleteColumn(), DownloadColumn()

    def render(self, task) -> Text:
        return (self.size if task.fields.get("bytes") else self.count).render(task)


SPEED_WINDOW_SECONDS = 3600  # the ETA's speed: the average over the last hour of updates
PLAIN_EVERY_SECONDS = 30  # where stderr is a file or a pipe: a stage's progress line at most this often


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress as plain lines, for a stderr that is a file or a pipe (`nohup ... > log`, a batch job's log): there
    rich's live bars print nothing until the end, so a run of hours said nothing for hours. Each stage gets a line
    when it starts, then at most every PLAIN_EVERY_SECONDS, and when it is done; a stage that counts again from the
    start (eval dubs a clip several times, analyses two videos) starts again:

        Training: 120/2500 (4 %), 0:05:12 elapsed, ETA 1:43:00; loss 0.0123  2.4 samples/s
    """

    def __init__(self, console: Console, clock: Callable[[], float]) -> None:
        self.console, self.clock = console, clock
        self.started: dict[str, tuple[float, int]] = {}  # stage -> (time, done) of its first update
        self.notes: dict[str, str] = {}  # stage -> its last note (None in an update keeps it, as on the bars)
        self.printed: dict[str, float] = {}  # stage -> time of its last line
        self.done: dict[str, int] = {}  # stage -> its last count
        self.finished: set[str] = set()

    def update(self, stage: str, label: str, done: int, total: int, note: str | None, in_bytes: bool) -> None:
        now = self.clock()
        if done < self.done.get(stage, 0) or (stage in self.finished and done < total):  # a new round
            for seen in (self.started, self.printed, self.done):
                seen.pop(stage, None)
            self.finished.discard(stage)
        self.done[stage] = done
        t0, done0 = self.started.setdefault(stage, (now, done))
        if note is not None:
            self.notes[stage] = note
        note = self.notes.get(stage)
        complete = total > 0 and done >= total
        due = stage not in self.printed or now - self.printed[stage] >= PLAIN_EVERY_SECONDS
        if stage in self.finished or not (due or complete):
            return
        if in_bytes:
            count = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
        else:
            count = f"{done}/{total}" + (f" ({100 * done // total} %)" if total else "")
        eta = "-"
        if done > done0 and now > t0:
            eta = _clock((total - done) * (now - t0) / (done - done0))
        line = f"{label}: {count}, {_clock(now - t0)} elapsed" + ("" if complete else f", ETA {eta}")
        self.console.print(line + (f"; {note}" if note else ""), highlight=False, markup=False, soft_wrap=True)
        self.printed[stage] = now
        if complete:
            self.finished.add(stage)


class StageProgress:
    """A rich progress bar per pipeline stage (and per download), on stderr; plain lines now and then where stderr is
    not a terminal (`plain`, by default when it is not). Silent when quiet."""

    LABELS = {
        "analyse": "Finding the face",
        "crop": "Cropping",
        "generate": "Generating the mouth",
        "write": "Writing the video",
        "pack": "Packing the clips",
        "train": "Training",
        "cut": "Cutting the clip",  # eval --holdout
        "compare": "Comparing",  # eval --reference
        "syncnet": "SyncNet crops",  # eval, LSE-C/D
    }

    def __init__(self, quiet: bool = False, plain: bool | None = None) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            _CountColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            _NoteColumn(table_column=Column(no_wrap=False)),  # wrappable, so that it is the column that gives way
            console=stderr,
            # rich estimates the speed from the updates of the last N seconds (30 by default), so updates further
            # apart (a frame at 50 steps, or a training step, on a CPU: a minute) never gave an ETA.
            speed_estimate_period=SPEED_WINDOW_SECONDS,
        )
        self.tasks: dict[str, int] = {}
        self.lock = threading.Lock()  # dub generates on one thread and writes on another
        plain = not stderr.is_terminal if plain is None else plain
        self.plain = PlainProgress(stderr, time.monotonic) if plain else None

    def __call__(self, stage: str, done: int, total: int, note: str | None = None) -> None:
        if self.quiet:
            return
        with self.lock:
            label = self.LABELS.get(stage, stage.replace("download ", "Downloading "))
            in_bytes = stage.startswith("download ")
            if self.plain is not None:
                self.plain.update(stage, label, done, total, note, in_bytes)
                return
            if not self.tasks:
                self.progress.start()  # only once there is something to show: an early error prints alone
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(label, total=total, note="", bytes=in_bytes)
            fields = {"note": note} if note is not None else {}
            self.progress.update(self.tasks[stage], completed=done, total=max(total, done), **fields)

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.tasks:
            self.progress.stop()


# ---------------------------------------------------------------------------------------------------------------
# Commands


@app.command()
@reports_errors
def dub(
    video: Annotated[Path, typer.Argument(help="Video of the person talking.")],
    speech: Annotated[Path, typer.Argument(help="The new speech: any audio file, or a video whose sound to use.")],
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Output video (default: VIDEO's name + .dubbed.mp4, here)."),
    ] = None,
    model: Annotated[str, typer.Option(help="Model name from weights.toml, or a weights file.")] = "default",
    sampler: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="ddim (fast) or ddpm (the paper's sampler) (default: the model's).", callback=_one_of("ddim", "ddpm")
        ),
    ] = None,
    steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Sampling steps per frame (default: the model's; the paper uses ddpm with 100)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same video.")] = 0,
    device: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="cuda, cuda:1, cpu, ... (default: CUDA when available)."),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="The UNet's precision: auto (fp16 on CUDA, bf16 on a CPU with AMX, else fp32), fp16, bf16 or fp32.",
            callback=_one_of("auto", "fp16", "bf16", "fp32"),
        ),
    ] = "auto",
    face: FaceOption = None,
    fit: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Speech longer than the video: pingpong (default: forward then backward), loop, or hold (freeze "
            "the last frame). Speech shorter: trim (cut the video to the speech).",
            callback=_one_of("pingpong", "loop", "hold", "trim"),
        ),
    ] = None,
    batch: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Chains sampled together (default: 16 on CUDA, 2 on CPU)."),
    ] = None,
    chain_seconds: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            min=0.04,
            help="A shot longer than twice this is split into chains of about this many seconds, each starting "
            "again from the original frame; shorter chains run more frames side by side (default 5).",
        ),
    ] = None,
    overlap: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            min=0,
            help="Frames over which each chain after a split fades in over the one before (default 3; 0 = none).",
        ),
    ] = None,
    crf: Annotated[int, typer.Option(min=0, max=51, help="x264 quality, lower is better (default 18).")] = 18,
    guidance: Annotated[
        float,
        typer.Option(
            help="Classifier-free guidance on the audio: above 1 follows the speech more strongly (1 = off; "
            "needs a model from `talkedit train`; twice the compute)."
        ),  # fmt: skip
    ] = 1.0,
    preview: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Also write a PNG strip of crops: the source above, the dubbed result below."),
    ] = None,
    analysis_dir: AnalysisDirOption = None,
    cache_dir: CacheDirOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Make the face in VIDEO speak SPEECH.

    The output is as long as the speech, with the speech as its sound track. Only the lower face changes. Model
    files are downloaded on first use (unless --offline) and verified every time.

    Example: [bold]talkedit dub input.mp4 speech.wav -o out.mp4[/]
    """
    from .pipeline import DubOptions
    from .pipeline import dub as run_dub

    _setup(cache_dir, quiet, verbose)
    if sampler is not None and sampler not in ("ddim", "ddpm"):
        raise TalkeditError(f"--sampler {sampler!r}: choose ddim or ddpm.")
    output = output or Path(f"{video.stem}.dubbed.mp4")
    options = DubOptions(
        model=model,
        sampler=sampler,
        steps=steps,
        seed=seed,
        device=device,
        precision=precision,
        face=face,
        fit=fit,
        batch=batch,
        chain_seconds=chain_seconds,
        overlap=overlap,
        crf=crf,
        analysis_dir=str(analysis_dir) if analysis_dir else None,
        offline=offline or None,
        preview=str(preview) if preview else None,
        guidance=guidance,
    )
    with StageProgress(quiet) as progress:
        result = run_dub(video, speech, output, options, progress=progress)
    if as_json:
        summary = {
            "output": str(result.output),
            "frames_written": result.frames_written,
            "frames_generated": result.frames_generated,
            "frames_passed_through": result.frames_passed_through,
            "seconds": round(result.seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()},
        }
        typer.echo(json.dumps(summary))
    if not quiet and result.frames_generated == 0:
        stderr.print(
            "[bold yellow]No face was tracked in the frames the output uses: nothing was generated, the picture is "
            "the source's.[/] Check the analysis preview (`talkedit preprocess VIDEO`).",
            highlight=False,
            soft_wrap=True,
        )
    if not quiet:
        stderr.print(
            f"[bold green]Done[/] in {result.seconds:.1f} s: {result.frames_written} frames written, "
            f"{result.frames_generated} with a generated mouth, {result.frames_passed_through} passed through.\n"
            f"Output: [bold]{escape(str(result.output))}[/]",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@reports_errors
def preprocess(
    video: Annotated[Path, typer.Argument(help="Video of the person talking.")],
    output_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output-dir", "-o", help="Cache the analysis here (default: in the talkedit cache)."),
    ] = None,
    face: FaceOption = None,
    cache_dir: CacheDirOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Find, track and crop the face in VIDEO, and cache the result for `dub`.

    Writes a contact sheet (preview.png) of aligned crops with the region that will be regenerated drawn in red.

    Example: [bold]talkedit preprocess input.mp4[/]
    """
    from .analysis import preprocess as run_preprocess

    _setup(cache_dir, quiet, verbose)
    with StageProgress(quiet) as progress:
        analysis = run_preprocess(video, face=face, output_dir=output_dir, offline=offline or None, progress=progress)
    tracked = int(analysis.tracked.sum())
    preview = analysis.directory / "preview.png"
    if as_json:
        summary = {
            "frames": analysis.frame_count,
            "frames_tracked": tracked,
            "analysis_dir": str(analysis.directory),
            "preview": str(preview),
        }
        typer.echo(json.dumps(summary))
    if not quiet:
        stderr.print(
            f"{analysis.frame_count} frames, face tracked in {tracked}.\nPreview: [bold]{escape(str(preview))}[/]",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@reports_errors
def pack(
    videos: Annotated[list[Path], typer.Argument(help="Videos with their own speech, folders of them, or .txt lists.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The pack file to write (NAME.pack).")],
    face: FaceOption = None,
    analysis_dir: AnalysisDirOption = None,
    cache_dir: CacheDirOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Make training data: preprocess each video and pack its crops, masks and speech features into one file.

    A pack is self-contained and small (about 35 MiB for 15 minutes of 25 fps footage); `talkedit train` reads it
    with nothing but torch, numpy, safetensors and OpenCV, so it can train on a machine without ffmpeg.

    Example: [bold]talkedit pack clips/ -o me.pack[/]
    """
    from .pack import build_pack

    _setup(cache_dir, quiet, verbose)
    if output.suffix != ".pack":
        raise TalkeditError(f"{output}: name the pack NAME.pack.")
    with StageProgress(quiet) as progress:
        build_pack(videos, output, face=face, analysis_dir=analysis_dir, offline=offline or None, progress=progress)
    if not quiet:
        stderr.print(f"Pack: [bold]{escape(str(output))}[/] ({output.stat().st_size / 2**20:.1f} MiB)", highlight=False)


@app.command()
@reports_errors
def train(
    inputs: Annotated[
        list[Path], typer.Argument(help="Videos with their own speech, folders of them, .txt lists, or one .pack.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The model to write (NAME.safetensors).")],
    init: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Fine-tune this model: a name from weights.toml, a talkedit weights file or an official "
            ".pth checkpoint (default: train from scratch)."
        ),  # fmt: skip
    ] = None,
    arch: Annotated[str, typer.Option(help="From scratch: dve (the paper's UNet) or small (for CPUs).")] = "dve",
    steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Optimiser steps (default: 30 passes over the data fine-tuning, 200 from scratch)."),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Global batch, split over torchrun's processes.")] = 32,
    lr: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(callback=_positive, help="Peak learning rate (default: 3e-5 fine-tuning, 1e-4 from scratch)."),
    ] = None,
    warmup: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=0, help="Warm-up steps (default: 5 % of the run, at most 500)."),
    ] = None,
    ema_decay: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0, max=1, help="EMA decay (default: 1 - 10/steps, within 0.99 .. 0.9999)."),
    ] = None,
    min_snr_gamma: Annotated[float, typer.Option(min=0, help="min-SNR-γ loss weighting; 0 = the paper's loss.")] = 5.0,
    audio_dropout: Annotated[
        float,
        typer.Option(min=0, max=1, help="Fraction of samples trained without audio, so that dub --guidance works."),
    ] = 0.1,
    previous_aug: Annotated[
        float, typer.Option(min=0, max=1, help="Fraction of previous frames warped, blurred and noised.")
    ] = 0.5,
    jitter: Annotated[
        float, typer.Option(min=0, max=1, help="Fraction of samples shifted and re-lit as a whole.")
    ] = 0.3,
    shuffle_audio: Annotated[
        bool,
        typer.Option(
            help="A control run: each sample hears another sample's audio, so the model cannot learn lip sync; "
            "its sync scores are what a model gets without following the speech."
        ),
    ] = False,
    dropout: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0, max=1, help="Dropout in the UNet's residual blocks (default: the model's, 0.1)."),
    ] = None,
    prediction: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="What the UNet learns to output: v, whose clean-image estimate does not divide by √ᾱ, or eps (the "
            "paper) (default: v from scratch, the initial model's when fine-tuning)."
        ),
    ] = None,
    ema: Annotated[
        bool, typer.Option("--ema/--no-ema", help="Write the EMA weights (default) or the raw ones.")
    ] = True,
    eval_every: Annotated[int, typer.Option(min=0, help="Validate every N steps (0: never).")] = 500,
    eval_samples: Annotated[int, typer.Option(min=1, help="Validation frames scored each time.")] = 64,
    strip_frames: Annotated[
        int, typer.Option(min=0, help="Validation mouths sampled from noise each time (the strip; 0: none).")
    ] = 6,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Save a checkpoint every N steps.")] = 500,
    time_limit: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Minutes: stop cleanly at a checkpoint before this; continue later with --resume."),
    ] = None,
    workdir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Checkpoints, metrics.jsonl, train.png and sample strips (default: OUTPUT's name + .train)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run whose checkpoint is in the work folder.")] = False,
    val_fraction: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Validation share: whole clips (default 0.1), or a single clip's last part (default 0.2)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed and data give the same model.")] = 0,
    device: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="cuda, cuda:1 or cpu (default: CUDA when available; under torchrun the local GPU)."),
    ] = None,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast on CUDA and on a CPU with AMX, else fp32), bf16 or fp32.")
    ] = "auto",
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet.")] = False,
    channels_last: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--channels-last/--no-channels-last", help="Channels-last memory format (default: on a CPU in bf16)."
        ),
    ] = None,
    face: FaceOption = None,
    analysis_dir: AnalysisDirOption = None,
    cache_dir: CacheDirOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Train a model on videos of people speaking, or fine-tune one on a clip of the person to dub.

    Each video goes through preprocess (cached) and its own sound becomes the audio the model learns to follow.
    Validation is on whole clips, or on the last part of a single clip. Ctrl-C saves a checkpoint and stops;
    --resume continues. Data-parallel on many GPUs: the same command under torchrun.

    Example: [bold]talkedit train me.mp4 -o me.safetensors --init dve-multispeaker[/]
    """
    from .train import ARCHITECTURES, Recipe, TrainOptions
    from .train import train as run_train

    _setup(cache_dir, quiet, verbose)
    if arch not in ARCHITECTURES:
        raise TalkeditError(f"--arch {arch!r}: choose {' or '.join(ARCHITECTURES)}.")
    recipe = Recipe(lr=lr, warmup=warmup, ema_decay=ema_decay, min_snr_gamma=min_snr_gamma,
                    audio_dropout=audio_dropout, previous_aug=previous_aug, jitter=jitter,
                    shuffle_audio=shuffle_audio)  # fmt: skip
    options = TrainOptions(
        steps=steps, batch=batch, recipe=recipe, arch=ARCHITECTURES[arch], init=init, dropout=dropout,
        prediction=prediction, seed=seed,
        device=device, eval_samples=eval_samples, strip_frames=strip_frames,
        precision=precision, compile=compile_model, channels_last=channels_last, eval_every=eval_every,
        checkpoint_every=checkpoint_every, time_limit=time_limit, ema=ema, val_fraction=val_fraction,
        workdir=str(workdir) if workdir else None, resume=resume,
    )  # fmt: skip
    build = {"face": face, "analysis_dir": analysis_dir, "offline": offline or None}
    rank = int(os.environ.get("RANK", "0"))
    with StageProgress(quiet or rank != 0) as progress:
        result = run_train(inputs, output, options, progress=progress, build=build)
    if rank != 0:
        return
    if as_json:
        summary = {"output": str(result.output) if result.output else None, "steps_done": result.steps_done,
                   "steps": result.steps, "stopped": result.stopped, "workdir": str(result.workdir),
                   "last_eval": result.last_eval, "seconds": round(result.seconds, 3)}  # fmt: skip
        typer.echo(json.dumps(summary))
    if result.stopped:  # said even with --quiet: the run is not finished
        stderr.print(
            f"[bold yellow]Stopped[/] ({result.stopped}) at step {result.steps_done} of {result.steps}; the checkpoint "
            f"is in {escape(str(result.workdir))}. Continue with the same command and [bold]--resume[/].",
            highlight=False,
            soft_wrap=True,
        )
        return
    if quiet:
        return
    last = result.last_eval
    scores = f" Validation error {last['val_error']:.4f}, audio-shift ratio {last['audio_ratio']:.3f}" if last else ""
    if last and "val_sampled_error" in last:
        scores += f", sampled mouths {last['val_sampled_error']:.4f}"
    scores += "." if last else ""
    stderr.print(
        f"[bold green]Done[/]: {result.steps_done} steps in {result.seconds:.0f} s.{scores}\n"
        f"Model: [bold]{escape(str(result.output))}[/]  (curves: {escape(str(result.workdir / 'train.png'))})",
        highlight=False,
        soft_wrap=True,
    )


@app.command("eval")
@reports_errors
def eval_(
    video: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="The video to judge (a dub, or any video of someone speaking)."),
    ] = None,
    speech: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="The speech the mouth should follow (default: the video's own sound)."),
    ] = None,
    reference: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="The original of the same shot: adds mouth PSNR/SSIM, LMD, jitter, drift and more."),
    ] = None,
    holdout: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Run the reconstruction protocol on this clip (with its own speech) instead."),
    ] = None,
    model: Annotated[str, typer.Option(help="With --holdout: the model to dub with.")] = "default",
    train_steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="With --holdout: fine-tune on the clip's head for this many steps first."),
    ] = None,
    train_batch: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            min=1, help="With --train-steps: the fine-tune's batch (default 32: 16-24 GB on a CPU; 4: ~3 GB)."
        ),
    ] = None,
    tail: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0.1, help="With --holdout: seconds held out at the end (default: 40 %, at least 2 s)."),
    ] = None,
    unrelated: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="With --holdout: speech for the unrelated case (default: the tail's speech reversed)."),
    ] = None,
    steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="With --holdout: sampling steps per frame (default: the model's)."),
    ] = None,
    device: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="cuda, cpu, ... (default: CUDA when available)."),
    ] = None,
    workdir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="With --holdout: keep the cut clips and the dubs here."),
    ] = None,
    syncnet: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="syncnet_v2.model for LSE-C/D (default: the installed `syncnet` entry, if any)."),
    ] = None,
    report: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write a PNG report: mouth opening vs speech, the sync curve, mouth crops."),
    ] = None,
    chain_seconds: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0.04, help="With --reference: the dub's --chain-seconds, to find its chain starts."),
    ] = None,
    overlap: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=0, help="With --reference: the dub's --overlap, to find its chain starts."),
    ] = None,
    face: FaceOption = None,
    analysis_dir: AnalysisDirOption = None,
    cache_dir: CacheDirOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Measure a dub: lip sync (offset, confidence; LSE-C/D with SyncNet weights), and with --reference the mouth's
    fidelity and stability against the original. Flags a frozen mouth, weak sync and changes outside the mouth.

    Examples: [bold]talkedit eval out.mp4 --speech speech.wav --reference input.mp4 --report report.png[/],
    [bold]talkedit eval --holdout clip.mp4 --model me.safetensors[/]
    """
    _setup(cache_dir, quiet, verbose)
    if (video is None) == (holdout is None):
        raise TalkeditError("give a VIDEO to judge, or --holdout CLIP for the reconstruction protocol (not both).")
    if report is not None:
        from .media import check_image_path

        check_image_path(report, *(p for p in (video, speech, reference, holdout) if p is not None))
    if train_batch is not None and train_steps is None:
        raise TalkeditError("--train-batch sets the fine-tune of --holdout --train-steps N: give --train-steps too.")
    offline_flag = offline or None
    with StageProgress(quiet) as progress:
        if holdout is not None:
            from .holdout import HoldoutOptions
            from .holdout import holdout as run_holdout
            from .train import TrainOptions

            options = HoldoutOptions(
                model=model, tail_seconds=tail, train_steps=train_steps,
                train=TrainOptions(batch=train_batch) if train_batch else None,
                unrelated=str(unrelated) if unrelated else None,
                steps=steps, device=device, syncnet=str(syncnet) if syncnet else None, face=face,
                analysis_dir=str(analysis_dir) if analysis_dir else None, offline=offline_flag,
                workdir=str(workdir) if workdir else None,
            )  # fmt: skip
            result = run_holdout(holdout, options, progress=progress)
            cases = result.cases
            summary = result.to_json()
        else:
            from .evaluate import evaluate

            one = evaluate(video, speech, reference, syncnet=syncnet, chain_seconds=chain_seconds, overlap=overlap,
                           face=face, analysis_dir=analysis_dir, offline=offline_flag, progress=progress)  # fmt: skip
            cases = {"video": one}
            summary = one.to_json()
    if report is not None:
        from .evaluate import write_report

        write_report(cases.get("dub", next(iter(cases.values()))), report)
    if as_json:
        typer.echo(json.dumps(summary))
    if not quiet:
        _print_scores(cases)
        if report is not None:
            stderr.print(f"Report: [bold]{escape(str(report))}[/]", highlight=False, soft_wrap=True)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _print_scores(cases: dict) -> None:
    """One row per video: sync, LSE, reference scores, then each one's flags."""
    from rich.table import Table

    table = Table(title_justify="left")
    columns = ["", "offset", "sync conf", "LSE-C", "LSE-D", "PSNR", "SSIM", "LMD", "jitter", "drift", "outside",
               "jump", "motion", "opening"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if not column else "right")
    for name, e in cases.items():
        ref, lse = e.reference, e.lse or {}
        table.add_row(
            escape(name if len(cases) > 1 else str(e.video)),
            _fmt(e.sync.offset) if e.sync else "-", _fmt(e.sync.confidence) if e.sync else "-",
            _fmt(lse.get("lse_c")), _fmt(lse.get("lse_d")),
            _fmt(ref.psnr, 1) if ref else "-", _fmt(ref.ssim, 3) if ref else "-", _fmt(ref.lmd) if ref else "-",
            _fmt(ref.jitter) if ref else "-", _fmt(ref.colour_drift, 1) if ref else "-",
            f"{ref.outside_changed:.0%}" if ref else "-", _fmt(ref.chain_jump) if ref else "-",
            _fmt(e.mouth_motion), _fmt(e.mean_opening),
        )  # fmt: skip
    Console(stderr=True, emoji=False, width=max(stderr.width, 160)).print(table)
    for name, e in cases.items():
        for flag in e.flags:
            stderr.print(f"[yellow]{escape(name)}:[/] {escape(flag)}", highlight=False, soft_wrap=True)
    notes = {e.lse_note for e in cases.values() if e.lse_note}
    for note in notes:
        stderr.print(f"LSE-C/D: {escape(note)}", highlight=False, soft_wrap=True)


@app.command("download-weights")
@reports_errors
def download_weights(
    names: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(help="Entries of weights.toml to fetch (default: what `dub` needs)."),
    ] = None,
    manifest: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Use this weights.toml instead of the one shipped with talkedit."),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show every entry and whether it is cached and valid.")] = False,
    from_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--from", help="Install a file you downloaded by hand (checked against its entry)."),
    ] = None,
    cache_dir: CacheDirOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Fetch model files into the cache and verify them (sha256 and size).

    Hub files come through huggingface_hub (HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE apply); URL files resume
    where an interrupted download stopped. A damaged cached file is fetched again.

    Examples: [bold]talkedit download-weights[/], [bold]talkedit download-weights --list[/],
    [bold]talkedit download-weights dve-multispeaker --from MultiSpeaker_Cremad_Epoch_735.zip[/]
    """
    from .download import check_cached, ensure, install_from
    from .manifest import read_manifest

    _setup(cache_dir, quiet, verbose)
    default, entries = read_manifest(manifest)
    if list_:
        _print_entries(entries, default, check_cached)
        return
    names = names or [n for n in (default, "face-landmarker") if n]
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise TalkeditError(f"unknown entry {unknown[0]!r}; known: {', '.join(sorted(entries))}.")
    if from_file is not None:
        if len(names) != 1:
            raise TalkeditError("--from installs one file: name its entry, e.g. `download-weights NAME --from FILE`.")
        path, warning = install_from(entries[names[0]], from_file)
        if warning:
            stderr.print(f"[bold yellow]WARNING:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        if not quiet:
            state = "installed (unverified: hash recorded)" if warning else "installed and verified"
            stderr.print(f"{names[0]}: {state} at {escape(str(path))}", highlight=False, soft_wrap=True)
        return
    failures = []
    with StageProgress(quiet) as progress:
        for name in names:
            try:
                path = ensure(
                    entries[name],
                    offline=offline or None,
                    progress=lambda n, done, total: progress(f"download {n}", done, total or done),
                )
            except TalkeditError as exc:
                failures.append(exc)
                continue
            if not quiet:
                stderr.print(f"{name}: verified, {escape(str(path))}", highlight=False, soft_wrap=True)
    for exc in failures[:-1]:
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    if failures:
        raise failures[-1]


def _print_entries(entries, default, check_cached) -> None:
    from rich.table import Table

    table = Table(title="weights.toml", title_justify="left")
    for column in ("name", "source", "size", "licence", "cache"):
        table.add_column(column)
    for name, entry in entries.items():
        status = check_cached(entry)
        state = {
            "valid": "[green]valid[/]" + (" (hash recorded, unverified)" if status.unverified else ""),
            "missing": "not cached",
            "damaged": "[red]damaged[/]",
            "unrecorded": "[red]unverifiable[/]",
        }[status.state]
        source = "hub" if entry.repo else "url" if entry.url else "by hand"
        size = f"{entry.size / 1e6:.1f} MB" if entry.size else "?"
        label = f"{name} (default)" if name == default else name
        table.add_row(label, source, size, entry.license, state)
    Console().print(table)


@app.command("import-weights")
@reports_errors
def import_weights(
    checkpoint: Annotated[Path, typer.Argument(help="Official checkpoint, e.g. 735_Network.pth.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The talkedit weights file to write.")],
    ema: Annotated[
        bool, typer.Option("--ema/--no-ema", help="Convert the EMA weights (the official inference uses the raw ones).")
    ] = False,
    head_channels: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Channels per attention head; 64 in the released config, 32 in the paper."),
    ] = None,
) -> None:
    """Convert an official DiffusionVideoEditing checkpoint into a talkedit weights file.

    To install the official model into the cache, prefer `talkedit download-weights dve-multispeaker --from FILE`,
    which converts it and records its hash.

    Example: [bold]talkedit import-weights 735_Network.pth -o dve-multispeaker.safetensors[/]
    """
    from .checkpoint import import_checkpoint

    written = import_checkpoint(checkpoint, output, ema=ema, head_channels=head_channels)
    params = sum(t.numel() for t in written.state_dict.values())
    kind = "EMA" if written.provenance["ema"] else "raw"
    stderr.print(
        f"Wrote [bold]{escape(str(output))}[/] ({params:,} parameters, {kind} weights from "
        f"{escape(str(written.provenance['source_file']))}, "
        f"head channels {written.unet_config.head_channels})",
        highlight=False,
        soft_wrap=True,
    )


def _one_line_paragraphs() -> None:
    """Join the hard-wrapped lines of each command's docstring, so that its help reflows to the terminal's width:
    rich markup mode keeps single line breaks (typer >= 0.13), which would break sentences mid-line."""
    for info in app.registered_commands:
        paragraphs = inspect.getdoc(info.callback).split("\n\n")
        info.callback.__doc__ = "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


_one_line_paragraphs()


def main() -> None:
    import signal

    for signum in (signal.SIGTERM, signal.SIGHUP):  # `train` puts its own SIGTERM handler in place while it trains
        signal.signal(signum, _terminate)
    app()
