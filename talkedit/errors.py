"""Errors a user can act on.

Every error talkedit raises on purpose is a `TalkeditError`: its message is one line that says what happened, to
which file, and what to do next. The CLI prints it in red and exits with `exit_code`; anything else is a bug.
"""

from __future__ import annotations


class TalkeditError(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug in talkedit."""

    exit_code = 1


class WeightsError(TalkeditError):
    """A weights file is missing, unreadable, not in the expected format, or fails its checks."""


class CheckpointError(WeightsError):
    """An official DiffusionVideoEditing checkpoint could not be imported."""


class MediaError(TalkeditError):
    """A video or audio file cannot be read or written, or lacks what talkedit needs."""


class NoFaceError(TalkeditError):
    """No usable face was found in the video."""
