"""The `talkedit` command line: thin commands over the library.

Exit codes: 0 done, 1 a problem with the user's input or files (one red line on stderr), 2 bad usage.
Library modules (and torch) are imported inside the commands, so `talkedit --help` stays instant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console

from . import __version__
from .errors import TalkeditError

app = typer.Typer(
    name="talkedit",
    help="Visual dubbing: make a talking-head video follow new speech.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
stderr = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def reports_errors(command: F) -> F:
    """Turn a TalkeditError into one red line on stderr and its exit code, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TalkeditError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

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

    Example: [bold]talkedit import-weights 735_Network.pth -o dve-multispeaker.safetensors[/]
    """
    from .weights import import_checkpoint

    written = import_checkpoint(checkpoint, output, ema=ema, head_channels=head_channels)
    params = sum(t.numel() for t in written.state_dict.values())
    kind = "EMA" if written.provenance["ema"] else "raw"
    stderr.print(
        f"Wrote [bold]{output}[/] ({params:,} parameters, {kind} weights from {written.provenance['source_file']}, "
        f"head channels {written.unet_config.head_channels})",
        highlight=False,
        soft_wrap=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# Options shared by `dub` and `preprocess`, declared once.

FaceOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--face",
        help="Which face to edit: its size rank (1 = largest, the default) or a point 'x,y' in pixels near it.",
    ),
]
AnalysisDirOption = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--analysis-dir", help="Where the face analysis is cached (default: the talkedit cache)."),
]


class StageProgress:
    """A rich progress bar per pipeline stage, on stderr."""

    LABELS = {
        "analyse": "Finding the face",
        "crop": "Cropping",
        "generate": "Generating the mouth",
        "write": "Writing the video",
    }

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=stderr,
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.tasks:
            self.progress.start()  # only once there is something to show: an early error prints alone
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage), total=total)
        self.progress.update(self.tasks[stage], completed=done, total=max(total, done))

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.tasks:
            self.progress.stop()


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
    sampler: Annotated[str, typer.Option(help="ddim (fast) or ddpm (the paper's sampler).")] = "ddim",
    steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Sampling steps per frame (default: the model's; the paper uses ddpm with 100)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same video.")] = 0,
    device: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="cuda, cuda:1, cpu, ... (default: CUDA when available)."),
    ] = None,
    fp16: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option("--fp16/--fp32", help="Half precision (default: fp16 on CUDA, fp32 on CPU)."),
    ] = None,
    face: FaceOption = None,
    fit: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Speech longer than the video: pingpong (default: forward then backward), loop, or hold (freeze "
            "the last frame). Speech shorter: trim (cut the video to the speech)."
        ),
    ] = None,
    batch: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Chains sampled together (default: 16 on CUDA, 1 on CPU)."),
    ] = None,
    crf: Annotated[int, typer.Option(min=0, max=51, help="x264 quality, lower is better (default 18).")] = 18,
    analysis_dir: AnalysisDirOption = None,
) -> None:
    """Make the face in VIDEO speak SPEECH.

    The output is as long as the speech, with the speech as its sound track. Only the lower face changes.

    Example: [bold]talkedit dub input.mp4 speech.wav -o out.mp4[/]
    """
    from .pipeline import DubOptions
    from .pipeline import dub as run_dub

    if sampler not in ("ddim", "ddpm"):
        raise TalkeditError(f"--sampler {sampler!r}: choose ddim or ddpm.")
    output = output or Path(f"{video.stem}.dubbed.mp4")
    options = DubOptions(
        model=model,
        sampler=sampler,
        steps=steps,
        seed=seed,
        device=device,
        fp16=fp16,
        face=face,
        fit=fit,
        batch=batch,
        crf=crf,
        analysis_dir=str(analysis_dir) if analysis_dir else None,
    )
    with StageProgress() as progress:
        result = run_dub(video, speech, output, options, progress=progress)
    stderr.print(
        f"[bold green]Done[/] in {result.seconds:.1f} s: {result.frames_written} frames written, "
        f"{result.frames_generated} with a generated mouth, {result.frames_passed_through} passed through.\n"
        f"Output: [bold]{result.output}[/]",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@reports_errors
def preprocess(
    video: Annotated[Path, typer.Argument(help="Video of the person talking.")],
    output_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output-dir", "-o", help="Cache the analysis here (default: the talkedit cache)."),
    ] = None,
    face: FaceOption = None,
) -> None:
    """Find, track and crop the face in VIDEO, and cache the result for `dub`.

    Writes a contact sheet (preview.png) of aligned crops with the region that will be regenerated drawn in red.

    Example: [bold]talkedit preprocess input.mp4[/]
    """
    from .pipeline import preprocess as run_preprocess

    with StageProgress() as progress:
        analysis = run_preprocess(video, face=face, output_dir=output_dir, progress=progress)
    tracked = int(analysis.tracked.sum())
    stderr.print(
        f"{analysis.frame_count} frames, face tracked in {tracked}.\n"
        f"Preview: [bold]{analysis.directory / 'preview.png'}[/]",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    app()
