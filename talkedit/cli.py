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


def main() -> None:
    app()
