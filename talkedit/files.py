"""Writing files so that no reader sees half of one, and a failed write leaves nothing behind.

Writes go through Python's own file objects, so that a full or read-only disk raises an OSError with its errno and
the caller can say "No space left on device" (safetensors' and numpy's fast paths report their own error types or
only byte counts). numpy, safetensors and the standard library only: packs are written with these on the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` to write to; moved onto `path` when the block completes, removed when it does
    not. A removal that fails too (a read-only disk) is ignored, so the error reported is the first one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name[:100]}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class _Chunks:
    """A file seen only through write(): numpy then writes an array in chunks through it instead of ndarray.tofile,
    whose failure carries no errno."""

    def __init__(self, file) -> None:
        self.write = file.write


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save whose failure on a full disk is an OSError with its errno."""
    with open(path, "wb") as f:
        np.save(_Chunks(f), array)
